"""Feeds the analysis from a store: every span once, declared timeouts, and proxies seen only in their logs."""

from __future__ import annotations

from typing import Any

from payscope.collector.store import LogQuery, Sample, Store, group_traces
from payscope.model import LogRecord

from .calls import Call, TraceFacts
from .declared import declared_timeouts
from .derived import KEY
from .diagnose import diagnose
from .engine import Analysis, Window, read
from .logcalls import log_calls
from .memory import paused_cycle_collection
from .orders import LoggedFacts, Rules, business_keys, configured_rules


def _proxy_calls(store: Store, window: Window | None, traces: set[str] | None = None) -> Any:
    """The calls proxies logged but have no spans of (``log_calls``), for ``read``'s ``extra_calls``: from the
    log lines written in ``window``, of the ``traces`` read (None: any)."""

    def proxy_calls(facts: dict[str, TraceFacts], calls: list[Call]) -> list[Call]:
        since, until = window if window else (None, None)
        records = [r for _, r in store.search_logs(LogQuery(attribute="status", since_ns=since, until_ns=until,
                                                            limit=None))
                   if traces is None or r.trace_id in traces]
        if not records:
            return []
        # a proxy that has its own spans is already in the analysis: its log lines would count it twice
        traced = {(c.trace_id, c.caller) for c in calls}
        records = [r for r in records if (r.trace_id, r.service) not in traced]
        entries: dict[str, tuple[str, int, int, bool, str] | None] = {}

        def entry_of(trace_id: str) -> tuple[str, int, int, bool, str] | None:
            if trace_id not in entries:
                rows = [r for r in store.trace_rows(trace_id) if r.kind in ("server", "consumer")]
                first = min(rows, key=lambda r: r.start_ns) if rows else None
                entries[trace_id] = (first.service, first.start_ns, first.end_ns, first.error_class is None,
                                     first.span_id) if first else None
            return entries[trace_id]

        return log_calls(records, entry_of)

    return proxy_calls


_END_NS = 2**63 - 1  # the last time a store can hold: a sample of "every trace" is drawn over [0, this)


def load(store: Store, *, window: Window | None = None, sample: int | None = None,
         including: list[str] | None = None) -> Analysis:
    """The whole-store analysis of ``store``. With ``window`` (from, to in ns; either may be None), only the
    traces that start in it (chosen in the store: nothing else is read), and the log lines written in it. With
    ``sample``, at most that many of those traces: the store's sample (``Store.sample_traces``, as a trace-id
    ratio sampler keeps them), read whole, with the log lines of those traces only; a window that holds no more
    is read as without it. ``including``: stored traces read whatever the window and the sample (the window
    widened to the moments they start, so that their log lines are read too; the sample says it read them)."""
    if window and including:
        window = _holding(store, window, including)
    since, until = window if window else (None, None)
    drawn = store.sample_traces(since or 0, _END_NS if until is None else until, sample) if sample else None
    if drawn is not None and not drawn.complete and including:
        drawn_ids = set(drawn.trace_ids)
        extra = [t for t in store.known_traces(including) if t not in drawn_ids]
        drawn = Sample(drawn.trace_ids + extra, drawn.in_window, drawn.limit)
    if drawn is not None and not drawn.complete:  # an order is judged on all its traces, as without a sample
        drawn = Sample(drawn.trace_ids + _rest_of_orders(store, drawn.trace_ids, window, drawn.limit),
                       drawn.in_window, drawn.limit)
    analysis = _analysis(store, window, drawn)
    analysis.window = window
    analysis.sample = drawn
    return analysis


def _analysis(store: Store, window: Window | None, drawn: Sample | None) -> Analysis:
    """The analysis of the traces that started in ``window``, or of those ``drawn`` when it is not all of them."""
    since, until = window if window else (None, None)
    rules = configured_rules()
    chosen = None if drawn is None or drawn.complete else set(drawn.trace_ids)  # None: every trace of the window
    with paused_cycle_collection():
        traces = store.iter_traces(KEY, since, until) if chosen is None else store.traces_of(KEY, sorted(chosen))
        return diagnose(traces, declared=declared_timeouts(store), extra_calls=_proxy_calls(store, window, chosen),
                        order_rules=rules, order_logs=logged_facts(store, rules, window, chosen))


def order_mates(store: Store, trace_ids: list[str]) -> set[str]:
    """``trace_ids`` and every stored trace that shares an order or payment id (:func:`orders.business_keys`) with
    one of them: what judging their orders reads, when a read holds only part of a store."""
    keys = business_keys(k for rows in store.rows_of(trace_ids) for r in rows for k in r.keys)
    found = set(trace_ids)
    for ids in store.traces_by_keys(sorted(keys)).values() if keys else ():
        found.update(ids)
    return found


def _rest_of_orders(store: Store, trace_ids: list[str], window: Window | None, bound: int | None) -> list[str]:
    """The traces of :func:`order_mates` that are not among ``trace_ids`` (a sample) and started in ``window`` (as
    every trace of a read does): at most ``bound`` of them (None: all), by trace id. A sample is drawn by trace;
    these complete its orders."""
    found = sorted(order_mates(store, trace_ids) - set(trace_ids))
    since, until = window if window else (None, None)
    if since is not None or until is not None:  # their summaries: asked only when there is a window to hold
        summaries = store.trace_summaries(found)
        found = [t for t in found if (summary := summaries.get(t)) is not None
                 and (since is None or summary.start_ns >= since) and (until is None or summary.start_ns < until)]
    return found[:bound]


def _holding(store: Store, window: Window, trace_ids: list[str]) -> Window:
    """``window`` widened, where it is bounded, to the start of each of ``trace_ids`` that is stored."""
    starts = [summary.start_ns for summary in store.trace_summaries(trace_ids).values()]
    if not starts:
        return window
    since, until = window
    return (None if since is None else min(since, min(starts)), None if until is None else max(until, max(starts) + 1))


def load_sampled(store: Store, windows: list[tuple[int, int]], limit: int | None) -> tuple[Analysis, list[Sample]]:
    """What `payscope compare` reads: from each window, the store's sample of the traces that start in it (at
    most ``limit``; None: all), with their calls on one clock. Nothing else is read."""
    samples = [store.sample_traces(lo, hi, limit) for lo, hi in windows]
    chosen = sorted({t for s in samples for t in s.trace_ids})
    span = (min(lo for lo, _ in windows), max(hi for _, hi in windows))
    with paused_cycle_collection():
        analysis = read(group_traces(store.rows_of(chosen)), extra_calls=_proxy_calls(store, span, set(chosen)))
    return analysis, samples


def logged_facts(store: Store, rules: Rules, window: Window | None = None,
                 chosen: set[str] | None = None) -> LoggedFacts:
    """The log lines of traces that the order rules name: each charge a charging service logged, and each
    trace that told its customer the order failed (of the ``chosen`` traces only; None: any)."""
    since, until = window if window else (None, None)

    def lines(text: str | None) -> list[LogRecord]:
        if not text:
            return []
        return [r for _, r in store.search_logs(LogQuery(text=text, since_ns=since, until_ns=until, limit=None))]

    def traces(r: LogRecord) -> tuple[str, ...]:  # its trace, or the traces its order id left it between
        found = (r.trace_id,) if r.trace_id else tuple(r.attributes.get("link.candidates") or ())
        return found if chosen is None else tuple(t for t in found if t in chosen)

    return LoggedFacts([(found, r.span_id or "", r.service, r.time_ns) for r in lines(rules.charge_log)
                        if (found := traces(r))],
                       {r.trace_id for r in lines(rules.failed_log)
                        if r.trace_id and (chosen is None or r.trace_id in chosen)})
