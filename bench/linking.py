"""Log linking without ids: a payment service at 20 requests/s with about six in flight, 30% of its request
lines carrying their trace id, and background lines that never do (`tests/test_logs.py::_busy_service`),
ingested with `payscope ingest logs`. Reports, per seed, the background lines linked and the recall and
precision of the time-window links of the id-less request lines, and how fast the file was ingested beside the
same file ingested into a store without its spans (where no line waits for the time window: the baseline)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from payscope.collector.store import LogQuery, open_store
from tests.test_logs import _busy_service


def _ingest(log: Path, store: Path) -> float:
    """Seconds `payscope ingest logs` took to read ``log`` into ``store``."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "payscope", "ingest", "logs", str(log), "--store", str(store)],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench linking")
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the service ran (30: about 1,500 lines)")
    args = parser.parse_args(argv)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "payscope.db"
            text, truth = _busy_service(store, seconds=args.seconds, seed=seed)
            log = Path(tmp) / "payment.log"
            log.write_text(text)
            baseline = _ingest(log, Path(tmp) / "no-spans.db")
            took = _ingest(log, store)
            with open_store(str(store), readonly=True) as opened:
                records = {int(r.source.rsplit(":", 1)[1]): r for _, r in opened.search_logs(LogQuery(limit=None))}
        background = [n for n, trace in truth.items() if trace is None]
        scoped = [n for n, trace in truth.items() if trace is not None]
        linked = [n for n in scoped if records[n].link_method == "time_window"]
        right = sum(records[n].trace_id == truth[n] for n in linked)
        print(f"seed {seed}: background lines linked {sum(records[n].trace_id is not None for n in background)} "
              f"of {len(background)}; id-less request lines linked {len(linked)} of {len(scoped)} "
              f"(recall {len(linked) / len(scoped):.2f}), precision {right / max(1, len(linked)):.3f}; "
              f"{text.count(chr(10)) / took:,.0f} lines/s ({took:.1f} s; x{baseline / took:.2f} of the same file "
              f"into a store without its spans, {baseline:.1f} s)")
