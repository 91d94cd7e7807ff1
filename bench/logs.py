"""Log ingestion: 1,000,000 mixed lines (JSON, nginx access, Python logging) parsed, linked and stored.

Reports lines/s beside `grep -c` over the same files in the same run (the I/O floor).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

from payscope.analyzers.correlate import Linker
from payscope.collector.decoding import default_workers
from payscope.collector.logingest import ingest
from payscope.collector.store import open_store


def write_files(directory: Path, lines: int, seed: int = 3) -> list[Path]:
    rng = random.Random(seed)
    per = lines // 3
    paths = [directory / "order.jsonl", directory / "gateway-access.log", directory / "payment.log"]
    t0 = 1_795_000_000.0
    with paths[0].open("w") as f:
        for i in range(per):
            stamp = f"2026-11-19T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z"
            f.write(json.dumps({"time": stamp,
                                "level": rng.choice(["info", "info", "warning", "error"]),
                                "msg": f"order ord-{i} {rng.choice(['received', 'confirmed', 'failed'])}",
                                "order_id": f"ord-{i}", "trace_id": format(rng.getrandbits(128), "032x")}) + "\n")
    with paths[1].open("w") as f:
        for i in range(per):
            t = time.gmtime(t0 + i / 10)
            f.write(f'10.0.0.{i % 250} - - [{time.strftime("%d/%b/%Y:%H:%M:%S +0000", t)}] "POST /orders/ord-{i} '
                    f'HTTP/1.1" {rng.choice([200, 200, 200, 504])} 48 "-" "curl/8" rt=0.{rng.randint(10, 999):03d} '
                    f'urt=0.{rng.randint(10, 999):03d} rid={rng.getrandbits(64):016x} us=200\n')
    with paths[2].open("w") as f:
        for i in range(lines - 2 * per):
            f.write(f"2026-11-19 10:{(i // 60) % 60:02d}:{i % 60:02d},{i % 1000:03d} INFO charging order ord-{i} "
                    f"amount {rng.randint(1, 999)}\n")
    return paths


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench logs")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--workers", default=f"0,{default_workers()}",
                        help="`payscope ingest logs --workers` values to compare, comma-separated (0: one process)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(Path(tmp), args.lines)
        t = time.perf_counter()
        for p in paths:
            subprocess.run(["grep", "-c", "", str(p)], capture_output=True, check=True)
        grep_s = time.perf_counter() - t
        print(f"log ingestion, {args.lines:,} lines (JSON, nginx access, Python logging), parse + link + store")
        print(f"  grep -c over the same files (I/O floor): {args.lines / grep_s:12,.0f} lines/s")
        first = None
        for workers in (int(w) for w in args.workers.split(",")):
            with open_store(str(Path(tmp) / f"logs-{workers}.db")) as store:
                t = time.perf_counter()
                report = ingest(store, [str(p) for p in paths], linker=Linker(store), workers=workers)
                ingest_s = time.perf_counter() - t
            doc = report.to_json()
            rate = doc["lines"] / ingest_s
            first = first or rate
            print(f"  payscope ingest logs --workers {workers}:       {rate:12,.0f} lines/s "
                  f"({ingest_s:.1f}s; {grep_s / ingest_s:.4f} of the floor; x{rate / first:.2f} of the first); "
                  f"{doc['unparsed']} unparsed; by format {doc['by_format']}", flush=True)
