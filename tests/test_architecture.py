"""Imports point one way: cli -> tui -> analyzers -> collector.store -> payscope core; instrumentation alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = {"instrumentation": "payscope.instrumentation", "collector": "payscope.collector",
            "analyzers": "payscope.analyzers", "tui": "payscope.tui"}

# What each part may import of payscope (prefixes); anything else of payscope is a wrong-way import.
ALLOWED = {
    "instrumentation": ("payscope.instrumentation",),
    "collector/store": ("payscope.collector.store", "payscope.model", "payscope.semconv", "payscope.errors",
                        "payscope.instrumentation.redaction"),
    "collector": ("payscope.collector", "payscope.model", "payscope.semconv", "payscope.errors",
                  "payscope.instrumentation.redaction"),
    "analyzers": ("payscope.analyzers", "payscope.collector.store", "payscope.model", "payscope.semconv",
                  "payscope.errors", "payscope.timeparse", "payscope.instrumentation.config"),
    "tui": ("payscope.tui", "payscope.analyzers", "payscope.collector.store", "payscope.model", "payscope.errors",
            "payscope.timeparse", "payscope.report"),
}


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1]) if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module == "payscope":  # from payscope import semconv
                found.update(f"payscope.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
    return {name for name in found if name.startswith("payscope")}


def _cases() -> list[tuple[str, Path, str]]:
    cases = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            sub = ".".join(rel.parts[:-1])
            pkg = f"{package}.{sub}" if sub else package
            part = "collector/store" if folder == "collector" and rel.parts[0] == "store" else folder
            cases.append((part, path, pkg))
    return cases


@pytest.mark.parametrize("part, path, package", _cases(), ids=lambda v: str(v).split("/work/main/")[-1])
def test_imports_point_one_way(part: str, path: Path, package: str) -> None:
    wrong = {name for name in _imports(path, package) if not name.startswith(ALLOWED[part])}
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
