"""Reading OpenTelemetry semantic-convention attributes (old and new spellings) into span facts."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from payscope.model import STATUS_ERROR, Span, SpanRow

_TIMEOUT_TEXT = re.compile(
    r"time[d\s_-]?out|deadline[ _]exceeded|ETIMEDOUT|ESOCKETTIMEDOUT|context deadline|"
    r"ReadTimeout|ConnectTimeout|TimeoutError|TimeoutException|SocketTimeoutException|timeout",
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

# Attribute names written by `payscope run` (documented in docs/attributes.md).
ATTR_TIMEOUT_CONNECT = "payscope.timeout.connect_ms"
ATTR_TIMEOUT_READ = "payscope.timeout.read_ms"
ATTR_TIMEOUT_TOTAL = "payscope.timeout.total_ms"
ATTR_TIMEOUT_SOURCE = "payscope.timeout.source"
ATTR_RETRY_MAX = "payscope.retry.max_attempts"
ATTR_FAULT = "payscope.fault.kind"  # written by the sidecar's fault injection
ATTR_AMOUNT = ("payscope.amount", "app.payment.amount", "payment.amount", "amount", "app.order.amount")

HTTP_STATUS = ("http.response.status_code", "http.status_code")
RPC_STATUS = ("rpc.grpc.status_code", "rpc.response.status_code")
HTTP_METHOD = ("http.request.method", "http.method")
ERROR_TYPE = ("error.type", "exception.type", "error")
PEER = ("peer.service", "server.address", "net.peer.name", "http.host", "db.system",
        "messaging.destination.name", "rpc.service")
URL = ("url.full", "http.url")
PATH = ("url.path", "http.target")
ROUTE = ("http.route", "url.template")
BUDGET = ("payscope.caller_budget_ms", "http.request.header.x_envoy_expected_rq_timeout_ms",
          "http.request.header.x-envoy-expected-rq-timeout-ms", "http.request.header.grpc_timeout",
          "http.request.header.grpc-timeout", "rpc.grpc.request.metadata.grpc-timeout")
_GRPC_TIMEOUT_UNITS = {"H": 3_600_000.0, "M": 60_000.0, "S": 1000.0, "m": 1.0, "u": 1e-3, "n": 1e-6}

# Every attribute the derivation reads; others are stored but never looked at here.
READ_KEYS = frozenset(HTTP_STATUS + RPC_STATUS + HTTP_METHOD + ERROR_TYPE + PEER + URL + PATH + ROUTE + ATTR_AMOUNT
                      + BUDGET + (
    "rpc.method", "http.request.resend_count", ATTR_TIMEOUT_CONNECT, ATTR_TIMEOUT_READ, ATTR_TIMEOUT_TOTAL,
    ATTR_TIMEOUT_SOURCE, ATTR_RETRY_MAX, ATTR_FAULT))
KEY_SUFFIXES = ("order_id", "orderid", "order.id", "payment_id", "paymentid", "payment.id",
                "transaction_id", "transaction.id", "charge_id", "charge.id")

_ID_SEGMENT = re.compile(r"^(?:\d+|[0-9a-fA-F-]{16,}|[0-9a-fA-F]{8,}|[A-Za-z]{2,4}_[A-Za-z0-9]{6,}|"
                         r"(?=(?:\D*\d){3})[\w.-]+)$")  # or anything with 3+ digits: ord-1000, INV2024001
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)[^/?#]*(/[^?#]*)?", re.IGNORECASE)
# a route's parameter segment as frameworks write it: {order_id} (OpenAPI, FastAPI, Spring), <order_id> or
# <int:order_id> (Flask, Django), :order_id (Express, Rails)
_ROUTE_PARAM = re.compile(r"\{[^/{}]+\}|<(?:\w+:)?\w+>|:\w+")
_KEY_TEMPLATE = re.compile(r"order|payment|charge|transaction|invoice", re.IGNORECASE)


BUSINESS_KEY, REQUEST_ID, IDEMPOTENCY = 1, 2, 4  # what an attribute's key says its value is (any case)
_key_roles: dict[str, int] = {}


def key_role(key: str) -> int:
    """What ``key`` names, as flags: a business key (``order_id``, ``paymentId``), a request id, an idempotency
    key; 0 for anything else. The one answer for the collector's filter (:func:`wanted`) and for
    :func:`derive`, so that a span keeps the same keys whichever way it was decoded."""
    role = _key_roles.get(key)
    if role is None:
        lowered = key.lower()
        role = (BUSINESS_KEY * lowered.endswith(KEY_SUFFIXES)
                | REQUEST_ID * ("request_id" in lowered or "request-id" in lowered)
                | IDEMPOTENCY * ("dempotency" in lowered))
        if len(_key_roles) < 100_000:
            _key_roles[key] = role
    return role


def wanted(key: str) -> bool:
    """Whether derivation reads this attribute (a fast filter for raw protobuf attributes)."""
    return key in READ_KEYS or key_role(key) != 0


def first(attrs: dict[str, Any], keys: Iterable[str]) -> Any:
    """The value of the first of ``keys`` present (and not empty) in ``attrs``."""
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


_INT32 = 2**31


def _int(value: Any) -> int | None:
    """A small integer attribute (a status, a count), or None when it is not one: the store keeps
    no number its column cannot hold, so one client's odd value never fails another's batch."""
    if value is None:
        return None
    if type(value) is not int:
        try:
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            return None
    return value if -_INT32 <= value < _INT32 else None


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def budget_ms(attrs: dict[str, Any]) -> float | None:
    """What the caller said it would wait: Envoy's expected timeout header, or gRPC's grpc-timeout."""
    for key in BUDGET:
        value = attrs.get(key)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is None:
            continue
        text = str(value).strip()
        if text[-1:] in _GRPC_TIMEOUT_UNITS and text[:-1].isdigit() and len(text) <= 9:
            return int(text[:-1]) * _GRPC_TIMEOUT_UNITS[text[-1]]
        number = _float(text)
        if number is not None:
            return number
    return None


def template_path(path: str) -> str:
    """A URL path with ids replaced by ``{id}``, so calls to one endpoint group together."""
    path = path.split("?", 1)[0]
    return "/".join("{id}" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/"))


def error_text(status_message: str, attrs: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """Everything a span says about its error: status message, error.type, exception events."""
    parts = [status_message]
    error_type = first(attrs, ERROR_TYPE)
    if error_type is not None:
        parts.append(str(error_type))
    for event in events:
        if "exception" in str(event.get("name", "")):
            ev_attrs = event.get("attributes") or {}
            parts.append(str(ev_attrs.get("exception.type", "")))
            parts.append(str(ev_attrs.get("exception.message", "")))
    return " ".join(p for p in parts if p)


def classify_error(kind: str, status_code: int, http_status: int | None, rpc_status: int | None,
                   text: str) -> str | None:
    """``timeout``, ``connection``, ``http_5xx``, ``business``, or None for a healthy span."""
    failed = status_code == STATUS_ERROR or (http_status is not None and http_status >= 500) or bool(rpc_status)
    # A client that got a 4xx failed; a server that answered one did its job.
    failed = failed or (http_status is not None and http_status >= 400 and kind == "client")
    if not failed:
        return None
    if rpc_status == GRPC_DEADLINE_EXCEEDED or http_status in (504, 408) or _TIMEOUT_TEXT.search(text):
        return "timeout"
    if rpc_status == GRPC_UNAVAILABLE or _CONNECTION_TEXT.search(text):
        return "connection"
    if http_status is not None and http_status >= 500:
        return "http_5xx"
    if rpc_status in (2, 13, 15):
        return "http_5xx"
    return "business"


class _Plan(NamedTuple):
    """What :func:`derive` reads from attributes with a given set of keys: for each fact, the keys of its
    spellings that are there, in the order of preference; the keys that name an id; which options are there."""

    http_status: tuple[str, ...]
    rpc_status: tuple[str, ...]
    method: tuple[str, ...]
    url: tuple[str, ...]
    peer: tuple[str, ...]
    route: tuple[str, ...]
    path: tuple[str, ...]
    amount: tuple[str, ...]
    roles: tuple[tuple[str, int], ...]
    captured: bool
    budget: bool


_plans: dict[tuple[str, ...], _Plan] = {}


# A span named after its request's method and path ("GET /orders/{id}"; Zipkin's "delete /code/{code}"), or as
# older HTTP instrumentations named them ("HTTP POST"): what a span without a method attribute says its method is.
_NAMED_METHOD = re.compile(r"(?i)(?:(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS|TRACE|CONNECT) /|"
                           r"HTTP (GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS|TRACE|CONNECT)$)")


def _plan(keys: tuple[str, ...]) -> _Plan:
    """The plan for attributes with these keys, made the first time a set of keys is seen (spans of one kind
    from one instrumentation share theirs; :func:`derive` looks it up first). Only which keys are there goes
    into it, never a value: an empty value is still skipped by :func:`first` when the span is read."""
    there = set(keys)

    def of(spellings: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(k for k in spellings if k in there)

    plan = _Plan(of(HTTP_STATUS), of(RPC_STATUS), of(HTTP_METHOD), of(URL), of(PEER), of(ROUTE), of(PATH),
                 of(ATTR_AMOUNT), tuple((k, role) for k in keys if (role := key_role(k))),
                 bool(there & {ATTR_TIMEOUT_SOURCE, ATTR_TIMEOUT_READ, ATTR_TIMEOUT_TOTAL, ATTR_RETRY_MAX}),
                 bool(there.intersection(BUDGET)))
    if len(_plans) < 10_000:
        _plans[keys] = plan
    return plan


def derive(trace_id: str, span_id: str, parent_id: str | None, service: str, name: str, kind: str,
           start_ns: int, end_ns: int, status_code: int, status_message: str, attrs: dict[str, Any],
           events: list[dict[str, Any]]) -> SpanRow:
    """The facts the analysis needs, from a span's fields and (at least its ``wanted``) attributes."""
    plan = _plans.get(keys := tuple(attrs)) or _plan(keys)
    http_status = _int(first(attrs, plan.http_status))
    rpc_status = _int(first(attrs, plan.rpc_status))
    method_value = first(attrs, plan.method)
    if method_value is None and (named := _NAMED_METHOD.match(name)) is not None:
        method_value = named.group(1) or named.group(2)  # no method attribute, but the name says it
    method = str(method_value).upper() if method_value is not None else None
    text = error_text(status_message, attrs, events) if status_code == STATUS_ERROR or (
        http_status or 0) >= 400 or rpc_status else ""
    url = first(attrs, plan.url)
    url_match = _URL.match(str(url)) if url is not None else None
    peer = first(attrs, plan.peer)
    if peer is None and url_match:
        peer = url_match.group(1)
    rpc_service, rpc_method = attrs.get("rpc.service"), attrs.get("rpc.method")
    route = first(attrs, plan.route)
    path = first(attrs, plan.path)
    if rpc_service and rpc_method:
        operation = f"{rpc_service}/{rpc_method}"
    elif kind in ("client", "producer"):
        if route is None:
            raw_path = url_match.group(2) if url_match else path
            route = template_path(str(raw_path or "/")) if (url_match or raw_path is not None) else None
        operation = f"{method} {route}" if method and route else (span_name_or(name, method))
    else:
        if route is None and method and name.upper() == method and path is not None:
            route = template_path(str(path))  # a span named only by its method (a sidecar, a proxy)
        operation = f"{method} {route}" if method and route else name
    keys_found: list[str] = []
    request_ids: list[str] = []
    idempotency = False
    for k, role in plan.roles:
        v = attrs[k]
        if role & BUSINESS_KEY and isinstance(v, (str, int)) and v != "":
            keys_found.append(str(v))
        if role & REQUEST_ID:  # captured X-Request-ID: lets log lines find the trace
            request_ids.extend(f"rid:{item}" for item in (v if isinstance(v, (list, tuple)) else [v]) if item)
        if role & IDEMPOTENCY:
            idempotency = True
    keys_found += request_ids
    if route and path:
        slots = _key_slots(str(route))
        if slots:
            segments = str(path).split("?")[0].split("/")
            keys_found.extend(segments[i] for i in slots if i < len(segments) and segments[i])
    captured = plan.captured
    return SpanRow(
        trace_id, span_id, parent_id, service, name, kind, start_ns, end_ns, status_code, status_message,
        classify_error(kind, status_code, http_status, rpc_status, text), operation,
        str(peer) if peer is not None else None, method, http_status,
        _int(attrs.get("http.request.resend_count")) or 0, idempotency,
        _float(attrs.get(ATTR_TIMEOUT_CONNECT)) if captured else None,
        _float(attrs.get(ATTR_TIMEOUT_READ)) if captured else None,
        _float(attrs.get(ATTR_TIMEOUT_TOTAL)) if captured else None,
        str(attrs[ATTR_TIMEOUT_SOURCE]) if ATTR_TIMEOUT_SOURCE in attrs else None,
        _int(attrs.get(ATTR_RETRY_MAX)) if captured else None,
        _float(first(attrs, plan.amount)), tuple(dict.fromkeys(keys_found)) if keys_found else (),
        budget_ms(attrs) if plan.budget and kind in ("server", "consumer") else None,
        str(attrs[ATTR_FAULT]) if attrs.get(ATTR_FAULT) else None)


@functools.lru_cache(maxsize=4096)
def _key_slots(route: str) -> tuple[int, ...]:
    """Which segments of a route are a business key's parameter (``/orders/{order_id}``: segment 2)."""
    if not any(mark in route for mark in "{<:"):
        return ()
    return tuple(i for i, tmpl in enumerate(route.split("/"))
                 if _ROUTE_PARAM.fullmatch(tmpl) and _KEY_TEMPLATE.search(tmpl))


def span_name_or(name: str, method: str | None) -> str:
    return name if not method or name.upper() != method else method


def row_of(span: Span) -> SpanRow:
    """The derived facts of a decoded span."""
    return derive(span.trace_id, span.span_id, span.parent_id, span.service, span.name, span.kind,
                  span.start_ns, span.end_ns, span.status_code, span.status_message, span.attributes, span.events)


_HEX_32 = re.compile(r"[0-9a-f]{32}")
_HEX_16 = re.compile(r"[0-9a-f]{16}")
_DECIMAL_ID = re.compile(r"\d{1,20}")


def normalise_trace_id(value: Any) -> str | None:
    """32 lower-case hex digits from W3C, B3/Jaeger 16-hex, dashed or upper-case, or Datadog decimal ids."""
    if value is None:
        return None
    if type(value) is str and _HEX_32.fullmatch(value):  # already the answer: asked of every log line
        return value if value.strip("0") else None
    text = str(value).strip().lower().replace("-", "")
    if _HEX_32.fullmatch(text):
        return text if text.strip("0") else None
    if _HEX_16.fullmatch(text):
        return text.rjust(32, "0") if text.strip("0") else None
    if _DECIMAL_ID.fullmatch(text) and int(text) < 2**64:  # Datadog writes 64-bit ids in decimal
        return format(int(text), "032x")
    return None
