"""Accept W3C tracecontext, B3 (single and multi header), Jaeger and SkyWalking's sw8 on the way in; emit W3C
(and baggage), and sw8 when ``PAYSCOPE_EMIT_SW8`` is set."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context, create_key, get_value, set_value
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .sw8 import SkyWalkingPropagator


def _incoming() -> list[TextMapPropagator]:
    found: list[TextMapPropagator] = [TraceContextTextMapPropagator()]
    try:
        from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat

        found += [B3SingleFormat(), B3MultiFormat()]
    except ImportError:  # pragma: no cover - declared dependency, but never break the service
        pass
    try:
        from opentelemetry.propagators.jaeger import JaegerPropagator

        found.append(JaegerPropagator())
    except ImportError:  # pragma: no cover
        pass
    return [*found, SkyWalkingPropagator(emit=False)]


REQUEST_ID = "x-request-id"
_REQUEST_ID_KEY = create_key("payscope-request-id")


def request_id_header() -> str:
    """The header that carries a request id: ``X-Request-ID``, or ``PAYSCOPE_REQUEST_ID_HEADER``."""
    return (os.environ.get("PAYSCOPE_REQUEST_ID_HEADER") or REQUEST_ID).strip().lower()


def request_id(context: Context | None) -> str | None:
    """The request id that arrived with the request this context belongs to."""
    value = get_value(_REQUEST_ID_KEY, context)
    return str(value) if value else None


class PayscopePropagator(TextMapPropagator):
    """Continue whichever trace header arrived (the first of W3C, B3, Jaeger, sw8); always send W3C
    ``traceparent`` and baggage onward, and sw8 when asked to.

    An incoming ``X-Request-ID`` travels with the request's context and goes out again on every
    call the service makes for it, so that logs which know only the request id can be joined.
    """

    def __init__(self) -> None:
        self.header = request_id_header()
        self._incoming = _incoming()
        self._outgoing: list[TextMapPropagator] = [TraceContextTextMapPropagator(), W3CBaggagePropagator()]
        sw8 = SkyWalkingPropagator()
        if sw8.emit:
            self._outgoing.append(sw8)

    def extract(self, carrier: CarrierT, context: Context | None = None,
                getter: Getter[CarrierT] = default_getter) -> Context:
        result = None
        for propagator in self._incoming:
            extracted = propagator.extract(carrier, context, getter)
            if trace.get_current_span(extracted).get_span_context().is_valid:
                result = W3CBaggagePropagator().extract(carrier, extracted, getter)
                break
        if result is None:
            result = W3CBaggagePropagator().extract(carrier, context, getter)
        found = getter.get(carrier, self.header)
        if found:
            result = set_value(_REQUEST_ID_KEY, found[0], result)
        return result

    def inject(self, carrier: CarrierT, context: Context | None = None,
               setter: Setter[CarrierT] = default_setter) -> None:
        for propagator in self._outgoing:
            propagator.inject(carrier, context, setter)
        value = get_value(_REQUEST_ID_KEY, context)
        getter = getattr(carrier, "get", None)
        spellings = {self.header, self.header.title(), title_case(self.header)}
        if value and not (getter and any(getter(h) for h in spellings)):
            setter.set(carrier, title_case(self.header), str(value))  # the service's own id, if it set one, wins

    @property
    def fields(self) -> set[str]:
        out: set[str] = set()
        for propagator in self._incoming + self._outgoing:  # type: ignore[operator]
            out |= set(propagator.fields)
        return out | {self.header}


def title_case(header: str) -> str:
    """``x-request-id`` -> ``X-Request-ID``, as the header is usually written."""
    return "-".join("ID" if part == "id" else part.capitalize() for part in header.split("-"))


def propagator() -> Any:
    return PayscopePropagator()
