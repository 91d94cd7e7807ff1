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
from tests import elastic
from tests.helpers import CollectorProcess


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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench elasticsearch")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--payloads", type=int, default=400)
    args = parser.parse_args(argv)
    payloads = [make_request(i) for i in range(args.payloads)]
    with tempfile.TemporaryDirectory() as tmp, elastic.running(name="payscope-bench", heap="1g") as node:
        embedded = str(Path(tmp) / "bench.db")
        es = node.url.replace("http://", "es://")
        base = ingest([embedded], payloads, args.clients, args.seconds)
        one = ingest([es], payloads, args.clients, args.seconds)
        elastic.wipe(node)
        two = ingest([es, es], payloads, args.clients, args.seconds)
        spans = node.request("GET", "/traces-payscope.otel-default/_count")
        count = spans["count"] if isinstance(spans, dict) else 0
        from payscope.collector.store import open_store

        with open_store(embedded, readonly=True) as opened:
            base_count = opened.counts()["spans"]
        base_analyze = analyze_seconds(embedded)
        es_analyze = analyze_seconds(es)
    print(f"ingest, {args.clients} clients x {args.seconds:.0f}s, {SPANS_PER_REQUEST} spans/request, "
          "OTLP/HTTP protobuf, acknowledged and durable; Elasticsearch 8.12.2, one node, 1 GiB heap, this machine")
    print(f"  embedded store, one collector (baseline):   {base:10,.0f} spans/s")
    print(f"  Elasticsearch, one collector:                {one:10,.0f} spans/s  ({one / base:.2f} x baseline)")
    print(f"  Elasticsearch, two collectors:               {two:10,.0f} spans/s  ({two / base:.2f} x baseline)")
    print(f"  payscope analyze: embedded {base_analyze:.1f} s on {base_count:,} spans "
          f"({base_count / base_analyze:,.0f} spans/s); Elasticsearch {es_analyze:.1f} s on {count:,} spans "
          f"({count / es_analyze:,.0f} spans/s, {count / es_analyze / (base_count / base_analyze):.2f} x)")
