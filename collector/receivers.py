"""OTLP receivers: HTTP (protobuf and JSON, gzip, chunked bodies) and gRPC."""

from __future__ import annotations

import errno
import hmac
import json
import ssl
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from payscope.errors import InputError

from .decoding import DecodePool
from .otlp import LOGS, TRACES, Decoded, Signal
from .writer import BatchWriter, OverloadedError, RejectedError

# What one request may hold, and what all of them together may hold in memory at once. With these, the
# collector's memory stays under MEMORY_BOUND_BYTES whatever the number of clients (docs/reliability.md).
MAX_BODY_BYTES = 32 * 1024 * 1024       # compressed or not, what we accept on the wire
MAX_INFLATED_BYTES = 64 * 1024 * 1024   # what a gzip body may grow to
MAX_ITEMS_PER_REQUEST = 100_000         # spans or log records in one request (the SDKs send 512)
BODIES_IN_MEMORY_BYTES = 256 * 1024 * 1024  # request bodies read and not yet decoded, all clients together
DECODE_SLOTS = 2                        # requests decoded at once (one per core)
MEMORY_BOUND_BYTES = 1536 * 1024 * 1024
ACK_TIMEOUT_S = 60.0
# The longest a request waits for a decode slot before it is answered 503 with Retry-After: under the SDK
# exporters' own 10 s timeout, so that they back off when told to instead of giving up on a request that is
# stored later anyway, and threads do not pile up behind the slots.
DECODE_WAIT_S = 5.0
READ_TIMEOUT_S = 15.0   # a client silent this long, mid-request or between requests, is dropped
MAX_CONNECTIONS = 2048  # open at once; a connection past this is closed at once, so others still get in
LISTEN_BACKLOG = 1024


class BodyError(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_PIECE = 1024 * 1024


class _Held:
    """What one request holds of the memory budget: taken piece by piece as bytes arrive, so that a
    client that stalls holds only what it sent."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.bytes = 0

    def take(self, n: int) -> None:
        if not self.budget.take(n):
            raise BodyError(HTTPStatus.SERVICE_UNAVAILABLE,
                            "collector busy: too many request bodies in memory; retry")
        self.bytes += n

    def release(self) -> None:
        self.budget.give(self.bytes)
        self.bytes = 0


def _read_exact(rfile: Any, length: int, held: _Held) -> bytes:
    parts: list[bytes] = []
    left = length
    while left:
        want = min(left, _PIECE)
        held.take(want)
        piece = rfile.read(want)
        if len(piece) != want:
            raise BodyError(HTTPStatus.BAD_REQUEST, "body shorter than its Content-Length")
        parts.append(piece)
        left -= want
    return b"".join(parts)


def _read_chunked(rfile: Any, limit: int, held: _Held) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(1024)
        if not line:
            raise BodyError(HTTPStatus.BAD_REQUEST, "chunked body ended early")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BodyError(HTTPStatus.BAD_REQUEST, "bad chunk size line in chunked body") from None
        if size < 0:
            raise BodyError(HTTPStatus.BAD_REQUEST, "bad chunk size line in chunked body")
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        total += size
        if total > limit:
            raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {limit} bytes")
        parts.append(_read_exact(rfile, size, held))
        rfile.readline(8)


def _inflate(body: bytes, encoding: str) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BodyError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(47 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, MAX_INFLATED_BYTES)
        if inflater.unconsumed_tail:
            raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"{encoding} body inflates past {MAX_INFLATED_BYTES} bytes")
        out += inflater.flush()
    except zlib.error as exc:
        raise BodyError(HTTPStatus.BAD_REQUEST, f"body is not valid {encoding}: {exc}") from None
    if not inflater.eof:  # cut short, perhaps at a flush point where what came before still inflates
        raise BodyError(HTTPStatus.BAD_REQUEST, f"{encoding} body is truncated: it ends before its end marker")
    return out


class Budget:
    """Bytes that requests may hold in memory together; a request that does not fit is turned away."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Receiver:
    """What both receivers share: decode (a few at a time, after checking there is room), queue for the
    writer, wait until durable."""

    def __init__(self, writer: BatchWriter, token: str | None = None, decoder: DecodePool | None = None,
                 decode_wait_s: float = DECODE_WAIT_S) -> None:
        self.writer = writer
        self.decode_wait_s = decode_wait_s
        self.token = token
        self.bodies = Budget(BODIES_IN_MEMORY_BYTES)
        self.decoder = decoder or DecodePool(0)
        # where decoding processes store what they decode themselves (None: they hand it to the writer)
        self.store_url = writer.store.address() if self.decoder.workers > 0 else None
        # two per decoding process: while one request is stored (or its spans cross back), the next is already there
        self._decoding = threading.BoundedSemaphore(max(DECODE_SLOTS, 2 * self.decoder.workers))

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the bearer token (compared in constant time)."""
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def decode(self, signal: Signal, body: bytes, content_type: str) -> Decoded:
        """A request body decoded (in a worker process when it is large), once the write queue has room.

        InputError when it cannot be read or holds too much, OverloadedError when the queue is full or no
        decode slot came free in ``decode_wait_s``. At most two requests per decoding process (and at least
        DECODE_SLOTS) are decoded at once, whatever the number of clients; the writer checks room again for what
        the request turned out to hold.
        """
        self.writer.check_room(1)
        if not self._decoding.acquire(timeout=self.decode_wait_s):
            raise OverloadedError(f"every decoder busy for {self.decode_wait_s:g} s")
        try:
            return self.decoder.decode(signal.name, body, content_type, MAX_ITEMS_PER_REQUEST, self.store_url)
        finally:
            self._decoding.release()

    def accept(self, decoded: Decoded) -> None:
        """Return once the request's items are durable: stored already by a decoding process (the writer is
        told which traces, for deriving them once settled), or queued for the writer and committed."""
        if decoded.stored is not None:
            self.writer.note(decoded.stored)
        elif decoded.spans or decoded.logs:
            self.writer.submit(decoded.spans, decoded.logs).result(timeout=ACK_TIMEOUT_S)


def _response_message(signal: str, decoded: Decoded) -> Any:
    if signal == "traces":
        response = ExportTraceServiceResponse()
        if decoded.rejected:
            response.partial_success.rejected_spans = decoded.rejected
            response.partial_success.error_message = "; ".join(decoded.reasons)
    else:
        response = ExportLogsServiceResponse()
        if decoded.rejected:
            response.partial_success.rejected_log_records = decoded.rejected
            response.partial_success.error_message = "; ".join(decoded.reasons)
    return response


def make_http_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    signals: dict[str, Signal] = {"/v1/traces": TRACES, "/v1/logs": LOGS}

    class OTLPHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "payscope-collector"
        disable_nagle_algorithm = True  # a response in small writes must not wait for the client's delayed ACK
        timeout = READ_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per request would drown the collector's own output

        def _reply(self, status: int, body: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, reason: str, as_json: bool,
                   headers: dict[str, str] | None = None) -> None:
            # The OTLP spec answers errors with a google.rpc.Status.
            code = 3 if status < 500 else 14
            if as_json:
                self._reply(status, json.dumps({"code": code, "message": reason}).encode(), "application/json",
                            headers)
            else:
                from google.rpc.status_pb2 import Status  # type: ignore[import-untyped]

                self._reply(status, Status(code=code, message=reason).SerializeToString(),
                            "application/x-protobuf", headers)

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/", "/health", "/healthz"):
                self._reply(200, b'{"status":"ok"}', "application/json")
            else:
                self._reply(404, b"not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            as_json = content_type == "application/json"
            if not receiver.authorized(self.headers.get("Authorization")):
                self.close_connection = True
                self._error(401, "missing or wrong bearer token", as_json, {"WWW-Authenticate": "Bearer"})
                return
            signal = signals.get(self.path.split("?")[0])
            held = _Held(receiver.bodies)
            try:
                try:
                    body = self._body(held)
                except BodyError as exc:
                    self.close_connection = True
                    self._error(exc.status, str(exc), as_json,
                                {"Retry-After": "1"} if exc.status == HTTPStatus.SERVICE_UNAVAILABLE else None)
                    return
                except OSError:  # the client stalled past the read timeout, or hung up mid-body
                    self.close_connection = True
                    return
                self._handle(signal, body, content_type, as_json)
            finally:
                held.release()

        def _handle(self, signal: Signal | None, body: bytes, content_type: str, as_json: bool) -> None:
            if signal is None:
                self._error(404, f"unknown path {self.path}: use /v1/traces or /v1/logs", as_json)
                return
            if content_type not in ("application/x-protobuf", "application/protobuf", "application/json"):
                self._error(415, f"unsupported Content-Type {content_type!r}: use "
                            "application/x-protobuf or application/json", as_json)
                return
            try:
                body = _inflate(body, (self.headers.get("Content-Encoding") or "").strip().lower())
                decoded = receiver.decode(signal, body, content_type)
                receiver.accept(decoded)
            except BodyError as exc:
                self._error(exc.status, str(exc), as_json)
                return
            except InputError as exc:
                self._error(400, str(exc), as_json)
                return
            except OverloadedError as exc:
                self._error(503, f"collector overloaded: {exc}", as_json,
                            {"Retry-After": str(OverloadedError.retry_after)})
                return
            except RejectedError as exc:
                self._error(400, str(exc), as_json)
                return
            except Exception as exc:  # the store failed: nothing was acknowledged
                self._error(503, f"could not store the batch ({type(exc).__name__})", as_json, {"Retry-After": "5"})
                return
            response = _response_message(signal.name, decoded)
            if as_json:
                self._reply(200, json_format.MessageToJson(response, indent=None).encode(), "application/json")
            else:
                self._reply(200, response.SerializeToString(), "application/x-protobuf")

        def _body(self, held: _Held) -> bytes:
            """The body, its bytes taken from the memory budget as they arrive (given back by the caller)."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                return _read_chunked(self.rfile, MAX_BODY_BYTES, held)
            length_text = self.headers.get("Content-Length")
            if length_text is None:
                raise BodyError(HTTPStatus.LENGTH_REQUIRED, "request has neither Content-Length nor a chunked body")
            try:
                length = int(length_text)
            except ValueError:
                raise BodyError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_text!r}") from None
            if length < 0:
                raise BodyError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_text!r}")
            if length > MAX_BODY_BYTES:
                raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"body of {length} bytes is larger than the limit of {MAX_BODY_BYTES}")
            return _read_exact(self.rfile, length, held)

    return OTLPHandler


class _Server(ThreadingHTTPServer):
    """A thread a connection, a bounded number of them, a real listen backlog, and no tracebacks."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 tls: ssl.SSLContext | None = None) -> None:
        self._open = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._tls = tls
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)  # out of file descriptors: wait for some to close instead of spinning
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._open.acquire(blocking=False):
            self.shutdown_request(request)  # full: refused at once, where waiting would lock everyone out
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self._tls is not None:
                request.settimeout(READ_TIMEOUT_S)
                request = self._tls.wrap_socket(request, server_side=True)
            super().process_request_thread(request, client_address)
        except (OSError, ssl.SSLError):
            self.shutdown_request(request)
        finally:
            self._open.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        kind = sys.exc_info()[0]
        if kind is not None and not issubclass(kind, (ConnectionError, TimeoutError)):
            # one line and no traceback: a traceback could quote what a client sent
            print(f"payscope collect: a request failed ({kind.__name__})", file=sys.stderr, flush=True)


class HTTPReceiver:
    """OTLP/HTTP on a host and port; ``port`` is the bound one (useful with port 0)."""

    def __init__(self, receiver: Receiver, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.server = _Server((host, port), make_http_handler(receiver), tls)
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="payscope-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GRPCReceiver:
    """OTLP/gRPC (traces and logs services) on a host and port.

    Requests arrive as bytes and are parsed here, as over HTTP: a malformed one is INVALID_ARGUMENT, never
    INTERNAL, and clients retry only UNAVAILABLE (overload, a store that failed).
    """

    def __init__(self, receiver: Receiver, host: str, port: int,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        import grpc

        def export(signal: Signal) -> Callable[[bytes, Any], Any]:
            def handler(body: bytes, context: Any) -> Any:
                if not receiver.authorized(dict(context.invocation_metadata()).get("authorization")):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
                try:
                    decoded = receiver.decode(signal, body, "application/x-protobuf")
                    receiver.accept(decoded)
                except (InputError, RejectedError) as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except OverloadedError as exc:
                    context.set_trailing_metadata((("retry-after", "1"),))
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"collector overloaded: {exc}")
                except Exception as exc:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"could not store the batch ({type(exc).__name__})")
                return _response_message(signal.name, decoded)
            return handler

        def service(name: str, signal: Signal) -> Any:
            return grpc.method_handlers_generic_handler(name, {"Export": grpc.unary_unary_rpc_method_handler(
                export(signal), request_deserializer=None,
                response_serializer=lambda message: message.SerializeToString())})

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", MAX_BODY_BYTES)])
        self.server.add_generic_rpc_handlers((
            service("opentelemetry.proto.collector.trace.v1.TraceService", TRACES),
            service("opentelemetry.proto.collector.logs.v1.LogsService", LOGS)))
        self.host = host
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        else:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen for OTLP/gRPC on {host}:{port}")

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=5).wait()


def protobuf_backend() -> str:
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


def warn_if_slow_protobuf() -> None:
    backend = protobuf_backend()
    if backend == "python":
        print("payscope collect: warning: protobuf uses its pure-Python backend, about 200 times "
              "slower than upb; reinstall protobuf from a wheel for your platform", file=sys.stderr)


__all__ = ["GRPCReceiver", "HTTPReceiver", "Receiver", "protobuf_backend", "warn_if_slow_protobuf"]
