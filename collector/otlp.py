"""Turning OTLP requests (protobuf or JSON) into payscope spans and log records."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from payscope import semconv
from payscope.errors import InputError
from payscope.model import SPAN_KINDS, EncodedSpan, LogRecord, SpanRow, row_fields

from .files import fix_surrogates, may_hold_surrogates
from .redaction import is_secret_key, may_need_redaction, redact_any, redact_attributes, redact_log, redact_span
from .store.codec import any_value, attributes, decode_span, encode_span

_HEX_ID_FIELDS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
_HEX = re.compile(r"^[0-9a-fA-F]*$")
OTLP_SOURCE = "otlp"  # where a record sent over OTLP came from starts with this
_SEVERITY_NAMES = {1: "TRACE", 5: "DEBUG", 9: "INFO", 13: "WARN", 17: "ERROR", 21: "FATAL"}


@dataclass
class Decoded:
    """What one OTLP request held: the accepted items and what was rejected, and why."""

    spans: list[EncodedSpan] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    stored: Stored | None = None  # what a decoding process stored itself (then ``spans`` and ``logs`` are empty)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)

    def stored_as(self, seconds: float) -> Decoded:
        """This request once its spans and records are durable in the store: what the collector still needs to
        know of them (how many, and which traces they belong to), without the items themselves."""
        trace_ids = list(dict.fromkeys(e.row.trace_id for e in self.spans))
        return Decoded([], [], self.rejected, self.reasons, Stored(trace_ids, len(self.spans), len(self.logs), seconds))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # sent back from a decoding process: spans as columns of plain tuples, the cheapest to pickle
        spans = self.spans
        return _rebuilt, ([row_fields(e.row) for e in spans], [e.body for e in spans], [e.resource for e in spans],
                          self.logs, self.rejected, self.reasons, self.stored)


@dataclass(frozen=True)
class Stored:
    """Spans and log records a decoding process stored (a committed transaction of its own): their traces, how
    many there were, and how long storing them took."""

    trace_ids: list[str]
    spans: int
    logs: int
    seconds: float


def _rebuilt(rows: list[tuple[Any, ...]], bodies: list[bytes], resources: list[dict[str, Any]],
             logs: list[LogRecord], rejected: int, reasons: list[str], stored: Stored | None = None) -> Decoded:
    return Decoded([EncodedSpan(SpanRow(*r), b, res) for r, b, res in zip(rows, bodies, resources, strict=True)],
                   logs, rejected, reasons, stored)


def _resource_service(resource: dict[str, Any]) -> str:
    return str(resource.get("service.name") or "unknown_service")


_MAX_NS = 2**63 - 1  # what a signed 64-bit store column holds: the year 2262


_NO_TRACE, _NO_SPAN = bytes(16), bytes(8)


def _problem(trace_id: bytes, span_id: bytes, parent: bytes, start_ns: int, end_ns: int, events: Any) -> str | None:
    """Why a span with these fields cannot be stored, or None (its fields read once by the caller: each read of a
    protobuf field makes a new object)."""
    if len(trace_id) != 16 or trace_id == _NO_TRACE:
        return "a span's trace id must be 16 non-zero bytes"
    if len(span_id) != 8 or span_id == _NO_SPAN:
        return "a span's span id must be 8 non-zero bytes"
    if parent and len(parent) != 8:
        return "a span's parent span id must be 8 bytes"
    if end_ns < start_ns:
        return "a span ends before it starts"
    if end_ns > _MAX_NS:
        return f"a span's time {end_ns} ns is past the year 2262"
    for event in events:
        if event.time_unix_nano > _MAX_NS:
            return f"a span event's time {event.time_unix_nano} ns is past the year 2262"
    return None


_BIG = 10**12  # no smaller number has the 13 digits of the shortest card number


def _number_may_be_card(value: Any, which: str | None) -> bool:
    if which == "int_value":
        return value.int_value >= _BIG
    if which == "double_value":
        return abs(value.double_value) >= _BIG
    if which == "array_value":
        return any(_number_may_be_card(v, v.WhichOneof("value")) for v in value.array_value.values)
    return which == "kvlist_value"  # keys at depth: decoded and masked the careful way


_SKIP, _WANTED, _SECRET = 0, 1, 2
_key_kinds: dict[str, int] = {}


def _key_kind(key: str) -> int:
    kind = _key_kinds.get(key)
    if kind is None:
        kind = _SECRET if is_secret_key(key) else _WANTED if semconv.wanted(key) else _SKIP
        if len(_key_kinds) < 100_000:
            _key_kinds[key] = kind
    return kind


def _wanted_attributes(kvs: Any) -> dict[str, Any] | None:
    """The attributes the analysis reads; None when a key or a number could need masking.

    (Integers and floats are binary on the wire, invisible to the byte scan of the request, and a
    secret key's value may be plain text.)
    """
    out = {}
    kinds = _key_kinds
    for kv in kvs:
        key = kv.key
        kind = kinds.get(key)
        if kind is None:
            kind = _key_kind(key)
        if kind == _SECRET:
            return None
        value = kv.value
        which = value.WhichOneof("value")
        if which != "string_value" and _number_may_be_card(value, which):
            return None
        if kind == _WANTED:
            out[key] = value.string_value if which == "string_value" else any_value(value)
    return out


def _lite_request_type() -> type[Any]:
    """ExportTraceServiceRequest as it is on the wire, but with a span's attributes, events and links left as
    the bytes of each: one parse gives a span's attributes as a list of ``bytes``, each an encoded KeyValue,
    without a Python object for every key and value. Made from the OTLP trace descriptor itself, so every
    other field is the same (an upstream field added later is declared the same way); the bytes of a span
    serialize back to what came."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    file = descriptor_pb2.FileDescriptorProto()
    trace_pb2.DESCRIPTOR.CopyToProto(file)
    real, lite = f".{file.package}.", ".payscope.lite.trace.v1."
    file.name, file.package = "payscope/lite/trace.proto", lite.strip(".")

    def retarget(messages: Any) -> None:
        for message in messages:
            for f in message.field:
                if f.type_name.startswith(real):
                    f.type_name = lite + f.type_name[len(real):]
                if message.name == "Span" and f.name in ("attributes", "events", "links"):
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    f.ClearField("type_name")
            retarget(message.nested_type)

    retarget(file.message_type)
    request = file.message_type.add(name="ExportTraceServiceRequest")
    request.field.add(name="resource_spans", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED, type_name=lite + "ResourceSpans")
    pool = descriptor_pool.DescriptorPool()  # its own pool: the OTLP files it depends on, then itself
    for dependency in (common_pb2.DESCRIPTOR, resource_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        dependency.CopyToProto(proto)
        pool.Add(proto)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{file.package}.{request.name}"))


_LiteRequest = _lite_request_type()
_CAREFUL = 3  # a value to decode the careful way: a secret's key, or a number as long as a card number
_kv_seen: dict[bytes, tuple[int, str, Any]] = {}
_KV_SEEN_MAX = 65_536  # then forgotten at once: a value seen once (a path with an id) is not worth keeping


def _kv_entry(encoded: bytes) -> tuple[int, str, Any]:
    """(kind, key, value) of one encoded KeyValue, the value only when the analysis reads it. Remembered for
    the next span that carries the same bytes (most attributes repeat: the method, the route, the peer),
    unless it is a secret or a long number, which are never kept."""
    kv = KeyValue.FromString(encoded)
    key = kv.key
    kind = _key_kind(key)
    if kind == _SECRET:
        return _CAREFUL, key, None
    value = kv.value
    which = value.WhichOneof("value")
    if which != "string_value" and _number_may_be_card(value, which):
        return _CAREFUL, key, None
    entry = (kind, key, (value.string_value if which == "string_value" else any_value(value))
             if kind == _WANTED else None)
    if type(entry[2]) in (str, int, float, bool, type(None)):  # nothing a reader could change in place
        if len(_kv_seen) >= _KV_SEEN_MAX:
            _kv_seen.clear()
        _kv_seen[encoded] = entry
    return entry


def _wanted_of_encoded(encoded_kvs: Any) -> dict[str, Any] | None:
    """:func:`_wanted_attributes` for attributes still encoded, one KeyValue's bytes each."""
    out = {}
    seen = _kv_seen
    for encoded in encoded_kvs:
        entry = seen.get(encoded) or _kv_entry(encoded)
        kind = entry[0]
        if kind == _WANTED:
            out[entry[1]] = entry[2]
        elif kind == _CAREFUL:
            return None
    return out


def spans_from_request(request: ExportTraceServiceRequest, raw: bytes | None = None,
                       careful: bool | None = None) -> Decoded:
    """The valid spans of a request, redacted and ready to store; invalid ones counted as rejected.

    ``raw`` is the request as serialized, when at hand. The fast path keeps a span's body as it came,
    and is taken only when nothing in it could need masking: no suspect text anywhere in the
    request's bytes, no secret key, no number as long as a card number, no events or links (whose
    numbers are not checked here). Every other span is decoded whole and masked (:func:`redact_span`).
    """
    if raw is None:
        raw = request.SerializeToString()
    careful = may_need_redaction(raw) if careful is None else careful
    return _spans(request, (lambda kvs: None) if careful else _wanted_attributes, lambda span: span)


def _spans(request: Any, read_wanted: Callable[[Any], dict[str, Any] | None],
           whole: Callable[[Any], PbSpan]) -> Decoded:
    """The one loop over a request's spans, either kind (:func:`_parse_traces`): ``read_wanted`` gives a span's
    attributes for the fast path, or None when the span is to be decoded whole (``whole`` gives it as the OTLP
    message) and masked."""
    out = Decoded()
    append = out.spans.append
    derive = semconv.derive
    kinds = SPAN_KINDS
    for resource_spans in request.resource_spans:
        resource = redact_attributes(attributes(resource_spans.resource.attributes))
        service = _resource_service(resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                events = span.events
                wanted = None if events or span.links else read_wanted(span.attributes)
                if wanted is None:
                    span = whole(span)
                    events = span.events
                trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
                start_ns, end_ns = span.start_time_unix_nano, span.end_time_unix_nano
                problem = _problem(trace_id, span_id, parent, start_ns, end_ns, events)
                if problem:
                    out.reject(problem)
                    continue
                if wanted is None:
                    append(encode_span(redact_span(decode_span(span, service, resource))))
                    continue
                kind = span.kind
                status = span.status
                row = derive(trace_id.hex(), span_id.hex(), parent.hex() if parent else None, service,
                             span.name, kinds[kind] if 0 <= kind < len(kinds) else "unspecified",
                             start_ns, end_ns, status.code, status.message, wanted, [])
                append(EncodedSpan(row, span.SerializeToString(), resource))
    return out


def logs_from_request(request: ExportLogsServiceRequest) -> Decoded:
    """The log records of a request, redacted, with their trace ids when they carry one."""
    out = Decoded()
    for resource_logs in request.resource_logs:
        resource = attributes(resource_logs.resource.attributes)
        service = _resource_service(resource)
        host = str(resource.get("host.name") or "")
        for scope_logs in resource_logs.scope_logs:
            for rec in scope_logs.log_records:
                time_ns = rec.time_unix_nano or rec.observed_time_unix_nano
                if not time_ns:
                    out.reject("a log record has neither time_unix_nano nor observed_time_unix_nano")
                    continue
                if time_ns > _MAX_NS:
                    out.reject(f"a log record's time {time_ns} ns is past the year 2262")
                    continue
                body = any_value(rec.body) if rec.HasField("body") else ""
                message = body if isinstance(body, str) else json.dumps(redact_any(body), default=str)
                attrs = attributes(rec.attributes)
                trace_id = rec.trace_id.hex() if len(rec.trace_id) == 16 and any(rec.trace_id) else None
                span_id = rec.span_id.hex() if len(rec.span_id) == 8 and any(rec.span_id) else None
                severity = rec.severity_text
                if not severity and rec.severity_number:
                    severity = _SEVERITY_NAMES.get((rec.severity_number - 1) // 4 * 4 + 1, "")
                where = str(attrs.get("code.filepath") or attrs.get("code.file.path")
                            or attrs.get("log.file.path") or "")
                line = attrs.get("code.lineno") or attrs.get("code.line.number")
                source = f"{OTLP_SOURCE} {where}:{line}" if where and line else f"{OTLP_SOURCE} {where}".strip()
                out.logs.append(redact_log(LogRecord(
                    time_ns=time_ns, service=service, host=host, severity=severity.upper()[:16],
                    message=message, attributes=attrs, source=source,
                    trace_id=trace_id, span_id=span_id,
                    link_method="trace_id" if trace_id else "none",
                    link_confidence=1.0 if trace_id else 0.0)))
    return out


# --- JSON --------------------------------------------------------------------

def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP JSON writes ids as hex; protobuf's JSON mapping expects base64."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _HEX_ID_FIELDS and isinstance(value, str):
                if not _HEX.match(value) or len(value) % 2:
                    raise InputError(f"{key} {value!r} is not a hex string")
                node[key] = base64.b64encode(bytes.fromhex(value)).decode()
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)
    return node


def parse_json_message(document: Any, message_type: type[Any]) -> Any:
    if not isinstance(document, dict):
        raise InputError("an OTLP JSON request must be a JSON object")
    try:
        return json_format.ParseDict(_hex_ids_to_base64(document), message_type(),
                                     ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise InputError(f"not an OTLP JSON request: {str(exc)[:300]}") from None
    except RecursionError:
        raise InputError("not an OTLP JSON request: nested deeper than OTLP goes") from None


def _parse(body: bytes, content_type: str, message_type: type[Any]) -> tuple[Any, bytes | None]:
    """The request message of an OTLP/HTTP body, and its protobuf bytes when that is what came."""
    if "json" in content_type:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed JSON: {exc}") from None
        except RecursionError:
            raise InputError("malformed JSON: nested deeper than the parser goes") from None
        if may_hold_surrogates(body):
            document = fix_surrogates(document)
        return parse_json_message(document, message_type), None
    request = message_type()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise InputError(f"malformed protobuf {message_type.__name__}: {exc}") from None
    return request, body


def count_items(request: Any) -> int:
    """How many spans or log records a parsed request holds (no decoding: lengths of repeated fields)."""
    if isinstance(request, (ExportTraceServiceRequest, _LiteRequest)):
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)


def _parse_traces(body: bytes, content_type: str) -> tuple[Any, bytes | None]:
    """A traces request: protobuf bytes in which nothing could need masking are parsed with their spans'
    attributes left encoded (:func:`_lite_request_type`); anything else as the OTLP message."""
    lite = "json" not in content_type and not may_need_redaction(body)
    return _parse(body, content_type, _LiteRequest if lite else ExportTraceServiceRequest)


def _convert_traces(request: Any, raw: bytes | None) -> Decoded:
    """What :func:`spans_from_request` gives, for either kind of request :func:`_parse_traces` made."""
    if not isinstance(request, _LiteRequest):
        return spans_from_request(request, raw, careful=None if raw is None else True)
    try:
        return _spans(request, _wanted_of_encoded, lambda span: PbSpan.FromString(span.SerializeToString()))
    except DecodeError as exc:  # a KeyValue, event or link inside a span, read only now
        raise InputError(f"malformed protobuf ExportTraceServiceRequest: {exc}") from None


class Signal:
    """One OTLP signal: what parses a body, and what turns a parsed request into payscope's records."""

    def __init__(self, name: str, parse: Callable[[bytes, str], tuple[Any, bytes | None]],
                 convert: Callable[[Any, bytes | None], Decoded]) -> None:
        self.name = name
        self._parse = parse
        self.convert = convert

    def parse(self, body: bytes, content_type: str) -> tuple[Any, bytes | None]:
        """The request message of a body, and its protobuf bytes when that is what came; InputError if unreadable."""
        return self._parse(body, content_type)


TRACES = Signal("traces", _parse_traces, _convert_traces)
LOGS = Signal("logs", lambda body, content_type: _parse(body, content_type, ExportLogsServiceRequest),
              lambda request, raw: logs_from_request(request))


def decode_traces(body: bytes, content_type: str) -> Decoded:
    """Decode an OTLP/HTTP traces body; raises InputError when it cannot be read at all."""
    return TRACES.convert(*TRACES.parse(body, content_type))


def decode_logs(body: bytes, content_type: str) -> Decoded:
    """Decode an OTLP/HTTP logs body; raises InputError when it cannot be read at all."""
    return logs_from_request(_parse(body, content_type, ExportLogsServiceRequest)[0])


__all__ = ["LOGS", "TRACES", "Decoded", "Signal", "count_items", "decode_logs", "decode_traces",
           "logs_from_request", "parse_json_message", "spans_from_request"]
