"""One writer thread that commits whatever the receivers queued, many requests a transaction."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any

from payscope.model import EncodedSpan, LogRecord, Span

from .store import Store


class OverloadedError(Exception):
    """The write queue is full: the client should retry after ``retry_after`` seconds."""

    retry_after = 1


class RejectedError(Exception):
    """A request whose data the store cannot hold: the client's fault, answered 400, never retried."""


# What a store raises on a value it cannot hold (an integer past 64 bits, text UTF-8 cannot encode).
_DATA_ERRORS = (OverflowError, ValueError, TypeError, UnicodeError)

_STOP = object()


class BatchWriter:
    """Group commit: a request is acknowledged only after the transaction holding it commits."""

    def __init__(self, store: Store, *, max_pending_items: int = 200_000,
                 max_transaction_items: int = 50_000) -> None:
        self.store = store
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

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
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
                work.append(item)
                size += item[3]  # type: ignore[index]
            self._commit(work)  # type: ignore[arg-type]
            with self._lock:
                self._pending -= size
            if stop_after:
                return

    def _commit(self, work: list[tuple[Any, Any, Future[None], int]]) -> None:
        """One transaction for many requests. If it fails, each request is committed alone, so that one
        client's value the store cannot hold fails that client's request and no other."""
        try:
            self._write(work)
        except BaseException as exc:
            if len(work) == 1 or not isinstance(exc, _DATA_ERRORS):
                for w in work:
                    w[2].set_exception(_blame(exc))
                return
            for w in work:
                try:
                    self._write([w])
                except BaseException as alone:
                    w[2].set_exception(_blame(alone))

    def _write(self, work: list[tuple[Any, Any, Future[None], int]]) -> None:
        spans = [s for w in work for s in w[0]]
        logs = [r for w in work for r in w[1]]
        self.store.write(spans, logs)
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


def _blame(exc: BaseException) -> BaseException:
    """The error a request gets: RejectedError when its own data was at fault, else the store's error."""
    if isinstance(exc, _DATA_ERRORS):
        return RejectedError(f"a value in this request cannot be stored ({type(exc).__name__}: {str(exc)[:120]})")
    return exc
