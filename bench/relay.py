"""What a finished span costs, in the service and in the relay.

In the service: CPU per span of an SDK tracer with no processor (the baseline), with payscope's relay
processors (masking, tuple, buffer, the sender thread writing to a Unix socket), and with the SDK's
batch processor and OTLP/HTTP exporter (what in-process export costs, sending to a local HTTP server
that discards). Each is measured as the CPU time of the whole process, threads included, so the
in-process row also carries the receiving server's share: it is an upper bound.

In the relay: per span, unmarshalling, rebuilding the SDK span and OTLP encoding with the SDK's
encoder (what the relay does), beside marshal alone.
"""

from __future__ import annotations

import argparse
import marshal
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from payscope.instrumentation import capture, distro
from payscope.instrumentation.distro import _masked
from payscope.instrumentation.relay import Channel, _Rebuilder, span_tuple

SERVER_ATTRIBUTES = {
    "http.request.method": "POST", "url.scheme": "http", "server.address": "127.0.0.1", "server.port": 8000,
    "network.peer.address": "127.0.0.1", "network.peer.port": 51234, "user_agent.original": "python-requests/2.32",
    "url.path": "/payments/pay-1", "http.route": "/payments/{id}", "http.response.status_code": 200,
    "network.protocol.version": "1.1", "url.query": "order_id=ord-1",
}


class _Collect(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


SINKS = """
import http.server, os, socket, sys, threading

class Discard(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
unix.bind(sys.argv[1])
unix.listen(16)

def drain(conn):
    while conn.recv(1 << 20):
        pass

def accept():
    while True:
        threading.Thread(target=drain, args=(unix.accept()[0],), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Discard)
print(web.server_address[1], flush=True)
threading.Thread(target=web.serve_forever, daemon=True).start()
sys.stdin.read()  # until the benchmark ends
"""


def _sinks() -> tuple[subprocess.Popen[str], str, str]:
    """A process that swallows what the service sends: a Unix socket (the relay's place) and an HTTP port."""
    path = os.path.join(tempfile.mkdtemp(prefix="payscope-bench-"), "relay.sock")
    proc = subprocess.Popen([sys.executable, "-c", SINKS, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, path, f"http://127.0.0.1:{port}/v1/traces"


def _cpu_per_span(processors: list[Any], spans: int) -> float:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    for processor in processors:
        provider.add_span_processor(processor)
    tracer = provider.get_tracer("opentelemetry.instrumentation.flask")

    def burst(n: int) -> None:
        for _ in range(n):
            with tracer.start_as_current_span("POST /payments/{id}", kind=trace.SpanKind.SERVER,
                                              attributes=SERVER_ATTRIBUTES):
                pass
        provider.force_flush()

    burst(2000)  # warm up
    start = time.process_time()
    burst(spans)
    cpu = time.process_time() - start
    provider.shutdown()
    return cpu / spans * 1e6


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench relay")
    parser.add_argument("--spans", type=int, default=20000)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args(argv)
    sinks, sink, url = _sinks()
    variants = {
        "no processor (baseline)": lambda: [],
        "payscope's span processors only": lambda: [distro.BusinessKeyProcessor(), capture.RetryPolicyProcessor()],
        "payscope run, relay": lambda: [distro.BusinessKeyProcessor(), capture.RetryPolicyProcessor(),
                                        distro.RelaySpanProcessor(Channel(sink, {"service.name": "bench"}, print))],
        "in-process batch + OTLP/HTTP": lambda: [distro.BusinessKeyProcessor(), capture.RetryPolicyProcessor(),
                                                 BatchSpanProcessor(distro.RedactingExporter(
                                                     OTLPSpanExporter(endpoint=url)), max_queue_size=65536)],
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.repetitions):
            for name, make in variants.items():  # interleaved
                results[name].append(_cpu_per_span(make(), args.spans))
    finally:
        sinks.communicate("")
    print(f"in the service: CPU per finished span, {args.spans} spans x {args.repetitions}, medians")
    base = sorted(results["no processor (baseline)"])[args.repetitions // 2]
    for name, values in results.items():
        value = sorted(values)[args.repetitions // 2]
        print(f"  {name:<32} {value:7.1f} us  (x{value / base:.2f}; +{value - base:.1f} us)")

    collect = _Collect()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(collect)
    tracer = provider.get_tracer("opentelemetry.instrumentation.flask")
    for _ in range(args.spans):
        with tracer.start_as_current_span("POST /payments/{id}", kind=trace.SpanKind.SERVER,
                                          attributes=SERVER_ATTRIBUTES):
            pass
    frame = marshal.dumps(("S", [span_tuple(s, *_masked(s)) for s in collect.spans]))
    rebuild = _Rebuilder()
    resource = rebuild.resource({"service.name": "bench"})
    t0 = time.process_time()
    _, items = marshal.loads(frame)
    t1 = time.process_time()
    rebuilt = [rebuild.span(item, resource) for item in items]
    t2 = time.process_time()
    encode_spans(rebuilt).SerializeToString()
    t3 = time.process_time()
    n = len(items)
    print(f"in the relay: per span, {n} spans")
    print(f"  unmarshal (baseline)             {(t1 - t0) / n * 1e6:7.2f} us")
    print(f"  rebuild the SDK span             {(t2 - t1) / n * 1e6:7.2f} us")
    print(f"  OTLP encode (SDK encoder)        {(t3 - t2) / n * 1e6:7.2f} us")
