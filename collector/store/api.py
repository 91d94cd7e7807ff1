"""The storage interface every backend implements, and the rules it keeps.

Rules (the conformance suite in ``tests/test_store_conformance.py`` checks them):

* Writes are idempotent: the same span (trace id, span id) or log record written
  twice is stored once.
* A write is durable when it returns: a process killed right after keeps it.
* A batch is visible to readers whole or not at all.
* Reads never block on the writer and never see "database is locked".
* A backend that cannot do something raises :class:`UnsupportedError`, it never
  silently returns less.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from payscope.errors import PayscopeError, StoreError
from payscope.model import EncodedSpan, LogRecord, Span, SpanRow, TraceSummary


class UnsupportedError(PayscopeError):
    """The backend does not implement this operation."""


class UnavailableError(StoreError):
    """The store cannot take a write now (unreachable, overloaded, no primary): worth trying again. A writer
    with a spool keeps the write there (``docs/elasticsearch.md``)."""


@dataclass(slots=True)
class LogQuery:
    """What ``search_logs`` filters on; every field left as None matches everything."""

    service: str | None = None
    trace_id: str | None = None
    text: str | None = None
    severity: str | None = None
    since_ns: int | None = None
    until_ns: int | None = None
    unlinked_only: bool = False
    attribute: str | None = None  # only records that carry this attribute
    source_prefix: str | None = None  # only records whose source starts with this ("otlp": sent over OTLP)
    limit: int | None = 100


Cursor = int | str | None  # where a scan of the store goes on from (a backend's own value); None: the start

# A trace id's last 14 hex digits (56 bits) are random in every W3C trace id (its "random" flag promises no
# more) and in time-prefixed ids too: a sample drawn by them is the one a trace-id ratio sampler keeps.
SAMPLE_DIGITS = 14


@dataclass(slots=True)
class Sample:
    """Traces chosen from a window by the store, and how many start in it."""

    trace_ids: list[str]
    in_window: int  # exact up to the limit; above it, Elasticsearch's estimate
    limit: int | None

    @property
    def complete(self) -> bool:
        return self.limit is None or len(self.trace_ids) < self.limit

    def to_json(self) -> dict[str, Any]:
        """What a document says of it: traces read, traces in the window, the limit, and whether all were read."""
        return {"traces_read": len(self.trace_ids), "traces_in_window": self.in_window, "limit": self.limit,
                "complete": self.complete}


class Store(abc.ABC):
    """A reader and a writer of spans and log records."""

    url: str

    # --- writing -----------------------------------------------------------
    @abc.abstractmethod
    def write(self, spans: Iterable[Span | EncodedSpan] = (),
              logs: Iterable[LogRecord] = ()) -> tuple[int, int]:
        """Store spans and log records as one batch; return how many of each were new."""

    @abc.abstractmethod
    def update_log_links(self, links: Iterable[tuple[int, str | None, str | None, str, float]]) -> None:
        """Set (log id, trace id, span id, method, confidence) on stored log records."""

    @abc.abstractmethod
    def update_log_sources(self, sources: Iterable[tuple[int, str]]) -> None:
        """Set (log id, source) on stored log records: a record that arrived two ways keeps both sources."""

    # --- reading spans -----------------------------------------------------
    @abc.abstractmethod
    def trace(self, trace_id: str) -> list[Span]:
        """All spans of one trace ordered by start time; empty when unknown."""

    def traces_whole(self, trace_ids: list[str]) -> dict[str, list[Span]]:
        """``trace`` for each of ``trace_ids`` that is stored, by trace id (a backend may read them together)."""
        found = {t.lower(): self.trace(t) for t in trace_ids}
        return {t: spans for t, spans in found.items() if spans}

    @abc.abstractmethod
    def trace_summary(self, trace_id: str) -> TraceSummary | None:
        """The summary of one trace, or None."""

    @abc.abstractmethod
    def trace_summaries(self, trace_ids: list[str]) -> dict[str, TraceSummary]:
        """The summaries of those of ``trace_ids`` that are stored, by trace id (as ``trace_summary`` gives them,
        in a few reads rather than one a trace)."""

    @abc.abstractmethod
    def failed_traces(self, since_ns: int | None = None, until_ns: int | None = None,
                      limit: int | None = 100, offset: int = 0) -> list[TraceSummary]:
        """Traces with an error span, newest first: a fast first look. Whether a trace failed, and how, is the
        analysis' call (a late success or a duplicate charge has no error span)."""

    @abc.abstractmethod
    def traces(self, since_ns: int | None = None, until_ns: int | None = None,
               limit: int | None = 100, offset: int = 0) -> list[TraceSummary]:
        """All trace summaries, newest first."""

    @abc.abstractmethod
    def iter_rows(self, batch_size: int = 10_000, since_ns: int | None = None,
                  until_ns: int | None = None) -> Iterator[list[SpanRow]]:
        """The derived facts of every span, in batches, a trace's spans contiguous; with ``since_ns`` or
        ``until_ns``, of the traces whose first span starts in [since, until) only, chosen in the store."""

    def iter_traces(self, derived_key: str | None = None, since_ns: int | None = None,
                    until_ns: int | None = None, batch_size: int = 10_000) -> Iterator[list[SpanRow] | bytes]:
        """Every trace (of those starting in [since, until)) once, by trace id: its stored derivation under
        ``derived_key`` when it has an exact one (see :meth:`write_derived`), else the derived facts of its
        spans. A backend that keeps no derivations gives the spans of every trace."""
        return group_traces(self.iter_rows(batch_size, since_ns, until_ns))

    def traces_of(self, derived_key: str | None, trace_ids: list[str],
                  batch_size: int = 10_000) -> Iterator[list[SpanRow] | bytes]:
        """Those of ``trace_ids`` that are stored, once each, by trace id, as :meth:`iter_traces` gives them: a
        trace's exact derivation under ``derived_key``, else its spans' derived facts."""
        return group_traces(self.rows_of(trace_ids, batch_size))

    keeps_derivations = False  # whether write_derived keeps anything

    def address(self) -> str | None:
        """What opens this store again in another process (``open_store``) with the same data and settings, or
        None when it cannot be (a worker process then hands what it made to this one to write)."""
        return None

    def written_elsewhere(self) -> None:
        """Another process, which opened this store at its ``address()``, has written to it: this handle's next read
        sees that write, as it sees its own. Nothing to do where every read sees every committed write."""
        return None

    def underived(self, derived_key: str, after: Cursor, limit: int) -> tuple[list[str], Cursor]:
        """The traces that have no exact derivation under ``derived_key``, looked for in one bounded step from
        ``after`` (None: the first stored trace): at most ``limit`` of them, and where the next step goes on
        from, or None when the scan has reached the last stored trace."""
        return [], None

    def rows_to_derive(self, trace_ids: list[str]) -> list[tuple[str, int, list[SpanRow]]]:
        """For each of ``trace_ids`` that is stored: (trace id, span count, its spans' facts by span id), all
        read at one moment, so that the count is the count of the spans given."""
        return []

    def write_derived(self, derived_key: str, items: list[tuple[str, int, bytes]]) -> None:
        """Keep (trace id, span count, body): what the code named ``derived_key`` derived from that trace
        when it had that many spans. :meth:`iter_traces` gives the body back only while the trace still
        has that many. Derivations are a cache of what the spans say: losing one loses nothing (a backend
        that keeps none drops them)."""
        return None

    @abc.abstractmethod
    def sample_traces(self, since_ns: int, until_ns: int, limit: int | None) -> Sample:
        """Up to ``limit`` (None: all) of the traces whose first span starts in [since, until): those whose trace
        ids' last :data:`SAMPLE_DIGITS` hex digits, read as a number, are least (then by trace id), so the same
        store gives the same sample, and a window of more traces a sample of the same kind."""

    @abc.abstractmethod
    def rows_of(self, trace_ids: list[str], batch_size: int = 10_000) -> Iterator[list[SpanRow]]:
        """The derived facts of those traces' spans, in batches, a trace's spans contiguous and by start time."""

    @abc.abstractmethod
    def server_spans_around(self, service: str, time_ns: int, slack_ns: int,
                            longest_ns: int = 120_000_000_000) -> list[SpanRow]:
        """Server spans of ``service`` in flight at ``time_ns`` (give or take ``slack_ns``)."""

    @abc.abstractmethod
    def trace_rows(self, trace_id: str) -> list[SpanRow]:
        """The derived facts of one trace's spans, by start time."""

    @abc.abstractmethod
    def traces_by_key(self, key: str) -> list[str]:
        """Trace ids that carry the business key (order id, payment id) ``key``."""

    @abc.abstractmethod
    def traces_by_keys(self, keys: list[str]) -> dict[str, list[str]]:
        """For many business keys at once: key -> trace ids (keys with none are left out)."""

    @abc.abstractmethod
    def known_traces(self, trace_ids: list[str]) -> list[str]:
        """Those of ``trace_ids`` that the store holds."""

    @abc.abstractmethod
    def server_services(self) -> list[str]:
        """Services that have server spans."""

    @abc.abstractmethod
    def write_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record (business key, trace id) pairs."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Numbers of spans, traces and log records stored."""

    # --- reading logs ------------------------------------------------------
    @abc.abstractmethod
    def logs_of_trace(self, trace_id: str) -> list[LogRecord]:
        """Log records linked to the trace, by time."""

    @abc.abstractmethod
    def search_logs(self, query: LogQuery) -> list[tuple[int, LogRecord]]:
        """(log id, record) pairs matching the query, by time."""

    # --- meta ----------------------------------------------------------------
    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A stored setting (schema version, clock offsets, declared timeouts)."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Store a setting."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; safe to call twice."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def group_traces(batches: Iterable[list[SpanRow]]) -> Iterator[list[SpanRow]]:
    """Span batches whose traces are contiguous (``Store.iter_rows``), as one list per trace."""
    current: list[SpanRow] = []
    for batch in batches:
        for span in batch:
            if current and span.trace_id != current[0].trace_id:
                yield current
                current = []
            current.append(span)
    if current:
        yield current
