"""Collector ingest: concurrent OTLP/HTTP protobuf exports into `payscope collect` (embedded store).

Reports sustained spans/s and the p99 acknowledgement latency, beside the decode-only rate of the
same payloads measured in the same run (protobuf parsing alone: the ceiling).
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from payscope.collector.decoding import default_workers
from tests.helpers import CollectorProcess

SPANS_PER_REQUEST = 512
SERVICES = ["gateway", "order", "inventory", "payment", "bank", "ledger", "notify", "fraud"]


def make_request(seed: int) -> bytes:
    """512 spans over 64 traces of 8 spans, with the attributes real HTTP instrumentation writes."""
    rng = random.Random(seed)
    req = ExportTraceServiceRequest()
    by_service: dict[str, object] = {}
    t0 = 1_767_000_000_000_000_000 + seed * 1_000_000_000
    for trace in range(SPANS_PER_REQUEST // 8):
        trace_id = rng.getrandbits(128).to_bytes(16, "big")
        parent = b""
        for depth in range(8):
            service = SERVICES[depth]
            rs = by_service.get(service)
            if rs is None:
                rs = req.resource_spans.add()
                for key, value in (("service.name", service), ("host.name", f"{service}-7d9f-1"),
                                   ("telemetry.sdk.language", "python"), ("telemetry.sdk.version", "1.45.1"),
                                   ("deployment.environment", "prod")):
                    kv = rs.resource.attributes.add()  # type: ignore[attr-defined]
                    kv.key, kv.value.string_value = key, value
                rs.scope_spans.add().scope.name = "opentelemetry.instrumentation.requests"  # type: ignore[attr-defined]
                by_service[service] = rs
            span = rs.scope_spans[0].spans.add()  # type: ignore[attr-defined]
            span.trace_id = trace_id
            span.span_id = rng.getrandbits(64).to_bytes(8, "big")
            if parent:
                span.parent_span_id = parent
            parent = span.span_id
            span.kind = 2 if depth % 2 == 0 else 3
            span.name = f"POST /{service}/{{id}}"
            span.start_time_unix_nano = t0 + trace * 10_000_000 + depth * 1_000_000
            span.end_time_unix_nano = span.start_time_unix_nano + rng.randint(1_000_000, 300_000_000)
            for key, value in (("http.request.method", "POST"), ("http.route", f"/{service}/{{id}}"),
                               ("url.path", f"/{service}/{rng.randint(1, 10**6)}"),
                               ("server.address", SERVICES[min(depth + 1, 7)]), ("network.protocol.version", "1.1"),
                               ("user_agent.original", "python-requests/2.32.3")):
                kv = span.attributes.add()
                kv.key, kv.value.string_value = key, value
            kv = span.attributes.add()
            kv.key, kv.value.int_value = "http.response.status_code", 200 if rng.random() > 0.02 else 503
            kv = span.attributes.add()
            kv.key, kv.value.int_value = "server.port", 8080
            if rng.random() < 0.02:
                span.status.code = 2
                span.status.message = "ReadTimeout"
    return req.SerializeToString()


def decode_only(payloads: list[bytes], seconds: float) -> float:
    """Spans/s parsing the same payloads with protobuf (upb) alone."""
    start = time.perf_counter()
    spans = 0
    while time.perf_counter() - start < seconds:
        for body in payloads:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            spans += SPANS_PER_REQUEST
    return spans / (time.perf_counter() - start)


def decode_and_flatten(payloads: list[bytes], seconds: float) -> float:
    """Spans/s through payscope's own decoding (protobuf -> redacted spans), no storage."""
    from payscope.collector.otlp import decode_traces

    start = time.perf_counter()
    spans = 0
    while time.perf_counter() - start < seconds:
        for body in payloads:
            spans += len(decode_traces(body, "application/x-protobuf").spans)
    return spans / (time.perf_counter() - start)


def load(port: int, payloads: list[bytes], clients: int, seconds: float) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    acked = 0
    rejected = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        nonlocal acked, rejected
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = k
        mine: list[float] = []
        ok = bad = 0
        try:
            while time.perf_counter() < stop:
                body = payloads[i % len(payloads)]
                i += clients
                t = time.perf_counter()
                conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
                resp = conn.getresponse()
                resp.read()
                mine.append(time.perf_counter() - t)
                if resp.status == 200:
                    ok += 1
                else:
                    bad += 1
                    time.sleep(float(resp.getheader("Retry-After") or 1))
        finally:
            conn.close()
        with lock:
            latencies.extend(mine)
            acked += ok
            rejected += bad

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acked, latencies, rejected


def prefilled(path: Path, spans: int) -> Path:
    """A store already holding ``spans`` spans of other traces (made once, then copied for each run)."""
    from payscope.collector.decoding import decode_request
    from payscope.collector.store import open_store

    with open_store(str(path)) as store:
        for seed in range(10**5, 10**5 + -(-spans // SPANS_PER_REQUEST)):
            store.write(decode_request("traces", make_request(seed), "application/x-protobuf", 10**6).spans)
    return path


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) used so far by a process and every child it has (Linux /proc), or nan
    where /proc is not there. Alive children are counted; a child that exited was waited for by its parent,
    which then counts it."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    pids = {pid}
    for task in tasks:
        try:
            pids.update(int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            continue  # a thread that ended meanwhile
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
    return total


def run(payloads: list[bytes], clients: int, seconds: float, workers: int,
        prefill: Path | None = None, settle: str = "10") -> tuple[float, float, float, int, int, float]:
    """spans/s acknowledged, p50 and p99 ms, requests acked and told to retry, and the collector's CPU
    (its decoding processes included) in microseconds a span, into a fresh store (or a copy of ``prefill``)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.db"
        if prefill is not None:
            shutil.copy(prefill, store)
        collector = CollectorProcess(store, grpc=False, extra=("--workers", str(workers), "--settle-seconds", settle))
        try:
            # the decoding processes start on the first large request: started before the clock
            conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=60)
            conn.request("POST", "/v1/traces", body=make_request(10**6),
                         headers={"Content-Type": "application/x-protobuf"})
            conn.getresponse().read()
            conn.close()
            cpu = cpu_seconds(collector.proc.pid)
            start = time.perf_counter()
            acked, latencies, rejected = load(collector.http_port, payloads, clients, seconds)
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(collector.proc.pid) - cpu
        finally:
            collector.stop()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    spans = acked * SPANS_PER_REQUEST
    return spans / elapsed, p50, p99, acked, rejected, cpu / max(1, spans) * 1e6


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench collector")
    parser.add_argument("--clients", default="2,4", help="numbers of concurrent senders, comma-separated")
    parser.add_argument("--workers", default=f"0,{default_workers()}",
                        help="`payscope collect --workers` values to compare, comma-separated (0: one process)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--payloads", type=int, default=400, help="distinct requests (each its own traces)")
    parser.add_argument("--prefill", type=int, default=0, help="spans the store holds before each run")
    parser.add_argument("--settle", default="10", help="`payscope collect --settle-seconds` values to compare, "
                        "comma-separated (a large one: no trace is derived during the run)")
    args = parser.parse_args(argv)
    payloads = [make_request(i) for i in range(args.payloads)]
    ceiling = decode_only(payloads[:50], 3.0)
    flatten = decode_and_flatten(payloads[:20], 3.0)
    print(f"collector ingest, {args.seconds:.0f}s a run, {SPANS_PER_REQUEST} spans/request, protobuf over HTTP, "
          f"embedded store (WAL, synchronous=FULL)")
    print(f"  decode only (protobuf upb, the ceiling):   {ceiling:12,.0f} spans/s")
    print(f"  payscope decode + redact, one process:      {flatten:12,.0f} spans/s  "
          f"({flatten / ceiling:.3f} of ceiling)")
    base: dict[int, float] = {}
    filled = tempfile.TemporaryDirectory()
    prefill = prefilled(Path(filled.name) / "prefill.db", args.prefill) if args.prefill else None
    if args.prefill:
        print(f"  each run into a store already holding {args.prefill:,} spans")
    for clients in (int(c) for c in args.clients.split(",")):
        for workers, settle in ((int(w), t) for w in args.workers.split(",") for t in args.settle.split(",")):
            rate, p50, p99, acked, rejected, cpu = run(payloads, clients, args.seconds, workers, prefill, settle)
            base.setdefault(clients, rate)
            print(f"  collect --workers {workers} --settle-seconds {settle}, {clients} senders, acknowledged and "
                  f"durable: {rate:10,.0f} spans/s "
                  f"({rate / ceiling:.3f} of ceiling, x{rate / base[clients]:.2f} of the first) | ack p50 "
                  f"{p50:.0f} ms, p99 {p99:.0f} ms | {acked} acked, {rejected} told to retry | collector CPU "
                  f"{cpu:.1f} us a span", flush=True)
