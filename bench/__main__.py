"""Run a benchmark: `python -m bench collector|analyzer [options]` (all of them without a name)."""

from __future__ import annotations

import sys


def main() -> None:
    names = sys.argv[1:2] or ["collector", "analyzer"]
    rest = sys.argv[2:]
    for name in names:
        if name == "collector":
            from bench import collector

            collector.main(rest)
        elif name == "analyzer":
            from bench import analyzer

            analyzer.main(rest)
        else:
            sys.exit(f"unknown benchmark {name!r}: use collector or analyzer")


main()
