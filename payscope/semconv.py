"""Reading OpenTelemetry semantic-convention attributes, old and new spellings alike."""

from __future__ import annotations

import re
from typing import Any

from payscope.model import Span

_TIMEOUT_TEXT = re.compile(
    r"time[d\s_-]?out|deadline[ _]exceeded|deadline_exceeded|ETIMEDOUT|ESOCKETTIMEDOUT|"
    r"context deadline|ReadTimeout|ConnectTimeout|TimeoutError|TimeoutException|"
    r"SocketTimeoutException|timeout",
    re.IGNORECASE,
)
_CONNECTION_TEXT = re.compile(
    r"connection refused|ECONNREFUSED|ECONNRESET|connection reset|ConnectError|"
    r"ConnectionError|ConnectException|no route to host|name resolution|UNAVAILABLE|"
    r"EHOSTUNREACH|broken pipe|remote end closed|Max retries exceeded",
    re.IGNORECASE,
)

GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNAVAILABLE = 14


def first(attrs: dict[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` present in ``attrs``."""
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def http_status(span: Span) -> int | None:
    return _as_int(first(span.attributes, "http.response.status_code", "http.status_code"))


def rpc_status(span: Span) -> int | None:
    return _as_int(first(span.attributes, "rpc.grpc.status_code", "rpc.response.status_code"))


def http_method(span: Span) -> str | None:
    value = first(span.attributes, "http.request.method", "http.method")
    return str(value).upper() if value is not None else None


def error_text(span: Span) -> str:
    """Everything a span says about its error: status message, error.type, exceptions."""
    parts = [span.status_message or ""]
    error_type = first(span.attributes, "error.type", "exception.type", "error")
    if error_type is not None:
        parts.append(str(error_type))
    for event in span.events:
        if event.get("name") == "exception" or "exception" in str(event.get("name", "")):
            ev_attrs = event.get("attributes") or {}
            parts.append(str(ev_attrs.get("exception.type", "")))
            parts.append(str(ev_attrs.get("exception.message", "")))
    return " ".join(p for p in parts if p)


def error_class(span: Span) -> str | None:
    """``timeout``, ``connection``, ``http_5xx``, ``business``, or None for a healthy span."""
    status = http_status(span)
    rpc = rpc_status(span)
    if not span.is_error and (status is None or status < 500) and not rpc:
        # Client spans with 4xx are left unset by the SDKs on the server side only.
        if not (status is not None and status >= 400 and span.kind == "client"):
            return None
    text = error_text(span)
    if rpc == GRPC_DEADLINE_EXCEEDED or status in (504, 408) or _TIMEOUT_TEXT.search(text):
        return "timeout"
    if rpc == GRPC_UNAVAILABLE or _CONNECTION_TEXT.search(text):
        return "connection"
    if status is not None and status >= 500:
        return "http_5xx"
    if rpc is not None and rpc != 0:
        return "http_5xx" if rpc in (2, 13, 14, 15) else "business"
    if not span.is_error and status is None:
        return None
    return "business"


def _host_of(url: str) -> str | None:
    match = re.match(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)", url, re.IGNORECASE)
    return match.group(1) if match else None


def peer_of(span: Span) -> str | None:
    """The callee a client span names, when the callee's own spans are not at hand."""
    attrs = span.attributes
    value = first(attrs, "peer.service", "server.address", "net.peer.name", "http.host",
                  "db.system", "messaging.destination.name", "rpc.service")
    if value is None:
        url = first(attrs, "url.full", "http.url")
        if url is not None:
            value = _host_of(str(url))
    if value is None:
        return None
    return str(value)


def route_of(span: Span) -> str:
    """The operation a span performs, stable across calls (route, not the raw path)."""
    attrs = span.attributes
    rpc_service = attrs.get("rpc.service")
    rpc_method = attrs.get("rpc.method")
    if rpc_service and rpc_method:
        return f"{rpc_service}/{rpc_method}"
    method = http_method(span)
    route = first(attrs, "http.route", "url.template")
    if method and route:
        return f"{method} {route}"
    return span.name


_KEY_SUFFIXES = ("order_id", "orderid", "order.id", "payment_id", "paymentid", "payment.id",
                 "transaction_id", "transaction.id", "charge_id", "charge.id")


def business_keys(span: Span) -> list[str]:
    """Order, payment and charge ids a span carries (``payscope.*``, ``app.*`` or bare)."""
    keys = []
    for name, value in span.attributes.items():
        lowered = name.lower()
        if lowered.endswith(_KEY_SUFFIXES) and isinstance(value, (str, int)) and value != "":
            keys.append(str(value))
    return keys
