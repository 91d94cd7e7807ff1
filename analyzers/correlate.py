"""Tie log records to transactions: by trace id, request id, business key, or time window.

Each link says how it was made and how sure it is. A line that could belong to several
transactions is marked ambiguous with its candidates, never attached to one of them. A line
with no id is linked by time only when its template is request-scoped (``templates``):
lines that need the time window wait until every line of the ingest has been read, so that
what the id-linked lines teach applies to all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from payscope.collector.store import Store
from payscope.collector.store.api import LogQuery
from payscope.model import LogRecord, SpanRow, TraceSummary
from payscope.semconv import normalise_trace_id

from .templates import Lessons, Templates

DEFAULT_KEY_PATTERNS = (
    r"(?i)\border[_ -]?(?:id|no|number)?\s*[=:#]?\s*[\"']?([A-Za-z]*[-_]?\d[\w-]{2,})",
    r"(?i)\bpayment[_ -]?(?:id)?\s*[=:#]?\s*[\"']?([A-Za-z]*[-_]?\d[\w-]{2,})",
)
KEY_FIELDS = ("order_id", "orderId", "order.id", "payment_id", "paymentId", "payment.id")
# How far a line may fall outside its span and still belong to it: a little before its start (clocks
# differ), more after its end (access logs are written as the response leaves).
WINDOW_SLACK_NS = 50_000_000
WINDOW_LEAD_NS = 10_000_000
LONGEST_SPAN_NS = 120_000_000_000  # a server span longer than this holds no line (how far back the search looks)
AROUND_READ_NS = 1_000_000_000     # the server spans around this much of a service's lines are read at once

CONFIDENCE = {"trace_id": 1.0, "request_id": 0.98, "business_key": 0.9}
WINDOW_CONFIDENCE_ROUTE = 0.85
WINDOW_CONFIDENCE_POSITION = 0.75
WINDOW_CONFIDENCE = 0.6
MAX_PENDING = 100_000         # lines held for the time window; past this the oldest half is decided early
STORED_LINES_LEARNED = 5_000  # id-linked lines already stored, per service, that teach templates too


@dataclass
class LinkStats:
    by_method: dict[str, int] = field(default_factory=dict)

    def count(self, method: str) -> None:
        self.by_method[method] = self.by_method.get(method, 0) + 1


class Linker:
    """Links records against what a store holds; caches what it looked up."""

    def __init__(self, store: Store, key_patterns: tuple[str, ...] = DEFAULT_KEY_PATTERNS,
                 time_window: bool = True, traced_services: Iterable[str] | None = None,
                 lessons: Lessons | None = None) -> None:
        self.store = store
        self.patterns = [re.compile(p) for p in key_patterns]
        self.time_window = time_window
        self.stats = LinkStats()
        self._known: dict[str, bool] = {}
        self._by_key: dict[str, list[str]] = {}
        self._traced_services: set[str] | None = None if traced_services is None else set(traced_services)
        self.templates = Templates()
        self.lessons = lessons  # given: what id-linked lines teach is kept there for another linker, not learned
        self._pending: list[LogRecord] = []
        self._rows: dict[str, list[SpanRow]] = {}
        self._summaries: dict[str, TraceSummary | None] = {}
        self._around: dict[str, tuple[int, int, list[SpanRow]]] = {}  # service -> [from, to) and its spans
        self._learned_stored: set[str] = set()

    def _trace_known(self, trace_id: str) -> bool:
        if trace_id not in self._known:
            self._known[trace_id] = self.store.trace_summary(trace_id) is not None
        return self._known[trace_id]

    def _traces_by_key(self, key: str) -> list[str]:
        if key not in self._by_key:
            self._by_key[key] = self.store.traces_by_key(key)
        return self._by_key[key]

    def prefetch(self, records: list[LogRecord], keys_of: list[list[str]] | None = None) -> None:
        """Look up a batch's trace ids and keys (``keys_of``: each record's :meth:`_keys`, when already found)
        in a few queries instead of one or more a line."""
        ids = {tid for r in records if (tid := normalise_trace_id(r.trace_id)) and tid not in self._known}
        if ids:
            found = set(self.store.known_traces(sorted(ids)))
            self._known.update({tid: tid in found for tid in ids})
        keys = {f"rid:{r.attributes['request_id']}" for r in records if r.attributes.get("request_id")}
        for of_record in keys_of if keys_of is not None else map(self._keys, records):
            keys.update(of_record)
        keys -= self._by_key.keys()
        if keys:
            found_keys = self.store.traces_by_keys(sorted(keys))
            self._by_key.update({k: found_keys.get(k, []) for k in keys})
        self.traced_services()

    def traced_services(self) -> set[str]:
        """The services with server spans in the store, read once: a line of any other falls in no span."""
        if self._traced_services is None:
            self._traced_services = set(self.store.server_services())
        return self._traced_services

    def by_ids(self) -> IdLinking:
        """Linking by ids as this linker does it, to run elsewhere (a worker process, on its own handle of the
        store): the lines it cannot link wait for this linker's time window (:meth:`take`)."""
        return IdLinking(tuple(p.pattern for p in self.patterns), self.time_window,
                         frozenset(self.traced_services()))

    def take(self, linked: IdLinked) -> list[LogRecord]:
        """What :class:`IdLinking` did elsewhere, as if this linker had linked those lines: its counts, what its
        id-linked lines teach (in their order), and its waiting lines held for the time window. Returns the
        held lines decided early (MAX_PENDING), to be stored."""
        for method, count in linked.counts.items():
            self.stats.by_method[method] = self.stats.by_method.get(method, 0) + count
        for lesson in linked.lessons:
            self.templates.learn(*lesson)
        return self._hold(linked.waiting)

    def _keys(self, record: LogRecord) -> list[str]:
        attrs = record.attributes
        found = [str(attrs[k]) for k in KEY_FIELDS if attrs.get(k)] if attrs else []
        for pattern in self.patterns:
            found += pattern.findall(record.message)
        return list(dict.fromkeys(found))

    def _closest(self, trace_ids: list[str], time_ns: int) -> list[str]:
        """Of several traces, those whose time span holds the line (a customer's retry is a new trace)."""
        unread = [tid for tid in trace_ids if tid not in self._summaries]
        if unread:
            if len(self._summaries) > 200_000:
                self._summaries.clear()
            found = self.store.trace_summaries(unread)
            self._summaries.update({tid: found.get(tid) for tid in unread})
        holding = []
        for tid in trace_ids:
            summary = self._summaries[tid]
            if summary and summary.start_ns - WINDOW_SLACK_NS <= time_ns <= summary.end_ns + WINDOW_SLACK_NS:
                holding.append(tid)
        return holding

    def link_batch(self, records: list[LogRecord]) -> list[LogRecord]:
        """Link what ids can link now and return those records; hold the lines that need the time window
        until ``finish`` (or until MAX_PENDING of them are held, when the oldest half is decided)."""
        ready, waiting = self.decide_by_id(records)
        return ready + self._hold(waiting)

    def decide_by_id(self, records: list[LogRecord]) -> tuple[list[LogRecord], list[LogRecord]]:
        """(the records linked now: by an id, or to nothing when their service has no spans to fall in, or with
        no time window; the lines that need the time window)."""
        keys_of = [self._keys(r) for r in records]
        self.prefetch(records, keys_of)
        traced = self.traced_services()
        ready, waiting = [], []
        for record, keys in zip(records, keys_of, strict=True):
            decision = self._by_id(record, keys)
            if decision is None and self.time_window and record.service in traced:
                waiting.append(record)
            else:
                ready.append(self._apply(record, decision or ("none", None, 0.0, [])))
        return ready, waiting

    def _hold(self, waiting: list[LogRecord]) -> list[LogRecord]:
        """Hold lines for the time window; past MAX_PENDING held, the oldest half is decided now and returned."""
        self._pending += waiting
        if len(self._pending) <= MAX_PENDING:
            return []
        early, self._pending = self._pending[:MAX_PENDING // 2], self._pending[MAX_PENDING // 2:]
        return self._decide_by_time(early)

    def finish(self) -> list[LogRecord]:
        """The held lines, decided by time window with every template learned."""
        held, self._pending = self._pending, []
        return self._decide_by_time(held)

    def link(self, record: LogRecord) -> LogRecord:
        """Link one record now, with what has been learned so far."""
        decision = self._by_id(record)
        if decision is None:
            return self._decide_by_time([record])[0] if self.time_window else self._apply(
                record, ("none", None, 0.0, []))
        return self._apply(record, decision)

    def _decide_by_time(self, records: list[LogRecord]) -> list[LogRecord]:
        for service in {r.service for r in records}:
            self._learn_stored(service, [r.time_ns for r in records if r.service == service])
        return [self._apply(r, self._by_time(r)) for r in records]

    def _learn_stored(self, service: str, times: list[int]) -> None:
        """Templates from the service's id-linked lines already in the store (an earlier ingest, OTLP)."""
        if service in self._learned_stored:
            return
        self._learned_stored.add(service)
        hour = 3_600_000_000_000
        for _, stored in self.store.search_logs(LogQuery(service=service, since_ns=min(times) - hour,
                                                      until_ns=max(times) + hour, limit=STORED_LINES_LEARNED)):
            if stored.trace_id and stored.link_method in CONFIDENCE:
                self.templates.learn(service, stored.message, stored.trace_id, stored.time_ns)

    def _apply(self, record: LogRecord, decision: tuple[str, str | None, float, list[str]]) -> LogRecord:
        method, trace_id, confidence, candidates = decision
        if method in CONFIDENCE and trace_id:
            (self.lessons or self.templates).learn(record.service, record.message, trace_id, record.time_ns)
        record.link_method = method
        record.link_confidence = confidence
        if method in ("none", "ambiguous"):
            record.trace_id = None
            if candidates:
                record.attributes["link.candidates"] = candidates[:10]
        else:
            record.trace_id = trace_id
        self.stats.count(method)
        return record

    def _by_id(self, r: LogRecord, keys: list[str] | None = None) -> tuple[str, str | None, float, list[str]] | None:
        """The link an id makes, ``ambiguous`` when an id names several transactions, or None: no id. (``keys``:
        the record's :meth:`_keys`, when already found.)"""
        tid = normalise_trace_id(r.trace_id)
        if tid and self._trace_known(tid):
            return "trace_id", tid, CONFIDENCE["trace_id"], []
        request_id = r.attributes.get("request_id")
        if request_id:
            ids = self._traces_by_key(f"rid:{request_id}")
            if len(ids) == 1:
                return "request_id", ids[0], CONFIDENCE["request_id"], []
        candidates: list[str] = []
        for key in self._keys(r) if keys is None else keys:
            ids = self._traces_by_key(key)
            if len(ids) == 1:
                return "business_key", ids[0], CONFIDENCE["business_key"], []
            if len(ids) > 1:
                holding = self._closest(ids, r.time_ns)
                if len(holding) == 1:
                    return "business_key", holding[0], CONFIDENCE["business_key"] - 0.1, []
                candidates += holding or ids
        if candidates:
            return "ambiguous", None, 0.0, sorted(set(candidates))
        return None

    def _trace_rows(self, trace_id: str) -> list[SpanRow]:
        if trace_id not in self._rows:
            if len(self._rows) > 50_000:
                self._rows.clear()
            self._rows[trace_id] = self.store.trace_rows(trace_id)
        return self._rows[trace_id]

    def _spans_around(self, service: str, time_ns: int) -> list[SpanRow]:
        """``store.server_spans_around(service, time_ns, WINDOW_SLACK_NS, LONGEST_SPAN_NS)``, cut from the spans
        around AROUND_READ_NS of the service's lines from ``time_ns`` on, read once (lines come in time order:
        one read a second of lines, not one a line). The spans read hold every span a line of that stretch asks
        for, and it keeps exactly those, in their order."""
        read = self._around.get(service)
        if read is None or not read[0] <= time_ns < read[1]:
            begin, end = time_ns, time_ns + AROUND_READ_NS
            # in flight from begin - slack, started by end + slack (and at most the longest span before begin)
            rows = self.store.server_spans_around(service, end, end - begin + WINDOW_SLACK_NS,
                                                  LONGEST_SPAN_NS + end - begin)
            read = self._around[service] = (begin, end, rows)
        return [s for s in read[2] if time_ns - LONGEST_SPAN_NS <= s.start_ns <= time_ns + WINDOW_SLACK_NS
                and s.end_ns >= time_ns - WINDOW_SLACK_NS]

    def _by_time(self, r: LogRecord) -> tuple[str, str | None, float, list[str]]:
        if self._traced_services is not None and r.service not in self._traced_services:
            return "none", None, 0.0, []  # no spans of this service at all: nothing to fall in
        spans = [s for s in self._spans_around(r.service, r.time_ns) if s.start_ns - WINDOW_LEAD_NS <= r.time_ns]
        if not spans:
            return "none", None, 0.0, []
        path = str(r.attributes.get("path") or "")
        status = r.attributes.get("status")
        if path or status:  # an access-log line is a request: its route and status are the evidence
            matching = [s for s in spans if _route_matches(s.operation, path)
                        and (status is None or s.http_status is None or str(s.http_status) == str(status))]
            if len(matching) == 1:
                return "time_window", matching[0].trace_id, WINDOW_CONFIDENCE_ROUTE, []
            spans = matching or spans
            if len({s.trace_id for s in spans}) == 1:
                return "time_window", spans[0].trace_id, WINDOW_CONFIDENCE, []
        template = self.templates.scoped(r.service, r.message)
        if template is None:
            return "none", None, 0.0, []  # a template never logged with an id: background
        traces = sorted({s.trace_id for s in spans})
        if len(traces) == 1:
            return "time_window", traces[0], WINDOW_CONFIDENCE, []
        anchor = self.templates.anchor(r.service, template, self._trace_rows)
        if anchor is not None:
            placed = {s.trace_id for s in spans if anchor.fits(s, r.time_ns)}
            if len(placed) == 1:
                r.attributes["link.position"] = anchor.at
                return "time_window", placed.pop(), WINDOW_CONFIDENCE_POSITION, []
        return "ambiguous", None, 0.0, traces


@dataclass(frozen=True)
class IdLinked:
    """What linking a batch by ids did, for the linker that holds the time window (:meth:`Linker.take`)."""

    counts: dict[str, int]
    lessons: list[tuple[str, str, str, int]]
    waiting: list[LogRecord]


@dataclass(frozen=True)
class IdLinking:
    """:meth:`Linker.by_ids`: a linker's settings, sent with a batch to link it where it was parsed."""

    key_patterns: tuple[str, ...]
    time_window: bool
    traced_services: frozenset[str]

    def __call__(self, store: Store, records: list[LogRecord]) -> tuple[list[LogRecord], IdLinked]:
        """(the records linked now, to be stored; what the holder of the time window takes)."""
        lessons = Lessons()
        linker = Linker(store, self.key_patterns, self.time_window, self.traced_services, lessons)
        ready, waiting = linker.decide_by_id(records)
        return ready, IdLinked(dict(linker.stats.by_method), lessons.lines, waiting)


def _route_matches(operation: str, path: str) -> bool:
    if not path:
        return True
    route = operation.split(" ", 1)[-1]
    pattern = "^" + re.sub(r"\\\{[^}]*\\\}|<[^>]*>", "[^/]+", re.escape(route)) + "$"
    return re.match(pattern, path.split("?")[0]) is not None
