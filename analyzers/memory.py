"""Memory management for large analyses."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_building = 0         # analyses and documents being built now, in any thread
_was_enabled = False  # whether the collector ran before the first of them began


@contextmanager
def paused_cycle_collection() -> Iterator[None]:
    """Cyclic garbage collection paused while an analysis, or a document from one, is built (a context manager
    or a decorator). They make hundreds of thousands of records that hold no reference cycle (kept so: no
    recursive closures) and live until the command ends; each collection would walk all of them again, for
    nothing (a tenth to a quarter of `analyze` on large stores). Reference counting still frees what is dropped.

    The collector is process-wide, and the TUI builds in worker threads: it stays paused until the last build
    under way in any thread has ended, and then runs again if it ran before the first began."""
    global _building, _was_enabled
    with _lock:
        if _building == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _building += 1
    try:
        yield
    finally:
        with _lock:
            _building -= 1
            if _building == 0 and _was_enabled:
                gc.enable()


def no_cycle_collection_until_exit() -> None:
    """For a command that builds one analysis, answers and ends: cyclic collection off for the rest of the
    process. Turning it back on after a build would make the next allocation walk every record the build made
    (everything allocated while paused is still in the youngest generation), and the interpreter would walk them
    all again at exit; neither finds anything. Memory stays bounded: what the command drops is still freed by
    reference counting."""
    gc.disable()
