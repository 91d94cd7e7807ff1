"""What the read commands and the TUI show: failure rows and one transaction, as plain data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from payscope.collector.store import Store
from payscope.errors import InputError
from payscope.model import Span, TraceSummary
from payscope.timeparse import format_duration_ns, format_ms, format_ns

from . import findings, recommend
from .calls import Call
from .engine import Analysis, Transaction, clock_shift_ns, order_of
from .loader import order_mates
from .memory import paused_cycle_collection
from .orders import MISMATCHES
from .tcc import ANOMALIES


def log_json(rec: Any) -> dict[str, Any]:
    """One log record in the JSON contract of `payscope logs`."""
    link: dict[str, Any] = {"method": rec.link_method, "confidence": round(rec.link_confidence, 3)}
    if rec.link_method == "ambiguous":
        link["candidates"] = rec.attributes.get("link.candidates", [])
    return {"time": format_ns(rec.time_ns), "service": rec.service, "level": rec.severity, "message": rec.message,
            "source": rec.source, "trace_id": rec.trace_id, "span_id": rec.span_id, "link": link}


def resolve_trace_ids(store: Store, ident: str) -> list[str]:
    """Trace ids for a trace id (any case, dashes allowed) or a business key (order or payment id)."""
    cleaned = ident.strip().lower().replace("-", "")
    if len(cleaned) in (16, 32) and all(c in "0123456789abcdef" for c in cleaned):
        candidate = cleaned.rjust(32, "0")
        if store.trace_summary(candidate) is not None:
            return [candidate]
    ids = store.traces_by_key(ident.strip())
    if ids:
        return sorted(ids)
    raise InputError(f"no transaction {ident!r} in {store.url}: not a stored trace id, order id or payment id")


def journey_trace_ids(store: Store, trace_ids: list[str]) -> list[str]:
    """``trace_ids`` and every trace that shares a business key (an order or payment id) with one of them
    (:func:`loader.order_mates`, which a sample's orders are read whole by), in order."""
    return sorted(order_mates(store, trace_ids))


FAILURE_OUTCOMES = ("timeout", "failed", "declined", "late_success", "duplicate_charge", "recovered", "injected")
# what can be inconsistent about an order (orders.problems); "any" is every one of them
PROBLEMS = (*MISMATCHES, *ANOMALIES, "compensation_missing", "any")


def failure_outcomes(analysis: Analysis, *, since_ns: int | None = None, service: str | None = None,
                     problem: str | None = None) -> dict[str, str]:
    """Trace id -> outcome of every failed transaction (``recovered``: it went well despite errors inside), as
    the whole-store analysis judged them. With ``problem`` (one of :data:`PROBLEMS`), only the transactions of
    orders with that problem, and all of them: an order told "paid" that nothing charged went wrong too."""
    problems = analysis.problems() if problem is not None else {}
    out = {}
    for tx in analysis.transactions.values():
        shown = analysis.outcome_of(tx)
        if problem is not None:  # a transaction that went well is listed for its order's problem
            found = problems.get(tx.trace_id, [])
            if not found or (problem != "any" and problem not in found):
                continue
        elif shown == "ok":
            continue
        if since_ns is not None and tx.facts.start_ns < since_ns:
            continue
        if service is not None and service not in tx.facts.services:
            continue
        out[tx.trace_id] = shown
    return out


@paused_cycle_collection()
def failure_rows(store: Store, analysis: Analysis, *, since_ns: int | None = None, limit: int | None = 50,
                 offset: int = 0, outcome: str | None = None, service: str | None = None,
                 problem: str | None = None) -> list[dict[str, Any]]:
    """Failed transactions newest first, each a flat dict (the JSON of `payscope failures`)."""
    picked = [(analysis.transactions[tid], shown)
              for tid, shown in failure_outcomes(analysis, since_ns=since_ns, service=service,
                                                 problem=problem).items()
              if outcome is None or shown == outcome]
    picked.sort(key=lambda p: (-p[0].facts.start_ns, p[0].trace_id))
    window = picked[offset:offset + limit] if limit is not None else picked[offset:]
    return failure_rows_of(store, analysis, window)


def failure_rows_of(store: Store, analysis: Analysis,
                    picked: Sequence[tuple[Transaction, str | None]]) -> list[dict[str, Any]]:
    """Transactions (each with the outcome to show, None: its own) as rows of `payscope failures`, in their order;
    their traces' summaries read together (on Elasticsearch one read a thousand, not one a row)."""
    summaries = store.trace_summaries([tx.trace_id for tx, _ in picked])
    return [_failure_row(analysis, tx, shown, summaries.get(tx.trace_id)) for tx, shown in picked]


def _failure_row(analysis: Analysis, tx: Transaction, outcome: str | None,
                 summary: TraceSummary | None) -> dict[str, Any]:
    f = tx.facts
    hop = f"{tx.failing_hop[0]} -> {tx.failing_hop[1]}" if tx.failing_hop else None
    return {
        "time": format_ns(f.start_ns), "trace_id": tx.trace_id,
        "entry": f"{f.root_service}: {summary.root_name if summary else f.root_operation}",
        "outcome": outcome or tx.outcome, "order": f.keys[0] if f.keys else None,
        "failing_hop": hop, "error_class": tx.error_class,
        "duration_ms": round((f.end_ns - f.start_ns) / 1e6, 3),
        "duration": format_duration_ns(f.end_ns - f.start_ns), "services": f.services,
        "spans": f.span_count, "errors": summary.error_count if summary else 0, "keys": f.keys,
        "findings": list(dict.fromkeys(found.kind for found in analysis.findings_of(tx.trace_id))),  # worst first
        "problems": analysis.problems().get(tx.trace_id, []),
    }


def _timeout_of(attrs: dict[str, Any]) -> float | None:
    for key in ("payscope.timeout.read_ms", "payscope.timeout.total_ms"):
        value = attrs.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _depths(spans: list[Span]) -> list[tuple[Span, int]]:
    by_id = {s.span_id: s for s in spans}
    children: dict[str | None, list[Span]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in by_id else None
        children.setdefault(parent, []).append(s)
    out: list[tuple[Span, int]] = []
    stack = [(s, 0) for s in sorted(children.get(None, []), key=lambda s: s.start_ns, reverse=True)]
    seen = set()
    while stack:
        span, depth = stack.pop()
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        out.append((span, depth))
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns, reverse=True):
            stack.append((child, depth + 1))
    return out


def _call_json(call: Call, attempts: int = 1) -> dict[str, Any]:
    """The three times of one call kept apart: what the caller saw, what the callee spent, and the gap. ``attempts``:
    how many calls its client span holds (it retried inside itself); ``call`` is the last of them."""
    server, gap = call.server_ms, call.gap_ms
    return {"callee": call.callee, "operation": call.operation, "client_ms": round(call.duration_ns / 1e6, 3),
            "server_ms": None if server is None else round(server, 3),
            "gap_ms": None if gap is None else round(gap, 3),
            "gap_at_least": gap is not None and call.error_class is not None,  # given up: what it waited at least
            "late_success": call.late_success, "attempt": call.attempt, "error_class": call.error_class,
            "attempts_in_span": attempts}


@paused_cycle_collection()
def transaction_view(store: Store, analysis: Analysis, ident: str) -> dict[str, Any]:
    """One transaction: its traces' spans as a tree, its log lines, outcome, and the whole-store findings it is
    evidence of."""
    trace_ids = resolve_trace_ids(store, ident)
    spans = [s for tid in trace_ids for s in store.trace(tid)]
    span_rows = {tid: store.trace_rows(tid) for tid in trace_ids}
    error_classes = {(r.trace_id, r.span_id): r.error_class for rs in span_rows.values() for r in rs}
    calls: dict[tuple[str, str], Call] = {}
    attempts: Counter[tuple[str, str]] = Counter()  # a client span that retried inside itself holds several calls
    for tid in trace_ids:
        for c in analysis.calls_of(tid):
            key = (c.trace_id, c.span_id.split("#")[0])
            calls[key] = c  # a span's last attempt speaks for it
            attempts[key] += 1
    seen: set[int] = set()
    found = []
    for tid in trace_ids:
        for f in analysis.findings_of(tid):
            if id(f) not in seen:
                seen.add(id(f))
                found.append(f.to_json())
    shift = clock_shift_ns(analysis.offsets)
    for span in spans:  # every span on the reference clock, as the analysis saw it
        span.start_ns -= shift.get(span.service, 0)
        span.end_ns -= shift.get(span.service, 0)
    t0 = min(s.start_ns for s in spans)
    rows = []
    for span, depth in _depths(spans):
        call = calls.get((span.trace_id, span.span_id))
        rows.append({
            "trace_id": span.trace_id, "span_id": span.span_id, "parent_id": span.parent_id, "depth": depth,
            "service": span.service, "name": span.name, "kind": span.kind,
            "offset_ms": round((span.start_ns - t0) / 1e6, 3), "duration_ms": round(span.duration_ns / 1e6, 3),
            "status": {0: "unset", 1: "ok", 2: "error"}.get(span.status_code, "unset"),
            "error_class": error_classes.get((span.trace_id, span.span_id)), "message": span.status_message,
            "timeout_ms": _timeout_of(span.attributes), "attributes": span.attributes,
            "events": span.events,
            "call": _call_json(call, attempts[(span.trace_id, span.span_id)]) if call is not None else None,
        })
    logs = sorted((log_json(rec) for tid in trace_ids for rec in store.logs_of_trace(tid)),
                  key=lambda r: r["time"])
    transactions = []
    for tx in sorted((analysis.transactions[t] for t in trace_ids if t in analysis.transactions),
                     key=lambda tx: tx.facts.start_ns):  # a journey in time order
        transactions.append({"trace_id": tx.trace_id, "start": format_ns(tx.facts.start_ns),
                             "outcome": analysis.outcome_of(tx),
                             "error_class": tx.error_class,
                             "failing_hop": None if not tx.failing_hop else
                             {"caller": tx.failing_hop[0], "callee": tx.failing_hop[1],
                              "operation": tx.failing_hop[2]},
                             "business_keys": tx.facts.keys})
    order = analysis.orders().get(ident.strip())  # an order id: its charges and what its customer was told
    if order is not None and not order.is_order:
        order = None
    first = analysis.transactions.get(trace_ids[0])
    belongs = analysis.orders().get(order_of(first.facts)) if first is not None else None
    return {"id": ident, "trace_ids": trace_ids, "transactions": transactions,
            "order": order.to_json() if order is not None else None,
            # the order this trace is part of, when its journey has more traces than this view shows
            "journey": {"order": belongs.key, "traces": len(belongs.trace_ids)}
            if belongs is not None and order is None and len(belongs.trace_ids) > len(trace_ids) else None,
            "start": format_ns(t0), "duration_ms": round((max(s.end_ns for s in spans) - t0) / 1e6, 3),
            "spans": rows, "logs": logs, "findings": found,
            "clock_skew": [o.to_json() for o in analysis.offsets], "window": window_json(analysis)}


def window_json(analysis: Analysis) -> dict[str, Any] | None:
    """The window of start times the analysis read its traces from, as ISO times, and the sample of them it read
    when a limit was set (None: every trace)."""
    if analysis.window is None and analysis.sample is None:
        return None
    since, until = analysis.window or (None, None)
    out: dict[str, Any] = {"from": None if since is None else format_ns(since),
                           "to": None if until is None else format_ns(until)}
    if analysis.sample is not None:
        out["sample"] = analysis.sample.to_json()
    return out


@paused_cycle_collection()
def analysis_document(analysis: Analysis) -> dict[str, Any]:
    """The JSON contract of `payscope analyze --format json`."""
    found = analysis.findings
    outcomes: dict[str, int] = {}
    for tx in analysis.transactions.values():
        shown = analysis.outcome_of(tx)
        outcomes[shown] = outcomes.get(shown, 0) + 1
    return {
        "findings": [f.to_json() for f in found],
        "edges": [{**e.to_json(), "recommended_timeout_ms": analysis.recommended_ms(key)}
                  for key, e in sorted(analysis.edges.items())],
        "clock_skew": [o.to_json() for o in analysis.offsets],
        # what the sidecar's fault injection did: reported as injected, never as the system's own finding
        "injected_faults": [{"caller": e.caller, "callee": e.callee, "operation": e.operation, "kind": kind,
                             "calls": n} for _, e in sorted(analysis.edges.items()) for kind, n in
                            sorted(e.injected.items())],
        "stats": {"window": window_json(analysis), "traces": len(analysis.traces),
                  "transactions": len(analysis.transactions),
                  "calls": len(analysis.calls), "edges": len(analysis.edges),
                  "orders": sum(order.is_order for order in analysis.orders().values()),
                  "outcomes": outcomes, "orders_charged_twice": len(analysis.orders_charged_twice()),
                  "orders_to_reconcile": {kind: sum(kind in o.mismatches for o in analysis.mismatched())
                                          for kind in MISMATCHES},
                  # the order with the most money at risk: where `payscope show` starts a journey
                  "order_most_at_risk": next((o.key for o in analysis.mismatched()), None),
                  "findings_by_severity": {s: sum(f.severity == s for f in found) for s in findings.SEVERITIES
                                           if any(f.severity == s for f in found)}},
    }


@paused_cycle_collection()
def recommendation_document(analysis: Analysis, *, simulate: bool = False) -> dict[str, Any]:
    """The JSON contract of `payscope recommend timeouts --format json`."""
    recs = list(analysis.recommendations.values())
    document: dict[str, Any] = {"window": window_json(analysis), "recommendations": [r.to_json() for r in recs]}
    edges = {(r.edge.caller, r.edge.callee): r.edge for r in recs}
    document["clients"] = [  # one client object serving several operations: one value that covers them all
        {"caller": caller, "callee": callee, "operations": operations, "timeout_ms": setting.per_try_ms,
         "attempts": setting.attempts, "retries": setting.attempts - 1, "backoff_ms": setting.backoff_ms,
         "snippets": recommend.snippets(edges[(caller, callee)], setting)}
        for (caller, callee), (operations, setting) in recommend.per_client(recs).items() if len(operations) > 1]
    if simulate:
        document["simulation"] = recommend.simulate(analysis, recs)
    return document


def fix_text(finding: dict[str, Any]) -> str:
    """A finding's fix with its edge's one recommended timeout, as every command and screen shows it."""
    rec = finding["recommendation"]
    text = rec.get("action") or "see payscope recommend timeouts"
    if rec.get("connect_timeout_ms"):  # the connect timeout, beside the read timeout it is not
        text += f" to {format_ms(rec['connect_timeout_ms'])}"
        if rec.get("timeout_ms"):
            text += f" (read: recommended timeout {format_ms(rec['timeout_ms'])})"
    elif rec.get("timeout_ms"):
        text += f" (recommended timeout {format_ms(rec['timeout_ms'])})"
    return text
