"""What the read commands and the TUI show: failure rows and one transaction, as plain data."""

from __future__ import annotations

from typing import Any

from payscope.errors import InputError
from payscope.model import Span, TraceSummary
from payscope.timeparse import format_duration_ns, format_ns

from . import engine, findings


def log_json(rec: Any) -> dict[str, Any]:
    """One log record in the JSON contract of `payscope logs`."""
    link: dict[str, Any] = {"method": rec.link_method, "confidence": round(rec.link_confidence, 3)}
    if rec.link_method == "ambiguous":
        link["candidates"] = rec.attributes.get("link.candidates", [])
    return {"time": format_ns(rec.time_ns), "service": rec.service, "level": rec.severity, "message": rec.message,
            "source": rec.source, "trace_id": rec.trace_id, "span_id": rec.span_id, "link": link}


def resolve_trace_ids(store: Any, ident: str) -> list[str]:
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


def _trace_outcome(store: Any, trace_id: str, summary: TraceSummary
                   ) -> tuple[str, str | None, str | None, list[str], list[str]]:
    """Outcome, failing hop, error class, business keys and finding kinds of one trace."""
    analysis = engine.run([store.trace_rows(trace_id)])
    tx = analysis.transactions.get(trace_id)
    kinds = sorted({f.kind for f in findings.find(analysis)})
    if tx is None:
        return "failed" if summary.error_count else "ok", None, summary.error_class, [], kinds
    hop = f"{tx.failing_hop[0]} -> {tx.failing_hop[1]}" if tx.failing_hop else None
    return tx.outcome, hop, tx.error_class, tx.facts.keys, kinds


def failure_row(store: Any, summary: TraceSummary, *, keep_ok: bool = False) -> dict[str, Any] | None:
    """One transaction as a row of `payscope failures`; None for one that went well (unless ``keep_ok``)."""
    outcome, hop, error_class, keys, kinds = _trace_outcome(store, summary.trace_id, summary)
    if outcome == "ok":
        if summary.error_count:
            outcome = "recovered"  # errors inside, but the transaction itself succeeded (a retry worked)
        elif not keep_ok:
            return None  # looked suspicious to the store; the analysis says it went well
    return {
        "time": format_ns(summary.start_ns), "trace_id": summary.trace_id,
        "entry": f"{summary.root_service}: {summary.root_name}", "outcome": outcome,
        "failing_hop": hop, "error_class": error_class or summary.error_class,
        "duration_ms": round(summary.duration_ns / 1e6, 3),
        "duration": format_duration_ns(summary.duration_ns), "services": summary.services,
        "spans": summary.span_count, "errors": summary.error_count, "keys": keys, "findings": kinds,
    }


def failure_rows(store: Any, *, since_ns: int | None = None, limit: int | None = 50,
                 offset: int = 0) -> list[dict[str, Any]]:
    """Failed transactions, newest first, each as a flat dict (the JSON of `payscope failures`)."""
    rows = (failure_row(store, s) for s in store.failed_traces(since_ns=since_ns, limit=limit, offset=offset))
    return [row for row in rows if row is not None]


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


def transaction_view(store: Any, ident: str) -> dict[str, Any]:
    """One transaction: its traces' spans as a tree, its log lines, outcome and findings."""
    trace_ids = resolve_trace_ids(store, ident)
    spans = [s for tid in trace_ids for s in store.trace(tid)]
    span_rows = {tid: store.trace_rows(tid) for tid in trace_ids}
    error_classes = {(r.trace_id, r.span_id): r.error_class for rs in span_rows.values() for r in rs}
    analysis = engine.run(list(span_rows.values()))
    found = [f.to_json() for f in findings.find(analysis)]
    shift = {o.service: int(o.offset_ms * 1e6) for o in analysis.offsets}
    for span in spans:  # show every span on the reference clock, as the analysis saw it
        span.start_ns -= shift.get(span.service, 0)
        span.end_ns -= shift.get(span.service, 0)
    t0 = min(s.start_ns for s in spans)
    rows = []
    for span, depth in _depths(spans):
        rows.append({
            "trace_id": span.trace_id, "span_id": span.span_id, "parent_id": span.parent_id, "depth": depth,
            "service": span.service, "name": span.name, "kind": span.kind,
            "offset_ms": round((span.start_ns - t0) / 1e6, 3), "duration_ms": round(span.duration_ns / 1e6, 3),
            "status": {0: "unset", 1: "ok", 2: "error"}.get(span.status_code, "unset"),
            "error_class": error_classes.get((span.trace_id, span.span_id)), "message": span.status_message,
            "timeout_ms": _timeout_of(span.attributes), "attributes": span.attributes,
            "events": span.events,
        })
    logs = sorted((log_json(rec) for tid in trace_ids for rec in store.logs_of_trace(tid)),
                  key=lambda r: r["time"])
    transactions = []
    for tid in trace_ids:
        tx = analysis.transactions.get(tid)
        if tx:
            transactions.append({"trace_id": tid, "outcome": tx.outcome, "error_class": tx.error_class,
                                 "failing_hop": None if not tx.failing_hop else
                                 {"caller": tx.failing_hop[0], "callee": tx.failing_hop[1],
                                  "operation": tx.failing_hop[2]},
                                 "business_keys": tx.facts.keys})
    return {"id": ident, "trace_ids": trace_ids, "transactions": transactions,
            "start": format_ns(t0), "duration_ms": round((max(s.end_ns for s in spans) - t0) / 1e6, 3),
            "spans": rows, "logs": logs, "findings": found,
            "clock_skew": [o.to_json() for o in analysis.offsets]}


def render_waterfall(view: dict[str, Any], width: int = 32) -> str:
    """The text waterfall of `payscope show`."""
    total = max(view["duration_ms"], 0.001)
    lines = []
    for tx in view["transactions"]:
        hop = tx["failing_hop"]
        where = f" at {hop['caller']} -> {hop['callee']} ({hop['operation']})" if hop else ""
        lines.append(f"trace {tx['trace_id']}: {tx['outcome']}{where}"
                     + (f" [{tx['error_class']}]" if tx["error_class"] else "")
                     + (f"  keys: {', '.join(tx['business_keys'])}" if tx["business_keys"] else ""))
    lines.append("")
    for row in view["spans"]:
        start = int(row["offset_ms"] / total * width)
        length = max(1, int(row["duration_ms"] / total * width))
        bar = " " * start + "#" * min(length, width - start)
        status = row["status"].upper() if row["status"] == "error" else ""
        cls = f" [{row['error_class']}]" if row["error_class"] else ""
        msg = f" {row['message']}" if row["message"] else ""
        label = "  " * row["depth"] + f"{row['service']}: {row['name']} ({row['kind']})"
        lines.append(f"{bar:<{width}} {row['duration_ms']:>10.1f} ms  {label} {status}{cls}{msg}".rstrip())
    if view["logs"]:
        lines.append("")
        lines.append("logs:")
        for rec in view["logs"]:
            lines.append(f"  {rec['time']} {rec['service']} {rec['level']} {rec['message']}  "
                         f"({rec['source']}, linked by {rec['link']['method']} {rec['link']['confidence']:.2f})")
    if view["findings"]:
        lines.append("")
        lines.append("findings:")
        for f in view["findings"]:
            lines.append(f"  [{f['severity']}] {f['kind']}: {f['summary']}")
    for skew in view["clock_skew"]:
        lines.append(f"(clock of {skew['service']} corrected by {skew['offset_ms']:+.1f} ms)")
    return "\n".join(lines)


def markdown_report(view: dict[str, Any]) -> str:
    """One transaction as Markdown, for an incident ticket."""
    lines = [f"# Transaction {', '.join(view['trace_ids'])}", ""]
    for tx in view["transactions"]:
        hop = tx["failing_hop"]
        lines.append(f"- **outcome:** {tx['outcome']}" + (f" at `{hop['caller']} -> {hop['callee']}` "
                                                          f"({hop['operation']})" if hop else "")
                     + (f", error class `{tx['error_class']}`" if tx["error_class"] else ""))
        if tx["business_keys"]:
            lines.append(f"- **business keys:** {', '.join(tx['business_keys'])}")
    lines += [f"- **started:** {view['start']}, **duration:** {view['duration_ms']:.1f} ms", "", "## Spans", "",
              "```", render_waterfall({**view, "logs": [], "findings": [], "clock_skew": []}), "```", ""]
    if view["findings"]:
        lines += ["## Findings", ""]
        for f in view["findings"]:
            lines += [f"- **{f['severity']} {f['kind']}**: {f['summary']}",
                      f"  - fix: {f['recommendation'].get('action', '')}"]
        lines.append("")
    if view["logs"]:
        lines += ["## Logs", "", "| time | service | level | message | linked by |", "| --- | --- | --- | --- | --- |"]
        for r in view["logs"]:
            message = r["message"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['time']} | {r['service']} | {r['level']} | {message} | {r['link']['method']} |")
    return "\n".join(lines) + "\n"
