"""One writer thread that commits whatever the receivers queued, many requests a transaction."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from payscope.model import EncodedSpan, LogRecord, Span

from .store import Store


class OverloadedError(Exception):
    """The write queue is full: the client should retry after ``retry_after`` seconds."""

    retry_after = 1


_STOP = object()


class BatchWriter:
    """Group commit: a request is acknowledged only after the transaction holding it commits."""

    def __init__(self, store: Store, *, max_pending_items: int = 500_000,
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
            spans = [s for w in work for s in w[0]]  # type: ignore[index]
            logs = [r for w in work for r in w[1]]  # type: ignore[index]
            try:
                self.store.write(spans, logs)
            except BaseException as exc:  # the requests get the error; the writer goes on
                for w in work:
                    w[2].set_exception(exc)  # type: ignore[index]
            else:
                self.committed_spans += len(spans)
                self.committed_logs += len(logs)
                for w in work:
                    w[2].set_result(None)  # type: ignore[index]
            with self._lock:
                self._pending -= size
            if stop_after:
                return

    def close(self) -> None:
        """Commit everything queued so far, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
