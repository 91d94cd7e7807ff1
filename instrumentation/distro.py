"""payscope's OpenTelemetry distro, configurator and start-up report, loaded by entry point.

`payscope run` points OpenTelemetry's own auto-instrumentation at these; they set up export to the
payscope collector with bounded queues and short timeouts, mask secrets before anything leaves the
process, add trace ids to the service's log lines, and record timeouts on client spans.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from opentelemetry import trace
from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]
from opentelemetry.sdk._configuration import _BaseConfigurator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from . import keys
from .propagation import request_id
from .redaction import redact_any, redact_attributes, redact_text

EXPORT_TIMEOUT_S = 2.0
QUEUE_SIZE = 4096
CAPTURED_HEADERS = "x-request-id,idempotency-key,x-envoy-expected-rq-timeout-ms,grpc-timeout"
instrumented: list[str] = []
_log = logging.getLogger("payscope.instrumentation")


def chosen() -> bool:
    """Only `payscope run` selects payscope; a plain `opentelemetry-instrument` elsewhere is left alone."""
    return os.environ.get("OTEL_PYTHON_DISTRO") == "payscope"


class PayscopeDistro(BaseDistro):  # type: ignore[misc]
    """Defaults for every OpenTelemetry setting payscope relies on; the user's own settings win."""

    def _configure(self, **kwargs: Any) -> None:
        if not chosen():
            return
        # OpenTelemetry's own complaints (another configurator installed, an unreachable collector) stay
        # out of the service's output; payscope says what matters once, itself.
        otel_logger = logging.getLogger("opentelemetry")
        otel_logger.propagate = False
        otel_logger.addHandler(logging.NullHandler())
        os.environ.setdefault("OTEL_TRACES_EXPORTER", "otlp")
        os.environ.setdefault("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        from .propagation import request_id_header

        headers = ",".join(dict.fromkeys([*CAPTURED_HEADERS.split(","), request_id_header()]))
        os.environ.setdefault("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", headers)
        os.environ.setdefault("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", headers)
        os.environ.setdefault("OTEL_PYTHON_LOG_CORRELATION", "false")
        # payscope exports each log record once, through its own handler (one that leaves the service's
        # basicConfig() working); the logging instrumentor's root handler would send every record again.
        os.environ["OTEL_PYTHON_LOG_AUTO_INSTRUMENTATION"] = "false"

    def load_instrumentor(self, entry_point: Any, **kwargs: Any) -> None:
        if not chosen():
            super().load_instrumentor(entry_point, **kwargs)
            return
        try:
            entry_point.load()().instrument(**{**_HOOKS.get(entry_point.name, {}), **kwargs})
            if entry_point.name in _AFTER:
                _AFTER[entry_point.name]()
        except ImportError:
            return  # the library is not installed here: not instrumented, and not reported as such
        except Exception as exc:  # a broken instrumentor must not stop the service
            _log.warning("payscope: %s was not instrumented: %s", entry_point.name, exc)
            return
        instrumented.append(entry_point.name)


class RedactingExporter(SpanExporter):
    """Masks card numbers, CVVs and credentials, then hands spans to the real exporter."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export([_redacted(s) for s in spans])
        except Exception as exc:
            result = SpanExportResult.FAILURE
            _notice(f"export failed ({type(exc).__name__})")
        if result is not SpanExportResult.SUCCESS:
            _notice(f"the collector at {os.environ.get('OTEL_EXPORTER_OTLP_ENDPOINT', '?')} did not take "
                    "spans; they are dropped, the service is not affected")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))


_noticed: set[str] = set()


def _notice(message: str) -> None:
    """Say a problem once, on stderr, and never again."""
    if message not in _noticed and not os.environ.get("PAYSCOPE_QUIET"):
        _noticed.add(message)
        print(f"payscope: {message}", file=sys.stderr, flush=True)


def _masked(span: ReadableSpan) -> tuple[str, dict[str, Any], list[Any], list[Any], str | None]:
    """A finished span's name, attributes, events, links and status message, with every secret masked."""
    message = span.status.description
    return (redact_text(span.name), redact_attributes(span.attributes or {}),
            [(redact_text(e.name), e.timestamp, redact_attributes(e.attributes or {})) for e in span.events],
            [(link.context, redact_attributes(link.attributes or {})) for link in span.links],
            redact_text(message) if message else message)


def _redacted(span: ReadableSpan) -> ReadableSpan:
    from opentelemetry.sdk.trace import Event
    from opentelemetry.trace import Link, Status

    name, attrs, events, links, message = _masked(span)
    return ReadableSpan(
        name=name, context=span.context, parent=span.parent, resource=_masked_resource(span.resource),
        attributes=attrs, events=[Event(n, a, t) for n, t, a in events], links=[Link(c, a) for c, a in links],
        kind=span.kind, status=Status(span.status.status_code, message),
        start_time=span.start_time, end_time=span.end_time, instrumentation_scope=span.instrumentation_scope)


_resources: dict[int, Resource] = {}


def _masked_resource(resource: Resource) -> Resource:
    """The resource with its attributes masked (once per resource: there are one or two)."""
    masked = _resources.get(id(resource))
    if masked is None:
        masked = _resources[id(resource)] = Resource(redact_attributes(dict(resource.attributes)),
                                                     resource.schema_url)
    return masked


class BusinessKeyProcessor(SpanProcessor):
    """Order id, payment id and amount onto server spans (query string here; headers and JSON bodies
    through the framework hooks below), and the worker's pid.

    The resource is built once, before a pre-fork server forks: ``process.pid`` on the span says
    which worker really served the request.
    """

    def __init__(self) -> None:
        self.names = keys.key_names()
        self.open: dict[int, Any] = {}  # server spans still running, by span id, for the ASGI body hook

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        try:
            if span.kind != trace.SpanKind.SERVER:
                return
            span.set_attribute("process.pid", os.getpid())
            self.open[span.context.span_id] = span
            arrived = request_id(parent_context)
            if arrived:  # whichever header carries it (PAYSCOPE_REQUEST_ID_HEADER), under one name
                span.set_attribute(REQUEST_ID_ATTRIBUTE, arrived)
            attrs = span.attributes or {}
            query = attrs.get("url.query") or str(attrs.get("http.target", "")).partition("?")[2]
            set_keys(span, keys.from_pairs(parse_qsl(str(query)), self.names))
        except Exception:
            pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.kind == trace.SpanKind.SERVER:
            self.open.pop(span.context.span_id, None)  # type: ignore[union-attr]


REQUEST_ID_ATTRIBUTE = "payscope.request_id"
_key_processor = BusinessKeyProcessor()


def set_keys(span: Any, found: dict[str, str]) -> None:
    """The keys not set yet (the query string comes first, then the body, then headers)."""
    if not found or span is None or not span.is_recording():
        return
    attrs = span.attributes or {}
    for name, value in found.items():
        if f"payscope.{name}" not in attrs:
            span.set_attribute(f"payscope.{name}", value)


def _wsgi_request_hook(span: Any, environ: dict[str, Any]) -> None:
    """Flask: JSON body fields and headers. The body is read once and put back for the application."""
    try:
        names = _key_processor.names
        if keys.is_json(environ.get("CONTENT_TYPE")):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if 0 < length <= keys.MAX_BODY:
                body = environ["wsgi.input"].read(length)
                environ["wsgi.input"] = io.BytesIO(body)
                set_keys(span, keys.from_json(body, names))
        headers = ((k[5:].replace("_", "-"), v) for k, v in environ.items() if k.startswith("HTTP_"))
        set_keys(span, keys.from_pairs(headers, names))
    except Exception:
        pass


def _django_request_hook(span: Any, request: Any) -> None:
    try:
        names = _key_processor.names
        if keys.is_json(request.META.get("CONTENT_TYPE")) and \
                0 < int(request.META.get("CONTENT_LENGTH") or 0) <= keys.MAX_BODY:
            set_keys(span, keys.from_json(request.body, names))  # Django keeps the body for the view
        set_keys(span, keys.from_pairs(request.headers.items(), names))
    except Exception:
        pass


def _asgi_headers(scope: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers") or []]


def _asgi_server_hook(span: Any, scope: dict[str, Any]) -> None:
    try:
        set_keys(span, keys.from_pairs(_asgi_headers(scope), _key_processor.names))
    except Exception:
        pass


def _asgi_receive_hook(span: Any, scope: dict[str, Any], message: dict[str, Any]) -> None:
    """FastAPI/Starlette: the body arrives through ``receive``; its keys go on the request's server span."""
    try:
        if message.get("type") != "http.request" or message.get("more_body"):
            return
        if not keys.is_json(dict(_asgi_headers(scope)).get("content-type")):
            return
        parent = getattr(span, "parent", None)
        server = _key_processor.open.get(parent.span_id) if parent is not None else None
        set_keys(server, keys.from_json(message.get("body") or b"", _key_processor.names))
    except Exception:
        pass


def _message_keys(span: Any, body: Any) -> None:
    """A consumed message's JSON body fields onto its consumer span: a callback or an event names its order."""
    try:
        if isinstance(body, str):
            body = body.encode()
        if isinstance(body, (bytes, bytearray)) and 0 < len(body) <= keys.MAX_BODY:
            set_keys(span, keys.from_json(bytes(body), _key_processor.names))
    except Exception:
        pass


def _pika_consume_hook(span: Any, body: bytes, properties: Any) -> None:
    _message_keys(span, body)


def _kafka_consume_hook(span: Any, record: Any, args: Any, kwargs: Any) -> None:
    _message_keys(span, getattr(record, "value", None))


def _confluent_kafka_keys() -> None:
    """confluent-kafka's instrumentor has no hooks: its consumer span, current once ``poll`` returns a message,
    gets the message's keys from a wrapper around that ``poll``."""
    import confluent_kafka
    import wrapt

    def poll(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        record = wrapped(*args, **kwargs)
        if record is not None and record.error() is None:
            _message_keys(getattr(instance, "_current_consume_span", None), record.value())
        return record

    wrapt.wrap_function_wrapper(confluent_kafka.Consumer, "poll", poll)


_AFTER: dict[str, Any] = {"confluent_kafka": _confluent_kafka_keys}

_HOOKS: dict[str, dict[str, Any]] = {
    "pika": {"consume_hook": _pika_consume_hook},
    "kafka": {"consume_hook": _kafka_consume_hook},
    "flask": {"request_hook": _wsgi_request_hook},
    "django": {"request_hook": _django_request_hook},
    "fastapi": {"server_request_hook": _asgi_server_hook, "client_request_hook": _asgi_receive_hook},
    "starlette": {"server_request_hook": _asgi_server_hook, "client_request_hook": _asgi_receive_hook},
}


class _ToRelay:
    """A processor that hands records to the relay's channel; flushing sends what is buffered now."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def shutdown(self) -> None:
        self.channel.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.channel.flush()
        return True


class RelaySpanProcessor(_ToRelay, SpanProcessor):
    """Finished spans, masked, to the `payscope run` relay as plain tuples: no encoding in the service."""

    def on_end(self, span: ReadableSpan) -> None:
        from .relay import span_tuple

        try:
            self.channel.put("S", span_tuple(span, *_masked(span)))
        except Exception:
            pass


class _LogProcessor:
    """The shape of an SDK LogRecordProcessor, without the SDK's private base class."""

    def enabled(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class MaskingLogProcessor(_LogProcessor):
    """Masks card numbers, CVVs and credentials in a log record before any exporter sees it."""

    def on_emit(self, log_record: Any) -> None:
        try:
            record = log_record.log_record
            record.body = redact_any(record.body)
            if record.attributes:
                for key, value in redact_attributes(record.attributes).items():
                    record.attributes[key] = value
        except Exception:
            pass


class RelayLogProcessor(_ToRelay, _LogProcessor):
    """Log records to the relay as plain tuples."""

    def on_emit(self, log_record: Any) -> None:
        from .relay import log_tuple

        try:
            self.channel.put("L", log_tuple(log_record.log_record))
        except Exception:
            pass


class PayscopeConfigurator(_BaseConfigurator):  # type: ignore[misc]
    """Tracer and logger providers exporting to the payscope collector: through the `payscope run` relay
    when there is one (``PAYSCOPE_RELAY``), otherwise from this process with bounded batch exporters."""

    def _configure(self, **kwargs: Any) -> None:
        if not chosen():
            return
        from . import logs
        from .capture import RetryPolicyProcessor, TimeoutCaptureInstrumentor

        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318").rstrip("/")
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "unknown_service"),
                                    "process.pid": os.getpid()})
        provider = TracerProvider(resource=resource)
        _key_processor.names = keys.key_names()
        provider.add_span_processor(_key_processor)
        provider.add_span_processor(RetryPolicyProcessor())
        relay_path = os.environ.get("PAYSCOPE_RELAY")
        channel = None
        if relay_path and os.path.exists(relay_path):
            from .relay import Channel

            channel = Channel(relay_path, redact_attributes(dict(resource.attributes)), _notice)
            provider.add_span_processor(RelaySpanProcessor(channel))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(
                RedactingExporter(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=EXPORT_TIMEOUT_S)),
                max_queue_size=QUEUE_SIZE, export_timeout_millis=int(EXPORT_TIMEOUT_S * 1000)))
        trace.set_tracer_provider(provider)
        self._configure_logs(endpoint, resource, channel)
        logs.install()
        TimeoutCaptureInstrumentor().instrument()
        instrumented.append("timeouts")

    @staticmethod
    def _configure_logs(endpoint: str, resource: Resource, channel: Any) -> None:
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler

        provider = LoggerProvider(resource=resource)
        provider.add_log_record_processor(MaskingLogProcessor())  # type: ignore[arg-type]
        if channel is not None:
            provider.add_log_record_processor(RelayLogProcessor(channel))  # type: ignore[arg-type]
        else:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

            provider.add_log_record_processor(BatchLogRecordProcessor(
                OTLPLogExporter(endpoint=f"{endpoint}/v1/logs", timeout=EXPORT_TIMEOUT_S),
                max_queue_size=QUEUE_SIZE, export_timeout_millis=int(EXPORT_TIMEOUT_S * 1000)))
        set_logger_provider(provider)
        handler = LoggingHandler(level=logging.NOTSET, logger_provider=provider)
        # Not a handler on the root logger: that would make the service's own basicConfig() a no-op.
        original = logging.Logger.callHandlers

        def call_handlers(self: logging.Logger, record: logging.LogRecord) -> None:
            original(self, record)
            # never export what the exporters themselves log (that would loop)
            if not self.name.startswith("opentelemetry") and not (record.threadName or "").startswith("Otel"):
                try:
                    handler.handle(record)
                except Exception:
                    pass

        logging.Logger.callHandlers = call_handlers  # type: ignore[method-assign]


def report() -> None:
    """One line on stderr at start-up: what is instrumented, and where it goes."""
    if os.environ.get("PAYSCOPE_QUIET") or not chosen():
        return
    names = ", ".join(sorted(set(instrumented))) or "nothing"
    relay = os.environ.get("PAYSCOPE_RELAY")
    how = "through the payscope run relay" if relay and os.path.exists(relay) else "from this process"
    print(f"payscope: {os.environ.get('OTEL_SERVICE_NAME', '?')} (pid {os.getpid()}) instrumented: {names}; "
          f"exporting to {os.environ.get('OTEL_EXPORTER_OTLP_ENDPOINT', '?')} {how}", file=sys.stderr, flush=True)
