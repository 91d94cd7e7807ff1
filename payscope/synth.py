"""A small simulator of payment topologies that writes OTLP JSON as other teams' SDKs would.

Used by the tests and benchmarks to plant known timeout and retry faults in
traces that carry only standard OpenTelemetry attributes (no payscope ones),
and to make stores of any size. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LANGUAGE_TIMEOUT = {
    "java": ("java.net.SocketTimeoutException", "Read timed out"),
    "go": ("*url.Error", "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"),
    "node": ("Error", "ETIMEDOUT"),
    "python": ("requests.exceptions.ReadTimeout", "HTTPConnectionPool: Read timed out. (read timeout=1.0)"),
}


@dataclass
class Service:
    name: str
    median_ms: float = 20.0      # own work per request
    sigma: float = 0.4           # lognormal spread of own work
    tail_p: float = 0.0          # share of requests that hit a slow path
    tail_ms: float = 0.0         # median of the slow path
    error_rate: float = 0.0      # business errors (HTTP 500 without a cause)
    language: str = "java"
    instrumented: bool = True
    clock_offset_ms: float = 0.0
    route: str = "/work"
    method: str = "POST"
    calls: list[Call] = field(default_factory=list)


@dataclass
class Call:
    callee: str
    timeout_ms: float | None = 1000.0
    attempts: int = 1
    backoff_ms: float = 50.0
    idempotency_key: bool = False


@dataclass
class Topology:
    services: dict[str, Service]
    entry: str


def _hex(rng: random.Random, nbytes: int) -> str:
    return format(rng.getrandbits(nbytes * 8) or 1, f"0{nbytes * 2}x")


def _attr(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": str(value)}}


class Simulator:
    """Runs requests through a topology and collects spans per service."""

    def __init__(self, topology: Topology, seed: int = 1) -> None:
        self.topology = topology
        self.rng = random.Random(seed)
        self.spans: dict[str, list[dict[str, Any]]] = {}

    def _own_ms(self, svc: Service) -> float:
        base = svc.median_ms
        if svc.tail_p and self.rng.random() < svc.tail_p:
            base = svc.tail_ms
        return self.rng.lognormvariate(0, svc.sigma) * base

    def _emit(self, svc: Service, span: dict[str, Any]) -> None:
        shift = int(svc.clock_offset_ms * 1e6)
        span["startTimeUnixNano"] = str(span.pop("start") + shift)
        span["endTimeUnixNano"] = str(span.pop("end") + shift)
        self.spans.setdefault(svc.name, []).append(span)

    def serve(self, name: str, trace_id: str, parent: str | None, start: int, order_id: int) -> tuple[int, bool]:
        """Handle one request at ``start`` (ns); return (end ns, success)."""
        svc = self.topology.services[name]
        span_id = _hex(self.rng, 8)
        own = self._own_ms(svc)
        t = start + int(own * 0.3e6)
        ok = True
        for call in svc.calls:
            t, call_ok = self.call(svc, call, trace_id, span_id if svc.instrumented else parent, t, order_id)
            if not call_ok:
                ok = False
                break
        t += int(own * 0.7e6)
        if ok and svc.error_rate and self.rng.random() < svc.error_rate:
            ok = False
        if svc.instrumented:
            route = svc.route
            path = route.replace("{order_id}", str(order_id))
            span = {
                "traceId": trace_id, "spanId": span_id, "name": f"{svc.method} {route}", "kind": 2,
                "start": start, "end": t,
                "attributes": [_attr("http.request.method", svc.method), _attr("http.route", route),
                               _attr("url.path", path), _attr("http.response.status_code", 200 if ok else 500)],
                "status": {"code": 1 if ok else 2},
            }
            if parent:
                span["parentSpanId"] = parent
            self._emit(svc, span)
        return t, ok

    def call(self, caller: Service, call: Call, trace_id: str, parent: str | None, start: int,
             order_id: int) -> tuple[int, bool]:
        callee = self.topology.services[call.callee]
        t = start
        key = _hex(self.rng, 8) if call.idempotency_key else None
        for attempt in range(call.attempts):
            span_id = _hex(self.rng, 8)
            net = int(self.rng.uniform(0.3, 1.5) * 1e6)
            server_end, server_ok = self.serve(call.callee, trace_id, span_id if caller.instrumented else parent,
                                               t + net, order_id)
            response_at = server_end + net
            timed_out = call.timeout_ms is not None and response_at - t > call.timeout_ms * 1e6
            end = response_at
            if timed_out and call.timeout_ms is not None:
                end = t + int(call.timeout_ms * 1e6) + int(self.rng.uniform(0.05, 0.4) * 1e6)
            ok = server_ok and not timed_out
            if caller.instrumented:
                path = callee.route.replace("{order_id}", str(order_id))
                attrs = [_attr("http.request.method", callee.method), _attr("server.address", callee.name),
                         _attr("server.port", 8080), _attr("url.full", f"http://{callee.name}:8080{path}")]
                if key:
                    attrs.append(_attr("http.request.header.idempotency-key", key))
                if attempt:
                    attrs.append(_attr("http.request.resend_count", attempt))
                span: dict[str, Any] = {"traceId": trace_id, "spanId": span_id, "name": callee.method, "kind": 3,
                                        "start": t, "end": end, "status": {"code": 0 if ok else 2}}
                if parent:
                    span["parentSpanId"] = parent
                if timed_out:
                    etype, emsg = LANGUAGE_TIMEOUT[caller.language]
                    attrs.append(_attr("error.type", etype))
                    span["status"]["message"] = emsg
                    span["events"] = [{"name": "exception", "timeUnixNano": str(end),
                                       "attributes": [_attr("exception.type", etype),
                                                      _attr("exception.message", emsg)]}]
                else:
                    attrs.append(_attr("http.response.status_code", 200 if server_ok else 500))
                    if not server_ok:
                        attrs.append(_attr("error.type", "500"))
                span["attributes"] = attrs
                self._emit(caller, span)
            t = end
            if ok:
                return t, True
            if attempt + 1 < call.attempts:
                t += int(call.backoff_ms * 1e6)
        return t, False

    def run(self, requests: int, start_ns: int = 1_767_000_000_000_000_000,
            interval_ms: float = 20.0) -> None:
        t = start_ns
        for i in range(requests):
            trace_id = _hex(self.rng, 16)
            self.serve(self.topology.entry, trace_id, None, t, 100_000 + i)
            t += int(self.rng.expovariate(1 / interval_ms) * 1e6)

    def otlp_lines(self) -> Iterator[str]:
        """One ExportTraceServiceRequest per service, JSON, as the collector's file exporter writes."""
        for name, spans in self.spans.items():
            svc = self.topology.services[name]
            for i in range(0, len(spans), 500):
                doc = {"resourceSpans": [{
                    "resource": {"attributes": [_attr("service.name", name),
                                                _attr("telemetry.sdk.language", svc.language)]},
                    "scopeSpans": [{"scope": {"name": f"io.opentelemetry.{svc.language}"},
                                    "spans": spans[i:i + 500]}]}]}
                yield json.dumps(doc, separators=(",", ":"))

    def spans_count(self) -> int:
        return sum(len(v) for v in self.spans.values())


def chain(*services: Service) -> Topology:
    """A topology from services listed entry first (the calls are set on them already)."""
    return Topology({s.name: s for s in services}, services[0].name)


def checkout_topology(*, skew_ms: float = 0.0) -> Topology:
    """The sample shop: a gateway, orders with inventory and payments, and a bank with a heavy tail.

    Its faults: the gateway gives up before the order service can (inversion), payment retries
    the bank's charge without an idempotency key under a timeout inside the bank's tail.
    """
    return chain(
        Service("gateway", 2, route="/checkout/{order_id}", calls=[Call("order", 1000)], language="go"),
        Service("order", 8, route="/orders/{order_id}", language="python",
                calls=[Call("inventory", 2000), Call("payment", 2500)]),
        Service("inventory", 12, sigma=0.3, route="/reserve", language="java"),
        Service("payment", 10, route="/payments", language="node",
                calls=[Call("bank", 400, attempts=3, backoff_ms=100)]),
        Service("bank", 120, sigma=0.5, tail_p=0.1, tail_ms=650, route="/v1/charges", clock_offset_ms=skew_ms),
    )
