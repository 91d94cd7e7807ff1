"""Decoding OTLP requests in worker processes, so that every core decodes while the writer commits.

Decoding a span (protobuf to redacted, derived facts) is per-span Python, and in one process it shares
one core with the HTTP threads and the writer. :class:`DecodePool` sends each large request's bytes to
one of a few worker processes and gets back exactly what decoding in-process would have given: a
:class:`~payscope.collector.otlp.Decoded`, or the InputError that says what was wrong with the input.
Redaction happens in the worker, before anything reaches the writer, so nothing changes in what is
stored. Small requests are decoded in the receiving thread: for them the round trip would cost more
than it saves.

When the store can be opened again in another process (both backends), a worker also stores what it
decoded, in a transaction of its own, and sends back only how many items and which traces
(:func:`decode_and_store`): the spans never cross back, and the collector's process is left with the HTTP
threads. The request is acknowledged after that transaction commits, as after the writer's.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from payscope.errors import InputError

from .otlp import LOGS, TRACES, Decoded, count_items
from .store import Store, UnavailableError, open_store
from .writer import blame

T = TypeVar("T")
INLINE_BELOW_BYTES = 64 * 1024  # a request smaller than this is decoded where it arrived
WORKER_ANSWER_S = 60.0  # a task not answered in this long is done where it was asked, and the workers replaced
_SIGNALS = {TRACES.name: TRACES, LOGS.name: LOGS}


def default_workers() -> int:
    """One decoding process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def decode_request(signal_name: str, body: bytes, content_type: str, max_items: int) -> Decoded:
    """Parse and convert one request body; InputError when it cannot be read or holds too much."""
    signal = _SIGNALS[signal_name]
    try:
        request, raw = signal.parse(body, content_type)
    except InputError:
        raise
    except Exception as exc:  # whatever else the parsers raise on hostile input is the input's fault
        raise InputError(f"unreadable request ({type(exc).__name__})") from None
    items = count_items(request)
    if items > max_items:
        raise InputError(f"{items} spans or log records in one request, more than {max_items}: "
                         "send smaller batches")
    return signal.convert(request, raw)


_OPENED: dict[str, Store] = {}  # in a worker process: the stores it opened, by URL


def opened_here(url: str) -> Store:
    """In a worker process: the store at ``url`` (``Store.address()``), opened the first time it is asked for."""
    store = _OPENED.get(url)
    if store is None:
        store = _OPENED[url] = open_store(url)
    return store


def decode_and_store(signal_name: str, body: bytes, content_type: str, max_items: int, store_url: str) -> Decoded:
    """In a worker process: :func:`decode_request`, and what it gave written to the store at ``store_url`` (opened
    once) in one transaction. Returns the request without its items, once they are durable (``Decoded.stored``).
    A value the store cannot hold is the request's fault (RejectedError), as in the writer. A store that cannot
    take the write now (Elasticsearch down) gets it back whole, for the writer, whose spool keeps it."""
    decoded = decode_request(signal_name, body, content_type, max_items)
    if not decoded.spans and not decoded.logs:
        return decoded
    started = time.monotonic()
    try:
        opened_here(store_url).write(decoded.spans, decoded.logs)
    except UnavailableError:
        return decoded  # the store cannot take it now: the collector's writer does, or keeps it in its spool
    except Exception as exc:
        raise blame(exc) from None
    return decoded.stored_as(time.monotonic() - started)


def _watch_parent(parent: int) -> None:
    """In a worker: exit when the collector that started it is gone, killed with -9 too."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="payscope-parent-watch", daemon=True).start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for per-record Python, spawned (not forked: a fork copies the locks other threads
    hold), each leaving when its parent is gone."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_watch_parent, initargs=(os.getpid(),))


class WorkerPool:
    """:func:`process_pool`, started on the first task and started again after a worker died."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = process_pool(self.workers)
            pool = self._pool
        try:
            return pool.submit(fn, *args)
        except BrokenProcessPool:
            self.discard(pool)
            raise
        except OSError as exc:
            # a worker died while this task started another one: the pool's pipes are already closed
            self.discard(pool)
            raise BrokenProcessPool(f"a worker process could not start ({exc})") from None

    def answer(self, future: Future[T], here: Callable[[], T]) -> T:
        """What ``future`` gives, or what ``here()`` gives when its worker died or does not answer: a worker
        killed while others start can leave the executor's own threads stuck, so the wait is bounded."""
        try:
            return future.result(timeout=WORKER_ANSWER_S)
        except (BrokenProcessPool, TimeoutError):
            self.discard()
            return here()

    def discard(self, pool: ProcessPoolExecutor | None = None) -> None:
        """Drop the pool (``pool``, when it is still the one in use): the next task starts new workers."""
        with self._lock:
            if pool is None or self._pool is pool:
                pool, self._pool = self._pool, None
            else:
                pool = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class DecodePool(WorkerPool):
    """Request bodies of INLINE_BELOW_BYTES or more decoded by the workers, smaller ones where they arrived."""

    def decode(self, signal_name: str, body: bytes, content_type: str, max_items: int,
               store_url: str | None = None) -> Decoded:
        """The request decoded; with ``store_url``, by a worker that also stores it there (``Decoded.stored``).
        A request decoded here (small, or its worker gone) comes back with its items, for the writer."""
        if self.workers <= 0 or len(body) < INLINE_BELOW_BYTES:
            return decode_request(signal_name, body, content_type, max_items)
        def here() -> Decoded:
            return decode_request(signal_name, body, content_type, max_items)

        try:
            future = (self.submit(decode_and_store, signal_name, body, content_type, max_items, store_url)
                      if store_url is not None else self.submit(decode_request, signal_name, body, content_type,
                                                                max_items))
        except BrokenProcessPool:  # a worker died (killed, out of memory): new ones start on the next request
            return here()
        return self.answer(future, here)


__all__ = ["INLINE_BELOW_BYTES", "WORKER_ANSWER_S", "DecodePool", "WorkerPool", "decode_and_store", "decode_request",
           "default_workers", "opened_here", "process_pool"]
