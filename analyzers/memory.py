"""Memory management for large analyses."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_cycle_collection() -> Iterator[None]:
    """Cyclic garbage collection paused while an analysis, or a document from one, is built (a context manager
    or a decorator). They make hundreds of thousands of records that hold no reference cycle (kept so: no
    recursive closures) and live until the command ends; each collection would walk all of them again, for
    nothing (a tenth to a quarter of `analyze` on large stores). Reference counting still frees what is dropped,
    and the collector runs again afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
