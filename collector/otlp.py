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
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from payscope.errors import InputError
from payscope.model import SPAN_KINDS, LogRecord, Span

from .redaction import may_need_redaction, redact_attributes, redact_text

_HEX_ID_FIELDS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_SEVERITY_NAMES = {1: "TRACE", 5: "DEBUG", 9: "INFO", 13: "WARN", 17: "ERROR", 21: "FATAL"}


@dataclass
class Decoded:
    """What one OTLP request held: the accepted items and what was rejected, and why."""

    spans: list[Span] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bool_value":
        return value.bool_value
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        which = value.WhichOneof("value")
        if which == "string_value":
            out[kv.key] = value.string_value
        elif which == "int_value":
            out[kv.key] = value.int_value
        else:
            out[kv.key] = any_value(value)
    return out


def _resource_service(resource: dict[str, Any]) -> str:
    return str(resource.get("service.name") or "unknown_service")


def _keep(attrs: dict[str, Any]) -> dict[str, Any]:
    # Integers are varints on the wire, invisible to the byte scan: a card number sent as one is caught here.
    for value in attrs.values():
        if type(value) is int and value >= 10**12:
            return redact_attributes(attrs)
    return attrs


def spans_from_request(request: ExportTraceServiceRequest, raw: bytes | None = None) -> Decoded:
    """The valid spans of a request (redacted), counting the invalid ones as rejected.

    ``raw`` is the request as serialized, when at hand: a request whose bytes hold nothing that
    looks like a card number or a secret skips the per-value redaction.
    """
    out = Decoded()
    if raw is None:
        raw = request.SerializeToString()
    redact = redact_attributes if may_need_redaction(raw) else _keep
    text = redact_text if redact is redact_attributes else str
    append = out.spans.append
    kinds = SPAN_KINDS
    for resource_spans in request.resource_spans:
        resource = redact(attributes(resource_spans.resource.attributes))
        service = _resource_service(resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                if len(trace_id) != 16 or not any(trace_id):
                    out.reject(f"span {span.name!r}: trace id must be 16 non-zero bytes")
                    continue
                if len(span_id) != 8 or not any(span_id):
                    out.reject(f"span {span.name!r}: span id must be 8 non-zero bytes")
                    continue
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if end < start:
                    out.reject(f"span {span.name!r}: ends before it starts")
                    continue
                parent = span.parent_span_id
                events = [
                    {"name": ev.name, "time_ns": ev.time_unix_nano,
                     "attributes": redact(attributes(ev.attributes))}
                    for ev in span.events
                ] if span.events else []
                kind = span.kind
                append(Span(
                    trace_id.hex(), span_id.hex(), parent.hex() if parent else None, service,
                    span.name, kinds[kind] if 0 <= kind < len(kinds) else "unspecified",
                    start, end, span.status.code, text(span.status.message),
                    redact(attributes(span.attributes)), events, resource,
                ))
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


def decode_traces(body: bytes, content_type: str) -> Decoded:
    """Decode an OTLP/HTTP traces body; raises InputError when it cannot be read at all."""
    if "json" in content_type:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed JSON: {exc}") from None
        return spans_from_request(parse_json_message(document, ExportTraceServiceRequest))
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise InputError(f"malformed protobuf ExportTraceServiceRequest: {exc}") from None
    return spans_from_request(request, body)


def decode_logs(body: bytes, content_type: str) -> Decoded:
    """Decode an OTLP/HTTP logs body; raises InputError when it cannot be read at all."""
    if "json" in content_type:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed JSON: {exc}") from None
        return logs_from_request(parse_json_message(document, ExportLogsServiceRequest))
    request = ExportLogsServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise InputError(f"malformed protobuf ExportLogsServiceRequest: {exc}") from None
    return logs_from_request(request)


__all__ = ["Decoded", "decode_logs", "decode_traces", "logs_from_request",
           "parse_json_message", "spans_from_request"]
