"""One writer thread that commits whatever the receivers queued, many requests a transaction."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, Protocol

from payscope.model import EncodedSpan, LogRecord, Span

from .otlp import Stored
from .store import Store
from .store.api import Cursor


class OverloadedError(Exception):
    """The write queue is full: the client should retry after ``retry_after`` seconds."""

    retry_after = 1


class RejectedError(Exception):
    """A request whose data the store cannot hold: the client's fault, answered 400, never retried."""


# What a store raises on a value it cannot hold (an integer past 64 bits, text UTF-8 cannot encode).
_DATA_ERRORS = (OverflowError, ValueError, TypeError, UnicodeError)

_STOP = object()

SETTLE_S = 10.0  # a trace this long without a new span is derived for the analysis
_SETTLE_STEP = 200  # traces derived between two looks at the queue (about 20 ms for ten-span traces)
_TICK_S = 0.5  # how often an idle writer looks for settled traces
_MAX_TOUCHED = 200_000  # traces remembered as written; past it the oldest are left to the backlog scan
_BUSY_MAX = 0.5  # derive only while committing took less than this share of the writer's last second


class Deriver(Protocol):
    """What derives a store's settled traces for the analysis (``analyzers.derived.Deriver``)."""

    def derive(self, trace_ids: list[str]) -> object: ...

    def backlog(self, after: Cursor, limit: int) -> tuple[list[str], Cursor]: ...


class BatchWriter:
    """Group commit: a request is acknowledged only after the transaction holding it commits."""

    def __init__(self, store: Store, *, max_pending_items: int = 200_000,
                 max_transaction_items: int = 50_000, deriver: Deriver | None = None,
                 settle_s: float = SETTLE_S) -> None:
        self.store = store
        # With a deriver, the writer derives each trace it wrote once no span came for it in ``settle_s``,
        # and every trace stored before that has no derivation yet (the backlog), when nothing waits in the
        # queue: acknowledgements never wait for a derivation longer than one step.
        self._deriver = deriver if store.keeps_derivations else None
        self.settle_s = settle_s
        self._touched: OrderedDict[str, float] = OrderedDict()  # trace id -> when a span of it was last written
        self._backlog_after: Cursor = None  # where the backlog scan goes on from (None: the start)
        self._backlog_done = False
        self._derive_failed = False
        self.derived_traces = 0
        self._busy_s = 0.0  # seconds spent committing since _window_start
        self._window_start = time.monotonic()
        self._busy_share = 1.0  # of the last whole window (none yet: taken as busy)
        self.max_pending_items = max_pending_items
        self.max_transaction_items = max_transaction_items
        self._queue: queue.Queue[object] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self.committed_spans = 0
        self.committed_logs = 0
        self._thread = threading.Thread(target=self._run, name="payscope-writer", daemon=True)
        self._thread.start()

    def check_room(self, items: int) -> None:
        """Raise OverloadedError when ``items`` more would not fit in the queue (checked before decoding)."""
        with self._lock:
            if self._closed:
                raise OverloadedError("the collector is shutting down")
            if self._pending and self._pending + items > self.max_pending_items:
                raise OverloadedError(f"write queue full ({self._pending} items pending)")

    def submit(self, spans: list[Span] | list[EncodedSpan], logs: list[LogRecord]) -> Future[None]:
        """Queue a batch; the future resolves once it is durable. Raises OverloadedError when full."""
        items = len(spans) + len(logs)
        future: Future[None] = Future()
        with self._lock:
            if self._closed:
                raise OverloadedError("the collector is shutting down")
            if self._pending and self._pending + items > self.max_pending_items:
                raise OverloadedError(f"write queue full ({self._pending} items pending)")
            self._pending += items
        self._queue.put((spans, logs, future, items))
        return future

    def note(self, stored: Stored) -> None:
        """Count what a decoding process stored itself, and derive its traces once they settle, as if written
        here; the time it took counts as this writer's, so that deriving waits while the store is busy."""
        self._queue.put(stored)

    def _noted(self, stored: Stored) -> None:
        self.store.written_elsewhere()  # what deriving reads next includes it
        self.committed_spans += stored.spans
        self.committed_logs += stored.logs
        self._busy_s += stored.seconds
        if self._deriver and stored.trace_ids:
            self._written_traces(stored.trace_ids)

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=_TICK_S if self._deriver else None)
            except queue.Empty:
                self._settle()
                continue
            if first is _STOP:
                return
            if isinstance(first, Stored):
                self._noted(first)
                if self._deriver and self._queue.empty():
                    self._settle()
                continue
            work = [first]
            size = first[3]  # type: ignore[index]
            stop_after = False
            while size < self.max_transaction_items:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                if isinstance(item, Stored):
                    self._noted(item)
                    continue
                work.append(item)
                size += item[3]  # type: ignore[index]
            started = time.monotonic()
            self._commit(work)  # type: ignore[arg-type]
            self._busy_s += time.monotonic() - started
            with self._lock:
                self._pending -= size
            if stop_after:
                return
            if self._deriver and self._queue.empty():
                self._settle()

    def _settle(self) -> None:
        """One bounded step of deriving: traces that settled, else the next page of the backlog."""
        if self._deriver is None:
            return
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._busy_share = self._busy_s / (now - self._window_start)
            self._busy_s, self._window_start = 0.0, now
        if self._busy_share >= _BUSY_MAX:  # a writer this busy keeps its time for acknowledging
            return
        settled_before = now - self.settle_s
        chosen: list[str] = []
        while self._touched and len(chosen) < _SETTLE_STEP:
            trace_id, written = next(iter(self._touched.items()))
            if written > settled_before:
                break
            del self._touched[trace_id]
            chosen.append(trace_id)
        try:
            if not chosen and not self._backlog_done:
                found, self._backlog_after = self._deriver.backlog(self._backlog_after, _SETTLE_STEP)
                self._backlog_done = self._backlog_after is None
                chosen = [trace_id for trace_id in found if trace_id not in self._touched]
            if chosen:
                self._deriver.derive(chosen)
                self.derived_traces += len(chosen)
        except Exception as exc:  # a derivation only saves the analysis work: it never stops the writer
            if not self._derive_failed:
                self._derive_failed = True
                print(f"payscope collect: deriving traces for the analysis failed ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); the analysis reads their spans instead", file=sys.stderr, flush=True)

    def _written(self, spans: list[Any]) -> None:
        """Remember when the traces of ``spans`` were last written (the oldest first)."""
        self._written_traces({s.row.trace_id if isinstance(s, EncodedSpan) else s.trace_id for s in spans})

    def _written_traces(self, trace_ids: Iterable[str]) -> None:
        now = time.monotonic()
        touched = self._touched
        for trace_id in trace_ids:
            touched.pop(trace_id, None)
            touched[trace_id] = now
        if len(touched) > _MAX_TOUCHED:
            while len(touched) > _MAX_TOUCHED:
                touched.popitem(last=False)
            self._backlog_after, self._backlog_done = None, False  # the forgotten ones: found again by the scan

    def _commit(self, work: list[tuple[Any, Any, Future[None], int]]) -> None:
        """One transaction for many requests. If it fails, each request is committed alone, so that one
        client's value the store cannot hold fails that client's request and no other."""
        try:
            self._write(work)
        except BaseException as exc:
            if len(work) == 1 or not isinstance(exc, _DATA_ERRORS):
                for w in work:
                    w[2].set_exception(blame(exc))
                return
            for w in work:
                try:
                    self._write([w])
                except BaseException as alone:
                    w[2].set_exception(blame(alone))

    def _write(self, work: list[tuple[Any, Any, Future[None], int]]) -> None:
        spans = [s for w in work for s in w[0]]
        logs = [r for w in work for r in w[1]]
        self.store.write(spans, logs)
        if self._deriver and spans:
            self._written(spans)
        self.committed_spans += len(spans)
        self.committed_logs += len(logs)
        for w in work:
            w[2].set_result(None)

    def close(self) -> None:
        """Commit everything queued so far, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join()


def blame(exc: BaseException) -> BaseException:
    """The error a request gets: RejectedError when its own data was at fault, else the store's error."""
    if isinstance(exc, _DATA_ERRORS):
        return RejectedError(f"a value in this request cannot be stored ({type(exc).__name__}: {str(exc)[:120]})")
    return exc
