"""How the store keeps a span: its OTLP protobuf body, to and from :class:`~payscope.model.Span`."""

from __future__ import annotations

import base64
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from payscope import semconv
from payscope.model import SPAN_KINDS, EncodedSpan, Span


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


def events_of(span: PbSpan) -> list[dict[str, Any]]:
    return [{"name": ev.name, "time_ns": ev.time_unix_nano, "attributes": attributes(ev.attributes)}
            for ev in span.events]


def decode_span(span: PbSpan, service: str, resource: dict[str, Any]) -> Span:
    """A protobuf span, fully decoded (every attribute and event)."""
    kind = span.kind
    parent = span.parent_span_id
    return Span(span.trace_id.hex(), span.span_id.hex(), parent.hex() if parent else None, service, span.name,
                SPAN_KINDS[kind] if 0 <= kind < len(SPAN_KINDS) else "unspecified",
                span.start_time_unix_nano, span.end_time_unix_nano, span.status.code, span.status.message,
                attributes(span.attributes), events_of(span) if span.events else [], resource)


def _put_any(target: Any, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, list):
        target.array_value.SetInParent()
        for item in value:
            _put_any(target.array_value.values.add(), item)
    elif isinstance(value, dict):
        target.kvlist_value.SetInParent()
        for k, v in value.items():
            kv = target.kvlist_value.values.add()
            kv.key = k
            _put_any(kv.value, v)
    elif value is not None:
        target.string_value = str(value)


def encode_span(span: Span) -> EncodedSpan:
    """A decoded span (imported, or redacted) as the store keeps it."""
    pb = PbSpan(trace_id=bytes.fromhex(span.trace_id), span_id=bytes.fromhex(span.span_id),
                parent_span_id=bytes.fromhex(span.parent_id) if span.parent_id else b"", name=span.name,
                kind=SPAN_KINDS.index(span.kind) if span.kind in SPAN_KINDS else 0,  # type: ignore[arg-type]
                start_time_unix_nano=span.start_ns, end_time_unix_nano=span.end_ns)
    pb.status.code = span.status_code  # type: ignore[assignment]
    pb.status.message = span.status_message
    for key, value in span.attributes.items():
        kv = pb.attributes.add()
        kv.key = key
        _put_any(kv.value, value)
    for event in span.events:
        ev = pb.events.add(name=str(event.get("name", "")), time_unix_nano=int(event.get("time_ns", 0)))
        for key, value in (event.get("attributes") or {}).items():
            kv = ev.attributes.add()
            kv.key = key
            _put_any(kv.value, value)
    return EncodedSpan(semconv.row_of(span), pb.SerializeToString(), span.resource)


def decode_body(body: bytes, service: str, resource: dict[str, Any]) -> Span:
    """A stored span body back to a :class:`Span`."""
    return decode_span(PbSpan.FromString(body), service, resource)


