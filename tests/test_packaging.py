"""The wheel: every package of the source tree in it, quiet to build, and the demo runs from a regular install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# source folder -> the package it installs as
FOLDERS = {"payscope": "payscope", "collector": "payscope.collector", "analyzers": "payscope.analyzers",
           "tui": "payscope.tui", "instrumentation": "payscope.instrumentation"}


def _source_packages() -> set[str]:
    """Every directory of the source tree Python would import as a package (a .py file or data in it)."""
    found = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.parent.relative_to(ROOT / folder)
                found.add(".".join([package, *rel.parts]))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools' build/ folder in the checkout could hand stale modules to the wheel
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", "build", "*.egg-info", ".git", "tests",
                                                                "__pycache__", "*.db*", "*-demo-logs", "bench"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("payscope-*.whl")), proc.stdout + proc.stderr


def test_every_source_package_is_in_the_wheel(wheel: tuple[Path, str]) -> None:
    names = zipfile.ZipFile(wheel[0]).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"payscope"}
    packaged = {".".join(n.split("/")[:-1]) for n in names if not n.split("/")[0].endswith(".dist-info")}
    missing = _source_packages() - packaged
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "payscope/demo/services/bank.py" in names
    assert "payscope/samples/checkout.otlp.jsonl.gz" in names


def test_building_the_wheel_warns_of_nothing(wheel: tuple[Path, str]) -> None:
    log = wheel[1]
    assert "Warning" not in log and "deprecated" not in log, log


def test_demo_log_folder_is_ignored_by_git(tmp_path: Path) -> None:
    proc = subprocess.run(["git", "check-ignore", "-q", "payscope-demo-logs/gateway.log"], cwd=ROOT)
    assert proc.returncode == 0


@pytest.mark.slow
def test_demo_runs_from_a_regular_install(wheel: tuple[Path, str], tmp_path: Path) -> None:
    """The wheel into a fresh venv outside the checkout; its dependencies come from this environment's
    site-packages through a .pth line (which adds the folder, not the editable install's hooks in it)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel[0])], check=True, capture_output=True, timeout=300)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    (Path(own) / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([str(python), "-c", "import payscope.demo, sys; print(payscope.demo.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(own), where  # the installed copy, not the checkout
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([str(env_dir / "bin" / "payscope"), "demo", "--duration", "5"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "orders placed" in proc.stderr and "recommended timeouts" in proc.stdout
    assert (work / "payscope.db").exists()
