"""Run a benchmark: `python -m bench collector|analyzer [options]` (all of them without a name)."""

from __future__ import annotations

import sys


def main() -> None:
    names = sys.argv[1:2] or ["collector", "analyzer", "logs", "tui", "instrumentation"]
    rest = sys.argv[2:]
    for name in names:
        if name == "collector":
            from bench import collector

            collector.main(rest)
        elif name == "analyzer":
            from bench import analyzer

            analyzer.main(rest)
        elif name == "logs":
            from bench import logs

            logs.main(rest)
        elif name == "tui":
            from bench import tui

            tui.main(rest)
        elif name == "instrumentation":
            from bench import instrumentation

            instrumentation.main(rest)
        else:
            sys.exit(f"unknown benchmark {name!r}: use collector, analyzer, logs, tui or instrumentation")


main()
