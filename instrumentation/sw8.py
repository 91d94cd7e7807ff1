"""Apache SkyWalking's ``sw8`` header, so that a shop running SkyWalking agents beside OpenTelemetry gets one
trace.

``sw8`` (SkyWalking's cross-process propagation protocol, version 3) is eight fields joined by ``-``: the
sample flag, then the trace id, the parent segment id, the parent span id (a number), the parent service,
its instance, its endpoint and the address the caller called, the strings in base64.

On the way in, a SkyWalking trace id becomes the OpenTelemetry trace id: a 32-hex id (what the Python agent
makes) is taken as it is, any other (the Java agent's ``a1b2.54.16...``) is hashed to 128 bits, so every
service that sees one SkyWalking trace computes the same id. The parent span id is the hash of the parent
segment and span, or, for a header payscope wrote itself, the span it named. The SkyWalking trace id travels
on with the request's context.

On the way out (``PAYSCOPE_EMIT_SW8=1``), ``sw8`` names the current span as the parent segment, with the
SkyWalking trace id that came in, or the OpenTelemetry one when none did; a SkyWalking agent downstream then
continues the same trace.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import socket
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context, create_key, get_value, set_value
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

HEADER = "sw8"
EMIT = "PAYSCOPE_EMIT_SW8"
_TRACE_KEY = create_key("payscope-sw8-trace-id")
_UNKNOWN = "-"  # a field SkyWalking requires to be non-empty, when payscope does not know it


@dataclass(frozen=True, slots=True)
class Sw8:
    sampled: bool
    trace: str
    segment: str
    span: int
    service: str
    instance: str
    endpoint: str
    address: str

    def header(self) -> str:
        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        return "-".join(["1" if self.sampled else "0", b64(self.trace), b64(self.segment), str(self.span),
                         b64(self.service), b64(self.instance), b64(self.endpoint), b64(self.address)])


def parse(value: str) -> Sw8 | None:
    """The header's fields, or None when it is not a well-formed ``sw8`` (then it is ignored)."""
    parts = value.strip().split("-")
    if len(parts) != 8 or parts[0] not in ("0", "1") or not parts[3].isdigit():
        return None
    try:
        texts = [base64.b64decode(p, validate=True).decode() for i, p in enumerate(parts) if i not in (0, 3)]
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not texts[0] or not texts[1]:
        return None
    return Sw8(parts[0] == "1", texts[0], texts[1], int(parts[3]), *texts[2:])


def _hash(text: str, size: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "big") or 1


def _hex(text: str, digits: int) -> int | None:
    if len(text) == digits:
        try:
            return int(text, 16) or None
        except ValueError:
            return None
    return None


def trace_id_of(sw_trace: str) -> int:
    """The OpenTelemetry trace id of a SkyWalking trace id."""
    return _hex(sw_trace.replace("-", "").lower(), 32) or _hash(sw_trace, 16)


def parent_span_id_of(segment: str, span: int) -> int:
    """The OpenTelemetry span id of the parent a header names (exact for a header payscope wrote)."""
    if span == 0 and (exact := _hex(segment, 16)):
        return exact
    return _hash(f"{segment}/{span}", 8)


def emitting() -> bool:
    return os.environ.get(EMIT, "").strip().lower() in ("1", "true", "yes")


class SkyWalkingPropagator(TextMapPropagator):
    """Reads ``sw8``; writes it too when ``emit`` (default: ``PAYSCOPE_EMIT_SW8``)."""

    def __init__(self, emit: bool | None = None) -> None:
        self.emit = emitting() if emit is None else emit
        self.instance = socket.gethostname() or _UNKNOWN

    def extract(self, carrier: CarrierT, context: Context | None = None,
                getter: Getter[CarrierT] = default_getter) -> Context:
        if context is None:
            context = Context()
        found = getter.get(carrier, HEADER)
        sw = parse(found[0]) if found else None
        if sw is None:
            return context
        parent = SpanContext(trace_id_of(sw.trace), parent_span_id_of(sw.segment, sw.span), is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED if sw.sampled else TraceFlags.DEFAULT))
        return set_value(_TRACE_KEY, sw.trace, trace.set_span_in_context(NonRecordingSpan(parent), context))

    def inject(self, carrier: CarrierT, context: Context | None = None,
               setter: Setter[CarrierT] = default_setter) -> None:
        if not self.emit:
            return
        span = trace.get_current_span(context)
        current = span.get_span_context()
        if not current.is_valid:
            return
        sw_trace = get_value(_TRACE_KEY, context)
        resource = getattr(span, "resource", None)  # an SDK span knows its service
        service = (resource.attributes.get("service.name") if resource is not None else None) \
            or os.environ.get("OTEL_SERVICE_NAME") or "unknown_service"
        setter.set(carrier, HEADER, Sw8(
            sampled=current.trace_flags.sampled, trace=str(sw_trace) if sw_trace else format(current.trace_id, "032x"),
            segment=format(current.span_id, "016x"), span=0, service=str(service), instance=self.instance,
            endpoint=str(getattr(span, "name", "") or _UNKNOWN), address=_UNKNOWN).header())

    @property
    def fields(self) -> set[str]:
        return {HEADER}
