"""What the TUI shows, read through the store and the analyzers: no Textual here."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from payscope.analyzers import search, views
from payscope.analyzers.engine import Analysis
from payscope.analyzers.loader import load
from payscope.collector.store import Store
from payscope.errors import PayscopeError
from payscope.timeparse import start_window

OUTCOMES = (None, *views.FAILURE_OUTCOMES)
PROBLEMS = (None, *views.PROBLEMS)
PAGE = 60


class Source:
    """The store and its whole-store analysis, made again only when the store has new data; with ``since`` or
    ``until`` (as `payscope analyze --since/--until` takes them), the analysis of the traces that started in
    that window, the window taken again at each new analysis (``--since 1h`` moves with the clock); with
    ``sample``, of at most that many of those traces (as `payscope analyze --sample`)."""

    def __init__(self, store: Store, since: str | None = None, until: str | None = None,
                 sample: int | None = None) -> None:
        self.store = store
        self.since, self.until, self.sample = since, until, sample
        self._analysis: Analysis | None = None
        self._counts: dict[str, int] | None = None
        self._lock = threading.Lock()

    def analysis(self) -> Analysis:
        with self._lock:  # workers of several screens ask at once: analyse once
            counts = self.store.counts()
            if self._analysis is None or counts != self._counts:
                window = start_window(self.since, self.until, time.time_ns())
                self._analysis = load(self.store, window=window, sample=self.sample)
                self._counts = counts
            return self._analysis

    def describe(self) -> str:
        """Which traces the analysis reads, for the title bar."""
        said = [*([f"since {self.since}"] if self.since else []), *([f"until {self.until}"] if self.until else [])]
        if self.sample:
            said.append(f"a sample of {self.sample:,} traces and their orders")
        return " ".join(said) or "every trace"


@dataclass
class Filter:
    outcome: str | None = None
    service: str | None = None
    text: str | None = None
    problem: str | None = None  # orders left inconsistent (views.PROBLEMS)

    def describe(self) -> str:
        parts = [f"outcome={self.outcome}" if self.outcome else "all outcomes"]
        if self.problem:
            parts.append(f"problem={self.problem}")
        if self.service:
            parts.append(f"service={self.service}")
        if self.text:
            parts.append(f"search={self.text!r}")
        return ", ".join(parts)


@dataclass
class FailurePage:
    """The first ``limit`` failed transactions the filter keeps, how many it keeps in all, and how many each
    outcome would keep (so that a filter with nothing to show is skipped)."""

    rows: list[dict[str, Any]]
    total: int
    by_outcome: dict[str, int]
    by_problem: dict[str, int] = field(default_factory=dict)  # ... and each problem


def failures(source: Source, flt: Filter, limit: int = PAGE) -> FailurePage:
    """Failed transactions newest first, filtered; a search by id goes straight to those traces."""
    analysis = source.analysis()
    store = source.store
    if flt.text:
        try:
            ids = views.resolve_trace_ids(store, flt.text)
        except PayscopeError:
            ids = []
        if ids:
            rows = views.failure_rows_of(store, analysis, [(analysis.transactions[tid], None) for tid in ids
                                                           if tid in analysis.transactions])
            return FailurePage(rows, len(rows), dict(Counter(r["outcome"] for r in rows)))
    # every outcome of the other filters, counted without building rows; rows only for the page shown
    outcomes = views.failure_outcomes(analysis, service=flt.service, problem=flt.problem)
    inconsistent = views.failure_outcomes(analysis, service=flt.service, problem="any")
    by_problem = dict(Counter(p for tid in inconsistent for p in analysis.problems().get(tid, [])))
    by_problem["any"] = len(inconsistent)
    if flt.text:
        rows = search.matching(store, views.failure_rows(store, analysis, limit=None, service=flt.service,
                                                         problem=flt.problem), search.parse(flt.text))
        by_outcome = dict(Counter(r["outcome"] for r in rows))
        kept = [r for r in rows if flt.outcome is None or r["outcome"] == flt.outcome]
        return FailurePage(kept[:limit], len(kept), by_outcome, by_problem)
    by_outcome = dict(Counter(outcomes.values()))
    total = sum(1 for o in outcomes.values() if flt.outcome is None or o == flt.outcome)
    rows = views.failure_rows(store, analysis, limit=limit, outcome=flt.outcome, service=flt.service,
                              problem=flt.problem)
    return FailurePage(rows, total, by_outcome, by_problem)


def next_outcome(current: str | None, by_outcome: dict[str, int]) -> str | None:
    """The outcome filter after ``current`` that keeps at least one row (all outcomes always does)."""
    return _next(OUTCOMES, current, by_outcome)


def next_problem(current: str | None, by_problem: dict[str, int]) -> str | None:
    """The problem filter after ``current`` that keeps at least one row (no problem filter always does)."""
    return _next(PROBLEMS, current, by_problem)


def _next(choices: tuple[str | None, ...], current: str | None, counts: dict[str, int]) -> str | None:
    i = choices.index(current)
    for step in range(1, len(choices)):
        candidate = choices[(i + step) % len(choices)]
        if candidate is None or counts.get(candidate):
            return candidate
    return None


def transaction(source: Source, trace_id: str) -> dict[str, Any]:
    return views.transaction_view(source.store, source.analysis(), trace_id)


def edges(source: Source) -> tuple[dict[str, Any], dict[tuple[str, str, str], list[float]]]:
    """The analysis document, and what each edge's callers saw of successful calls (for its histogram)."""
    analysis = source.analysis()
    return views.analysis_document(analysis), {key: list(edge.latency()) for key, edge in analysis.edges.items()}


def compare(source: Source, windows: tuple[tuple[int, int], tuple[int, int]] | None = None) -> dict[str, Any]:
    """`payscope compare` of two windows; without them, the slowest stretch of the data against the one before."""
    from payscope.analyzers.compare import compare as compare_windows
    from payscope.analyzers.compare import default_windows

    analysis = source.analysis()
    chosen = windows or default_windows(analysis)
    if chosen is None:
        raise PayscopeError("too few transactions in the store to compare two stretches of time")
    return compare_windows(analysis, *chosen)


def histogram(values: list[float], timeout_ms: float | None, width: int = 50, bins: int = 12,
              recommended_ms: float | None = None) -> list[str]:
    """A latency histogram as text lines, with the timeout and the recommended one marked where they cut."""
    if not values:
        return ["no healthy calls recorded"]
    import math

    lo, hi = max(min(values), 0.1), max(max(values), (timeout_ms or 0) * 1.1, (recommended_ms or 0) * 1.1, 0.2)
    edges_ms = [lo * (hi / lo) ** (i / bins) for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        i = min(bins - 1, max(0, int(math.log(max(v, lo) / lo) / math.log(hi / lo) * bins))) if hi > lo else 0
        counts[i] += 1
    top = max(counts) or 1
    lines = []
    marks = [(v, text) for v, text in ((timeout_ms, "timeout"), (recommended_ms, "recommended")) if v is not None]
    for i, count in enumerate(counts):
        label = f"{edges_ms[i]:>8.0f}-{edges_ms[i + 1]:<8.0f}ms"
        bar = "#" * max(1 if count else 0, round(count / top * width))
        lines.append(f"{label} {bar} {count}")
        for value, text in [m for m in marks if edges_ms[i + 1] >= m[0]]:
            lines.append(f"{'':>19} {('-' if text == 'timeout' else '=') * width} {text} {value:.0f} ms")
            marks.remove((value, text))
    return lines
