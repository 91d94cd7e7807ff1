"""`payscope compare` on two windows of about 500k spans each, beside the floor: reading the same spans from the
store in the same run. Once with the default sample of each window's traces, once reading them all
(``--sample 0``). Uses (and builds once) the analyzer benchmark's 1M-span store."""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.analyzer import FLOOR, build, measure
from payscope.collector.store import open_store


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench compare")
    parser.add_argument("--size", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    path = build(args.size)
    with open_store(str(path), readonly=True) as store:
        starts = sorted(t.start_ns for t in store.traces(limit=None))
    middle = starts[len(starts) // 2]
    baseline = f"{starts[0] / 1e9:.6f}..{middle / 1e9:.6f}"
    incident = f"{middle / 1e9:.6f}..{(starts[-1] + 1000) / 1e9:.6f}"
    out = subprocess.run([sys.executable, "-c", FLOOR, str(path)], capture_output=True, text=True, check=True)
    floor_s, floor_kb, count = out.stdout.split()
    command = ["compare", "--store", str(path), "--baseline", baseline, "--incident", incident, "--format", "json"]
    sampled_s, sampled_mb = measure(command)
    whole_s, whole_mb = measure([*command, "--sample", "0"])
    print(f"compare on {int(count):,} spans ({len(starts):,} transactions, two windows of half each)")
    print(f"  read floor {float(floor_s):6.1f}s {int(floor_kb) / 1024:6.0f} MiB")
    for label, seconds, mb in (("default sample", sampled_s, sampled_mb), ("--sample 0", whole_s, whole_mb)):
        print(f"  compare, {label:15} {seconds:6.1f}s ({seconds / float(floor_s):.2f}x floor) | peak {mb:5.0f} MiB")
