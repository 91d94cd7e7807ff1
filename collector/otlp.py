"""Turning OTLP requests (protobuf or JSON) into payscope spans and log records."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from payscope import semconv
from payscope.errors import InputError
from payscope.model import SPAN_KINDS, EncodedSpan, LogRecord

from .redaction import may_need_redaction, redact_attributes, redact_text
from .store.codec import any_value, attributes, decode_span, encode_span, events_of

_HEX_ID_FIELDS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_SEVERITY_NAMES = {1: "TRACE", 5: "DEBUG", 9: "INFO", 13: "WARN", 17: "ERROR", 21: "FATAL"}


@dataclass
class Decoded:
    """What one OTLP request held: the accepted items and what was rejected, and why."""

    spans: list[EncodedSpan] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def _resource_service(resource: dict[str, Any]) -> str:
    return str(resource.get("service.name") or "unknown_service")


def _problem(span: PbSpan) -> str | None:
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return f"span {span.name!r}: trace id must be 16 non-zero bytes"
    if len(span.span_id) != 8 or not any(span.span_id):
        return f"span {span.name!r}: span id must be 8 non-zero bytes"
    if span.end_time_unix_nano < span.start_time_unix_nano:
        return f"span {span.name!r}: ends before it starts"
    return None


def _wanted_attributes(kvs: Any) -> dict[str, Any] | None:
    """The attributes the analysis reads; None when an integer could be a card number.

    (Integers are varints on the wire, invisible to the byte scan of the request.)
    """
    read_keys, suffixes = semconv.READ_KEYS, semconv.KEY_SUFFIXES
    out = {}
    for kv in kvs:
        value = kv.value
        if value.int_value >= 10**12:
            return None
        key = kv.key
        if key in read_keys or key.endswith(suffixes) or "dempotency" in key or "request_id" in key \
                or "request-id" in key:
            out[key] = any_value(value)
    return out


def spans_from_request(request: ExportTraceServiceRequest, raw: bytes | None = None) -> Decoded:
    """The valid spans of a request, redacted and ready to store; invalid ones counted as rejected.

    ``raw`` is the request as serialized, when at hand. A request whose bytes hold nothing that
    looks like a card number or a secret takes the fast path: only the attributes the analysis
    reads are decoded, and each span's body is stored as it came.
    """
    out = Decoded()
    if raw is None:
        raw = request.SerializeToString()
    careful = may_need_redaction(raw)
    append = out.spans.append
    derive = semconv.derive
    kinds = SPAN_KINDS
    for resource_spans in request.resource_spans:
        resource = redact_attributes(attributes(resource_spans.resource.attributes))
        service = _resource_service(resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                problem = _problem(span)
                if problem:
                    out.reject(problem)
                    continue
                wanted = None if careful else _wanted_attributes(span.attributes)
                if wanted is None:
                    full = decode_span(span, service, resource)
                    full.attributes = redact_attributes(full.attributes)
                    full.status_message = redact_text(full.status_message)
                    for event in full.events:
                        event["attributes"] = redact_attributes(event["attributes"])
                    append(encode_span(full))
                    continue
                kind = span.kind
                parent = span.parent_span_id
                row = derive(span.trace_id.hex(), span.span_id.hex(), parent.hex() if parent else None, service,
                             span.name, kinds[kind] if 0 <= kind < len(kinds) else "unspecified",
                             span.start_time_unix_nano, span.end_time_unix_nano, span.status.code,
                             span.status.message, wanted, events_of(span) if span.events else [])
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
                    out.reject("log record without time_unix_nano or observed_time_unix_nano")
                    continue
                body = any_value(rec.body) if rec.HasField("body") else ""
                message = body if isinstance(body, str) else json.dumps(body, default=str)
                attrs = redact_attributes(attributes(rec.attributes))
                trace_id = rec.trace_id.hex() if any(rec.trace_id) else None
                span_id = rec.span_id.hex() if any(rec.span_id) else None
                severity = rec.severity_text
                if not severity and rec.severity_number:
                    severity = _SEVERITY_NAMES.get((rec.severity_number - 1) // 4 * 4 + 1, "")
                source = str(attrs.get("code.filepath") or attrs.get("log.file.path") or "otlp")
                if "code.lineno" in attrs and source != "otlp":
                    source = f"{source}:{attrs['code.lineno']}"
                out.logs.append(LogRecord(
                    time_ns=time_ns, service=service, host=host, severity=severity.upper(),
                    message=redact_text(message), attributes=attrs, source=source,
                    trace_id=trace_id, span_id=span_id,
                    link_method="trace_id" if trace_id else "none",
                    link_confidence=1.0 if trace_id else 0.0))
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
        raise InputError(f"not an OTLP JSON request: {exc}") from None


def _parse(body: bytes, content_type: str, message_type: type[Any]) -> tuple[Any, bytes | None]:
    """The request message of an OTLP/HTTP body, and its protobuf bytes when that is what came."""
    if "json" in content_type:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed JSON: {exc}") from None
        return parse_json_message(document, message_type), None
    request = message_type()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise InputError(f"malformed protobuf {message_type.__name__}: {exc}") from None
    return request, body


def decode_traces(body: bytes, content_type: str) -> Decoded:
    """Decode an OTLP/HTTP traces body; raises InputError when it cannot be read at all."""
    return spans_from_request(*_parse(body, content_type, ExportTraceServiceRequest))


def decode_logs(body: bytes, content_type: str) -> Decoded:
    """Decode an OTLP/HTTP logs body; raises InputError when it cannot be read at all."""
    return logs_from_request(_parse(body, content_type, ExportLogsServiceRequest)[0])


__all__ = ["Decoded", "decode_logs", "decode_traces", "logs_from_request",
           "parse_json_message", "spans_from_request"]
