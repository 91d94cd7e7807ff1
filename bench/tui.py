"""TUI responsiveness: first paint on a store of 1M spans, and key-to-render latency in a 50,000-span trace."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from payscope.collector.store import open_store
from payscope.model import Span

OUT = Path(__file__).parent / "out"


def big_trace_store(spans: int) -> Path:
    from payscope.collector.store.embedded import SCHEMA_VERSION

    path = OUT / f"tui-trace-{spans}-v{SCHEMA_VERSION}.db"
    if path.exists():
        return path
    OUT.mkdir(exist_ok=True)
    trace = "7" * 32
    rows = []
    t0 = 1_795_000_000_000_000_000
    for i in range(spans):
        parent = None if i == 0 else format((i - 1) // 8 + 1, "016x")
        kind = "server" if i % 2 == 0 else "client"
        start = t0 + i * 1_000_000
        rows.append(Span(trace, format(i + 1, "016x"), parent, f"svc-{i % 20}", f"op {i % 50}", kind, start,
                         start + 5_000_000 + (i % 7) * 1_000_000, 2 if i % 997 == 0 else 1, "",
                         {"http.request.method": "POST", "server.address": f"svc-{(i + 1) % 20}"}, [],
                         {"service.name": f"svc-{i % 20}"}))
    with open_store(str(path)) as store:
        for i in range(0, len(rows), 5000):
            store.write(rows[i:i + 5000])
    return path


async def first_paint(store: Path) -> float:
    from payscope.tui.app import FailuresScreen, build

    t = time.perf_counter()
    app = build(str(store), refresh_seconds=3600)
    async with app.run_test(size=(140, 44)) as pilot:
        while not (isinstance(app.screen, FailuresScreen) and app.screen.rows):
            await pilot.pause(0.01)
            if time.perf_counter() - t > 120:
                raise RuntimeError("the failures never appeared")
        return time.perf_counter() - t


async def key_latency(store: Path, trace_id: str, presses: int) -> tuple[float, list[float], float]:
    from payscope.tui.app import TransactionScreen, build
    from payscope.tui.widgets import Waterfall

    app = build(str(store), refresh_seconds=3600)
    async with app.run_test(size=(140, 44)) as pilot:
        t = time.perf_counter()
        app.push_screen(TransactionScreen(trace_id))
        while not app.screen.query(Waterfall):
            await pilot.pause(0.01)
        open_s = time.perf_counter() - t
        latencies = []
        cpu0 = time.process_time()
        for _ in range(presses):
            t = time.perf_counter()
            await pilot.press("down")
            await pilot.pause(0)
            latencies.append(time.perf_counter() - t)
        return open_s, latencies, (time.process_time() - cpu0) / presses


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench tui")
    from payscope.collector.store.embedded import SCHEMA_VERSION

    parser.add_argument("--store", default=str(OUT / f"analyzer-1000000-v{SCHEMA_VERSION}.db"),
                        help="a store of ~1M spans")
    parser.add_argument("--trace-spans", type=int, default=50_000)
    args = parser.parse_args(argv)
    if not Path(args.store).exists():
        sys.exit(f"{args.store} does not exist: run `python -m bench analyzer` first (it builds it)")
    paint = asyncio.run(first_paint(Path(args.store)))
    print(f"tui: first paint of the failures on a {Path(args.store).name}: {paint:.2f}s")
    for spans in (50, args.trace_spans):  # the small trace is the baseline: Pilot's own round trip
        open_s, lat, cpu = asyncio.run(key_latency(big_trace_store(spans), "7" * 32, 100))
        print(f"tui: a {spans:,}-span trace opens in {open_s:.2f}s; key to render (100 x down, through Pilot): "
              f"median {statistics.median(lat) * 1000:.1f} ms, p90 {sorted(lat)[89] * 1000:.1f} ms; "
              f"CPU {cpu * 1000:.1f} ms a key")
