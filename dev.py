#!/usr/bin/env python3
"""Set up a virtual environment and run payscope's demo, tests or benchmarks: `python3 dev.py demo|test|bench`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


def run(*args: str | Path, env: dict[str, str] | None = None) -> None:
    code = subprocess.call([str(a) for a in args], cwd=ROOT, env={**os.environ, **(env or {})})
    if code:
        sys.exit(code)


def setup() -> None:
    """Create .venv and install payscope with everything, again only when pyproject.toml changed."""
    if not PYTHON.exists():
        print("creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".payscope-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    stamp.write_text(digest)


def demo(extra: list[str]) -> None:
    """The demo system, investigated, into ./payscope.db (then: .venv/bin/payscope tui)."""
    print("$ payscope demo " + " ".join(extra), flush=True)
    run(BIN / "payscope", "demo", *extra)


def test(extra: list[str]) -> None:
    run(BIN / "ruff", "check", ".")
    run(BIN / "mypy")
    # both cores (or all): tests that share a server or a fixture stay in one process (tests/conftest.py)
    spread = [] if any(a == "-n" or a.startswith(("-n", "--numprocesses", "-p")) for a in extra) \
        else ["-n", "auto", "--dist", "loadgroup"]
    run(PYTHON, "-m", "pytest", *spread, *extra)


def bench(extra: list[str]) -> None:
    run(PYTHON, "-m", "bench", *extra)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("setup", "demo", "test", "bench"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    setup()
    command, extra = sys.argv[1], sys.argv[2:]
    if command == "demo":
        demo(extra)
    elif command == "test":
        test(extra)
    elif command == "bench":
        bench(extra)


if __name__ == "__main__":
    main()
