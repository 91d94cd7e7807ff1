"""OTLP receivers: HTTP (protobuf and JSON, gzip, chunked bodies) and gRPC."""

from __future__ import annotations

import json
import sys
import threading
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

from .otlp import Decoded, decode_logs, decode_traces, logs_from_request, spans_from_request
from .writer import BatchWriter, OverloadedError

MAX_BODY_BYTES = 32 * 1024 * 1024       # compressed or not, what we accept on the wire
MAX_INFLATED_BYTES = 128 * 1024 * 1024  # what a gzip body may grow to
ACK_TIMEOUT_S = 60.0


class BodyError(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _read_chunked(rfile: Any, limit: int) -> bytes:
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
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        total += size
        if total > limit:
            raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {limit} bytes")
        chunk = rfile.read(size)
        if len(chunk) != size:
            raise BodyError(HTTPStatus.BAD_REQUEST, "chunked body ended early")
        parts.append(chunk)
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
    return out


class Receiver:
    """What both receivers share: decode, queue for the writer, wait until durable."""

    def __init__(self, writer: BatchWriter) -> None:
        self.writer = writer

    def accept(self, decoded: Decoded) -> None:
        if decoded.spans or decoded.logs:
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
    decoders: dict[str, Callable[[bytes, str], Decoded]] = {
        "/v1/traces": decode_traces, "/v1/logs": decode_logs}

    class OTLPHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "payscope-collector"

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
            if as_json:
                body = json.dumps({"code": 3 if status == 400 else 14, "message": reason}).encode()
                self._reply(status, body, "application/json", headers)
            else:
                from google.rpc.status_pb2 import Status  # type: ignore[import-untyped]

                msg = Status(code=3 if status == 400 else 14, message=reason)
                self._reply(status, msg.SerializeToString(), "application/x-protobuf", headers)

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/", "/health", "/healthz"):
                self._reply(200, b'{"status":"ok"}', "application/json")
            else:
                self._reply(404, b"not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            as_json = content_type == "application/json"
            decoder = decoders.get(self.path.split("?")[0])
            try:
                body = self._body()
            except BodyError as exc:
                self.close_connection = True
                self._error(exc.status, str(exc), as_json)
                return
            if decoder is None:
                self._error(404, f"unknown path {self.path}: use /v1/traces or /v1/logs", as_json)
                return
            if content_type not in ("application/x-protobuf", "application/protobuf", "application/json"):
                self._error(415, f"unsupported Content-Type {content_type!r}: use "
                            "application/x-protobuf or application/json", as_json)
                return
            try:
                body = _inflate(body, (self.headers.get("Content-Encoding") or "").strip().lower())
                decoded = decoder(body, content_type)
            except BodyError as exc:
                self._error(exc.status, str(exc), as_json)
                return
            except InputError as exc:
                self._error(400, str(exc), as_json)
                return
            try:
                receiver.accept(decoded)
            except OverloadedError as exc:
                self._error(503, f"collector overloaded: {exc}", as_json,
                            {"Retry-After": str(OverloadedError.retry_after)})
                return
            except Exception as exc:  # the store failed: nothing was acknowledged
                self._error(503, f"could not store the batch: {exc}", as_json, {"Retry-After": "5"})
                return
            response = _response_message("traces" if self.path.startswith("/v1/traces") else "logs", decoded)
            if as_json:
                self._reply(200, json_format.MessageToJson(response, indent=None).encode(), "application/json")
            else:
                self._reply(200, response.SerializeToString(), "application/x-protobuf")

        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                return _read_chunked(self.rfile, MAX_BODY_BYTES)
            length_text = self.headers.get("Content-Length")
            if length_text is None:
                raise BodyError(HTTPStatus.LENGTH_REQUIRED, "request has neither Content-Length nor a chunked body")
            try:
                length = int(length_text)
            except ValueError:
                raise BodyError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_text!r}") from None
            if length > MAX_BODY_BYTES:
                raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"body of {length} bytes is larger than the limit of {MAX_BODY_BYTES}")
            body = self.rfile.read(length)
            if len(body) != length:
                raise BodyError(HTTPStatus.BAD_REQUEST, "body shorter than its Content-Length")
            return body

    return OTLPHandler


class HTTPReceiver:
    """OTLP/HTTP on a host and port; ``port`` is the bound one (useful with port 0)."""

    def __init__(self, receiver: Receiver, host: str, port: int) -> None:
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((host, port), make_http_handler(receiver))
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="payscope-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GRPCReceiver:
    """OTLP/gRPC (traces and logs services) on a host and port."""

    def __init__(self, receiver: Receiver, host: str, port: int) -> None:
        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        def export(decode: Callable[[Any], Decoded], signal: str) -> Callable[[Any, Any], Any]:
            def handler(request: Any, context: Any) -> Any:
                decoded = decode(request)
                try:
                    receiver.accept(decoded)
                except OverloadedError as exc:
                    context.set_trailing_metadata((("retry-after", "1"),))
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"collector overloaded: {exc}")
                except Exception as exc:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"could not store the batch: {exc}")
                return _response_message(signal, decoded)
            return handler

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            Export = staticmethod(export(spans_from_request, "traces"))

        class LogsService(logs_service_pb2_grpc.LogsServiceServicer):
            Export = staticmethod(export(logs_from_request, "logs"))

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", MAX_BODY_BYTES)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(LogsService(), self.server)
        self.host = host
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
