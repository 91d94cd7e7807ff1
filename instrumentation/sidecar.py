"""`payscope sidecar`: an HTTP proxy in front of a service payscope cannot instrument (Java, Go, Node,
a vendor binary), so that its requests still join the payment's trace.

For each request the proxy records the service's server span, as the service would have recorded it
itself: the trace continued from whichever header arrived (W3C, B3, Jaeger), method, path, status,
duration, ``X-Request-ID`` (made up, like Envoy does, when the caller sent none), the caller's
remaining budget, and business keys from the query, headers and JSON body. The request goes on to
the service with a W3C ``traceparent`` naming that span, so a service that does speak OpenTelemetry
continues the same trace. Secrets are masked before export, as in `payscope run`.

It is built on aiohttp's server and client (asyncio, ``TCP_NODELAY``, HTTP/1.1 keep-alive to both sides)
and streams: a body of any size, chunked or not, passes through in pieces, never held whole. Only a JSON
request body of at most ``keys.MAX_BODY`` (what key extraction reads) is read first, for the business keys
in it; so a request holds at most that much, or one chunk (``CHUNK``) of a stream, in memory at a time.

With ``--egress`` it is a forward proxy instead, for the service's own outbound calls (the service is pointed
at it with ``HTTP_PROXY``): it records a client span for each call, with the callee, status and duration,
continuing the trace the service sent if it sent one, and passes a ``traceparent`` naming that span to the
callee. When the service hangs up before the answer, the span says so, with how long the service waited:
its timeout, inferred like any other edge's.

With ``--delay``, ``--abort`` or ``--reset`` it injects faults into a share of requests (``faults.py``), each
marked on its span, and changeable at run time on an admin endpoint bound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, ServerDisconnectedError, TCPConnector, web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from . import keys
from .distro import (
    QUEUE_SIZE,
    REQUEST_ID_ATTRIBUTE,
    BusinessKeyProcessor,
    RedactingExporter,
    RelaySpanProcessor,
    set_keys,
)
from .faults import Faults
from .propagation import PayscopePropagator, title_case
from .redaction import redact_attributes

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "content-length", "host"}
TRACE_HEADERS = {"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                 "x-b3-sampled", "x-b3-flags", "uber-trace-id"}
RECORDED_HEADERS = ("idempotency-key", "x-envoy-expected-rq-timeout-ms", "grpc-timeout")
CHUNK = 64 * 1024


class Sidecar:
    """The proxy: an aiohttp server, a pooled client to the service, a tracer provider exporting spans."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int] | None, service: str, collector: str,
                 timeout_s: float, provider: TracerProvider | None = None, faults: Faults | None = None,
                 relay_path: str | None = None) -> None:
        """``upstream`` None: egress mode, a forward proxy for the service's outbound calls. ``relay_path``: a
        relay process (``relay.start``) that exports the spans; without one they are exported from here."""
        self.listen = listen
        self.upstream = upstream
        self.base = f"http://{upstream[0]}:{upstream[1]}" if upstream else ""
        self.timeout_s = timeout_s
        self.faults = faults or Faults()
        self.relay_path = relay_path
        self.channel: Any = None  # to the relay, when there is one
        if provider is None:
            provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                                "payscope.sidecar": True}))
            provider.add_span_processor(BusinessKeyProcessor())
            if relay_path:  # the encoding and sending happen in the relay process, off the event loop
                from .relay import Channel

                self.channel = Channel(relay_path, redact_attributes(dict(provider.resource.attributes)), _say)
                provider.add_span_processor(RelaySpanProcessor(self.channel))
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(BatchSpanProcessor(
                    RedactingExporter(OTLPSpanExporter(endpoint=f"{collector.rstrip('/')}/v1/traces", timeout=2.0)),
                    max_queue_size=QUEUE_SIZE,
                    schedule_delay_millis=int(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", 500))))
        self.provider = provider
        self.tracer = provider.get_tracer("payscope.sidecar")
        self.propagator = PayscopePropagator()
        self.names = keys.key_names()
        self.session: ClientSession | None = None
        self.runner: web.ServerRunner | None = None
        self.address = listen
        self.handled = 0  # requests taken in (one event loop: no lock)

    async def start(self, admin: tuple[str, int] | None = None) -> None:
        self.session = ClientSession(
            connector=TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False,  # the answer passes as the service sent it, compressed or not
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s))
        server = web.Server(self.handle if self.upstream else self.handle_egress, handler_cancellation=True)
        self.runner = web.ServerRunner(server, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.listen[0], self.listen[1], backlog=1024, reuse_address=True)
        await site.start()
        if self.runner.addresses:  # the port bound when 0 was asked for
            host, port = self.runner.addresses[0][:2]
            self.address = (str(host), int(port))
        if admin is not None:
            await self.faults.serve_admin(admin)

    async def close(self) -> None:
        await self.faults.close_admin()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()
        if self.channel is not None:
            self.provider.force_flush()
            self.channel.close(end=True)
            await _gone(os.path.dirname(self.relay_path or ""), RELAY_DRAIN_S)  # every span exported
        self.provider.shutdown()

    # --- one request -----------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.handled += 1
        path, query = request.path, request.query_string
        id_header = self.propagator.header
        request_id = request.headers.get(id_header) or uuid.uuid4().hex
        peer = request.remote or ""
        attributes: dict[str, Any] = {
            "http.request.method": request.method, "url.path": path, "url.scheme": "http",
            "server.address": self.address[0], "server.port": self.address[1],
            "client.address": peer, "network.protocol.version": f"{request.version.major}.{request.version.minor}",
            f"http.request.header.{id_header}": (request_id,), REQUEST_ID_ATTRIBUTE: request_id,
        }
        if query:
            attributes["url.query"] = query
        if request.headers.get("User-Agent"):
            attributes["user_agent.original"] = request.headers["User-Agent"]
        for name in RECORDED_HEADERS:
            if request.headers.get(name):
                attributes[f"http.request.header.{name}"] = tuple(request.headers.getall(name))
        context = self.propagator.extract(request.headers)
        span = self.tracer.start_span(request.method, context=context, kind=trace.SpanKind.SERVER,
                                      attributes=attributes, record_exception=False, set_status_on_exception=False)
        token = otel_context.attach(context)  # what arrived with the request (a SkyWalking trace id) goes on
        try:
            with trace.use_span(span, end_on_exit=False):
                return await self._proxy(request, span, request_id, peer)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # the caller hung up: the request to the service is dropped with it, as Envoy and nginx do, so
            # the service did not answer it (it is no success, late or not)
            span.set_attribute("error.type", "client_closed_request")
            span.set_status(Status(StatusCode.ERROR, "remote end closed before the answer: the caller hung up"))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return web.Response(status=499)  # nobody reads it: the connection is gone
        finally:
            otel_context.detach(token)
            span.end()

    async def _proxy(self, request: web.BaseRequest, span: Any, request_id: str, peer: str) -> web.StreamResponse:
        body = await self._body(request, span)
        fault = self.faults.pick(request.method, request.path)
        if fault is not None:
            injected = await fault.apply(span, request)
            if injected is not None:
                return injected
        id_header = self.propagator.header
        forward = self._forwarded_headers(request, body, {id_header})
        forward[title_case(id_header)] = request_id
        forward["X-Forwarded-For"] = peer
        forward["Host"] = request.headers.get("Host", self.base.removeprefix("http://"))
        self.propagator.inject(forward)
        return await self._send(request, span, self.base + request.raw_path, forward, body)

    async def _body(self, request: web.BaseRequest, span: Any) -> Any:
        """The body to send on: read whole when it is JSON small enough for its business keys (set on the
        span), else a stream of chunks; None when there is none."""
        set_keys(span, keys.from_pairs(request.headers.items(), self.names))
        length = request.content_length
        if keys.is_json(request.headers.get("Content-Type")) and length is not None and length <= keys.MAX_BODY:
            body = await request.read()  # after the query string, as in `payscope run`
            set_keys(span, keys.from_json(body, self.names))
            return body
        return request.content.iter_chunked(CHUNK) if request.body_exists else None

    @staticmethod
    def _forwarded_headers(request: web.BaseRequest, body: Any, dropped: set[str]) -> dict[str, str]:
        forward = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | TRACE_HEADERS | dropped}
        if request.content_length is not None and body is not None:
            forward["Content-Length"] = str(request.content_length)
        return forward

    async def _send(self, request: web.BaseRequest, span: Any, url: str, forward: dict[str, str],
                    body: Any) -> web.StreamResponse:
        """The request sent on to ``url`` and its answer streamed back, or the failure answered."""
        assert self.session is not None
        retried = not isinstance(body, (bytes, type(None)))  # a streamed body cannot be sent again
        while True:
            try:
                upstream = await asyncio.wait_for(
                    self.session.request(request.method, url, headers=forward, data=body, allow_redirects=False),
                    self.timeout_s)
                break
            except (TimeoutError, asyncio.TimeoutError):
                span.set_attribute("error.type", "timeout")
                span.set_status(Status(StatusCode.ERROR, f"no answer within {self.timeout_s:g} s"))
                return self._fail(span, 504, "upstream timed out")
            except ServerDisconnectedError as exc:  # a kept-alive connection the service closed meanwhile
                if retried:
                    return self._connection_failed(span, exc)
                retried = True
            except (ClientError, OSError) as exc:
                return self._connection_failed(span, exc)
        try:
            return await self._answer(request, span, upstream)
        finally:
            upstream.release()

    # --- egress: one outbound call of the service ------------------------------------------
    async def handle_egress(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "CONNECT" or not request.raw_path.startswith("http://"):
            return web.Response(status=400, headers={"Connection": "close"}, text=(
                "payscope sidecar --egress is a forward proxy for plain http:// calls (set HTTP_PROXY, not "
                "HTTPS_PROXY): the request target must be an absolute http:// URL\n"))
        target = request.url
        port = target.port or 80
        attributes: dict[str, Any] = {
            "http.request.method": request.method, "url.full": str(target), "server.address": target.host or "",
            "server.port": port, "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        }
        for name in RECORDED_HEADERS:
            if request.headers.get(name):
                attributes[f"http.request.header.{name}"] = tuple(request.headers.getall(name))
        context = self.propagator.extract(request.headers)  # the service's own trace, when it sends one
        span = self.tracer.start_span(request.method, context=context, kind=trace.SpanKind.CLIENT,
                                      attributes=attributes, record_exception=False, set_status_on_exception=False)
        started = asyncio.get_running_loop().time()
        token = otel_context.attach(context)
        try:
            with trace.use_span(span, end_on_exit=False):
                body = await self._body(request, span)
                fault = self.faults.pick(request.method, target.path)
                if fault is not None:
                    injected = await fault.apply(span, request)
                    if injected is not None:
                        return injected
                forward = self._forwarded_headers(request, body, set())
                forward["Host"] = request.headers.get("Host", f"{target.host}:{port}")
                self.propagator.inject(forward)  # the callee continues from this client span
                return await self._send(request, span, str(target), forward, body)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # the service hung up before the answer came: it stopped waiting, which is its timeout
            waited_ms = (asyncio.get_running_loop().time() - started) * 1000
            span.set_attribute("error.type", "timeout")
            span.set_attribute("payscope.egress.abandoned_after_ms", round(waited_ms, 1))
            span.set_status(Status(StatusCode.ERROR, f"the caller gave up (timeout) after {waited_ms:.0f} ms, "
                                                     "before the answer"))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return web.Response(status=499)
        finally:
            otel_context.detach(token)
            span.end()

    async def _answer(self, request: web.BaseRequest, span: Any, upstream: Any) -> web.StreamResponse:
        status = upstream.status
        span.set_attribute("http.response.status_code", status)
        if status >= (400 if self.upstream is None else 500):  # a client's call failed on a 4xx too
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(status))
        length = upstream.headers.get("Content-Length")
        if request.method != "HEAD" and length is not None and length.isdigit() and int(length) <= CHUNK:
            # a small answer of known length (most of them) goes out in one write, headers and body together
            small = web.Response(status=status, reason=upstream.reason, body=await upstream.read())
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-type":
                    small.headers.add(name, value)
            if upstream.headers.get("Content-Type"):
                small.headers["Content-Type"] = upstream.headers["Content-Type"]
            return small
        response = web.StreamResponse(status=status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP:
                response.headers.add(name, value)
        if upstream.headers.get("Content-Length") is not None:
            response.content_length = int(upstream.headers["Content-Length"])
        elif request.method != "HEAD" and status not in (204, 304):
            response.enable_chunked_encoding()
        await response.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except (TimeoutError, asyncio.TimeoutError, ClientError) as exc:
                span.set_attribute("error.type", "timeout" if not isinstance(exc, ClientError) else type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, "the service stopped sending its answer"))
                raise
        await response.write_eof()
        return response

    def _connection_failed(self, span: Any, exc: BaseException) -> web.Response:
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, f"connection to the service failed: {exc}"))
        return self._fail(span, 502, "upstream connection failed")

    @staticmethod
    def _fail(span: Any, status: int, text: str) -> web.Response:
        span.set_attribute("http.response.status_code", status)
        return web.Response(status=status, text=text + "\n", headers={"Connection": "close"})


async def _serve(sidecar: Sidecar, service: str, collector: str, admin: tuple[str, int] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before the port opens: a stop right after is a clean one
        loop.add_signal_handler(signum, stop.set)
    await sidecar.start(admin)
    host, port = sidecar.address
    behind = f"{sidecar.upstream[0]}:{sidecar.upstream[1]}" if sidecar.upstream else \
        f"its outbound calls (egress; point it here with HTTP_PROXY=http://{host}:{port})"
    print(f"payscope sidecar: {service} on {host}:{port} -> {behind} "
          f"(timeout {sidecar.timeout_s:g} s), exporting to {collector}", file=sys.stderr, flush=True)
    for line in sidecar.faults.describe():
        print(f"payscope sidecar: FAULT INJECTION ON: {line}", file=sys.stderr, flush=True)
    if admin is not None:
        print(f"payscope sidecar: faults can be changed at http://{admin[0]}:{admin[1]}/faults",
              file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await sidecar.close()


RELAY_DRAIN_S = 15.0  # how long a stopping sidecar waits for its relay to export what it was handed


async def _gone(directory: str, timeout_s: float) -> None:
    """Wait until the relay removed its directory: it has exported everything and exited."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while directory and os.path.exists(directory) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def _say(message: str) -> None:
    print(f"payscope sidecar: {message}", file=sys.stderr, flush=True)


def run(listen: tuple[str, int], upstream: tuple[str, int] | None, service: str, collector: str,
        timeout_s: float, faults: Faults | None = None, admin: tuple[str, int] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, then export what is left."""
    from .relay import start

    # forked before any thread or event loop exists; it exports what this process hands it, and drains
    # after this process exits
    relay_path = start(collector.rstrip("/")) if os.environ.get("PAYSCOPE_EXPORT") != "inprocess" else None
    sidecar = Sidecar(listen, upstream, service, collector, timeout_s, faults=faults, relay_path=relay_path)
    asyncio.run(_serve(sidecar, service, collector, admin))
