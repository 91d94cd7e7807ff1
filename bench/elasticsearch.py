"""Ingest into Elasticsearch through one and two collectors, beside the embedded store in the same run, and
`payscope analyze` over what was ingested, on both.

Needs the real Elasticsearch the tests use (`python3 -m tests.elastic provision`). Every rate is also given
as a ratio to the embedded store's, measured in the same run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.collector import SPANS_PER_REQUEST, load, make_request
from payscope.demo.netdelay import DelayingRelay
from tests import elastic
from tests.helpers import CollectorProcess, free_port

WARM_UP_S = 20.0  # of ingest into a fresh node, before the ingest that is measured


def ingest(stores: list[str], payloads: list[bytes], clients: int, seconds: float) -> float:
    """Spans/s acknowledged by collectors on ``stores`` (one collector each), the clients split among them."""
    collectors = [CollectorProcess(store, grpc=False) for store in stores]
    acked = [0] * len(collectors)
    try:
        def run(i: int) -> None:
            share = clients // len(collectors) + (1 if i < clients % len(collectors) else 0)
            acked[i] = load(collectors[i].http_port, payloads[i::len(collectors)], max(share, 1), seconds)[0]

        start = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(collectors))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        for collector in collectors:
            collector.stop()
    return sum(acked) * SPANS_PER_REQUEST / elapsed


def analyze_seconds(store: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "payscope", "analyze", "--store", store, "--format", "json"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def read_cost(node: elastic.Node, command: list[str], options: str = "") -> tuple[float, int]:
    """Seconds a payscope command takes on the node's data, and the bytes Elasticsearch sent it (counted by a
    relay with no delay in front of the node); ``options`` ends the store URL (``?compress=off``)."""
    port = free_port()
    with DelayingRelay(port, int(node.url.rsplit(":", 1)[1]), lambda: 0.0) as relay:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "payscope", *command, "--store",
                        f"es://127.0.0.1:{port}{options}", "--format", "json"], check=True, capture_output=True)
        return time.perf_counter() - start, relay.answered_bytes


def derive_all(store: str) -> tuple[float, int]:
    """Seconds to derive every stored trace's calls (what collectors do as traces settle), and how many."""
    from payscope.analyzers.derived import derive
    from payscope.collector.store import open_store

    start = time.perf_counter()
    with open_store(store) as opened:
        ids = sorted(t.trace_id for t in opened.traces(limit=None))
        done = sum(derive(opened, ids[i:i + 1000]) for i in range(0, len(ids), 1000))
    return time.perf_counter() - start, done


def copy_store(source: str, es: str) -> tuple[float, int]:
    """Write every span of the store ``source`` into ``es`` (what a collector would have stored), in batches; the
    seconds it took and the spans written."""
    from payscope.collector.store import open_store

    start = time.perf_counter()
    written = 0
    with open_store(source, readonly=True) as src, open_store(es) as dst:
        batch: list[object] = []
        for summary in src.traces(limit=None):
            batch += src.trace(summary.trace_id)
            if len(batch) >= 5000:
                written += dst.write(batch)[0]  # type: ignore[arg-type]
                batch = []
        written += dst.write(batch)[0]  # type: ignore[arg-type]
    return time.perf_counter() - start, written


def large(source: str) -> None:
    """`analyze` on a large store copied into Elasticsearch: from its spans, then with every trace derived. Wall
    time, peak memory of the command, and the bytes Elasticsearch sent (gzipped, as a reader asks for them)."""
    from bench.analyzer import measure

    base_wall, base_peak = measure(["analyze", "--store", source, "--format", "json"])
    with elastic.running(name="payscope-bench", heap="1g") as node:
        es = node.url.replace("http://", "es://")
        copy_seconds, spans = copy_store(source, es)
        print(f"copied {spans:,} spans from {source} in {copy_seconds:.0f} s ({spans / copy_seconds:,.0f} spans/s)")
        node.request("DELETE", "/_data_stream/payscope-derived")
        rows = []
        for label in ("from the spans", "every trace derived"):
            if label != "from the spans":
                seconds, traces = derive_all(es)
                print(f"derived {traces:,} traces in {seconds:.0f} s ({seconds / traces * 1e3:.2f} ms a trace)")
            port = free_port()
            with DelayingRelay(port, int(node.url.rsplit(":", 1)[1]), lambda: 0.0) as relay:
                wall, peak = measure(["analyze", "--store", f"es://127.0.0.1:{port}", "--format", "json"])
                rows.append((label, wall, peak, relay.answered_bytes))
    print(f"payscope analyze on {spans:,} spans in Elasticsearch (one node, 1 GiB heap, this machine); the baseline "
          f"is the embedded store it was copied from, read from its spans: {base_wall:.1f} s, peak {base_peak:.0f} MiB")
    for label, wall, peak, sent in rows:
        print(f"  {label:22} {wall:7.1f} s ({wall / base_wall:.2f} x baseline)  peak {peak:6.0f} MiB  "
              f"{sent / 2**20:8.1f} MiB sent ({sent / spans:.0f} bytes a span; {sent / rows[0][3]:.3f} x)")


def _fill(args: tuple[str, str, int, int]) -> int:
    """Write ``count`` spans into ``es``: the traces of the store ``template`` again and again, each copy under new
    random trace ids, through payscope's own writer (as a collector stores them). Run in a process of its own."""
    import dataclasses
    import random

    from payscope.collector.store import open_store

    template, es, count, seed = args
    rng = random.Random(seed)
    with open_store(template, readonly=True) as src:
        traces = [src.trace(t.trace_id) for t in src.traces(limit=None)]
    written = 0
    with open_store(es) as dst:
        while written < count:
            batch: list[object] = []
            for spans in traces:
                trace_id = f"{rng.getrandbits(128):032x}"
                batch += [dataclasses.replace(s, trace_id=trace_id) for s in spans]
                if len(batch) >= 5000:
                    written += dst.write(batch)[0]  # type: ignore[arg-type]
                    batch = []
                    if written >= count:
                        break
    return written


def scale(template: str, sizes: list[int], sample: int, writers: int = 2) -> None:
    """`analyze --sample` as one node fills up to each of ``sizes`` spans: wall time, peak memory, and the bytes
    Elasticsearch sent (gzipped, as a reader asks for them). The baseline is the whole analysis at the first size."""
    from concurrent.futures import ProcessPoolExecutor

    from bench.analyzer import measure

    def analyze(node: elastic.Node, *options: str) -> tuple[float, float, int]:
        port = free_port()
        with DelayingRelay(port, int(node.url.rsplit(":", 1)[1]), lambda: 0.0) as relay:
            wall, peak = measure(["analyze", "--store", f"es://127.0.0.1:{port}", "--format", "json", *options])
            return wall, peak, relay.answered_bytes

    rows = []
    with elastic.running(name="payscope-bench", heap="1g") as node:
        es = node.url.replace("http://", "es://")
        stored = 0
        for size in sizes:
            start = time.perf_counter()
            share = (size - stored + writers - 1) // writers
            with ProcessPoolExecutor(writers) as pool:
                stored += sum(pool.map(_fill, [(template, es, share, size * 10 + i) for i in range(writers)]))
            node.request("POST", "/_refresh")
            print(f"filled to {stored:,} spans ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
            if not rows:
                rows.append((stored, "every trace", *analyze(node)))
                print(rows[-1], flush=True)
            rows.append((stored, f"--sample {sample:,}", *analyze(node, "--sample", str(sample))))
            print(rows[-1], flush=True)
    base = rows[0]
    print(f"payscope analyze on Elasticsearch 8.12.2 (one node, 1 GiB heap, this machine) as it fills; the baseline is "
          f"the whole analysis of {base[0]:,} spans")
    for spans, label, wall, peak, sent in rows:
        print(f"  {spans:>12,} spans  {label:16} {wall:7.1f} s ({wall / base[2]:.2f} x)  peak {peak:6.0f} MiB  "
              f"{sent / 2**20:8.1f} MiB sent ({sent / base[4]:.3f} x)")


def halves(store: str) -> list[str]:
    """`compare`'s windows: the second half of the stored traces against the first."""
    from payscope.collector.store import open_store

    with open_store(store, readonly=True) as opened:
        starts = sorted(t.start_ns for t in opened.traces(limit=None))
    middle = starts[len(starts) // 2]
    return ["compare", "--baseline", f"{starts[0] / 1e9:.6f}..{middle / 1e9:.6f}",
            "--incident", f"{middle / 1e9:.6f}..{(starts[-1] + 1000) / 1e9:.6f}"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench elasticsearch")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--payloads", type=int, default=400)
    parser.add_argument("--large", metavar="STORE", help="instead: copy this embedded store into Elasticsearch and "
                        "measure `analyze` on it, from the spans and derived (bench/out/analyzer-1000000-v8.db)")
    parser.add_argument("--scale", metavar="SIZES", help="instead: fill a node to each of these numbers of spans "
                        "(comma-separated) from the store --template, and measure `analyze --sample` at each")
    parser.add_argument("--template", default="bench/out/analyzer-250000-v8.db")
    parser.add_argument("--sample", type=int, default=50_000)
    args = parser.parse_args(argv)
    if args.scale:
        scale(args.template, [int(n) for n in args.scale.split(",")], args.sample)
        return
    if args.large:
        large(args.large)
        return
    payloads = [make_request(i) for i in range(args.payloads)]
    with tempfile.TemporaryDirectory() as tmp, elastic.running(name="payscope-bench", heap="1g") as node:
        embedded = str(Path(tmp) / "bench.db")
        es = node.url.replace("http://", "es://")
        base = ingest([embedded], payloads, args.clients, args.seconds)
        # a node just started indexes slowly until its JIT has warmed up (three 10 s runs on a fresh node: 4.6k,
        # 7.8k, 10.8k spans/s): that is not what is measured here
        ingest([es], payloads, args.clients, WARM_UP_S)
        elastic.wipe(node)
        one = ingest([es], payloads, args.clients, args.seconds)
        elastic.wipe(node)
        two = ingest([es, es], payloads, args.clients, args.seconds)
        spans = node.request("GET", "/traces-payscope.otel-default/_count")
        count = spans["count"] if isinstance(spans, dict) else 0
        from payscope.collector.store import open_store
        from payscope.timeparse import format_ns

        with open_store(embedded, readonly=True) as opened:
            base_count = opened.counts()["spans"]
        base_analyze = analyze_seconds(embedded)
        node.request("DELETE", "/_data_stream/payscope-derived")  # what the collectors derived meanwhile
        es_analyze = analyze_seconds(es)
        compare = halves(es)
        middle = compare[-1].split("..")[0]  # where the incident window starts
        reads = [(label, *read_cost(node, command)) for label, command in (
            ("analyze (reads every span)", ["analyze"]),
            ("compare, --sample 0", [*compare, "--sample", "0"]),
            ("compare, --sample 1000", [*compare, "--sample", "1000"]),
            ("compare, --sample 100", [*compare, "--sample", "100"]),
            ("analyze --since the middle", ["analyze", "--since", format_ns(int(float(middle) * 1e9))]))]
        derive_seconds, derived = derive_all(es)
        reads.append(("analyze, every trace derived", *read_cost(node, ["analyze"])))
        reads.append(("the same, ?compress=off", *read_cost(node, ["analyze"], "?compress=off")))
        reads.append(("analyze --since, derived", *read_cost(node, ["analyze", "--since",
                                                                    format_ns(int(float(middle) * 1e9))])))
    print(f"ingest, {args.clients} clients x {args.seconds:.0f}s, {SPANS_PER_REQUEST} spans/request, "
          "OTLP/HTTP protobuf, acknowledged and durable; Elasticsearch 8.12.2, one node, 1 GiB heap, this machine")
    print(f"  embedded store, one collector (baseline):   {base:10,.0f} spans/s")
    print(f"  Elasticsearch, one collector:                {one:10,.0f} spans/s  ({one / base:.2f} x baseline)")
    print(f"  Elasticsearch, two collectors:               {two:10,.0f} spans/s  ({two / base:.2f} x baseline)")
    print(f"  payscope analyze: embedded {base_analyze:.1f} s on {base_count:,} spans "
          f"({base_count / base_analyze:,.0f} spans/s); Elasticsearch {es_analyze:.1f} s on {count:,} spans "
          f"({count / es_analyze:,.0f} spans/s, {count / es_analyze / (base_count / base_analyze):.2f} x)")
    print(f"  deriving every trace's calls afterwards: {derive_seconds:.1f} s for {derived:,} traces")
    print(f"read from Elasticsearch ({count:,} spans), bytes it sent back; the first line is the baseline:")
    for label, seconds, sent in reads:
        print(f"  {label:28} {seconds:6.1f}s {sent / 2**20:8.1f} MiB  ({sent / reads[0][2]:.3f} x)")
