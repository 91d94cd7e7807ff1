"""A trace's calls and facts, derived once from its spans and kept in the store beside them.

``calls.trace_calls`` is the one pass over a trace's spans. Once a trace has settled, what that pass makes
(the trace's facts, its calls, and its votes on which service answers at which address) is stored as one
value, and an analysis reads it instead of the spans: a call is a few dozen values where its spans are
hundreds. What stays cross-trace (renaming addresses by the votes, clock offsets, late successes, retry
chains) is still worked out at analysis time from the calls, so a stored derivation never holds a conclusion.

A derivation is used only while it is exact: the store hands it out only while the trace still has the span
count it was made from (a late span makes the analysis read the spans again), and only to the code that made
it (``KEY``, a digest of the code the pass runs). Anything else is read from the spans as before.
"""

from __future__ import annotations

import hashlib
import marshal
import sys
from dataclasses import fields
from importlib import metadata
from pathlib import Path

from payscope import model
from payscope.collector.store import Store
from payscope.collector.store.api import Cursor

from . import calls as calls_module
from .calls import Call, Captured, TraceFacts, trace_calls

Votes = dict[str, dict[str, int]]


def _key() -> str:
    """A digest of the code a derivation comes from: the pass itself, the span facts it reads, and this
    module's format (or, installed without sources, the version)."""
    digest = hashlib.blake2b(digest_size=8)
    try:
        for module in (calls_module, model, sys.modules[__name__]):
            digest.update(Path(module.__file__ or "").read_bytes())
    except OSError:
        digest.update(f"payscope {metadata.version('payscope')}".encode())
    return digest.hexdigest()


KEY = _key()

_CALL_FIELDS = tuple(f.name for f in fields(Call))
assert _CALL_FIELDS[-1] == "edge_key"  # set from the final callee names, at analysis time
_FROZEN_CALL_FIELDS = _CALL_FIELDS[:-1]
_CAPTURED = _FROZEN_CALL_FIELDS.index("captured")
_NAMES = tuple(_FROZEN_CALL_FIELDS.index(name) for name in ("caller", "callee", "operation", "method",
                                                             "error_class", "server_service", "fault"))
_FACT_FIELDS = tuple(f.name for f in fields(TraceFacts))
_intern = sys.intern


def freeze(facts: TraceFacts, trace_calls_: list[Call], votes: Votes) -> bytes:
    """One value for what ``trace_calls`` made of a trace (names interned, so that reading a store's
    derivations back shares one string per name)."""
    frozen = []
    for c in trace_calls_:
        values = [getattr(c, name) for name in _FROZEN_CALL_FIELDS]
        captured = values[_CAPTURED]
        if captured is not None:
            values[_CAPTURED] = (captured.connect_ms, captured.read_ms, captured.total_ms, captured.source,
                                 captured.retry_max)
        for at in _NAMES:
            if values[at] is not None:
                values[at] = _intern(values[at])
        frozen.append(tuple(values))
    return marshal.dumps((tuple(getattr(facts, name) for name in _FACT_FIELDS), frozen, votes))


def thaw(body: bytes) -> tuple[TraceFacts, list[Call], Votes]:
    """What :func:`freeze` was given, as new objects."""
    facts, frozen, votes = marshal.loads(body)
    out = []
    for values in frozen:
        call = Call(*values)
        if call.captured is not None:
            call.captured = Captured(*call.captured)  # type: ignore[misc]
        out.append(call)
    return TraceFacts(*facts), out, votes


def derive(store: Store, trace_ids: list[str]) -> int:
    """Derive and store the calls of ``trace_ids`` from their spans as stored now; the number derived."""
    items = []
    for trace_id, span_count, spans in store.rows_to_derive(trace_ids):
        votes: Votes = {}
        facts, found = trace_calls(spans, votes)
        items.append((trace_id, span_count, freeze(facts, found, votes)))
    store.write_derived(KEY, items)
    return len(items)


def settle(store: Store, batch: int = 1_000) -> int:
    """Derive every trace of ``store`` that has no exact derivation (after an import); the number derived."""
    done = 0
    after: Cursor = None
    while True:
        found, after = store.underived(KEY, after, batch)
        if found:
            done += derive(store, found)
        if after is None:
            return done


class Deriver:
    """What `payscope collect`'s writer calls (``collector.writer.Deriver``) to derive the traces of
    ``store`` once they settle."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def derive(self, trace_ids: list[str]) -> int:
        return derive(self.store, trace_ids)

    def backlog(self, after: Cursor, limit: int) -> tuple[list[str], Cursor]:
        return self.store.underived(KEY, after, limit)
