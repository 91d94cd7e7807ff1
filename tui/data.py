"""What the TUI shows, read through the store and the analyzers: no Textual here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from payscope.analyzers import report, views
from payscope.errors import PayscopeError

OUTCOMES = (None, "timeout", "failed", "late_success", "duplicate_charge")
PAGE = 60


@dataclass
class Filter:
    outcome: str | None = None
    service: str | None = None
    text: str | None = None

    def describe(self) -> str:
        parts = [f"outcome={self.outcome}" if self.outcome else "all outcomes"]
        if self.service:
            parts.append(f"service={self.service}")
        if self.text:
            parts.append(f"search={self.text!r}")
        return ", ".join(parts)


def failures(store: Any, flt: Filter, limit: int = PAGE) -> list[dict[str, Any]]:
    """Failed transactions newest first, filtered; a search by id goes straight to those traces."""
    if flt.text:
        try:
            ids = views.resolve_trace_ids(store, flt.text)
        except PayscopeError:
            ids = []
        if ids:
            summaries = [store.trace_summary(tid) for tid in ids]
            return [row for s in summaries if s is not None
                    if (row := views.failure_row(store, s, keep_ok=True)) is not None]
    rows: list[dict[str, Any]] = []
    offset = 0
    while len(rows) < limit:
        page = views.failure_rows(store, limit=limit, offset=offset)
        if not page:
            break
        offset += len(page)
        for row in page:
            if flt.outcome and row["outcome"] != flt.outcome:
                continue
            if flt.service and flt.service not in row["services"]:
                continue
            if flt.text and flt.text.lower() not in " ".join(
                    [row["entry"], row["failing_hop"] or "", *row["keys"], row["trace_id"]]).lower():
                continue
            rows.append(row)
        if not (flt.outcome or flt.service or flt.text):
            break
    return rows[:limit]


def transaction(store: Any, trace_id: str) -> dict[str, Any]:
    return views.transaction_view(store, trace_id)


def edges(store: Any) -> tuple[dict[str, Any], dict[tuple[str, str, str], list[float]]]:
    """The analysis document, and each edge's healthy latencies (for its histogram)."""
    from payscope.analyzers import engine

    analysis = engine.analyze(store)
    return report.document_of(analysis), {key: list(edge.latency()) for key, edge in analysis.edges.items()}


def histogram(values: list[float], timeout_ms: float | None, width: int = 50, bins: int = 12) -> list[str]:
    """A latency histogram as text lines, with the timeout marked where it cuts."""
    if not values:
        return ["no healthy calls recorded"]
    import math

    lo, hi = max(min(values), 0.1), max(max(values), (timeout_ms or 0) * 1.1, 0.2)
    edges_ms = [lo * (hi / lo) ** (i / bins) for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        i = min(bins - 1, max(0, int(math.log(max(v, lo) / lo) / math.log(hi / lo) * bins))) if hi > lo else 0
        counts[i] += 1
    top = max(counts) or 1
    lines = []
    marked = False
    for i, count in enumerate(counts):
        label = f"{edges_ms[i]:>8.0f}-{edges_ms[i + 1]:<8.0f}ms"
        bar = "#" * max(1 if count else 0, round(count / top * width))
        lines.append(f"{label} {bar} {count}")
        if timeout_ms is not None and not marked and edges_ms[i + 1] >= timeout_ms:
            lines.append(f"{'':>19} {'-' * width} timeout {timeout_ms:.0f} ms")
            marked = True
    return lines
