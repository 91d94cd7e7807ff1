"""`payscope sidecar`: an HTTP proxy in front of a service payscope cannot instrument (Java, Go, Node,
a vendor binary), so that its requests still join the payment's trace.

For each request the proxy records the service's server span, as the service would have recorded it
itself: the trace continued from whichever header arrived (W3C, B3, Jaeger), method, path, status,
duration, ``X-Request-ID`` (made up, like Envoy does, when the caller sent none), the caller's
remaining budget, and business keys from the query, headers and JSON body. The request goes on to
the service with a W3C ``traceparent`` naming that span, so a service that does speak OpenTelemetry
continues the same trace. Secrets are masked before export, as in `payscope run`.
"""

from __future__ import annotations

import http.client
import http.server
import os
import signal
import sys
import threading
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from . import keys
from .distro import QUEUE_SIZE, REQUEST_ID_ATTRIBUTE, BusinessKeyProcessor, RedactingExporter, set_keys
from .propagation import PayscopePropagator, title_case

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "content-length"}
TRACE_HEADERS = {"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                 "x-b3-sampled", "x-b3-flags", "uber-trace-id"}
RECORDED_HEADERS = ("idempotency-key", "x-envoy-expected-rq-timeout-ms", "grpc-timeout")
MAX_BODY = 16 * 1024 * 1024


class Sidecar:
    """The proxy: a threading HTTP server, a tracer provider exporting to the collector, an upstream."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], service: str, collector: str,
                 timeout_s: float, provider: TracerProvider | None = None) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        if provider is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                                "payscope.sidecar": True}))
            provider.add_span_processor(BusinessKeyProcessor())
            provider.add_span_processor(BatchSpanProcessor(
                RedactingExporter(OTLPSpanExporter(endpoint=f"{collector.rstrip('/')}/v1/traces", timeout=2.0)),
                max_queue_size=QUEUE_SIZE, schedule_delay_millis=int(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", 500))))
        self.provider = provider
        self.tracer = provider.get_tracer("payscope.sidecar")
        self.propagator = PayscopePropagator()
        self.names = keys.key_names()
        self.local = threading.local()
        handler = type("Handler", (_Handler,), {"sidecar": self})
        self.server = http.server.ThreadingHTTPServer(listen, handler)
        self.server.daemon_threads = True

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def connection(self) -> http.client.HTTPConnection:
        """This thread's keep-alive connection to the service."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(*self.upstream, timeout=self.timeout_s)
        return conn

    def drop_connection(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None

    def serve_forever(self) -> None:
        self.server.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.provider.shutdown()


class _Handler(http.server.BaseHTTPRequestHandler):
    sidecar: Sidecar
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # an answer in small writes must not wait for the client's delayed ACK
    server_version = "payscope-sidecar"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's names
        self._proxy()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def _body(self) -> bytes | None:
        """The request body, or None when it is too large or malformed (already answered)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    self._refuse(413, "request body too large for the sidecar")
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._refuse(413, "request body too large for the sidecar")
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _refuse(self, status: int, text: str) -> None:
        payload = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def _proxy(self) -> None:
        sidecar = self.sidecar
        try:
            body = self._body()
        except ValueError:
            self._refuse(400, "malformed chunked body")
            return
        if body is None:
            return
        path, _, query = self.path.partition("?")
        id_header = sidecar.propagator.header
        request_id = self.headers.get(id_header) or uuid.uuid4().hex
        attributes: dict[str, Any] = {
            "http.request.method": self.command, "url.path": path, "url.scheme": "http",
            "server.address": sidecar.address[0], "server.port": sidecar.address[1],
            "client.address": self.client_address[0], "network.protocol.version": self.request_version[5:],
            f"http.request.header.{id_header}": (request_id,), REQUEST_ID_ATTRIBUTE: request_id,
        }
        if query:
            attributes["url.query"] = query
        if self.headers.get("User-Agent"):
            attributes["user_agent.original"] = self.headers["User-Agent"]
        for name in RECORDED_HEADERS:
            if self.headers.get(name):
                attributes[f"http.request.header.{name}"] = tuple(self.headers.get_all(name) or ())
        context = sidecar.propagator.extract(self.headers)
        with sidecar.tracer.start_as_current_span(self.command, context=context, kind=trace.SpanKind.SERVER,
                                                  attributes=attributes, record_exception=False,
                                                  set_status_on_exception=False) as span:
            if keys.is_json(self.headers.get("Content-Type")):  # after the query string, as in `payscope run`
                set_keys(span, keys.from_json(body, sidecar.names))
            set_keys(span, keys.from_pairs(self.headers.items(), sidecar.names))
            dropped = HOP_BY_HOP | TRACE_HEADERS | {id_header}
            forward = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            forward[title_case(id_header)] = request_id
            forward["X-Forwarded-For"] = self.client_address[0]
            sidecar.propagator.inject(forward)
            self._forward(span, forward, body)

    def _forward(self, span: Any, headers: dict[str, str], body: bytes) -> None:
        sidecar = self.sidecar
        for attempt in (1, 2):  # a kept-alive connection the service closed meanwhile gets one fresh retry
            conn = sidecar.connection()
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except TimeoutError:
                sidecar.drop_connection()
                span.set_attribute("error.type", "timeout")
                span.set_status(Status(StatusCode.ERROR, f"the service did not answer within {sidecar.timeout_s:g} s"))
                self._fail(span, 504, "upstream timed out")
                return
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                sidecar.drop_connection()
                if attempt == 2:
                    self._connection_failed(span, exc)
                    return
            except OSError as exc:
                sidecar.drop_connection()
                self._connection_failed(span, exc)
                return
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(response.status))
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(payload)))  # a HEAD answer keeps the GET's length
        if response.will_close:
            sidecar.drop_connection()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _connection_failed(self, span: Any, exc: BaseException) -> None:
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, f"connection to the service failed: {exc}"))
        self._fail(span, 502, "upstream connection failed")

    def _fail(self, span: Any, status: int, text: str) -> None:
        span.set_attribute("http.response.status_code", status)
        self._refuse(status, text)


def run(listen: tuple[str, int], upstream: tuple[str, int], service: str, collector: str,
        timeout_s: float) -> None:
    """Serve until SIGTERM or Ctrl-C, then export what is left."""
    sidecar = Sidecar(listen, upstream, service, collector, timeout_s)
    host, port = sidecar.address
    print(f"payscope sidecar: {service} on {host}:{port} -> {upstream[0]}:{upstream[1]} "
          f"(timeout {timeout_s:g} s), exporting to {collector}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=sidecar.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    sidecar.close()
