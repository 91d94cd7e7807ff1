"""`payscope analyze` and `payscope recommend timeouts` on large stores (250k and 1M spans, 20 services).

Reports wall time and peak memory of each command, beside the floor: reading the same span facts from the store
into memory; `analyze` both on the spans alone (traces still arriving) and once every trace is settled and
derived, and what deriving them cost; and `analyze --since` the store's last ten minutes, which should not grow
with the store. Stores are built once per size under bench/out/ and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from payscope.collector.otlp import parse_json_message, spans_from_request
from payscope.collector.store import open_store
from payscope.synth import Call, Service, Simulator, Topology

OUT = Path(__file__).parent / "out"


def flows() -> list[Topology]:
    """Four request flows over a shop of 20 services; a transaction is about 10 spans."""
    s = {x.name: x for x in [
        Service("edge", 1, route="/api/{order_id}", calls=[Call("gateway", 3000)]),
        Service("gateway", 2, route="/route", calls=[]),
        Service("order", 5, route="/orders/{order_id}", calls=[Call("payment", 2500)]),
        Service("payment", 6, route="/payments", calls=[Call("fraud", 700), Call("bank", 400, attempts=3)]),
        Service("fraud", 8, route="/score"),
        Service("bank", 90, sigma=0.5, tail_p=0.05, tail_ms=500, route="/v1/charges"),
        Service("catalog", 3, route="/items", calls=[Call("pricing", 300)]),
        Service("pricing", 4, route="/price", calls=[Call("promo", 300)]),
        Service("promo", 2, route="/promo", calls=[Call("tax", 300)]),
        Service("tax", 2, route="/tax"),
        Service("cart", 4, route="/cart", calls=[Call("shipping", 300)]),
        Service("shipping", 4, route="/ship", calls=[Call("warehouse", 300)]),
        Service("warehouse", 4, route="/pick", calls=[Call("audit", 300)]),
        Service("audit", 2, route="/audit"),
        Service("session", 3, route="/session", calls=[Call("loyalty", 300)]),
        Service("loyalty", 3, route="/points", calls=[Call("notify", 500)]),
        Service("notify", 3, route="/notify", calls=[Call("email", 500)]),
        Service("email", 20, route="/send"),
        Service("ledger", 5, route="/entries"),
        Service("risk-model", 15, route="/predict"),
    ]}
    out = []
    for first in ("order", "catalog", "cart", "session"):
        services = {k: Service(**{**v.__dict__, "calls": list(v.calls)}) for k, v in s.items()}
        services["gateway"].calls = [Call(first, 2800)]
        out.append(Topology(services, "edge"))
    return out


def short_flows() -> list[Topology]:
    """What a load test leaves: many traces of one to three spans (an endpoint alone, or calling one other)."""
    s = {x.name: x for x in [
        Service("api", 3, route="/api/items/{id}"),
        Service("checkout", 6, route="/checkout/{order_id}", calls=[Call("payment", 800)]),
        Service("payment", 12, sigma=0.6, tail_p=0.02, tail_ms=400, route="/payments"),
        Service("search", 4, route="/search", calls=[Call("index", 300)]),
        Service("index", 2, route="/query"),
        Service("health", 0.2, route="/healthz"),
    ]}
    return [Topology(s, entry) for entry in ("api", "checkout", "search", "health")]


SHAPES = {"ten": flows, "short": short_flows}


def build(size: int, shape: str = "ten") -> Path:
    OUT.mkdir(exist_ok=True)
    from payscope.collector.store.embedded import SCHEMA_VERSION

    name = f"analyzer-{size}" if shape == "ten" else f"analyzer-{shape}-{size}"
    path = OUT / f"{name}-v{SCHEMA_VERSION}.db"
    if path.exists():
        return path
    tmp = path.with_suffix(".building")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = open_store(str(tmp))
    written = 0
    seed = 0
    start = time.perf_counter()
    topologies = SHAPES[shape]()
    while written < size:
        sim = Simulator(topologies[seed % len(topologies)], seed=seed)
        sim.run(2000, start_ns=1_767_000_000_000_000_000 + seed * 60_000_000_000)
        batch = [e for line in sim.otlp_lines() for e in
                 spans_from_request(parse_json_message(json.loads(line), ExportTraceServiceRequest)).spans]
        store.write(batch)
        written += len(batch)
        seed += 1
    store.close()
    tmp.rename(path)
    print(f"  built {path.name}: {written} spans in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return path


FLOOR = """
import sys, time, resource
from payscope.collector.store import open_store
t = time.perf_counter()
with open_store(sys.argv[1], readonly=True) as store:
    rows = [r for batch in store.iter_rows() for r in batch]
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(rows))
"""




WINDOW_MINUTES = 10  # a store built by build() holds a few thousand traces a minute of its time, whatever its size


def last_minutes(path: Path, minutes: int) -> tuple[str, int]:
    """`--since` for the last ``minutes`` of the store's traces, and how many traces started in them."""
    from payscope.timeparse import format_ns

    with open_store(str(path), readonly=True) as store:
        newest = store.traces(limit=1)[0].start_ns
        since_ns = (newest - minutes * 60 * 10**9) // 10**6 * 10**6  # to the millisecond, as format_ns writes it
        return format_ns(since_ns), len(store.traces(since_ns=since_ns, limit=None))


def settle_store(path: Path) -> float:
    """Derive every trace of the store (``analyzers.derived.settle``); the seconds it took."""
    from payscope.analyzers.derived import settle

    with open_store(str(path)) as store:
        t = time.perf_counter()
        settle(store)
        return time.perf_counter() - t


def measure(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of `payscope ARGS` in a child process (its own peak, as its parent is
    told when it ends: a command may end the process without unwinding)."""
    with tempfile.TemporaryFile() as errors:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "payscope", *args], stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            errors.seek(0)
            raise SystemExit(f"payscope {' '.join(args)}: exit {proc.returncode}: {errors.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench analyzer")
    parser.add_argument("--sizes", default="250000,1000000")
    parser.add_argument("--shapes", default="ten,short",
                        help="ten: 20 services, ~10 spans a transaction; short: traces of one to three spans")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    for shape in args.shapes.split(","):
        run_shape(shape, sizes)


def run_shape(shape: str, sizes: list[int]) -> None:
    print("analyzer on stores of synthetic traces " + (
        "(20 services, four flows, ~10 spans a transaction)" if shape == "ten" else
        "(six services, four endpoints, one to three spans a trace)"))
    results = {}
    for size in sizes:
        path = build(size, shape)
        with path.open("rb") as f:  # into the page cache first: the floor and the commands read it alike
            while f.read(1 << 24):
                pass
        out = subprocess.run([sys.executable, "-c", FLOOR, str(path)], capture_output=True, text=True, check=True)
        floor_s, floor_kb, count = out.stdout.split()
        with sqlite3.connect(path) as conn:  # first as a store whose traces are still arriving: spans only
            conn.execute("DELETE FROM derived")
        spans_s, spans_mb = measure(["analyze", "--store", str(path), "--format", "json"])
        derive_s = settle_store(path)  # what the collector does once each trace settles
        analyze_s, analyze_mb = measure(["analyze", "--store", str(path), "--format", "json"])
        recommend_s, recommend_mb = measure(["recommend", "timeouts", "--store", str(path), "--format", "json"])
        since, in_window = last_minutes(path, WINDOW_MINUTES)
        window_s, window_mb = measure(["analyze", "--store", str(path), "--format", "json", "--since", since])
        results[size] = analyze_s
        print(f"  {int(count):>9,} spans: load floor {float(floor_s):6.1f}s {int(floor_kb) / 1024:6.0f} MiB | "
              f"analyze from the spans {spans_s:6.1f}s ({spans_s / float(floor_s):.1f}x floor), peak "
              f"{spans_mb:5.0f} MiB | deriving every trace {derive_s:5.1f}s ({derive_s / int(count) * 1e6:.1f} us a "
              f"span) | analyze settled {analyze_s:6.1f}s ({analyze_s / float(floor_s):.1f}x floor, "
              f"x{spans_s / analyze_s:.2f} of from the spans) | "
              f"recommend {recommend_s:6.1f}s | peak {analyze_mb:5.0f} / {recommend_mb:5.0f} MiB | "
              f"analyze --since the last {WINDOW_MINUTES} min ({in_window:,} traces) {window_s:5.1f}s "
              f"({window_s / analyze_s:.2f}x analyze), peak {window_mb:4.0f} MiB")
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        print(f"  growth {small:,} -> {large:,} spans: x{results[large] / results[small]:.2f} time "
              f"for x{large / small:.1f} spans")
