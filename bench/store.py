"""Writing into a store that already holds spans: microseconds and WAL bytes a span, with no collector around
it. The WAL is not checkpointed while measuring, so its growth is what the commits wrote.

`python -m bench store [--prefill 512000] [--spans 61440] [--batch 4096] [--runs 3]`
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.collector import SPANS_PER_REQUEST, make_request, prefilled


def write_cost(prefill: Path, spans: list[object], batch: int, tmp: Path) -> tuple[float, float]:
    """(us a span, WAL bytes a span) writing ``spans`` in batches into a copy of ``prefill``."""
    from payscope.collector.store import open_store

    path = tmp / "run.db"
    shutil.copy(prefill, path)
    wal = Path(f"{path}-wal")
    with open_store(str(path)) as store:
        store._conn().execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[attr-defined]
        before = wal.stat().st_size if wal.exists() else 0
        start = time.perf_counter()
        for i in range(0, len(spans), batch):
            store.write(spans[i:i + batch])  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
        written = wal.stat().st_size - before
    for leftover in (path, wal, Path(f"{path}-shm")):
        if leftover.exists():
            os.remove(leftover)
    return elapsed / len(spans) * 1e6, written / len(spans)


def main(argv: list[str]) -> None:
    from payscope.collector.decoding import decode_request
    from payscope.collector.store.embedded import SCHEMA_VERSION

    parser = argparse.ArgumentParser(prog="python -m bench store")
    parser.add_argument("--prefill", type=int, default=512_000, help="spans the store holds before each run")
    parser.add_argument("--spans", type=int, default=61_440, help="new spans written in each run")
    parser.add_argument("--batch", type=int, default=4096, help="spans a transaction")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    spans = [s for seed in range(5_000, 5_000 + -(-args.spans // SPANS_PER_REQUEST))
             for s in decode_request("traces", make_request(seed), "application/x-protobuf", 10**6).spans]
    with tempfile.TemporaryDirectory() as tmp:
        prefill = prefilled(Path(tmp) / "prefill.db", args.prefill)
        print(f"store writes, schema {SCHEMA_VERSION}: {len(spans):,} new spans in batches of {args.batch:,} into a "
              f"store already holding {args.prefill:,} (WAL, synchronous=FULL)")
        for run in range(args.runs):
            us, wal = write_cost(prefill, spans, args.batch, Path(tmp))
            print(f"  run {run + 1}: {us:5.1f} us a span ({1e6 / us:8,.0f} spans/s) | WAL {wal:6,.0f} bytes a span",
                  flush=True)
