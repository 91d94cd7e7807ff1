"""Run a benchmark: `python -m bench collector|analyzer|... [options]` (all of them without a name)."""

from __future__ import annotations

import importlib
import sys

NAMES = ["collector", "analyzer", "compare", "logs", "linking", "tui", "instrumentation", "relay", "elasticsearch",
         "sidecar", "store", "nezha"]


def main() -> None:
    names = sys.argv[1:2] or NAMES
    rest = sys.argv[2:]
    for name in names:
        if name not in NAMES:
            sys.exit(f"unknown benchmark {name!r}: use {', '.join(NAMES)}")
        importlib.import_module(f"bench.{name}").main(rest)


main()
