"""Log linking without ids: a payment service at 20 requests/s with about six in flight, 30% of its request
lines carrying their trace id, and background lines that never do (`tests/test_logs.py::_busy_service`),
ingested with `payscope ingest logs`. Reports, per seed, the background lines linked and the recall and
precision of the time-window links of the id-less request lines."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from payscope.collector.store import LogQuery, open_store
from tests.test_logs import _busy_service


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench linking")
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6])
    args = parser.parse_args(argv)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "payscope.db"
            text, truth = _busy_service(store, seed=seed)
            (Path(tmp) / "payment.log").write_text(text)
            subprocess.run([sys.executable, "-m", "payscope", "ingest", "logs", str(Path(tmp) / "payment.log"),
                            "--store", str(store)], check=True, capture_output=True)
            with open_store(str(store), readonly=True) as opened:
                records = {int(r.source.rsplit(":", 1)[1]): r for _, r in opened.search_logs(LogQuery(limit=None))}
        background = [n for n, trace in truth.items() if trace is None]
        scoped = [n for n, trace in truth.items() if trace is not None]
        linked = [n for n in scoped if records[n].link_method == "time_window"]
        right = sum(records[n].trace_id == truth[n] for n in linked)
        print(f"seed {seed}: background lines linked {sum(records[n].trace_id is not None for n in background)} "
              f"of {len(background)}; id-less request lines linked {len(linked)} of {len(scoped)} "
              f"(recall {len(linked) / len(scoped):.2f}), precision {right / max(1, len(linked)):.3f}")
