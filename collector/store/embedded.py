"""The embedded store: one SQLite file in WAL mode, one writer and many readers.

Why SQLite: it is a single file that needs no server, WAL lets readers in other
processes read while the collector writes without ever seeing half a batch, and
``synchronous=FULL`` makes a committed batch survive ``kill -9`` and power loss.
"""

from __future__ import annotations

import itertools
import json
import marshal
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from payscope.errors import StoreError
from payscope.model import EncodedSpan, LogRecord, Span, SpanRow, TraceSummary

from .api import SAMPLE_DIGITS, Cursor, LogQuery, Sample, Store, group_traces
from .codec import decode_body, encode_span

SCHEMA_VERSION = 9

_TRACES_ID = "CREATE UNIQUE INDEX IF NOT EXISTS traces_id ON traces(trace_id, trace_no, span_count)"
_DERIVED_TABLE = ("CREATE TABLE IF NOT EXISTS derived(trace_no INTEGER PRIMARY KEY, span_count INTEGER NOT NULL, "
                  "key TEXT NOT NULL, body BLOB NOT NULL)")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources(id INTEGER PRIMARY KEY, body TEXT NOT NULL UNIQUE);
-- A trace is numbered when it is first seen (trace_no), and its spans are found by that number: new traces
-- and their spans go to the end of both tables and of the spans' index, where an index on the random trace
-- id put every batch's entries on as many pages as it had traces (three times the bytes written).
CREATE TABLE IF NOT EXISTS spans(
    trace_no INTEGER NOT NULL, trace_id TEXT NOT NULL, span_id TEXT NOT NULL,
    service TEXT NOT NULL, kind TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
    facts BLOB NOT NULL,  -- every derived fact after the span id, in one value: see _facts
    resource_id INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS spans_trace ON spans(trace_no, span_id);
CREATE INDEX IF NOT EXISTS spans_service_time ON spans(service, start_ns) WHERE kind IN ('server', 'consumer');
CREATE TABLE IF NOT EXISTS traces(
    trace_no INTEGER PRIMARY KEY, trace_id TEXT NOT NULL,
    start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
    root_service TEXT NOT NULL, root_name TEXT NOT NULL,
    span_count INTEGER NOT NULL, error_count INTEGER NOT NULL,
    error_class TEXT, error_service TEXT, services TEXT NOT NULL,
    root_rank INTEGER, error_rank INTEGER  -- how the root and the error were chosen: see _Summary
);
-- A trace by id. It holds the number and the span count too, so that the analysis pairs every trace with its
-- derivation in trace id order without visiting the summaries themselves (2.8 -> 1.6 s for 500k traces). It
-- costs no write of its own: a summary is replaced whole, entry and all. One id, one number: the writer
-- numbers a trace under its write lock, after looking the id up (_write_spans).
{_TRACES_ID};
CREATE INDEX IF NOT EXISTS traces_start ON traces(start_ns);
CREATE INDEX IF NOT EXISTS traces_failed ON traces(start_ns) WHERE error_count > 0;
-- What the analysis derived from a trace's spans (its calls and facts, analyzers/derived.py), so that it need
-- not read them again: exact only while the trace has the span count it was made from, and for the code that
-- made it (key). Anything else is read from the spans.
{_DERIVED_TABLE};
CREATE TABLE IF NOT EXISTS keys(key TEXT NOT NULL, trace_id TEXT NOT NULL,
    PRIMARY KEY(key, trace_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs(
    id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, time_ns INTEGER NOT NULL,
    service TEXT NOT NULL, host TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
    attributes TEXT NOT NULL, source TEXT NOT NULL,
    trace_id TEXT, span_id TEXT, link_method TEXT NOT NULL, link_confidence REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_trace ON logs(trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS logs_service_time ON logs(service, time_ns);
CREATE INDEX IF NOT EXISTS logs_time ON logs(time_ns);
"""

_SPAN_COLUMNS = "trace_no, trace_id, span_id, service, kind, start_ns, end_ns, facts, resource_id, body"
_ROW_SELECT = "SELECT trace_id, span_id, facts FROM spans"
_TRACE_ROWS = "SELECT s.trace_id, s.span_id, s.facts FROM traces t JOIN spans s ON s.trace_no = t.trace_no"
_TRACE_NO = "(SELECT trace_no FROM traces WHERE trace_id = ?)"
_EXACT = "d.trace_no = t.trace_no AND d.span_count = t.span_count AND d.key = ?"  # a derivation still true
_FEW_UNDERIVED = 20_000  # traces without a derivation an analysis reads the spans of apart (see iter_traces)


def _derived_sql(where: str) -> str:
    """The exact derivations of the traces ``where`` keeps, in trace id order: from the trace id index alone."""
    return f"SELECT t.trace_id, d.body FROM traces t JOIN derived d ON {_EXACT}{where} ORDER BY t.trace_id"


def _underived_sql(where: str) -> str:
    """The traces ``where`` keeps (it says ``d.trace_no IS NULL``) with no exact derivation, found front to back
    (a tenth of the time an order by trace id takes to visit every trace): on a settled store none or a few."""
    return f"SELECT t.trace_id, t.trace_no FROM traces t LEFT JOIN derived d ON {_EXACT}{where} ORDER BY t.trace_no"


_ROOT_RANK = 4_000_000_000_000_000_000  # sorts spans with a parent after every root, within int64
_V5_COLUMNS = ("trace_id, span_id, parent_id, service, name, kind, start_ns, end_ns, status_code, status_message, "
               "error_class, operation, peer, method, http_status, attempt, idempotency_key, timeout_connect_ms, "
               "timeout_read_ms, timeout_total_ms, timeout_source, retry_max, amount, keys, caller_budget_ms, fault, "
               "resource_id, body")
_SPAN_SELECT = ("SELECT s.service, s.body, r.body FROM spans s JOIN resources r ON r.id = s.resource_id")
_KEY_SEP = "\x1f"
_TRACE_COLUMNS = ("trace_id, start_ns, end_ns, root_service, root_name, span_count, error_count, "
                  "services, error_class, error_service")
_LOG_COLUMNS = ("id, time_ns, service, host, severity, message, attributes, source, trace_id, "
                "span_id, link_method, link_confidence")

_CHUNK = 500
_T = TypeVar("_T")


def _chunks(items: list[_T]) -> Iterator[list[_T]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def _marks(chunk: list[Any]) -> str:
    return ",".join("?" * len(chunk))


def _window(column: str, since_ns: int | None, until_ns: int | None, where: str = "") -> tuple[str, tuple[int, ...]]:
    """`` WHERE`` ``where`` and ``column`` in [since, until) (either bound may be None), and its parameters."""
    clauses, params = [where] if where else [], []
    if since_ns is not None:
        clauses.append(f"{column} >= ?")
        params.append(since_ns)
    if until_ns is not None:
        clauses.append(f"{column} < ?")
        params.append(until_ns)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _log_rows(logs: Iterable[LogRecord]) -> list[tuple[Any, ...]]:
    """The rows of the logs table for these records."""
    return [(r.identity(), r.time_ns, r.service, r.host, r.severity, r.message,
             _dumps(r.attributes) if r.attributes else "{}", r.source,
             r.trace_id, r.span_id, r.link_method, r.link_confidence) for r in logs]


def _span_from_row(row: tuple[Any, ...]) -> Span:
    return decode_body(row[1], row[0], json.loads(row[2]))


def _facts(r: SpanRow) -> bytes:
    """A span's derived facts after its ids, as one marshal value: one column to write and to read instead of
    24 (reading a million spans 2.6 times faster, writing one about a quarter cheaper). The names a store
    repeats (services, operations, peers) go in interned, and come back out as one shared string each,
    whatever the number of spans."""
    i = _intern
    return _dump((r.parent_id, i(r.service), i(r.name), i(r.kind), r.start_ns, r.end_ns, r.status_code,
                  r.status_message, r.error_class and i(r.error_class), i(r.operation), r.peer and i(r.peer),
                  r.method and i(r.method), r.http_status, r.attempt, r.idempotency_key, r.timeout_connect_ms,
                  r.timeout_read_ms, r.timeout_total_ms, r.timeout_source and i(r.timeout_source), r.retry_max,
                  r.amount, r.keys, r.caller_budget_ms, r.fault and i(r.fault)))


_intern = sys.intern
_dump = marshal.dumps


def _rows(path: Path, found: list[tuple[str, str, bytes]]) -> list[SpanRow]:
    """SpanRows from (trace id, span id, facts). A field added to SpanRow after a store was written takes its
    default, so fields are only ever added, at the end, with a default."""
    load = marshal.loads
    try:
        return [SpanRow(tid, sid, *load(facts)) for tid, sid, facts in found]
    except (ValueError, EOFError, TypeError) as exc:
        raise StoreError(f"{path}: a span's stored facts are damaged ({type(exc).__name__}); import its traces "
                         "again into a new store") from None


def _root_rank(r: SpanRow) -> int:
    """The least is a trace's root: a span without a parent before any other, then the earliest."""
    return (r.parent_id is not None) * _ROOT_RANK + r.start_ns


def _error_rank(r: SpanRow) -> int:
    """The greatest is a trace's error: the one that started last, a client before its server on a tie."""
    return r.start_ns * 2 + (r.kind in ("client", "producer"))


def _upgrade_5(conn: sqlite3.Connection) -> None:
    """Version 5 kept each derived fact in a column of its own, and trace summaries without their ranks."""
    conn.execute("DROP INDEX IF EXISTS spans_id")
    conn.execute("DROP INDEX IF EXISTS spans_service_time")
    conn.execute("ALTER TABLE spans RENAME TO spans_v5")
    for statement in _V6_SPANS:
        conn.execute(statement)
    roots: dict[str, int] = {}
    errors: dict[str, int] = {}
    cursor = conn.execute(f"SELECT {_V5_COLUMNS} FROM spans_v5 ORDER BY rowid")
    while found := cursor.fetchmany(10_000):
        rows = []
        for r in found:
            row = SpanRow(*r[:16], bool(r[16]), *r[17:23],  # type: ignore[call-arg]
                          tuple(r[23].split(_KEY_SEP)) if r[23] else (), r[24], r[25])
            rows.append((row.trace_id, row.span_id, row.service, row.kind, row.start_ns, row.end_ns, _facts(row),
                         r[26], r[27]))
            rank = _root_rank(row)
            roots[row.trace_id] = min(rank, roots.get(row.trace_id, rank))
            if row.error_class is not None:
                rank = _error_rank(row)
                errors[row.trace_id] = max(rank, errors.get(row.trace_id, rank))
        conn.executemany(f"INSERT OR IGNORE INTO spans({_V6_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?)", rows)
    conn.execute("DROP TABLE spans_v5")
    conn.execute("ALTER TABLE traces ADD COLUMN root_rank INTEGER")
    conn.execute("ALTER TABLE traces ADD COLUMN error_rank INTEGER")
    services = dict(conn.execute("SELECT trace_id, services FROM traces").fetchall())
    conn.executemany("UPDATE traces SET root_rank=?, error_rank=?, services=? WHERE trace_id=?",
                     [(rank, errors.get(tid), ",".join(sorted(services.get(tid, "").split(","))), tid)
                      for tid, rank in roots.items()])


# version 6's span table, which the upgrade from 5 writes and the one from 6 reads
_V6_COLUMNS = "trace_id, span_id, service, kind, start_ns, end_ns, facts, resource_id, body"
_V6_SPANS = (
    "CREATE TABLE spans(trace_id TEXT NOT NULL, span_id TEXT NOT NULL, service TEXT NOT NULL, kind TEXT NOT NULL, "
    "start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, facts BLOB NOT NULL, resource_id INTEGER NOT NULL, "
    "body BLOB NOT NULL)",
    "CREATE UNIQUE INDEX spans_id ON spans(trace_id, span_id)",
    "CREATE INDEX spans_service_time ON spans(service, start_ns) WHERE kind IN ('server', 'consumer')",
)


def _upgrade_6(conn: sqlite3.Connection) -> None:
    """Version 6 found a trace's spans, and kept its summary, by its random trace id."""
    for index in ("spans_id", "spans_service_time", "traces_start", "traces_failed"):
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("ALTER TABLE spans RENAME TO spans_v6")
    conn.execute("ALTER TABLE traces RENAME TO traces_v6")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    columns = f"trace_id, {_TRACE_COLUMNS.split(', ', 1)[1]}, root_rank, error_rank"
    conn.execute(f"INSERT INTO traces({columns}) SELECT {columns} FROM traces_v6 ORDER BY start_ns, trace_id")
    conn.execute(f"INSERT INTO spans({_SPAN_COLUMNS}) SELECT t.trace_no, s.trace_id, s.span_id, s.service, s.kind, "
                 "s.start_ns, s.end_ns, s.facts, s.resource_id, s.body FROM spans_v6 s "
                 "JOIN traces t ON t.trace_id = s.trace_id ORDER BY t.trace_no, s.rowid")
    conn.execute("DROP TABLE spans_v6")
    conn.execute("DROP TABLE traces_v6")


# from version N to N + 1: statements, or a function of the connection, run in one transaction
_MIGRATIONS: dict[int, tuple[str, ...] | Callable[[sqlite3.Connection], None]] = {
    4: ("ALTER TABLE spans ADD COLUMN fault TEXT",),
    5: _upgrade_5,
    6: _upgrade_6,
    7: (_DERIVED_TABLE,),
    8: ("DROP INDEX traces_id", _TRACES_ID),  # version 8 indexed the trace id alone
}


def _summary_from_row(row: tuple[Any, ...]) -> TraceSummary:
    return TraceSummary(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                        row[7].split(",") if row[7] else [], row[8], row[9])


def _log_from_row(row: tuple[Any, ...]) -> tuple[int, LogRecord]:
    return row[0], LogRecord(time_ns=row[1], service=row[2], host=row[3], severity=row[4],
                             message=row[5], attributes=json.loads(row[6]), source=row[7],
                             trace_id=row[8], span_id=row[9], link_method=row[10],
                             link_confidence=row[11])


class _Summary:
    """A trace's summary, kept up to date span by span as spans arrive, in any order and any batches.

    The root is the span without a parent, else the earliest (the root may never arrive): the least
    ``root_rank``. The error is the one that started last, a client before its server on a tie (where the
    failure began): the greatest ``error_rank``.
    """

    __slots__ = ("trace_no", "trace_id", "start_ns", "end_ns", "root_service", "root_name", "span_count", "error_count",
                 "services", "error_class", "error_service", "root_rank", "error_rank", "changed")

    def __init__(self, trace_no: int, trace_id: str) -> None:
        self.trace_no = trace_no
        self.trace_id = trace_id
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.root_rank: int | None = None
        self.error_rank: int | None = None
        self.root_service = self.root_name = ""
        self.span_count = self.error_count = 0
        self.services: set[str] = set()
        self.error_class: str | None = None
        self.error_service: str | None = None
        self.changed = False

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> _Summary:
        (trace_no, trace_id, start, end, root_service, root_name, count, errors, services, error_class,
         error_service, root_rank, error_rank) = row
        summary = cls(trace_no, trace_id)
        summary.start_ns, summary.end_ns, summary.root_service, summary.root_name = start, end, root_service, root_name
        summary.span_count, summary.error_count = count, errors
        summary.services = set(services.split(",")) if services else set()
        summary.error_class, summary.error_service = error_class, error_service
        summary.root_rank, summary.error_rank = root_rank, error_rank
        return summary

    def add(self, r: SpanRow) -> None:
        self.changed = True
        if self.start_ns is None or r.start_ns < self.start_ns:
            self.start_ns = r.start_ns
        if self.end_ns is None or r.end_ns > self.end_ns:
            self.end_ns = r.end_ns
        rank = _root_rank(r)
        if self.root_rank is None or rank < self.root_rank:
            self.root_rank, self.root_service, self.root_name = rank, r.service, r.name
        self.span_count += 1
        self.services.add(r.service)
        if r.status_code == 2 or r.error_class is not None:
            self.error_count += 1
        if r.error_class is not None:
            rank = _error_rank(r)
            if self.error_rank is None or rank > self.error_rank:
                self.error_rank, self.error_class, self.error_service = rank, r.error_class, r.service

    def row(self) -> tuple[Any, ...]:
        return (self.trace_no, self.trace_id, self.start_ns, self.end_ns, self.root_service, self.root_name,
                self.span_count, self.error_count, ",".join(sorted(self.services)), self.error_class,
                self.error_service, self.root_rank, self.error_rank)


class EmbeddedStore(Store):
    """A :class:`Store` in one SQLite file (see the module docstring for why)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._readonly = readonly
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._resource_ids: dict[str, int] = {}
        if readonly and not self.path.exists():
            raise StoreError(f"no payscope store at {self.path} (run `payscope collect` or "
                             "`payscope import traces` first, or pass --store)")
        if not readonly and not self.path.exists():
            # payment data: readable by its owner only (SQLite gives the -wal and -shm files the same mode)
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create store {self.path}: {exc.strerror}") from None
        try:
            conn = self._conn()
            version = self._version(conn)
            if not readonly and (version is None or version == (str(SCHEMA_VERSION),)):
                # a new store, or this version's (an earlier one's tables are the upgrade's to change)
                with self._write_lock:
                    conn.executescript(_SCHEMA)
                    if self._version(conn) is None:
                        conn.execute("INSERT INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                    conn.commit()
            version = self._version(conn)
            if version is not None and str(version[0]).isdigit() and int(version[0]) in _MIGRATIONS \
                    and os.access(self.path, os.W_OK):
                self._migrate(int(version[0]))
                version = (str(SCHEMA_VERSION),)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a payscope store ({exc})") from None
        if version is None or not str(version[0]).isdigit() or int(version[0]) != SCHEMA_VERSION:
            found = version[0] if version else "none"
            if str(found).isdigit() and int(found) > SCHEMA_VERSION:
                todo = "a newer payscope wrote it: upgrade payscope to read it"
            elif str(found).isdigit() and int(found) in _MIGRATIONS:
                todo = "an earlier payscope wrote it: give this user write access to it once, and it is upgraded"
            else:
                todo = "import its traces again into a new store (payscope import traces)"
            raise StoreError(f"{self.path} has schema version {found}; this payscope reads "
                             f"version {SCHEMA_VERSION} ({todo})")

    @staticmethod
    def _version(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
        """The stored schema version (a one-value row), or None for a file that has none yet."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
            return None
        found: tuple[Any, ...] | None = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return found

    def _migrate(self, version: int) -> None:
        """Bring a store of an earlier schema up to this one, in one transaction (readers wait for it)."""
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            while version < SCHEMA_VERSION:
                step = _MIGRATIONS[version]
                if callable(step):
                    step(conn)
                else:
                    for statement in step:
                        conn.execute(statement)
                version += 1
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
            try:  # the old tables' pages back to the disk (7 s for a million spans), unless a reader holds them
                conn.execute("VACUUM")
            except sqlite3.OperationalError:
                pass  # free pages are reused by the next writes
        finally:
            conn.close()

    # --- connections ---------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect(self._readonly)
            if not hasattr(self, "_all_conns"):
                self._all_conns: list[sqlite3.Connection] = []
            self._all_conns.append(conn)
        return conn

    def _connect(self, autocommit: bool) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False,
                                   isolation_level=None if autocommit else "DEFERRED")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        conn.execute("PRAGMA busy_timeout=30000")
        if not self._readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    def close(self) -> None:
        for conn in getattr(self, "_all_conns", []):
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._all_conns = []
        self._local = threading.local()

    # --- writing -------------------------------------------------------------
    def _resource_id(self, conn: sqlite3.Connection, resource: dict[str, Any], staged: dict[str, int]) -> int:
        """The row id of a resource; one first stored in this transaction is staged, and cached only once
        the transaction commits (a rollback must leave no id pointing at a row that is not there)."""
        body = _dumps(resource)
        rid = self._resource_ids.get(body) or staged.get(body)
        if rid is None:
            conn.execute("INSERT OR IGNORE INTO resources(body) VALUES(?)", (body,))
            rid = staged[body] = conn.execute("SELECT id FROM resources WHERE body=?", (body,)).fetchone()[0]
        return rid

    def write(self, spans: Iterable[Span | EncodedSpan] = (),
              logs: Iterable[LogRecord] = ()) -> tuple[int, int]:
        if self._readonly:
            raise StoreError("this store was opened read-only")
        encoded = [s if isinstance(s, EncodedSpan) else encode_span(s) for s in spans]
        log_rows = _log_rows(logs)  # made before the store is locked: other writers wait only for the insert
        with self._write_lock:
            conn = self._conn()
            staged: dict[str, int] = {}
            try:
                conn.execute("BEGIN IMMEDIATE")
                new_spans = self._write_spans(conn, encoded, staged) if encoded else 0
                new_logs = self._write_logs(conn, log_rows) if log_rows else 0
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._resource_ids.update(staged)
        return new_spans, new_logs

    def _write_spans(self, conn: sqlite3.Connection, spans: list[EncodedSpan], staged: dict[str, int]) -> int:
        """Insert the spans not stored yet (a write is idempotent) and fold them into their traces' summaries."""
        new: dict[tuple[str, str], EncodedSpan] = {}
        for e in spans:  # the first of two copies in one batch is the one kept, as INSERT OR IGNORE would
            new.setdefault((e.row.trace_id, e.row.span_id), e)
        summaries = self._stored_summaries(conn, list({tid for tid, _ in new}))
        stored = [summary.trace_no for summary in summaries.values()]
        for chunk in _chunks(stored):  # only a trace with a summary can have spans stored already
            for found in conn.execute(f"SELECT trace_id, span_id FROM spans WHERE trace_no IN ({_marks(chunk)})",
                                      chunk):
                new.pop(found, None)
        next_no = None
        resource_cache: dict[int, int] = {}
        rows = []
        keys = []
        for e in new.values():
            rkey = id(e.resource)
            rid = resource_cache.get(rkey)
            if rid is None:
                rid = resource_cache[rkey] = self._resource_id(conn, e.resource, staged)
            r = e.row
            summary = summaries.get(r.trace_id)
            if summary is None:
                if next_no is None:
                    next_no = conn.execute("SELECT coalesce(max(trace_no), 0) + 1 FROM traces").fetchone()[0]
                summary = summaries[r.trace_id] = _Summary(next_no, r.trace_id)
                next_no += 1
            summary.add(r)
            rows.append((summary.trace_no, r.trace_id, r.span_id, r.service, r.kind, r.start_ns, r.end_ns, _facts(r),
                         rid, e.body))
            for key in r.keys:
                keys.append((key, r.trace_id))
        conn.executemany(f"INSERT OR IGNORE INTO spans({_SPAN_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?,?)", rows)
        if keys:
            conn.executemany("INSERT OR IGNORE INTO keys VALUES(?, ?)", keys)
        conn.executemany(f"INSERT OR REPLACE INTO traces(trace_no, {_TRACE_COLUMNS}, root_rank, error_rank) "
                         f"VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)", [s.row() for s in summaries.values() if s.changed])
        return len(rows)

    @staticmethod
    def _stored_summaries(conn: sqlite3.Connection, trace_ids: list[str]) -> dict[str, _Summary]:
        """The stored summaries of those of ``trace_ids`` that have one."""
        out = {}
        for chunk in _chunks(trace_ids):
            for row in conn.execute(f"SELECT trace_no, {_TRACE_COLUMNS}, root_rank, error_rank FROM traces "
                                    f"WHERE trace_id IN ({_marks(chunk)})", chunk):
                out[row[1]] = _Summary.of(row)
        return out

    def _write_logs(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO logs(uid, time_ns, service, host, severity, message, attributes, "
            "source, trace_id, span_id, link_method, link_confidence) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        return conn.total_changes - before

    def update_log_links(self, links: Iterable[tuple[int, str | None, str | None, str, float]]) -> None:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE logs SET trace_id=?, span_id=?, link_method=?, link_confidence=? "
                             "WHERE id=?", [(t, s, m, c, i) for i, t, s, m, c in links])
            conn.execute("COMMIT")

    def update_log_sources(self, sources: Iterable[tuple[int, str]]) -> None:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE logs SET source=? WHERE id=?", [(src, i) for i, src in sources])
            conn.execute("COMMIT")

    def write_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR IGNORE INTO keys VALUES(?, ?)", list(pairs))
            conn.execute("COMMIT")

    def set_meta(self, key: str, value: str) -> None:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))
            conn.execute("COMMIT")

    def address(self) -> str | None:
        return None if self._readonly else self.url

    # --- reading -------------------------------------------------------------
    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn().execute(sql, params).fetchall()

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def trace(self, trace_id: str) -> list[Span]:
        rows = self._read(f"{_SPAN_SELECT} WHERE s.trace_no={_TRACE_NO} ORDER BY s.start_ns, s.span_id",
                          (trace_id.lower(),))
        return [_span_from_row(r) for r in rows]

    def trace_summary(self, trace_id: str) -> TraceSummary | None:
        rows = self._read(f"SELECT {_TRACE_COLUMNS} FROM traces WHERE trace_id=?", (trace_id.lower(),))
        return _summary_from_row(rows[0]) if rows else None

    def trace_summaries(self, trace_ids: list[str]) -> dict[str, TraceSummary]:
        out = {}
        for chunk in _chunks(sorted({t.lower() for t in trace_ids})):
            for row in self._read(f"SELECT {_TRACE_COLUMNS} FROM traces WHERE trace_id IN ({_marks(chunk)})",
                                  tuple(chunk)):
                out[row[0]] = _summary_from_row(row)
        return out

    def _summaries(self, where: str, since_ns: int | None, until_ns: int | None,
                   limit: int | None, offset: int) -> list[TraceSummary]:
        clauses, params = _window("start_ns", since_ns, until_ns, where)
        sql = f"SELECT {_TRACE_COLUMNS} FROM traces{clauses} ORDER BY start_ns DESC LIMIT ? OFFSET ?"
        return [_summary_from_row(r) for r in self._read(sql, (*params, -1 if limit is None else limit, offset))]

    def failed_traces(self, since_ns: int | None = None, until_ns: int | None = None,
                      limit: int | None = 100, offset: int = 0) -> list[TraceSummary]:
        return self._summaries("error_count > 0", since_ns, until_ns, limit, offset)

    def traces(self, since_ns: int | None = None, until_ns: int | None = None,
               limit: int | None = 100, offset: int = 0) -> list[TraceSummary]:
        return self._summaries("", since_ns, until_ns, limit, offset)

    def iter_rows(self, batch_size: int = 10_000, since_ns: int | None = None,
                  until_ns: int | None = None) -> Iterator[list[SpanRow]]:
        where, args = _window("t.start_ns", since_ns, until_ns)
        cursor = self._conn().execute(f"{_TRACE_ROWS}{where} ORDER BY t.trace_id, s.span_id", args)
        while True:
            found = cursor.fetchmany(batch_size)
            if not found:
                return
            yield _rows(self.path, found)

    keeps_derivations = True

    def iter_traces(self, derived_key: str | None = None, since_ns: int | None = None,
                    until_ns: int | None = None, batch_size: int = 10_000) -> Iterator[list[SpanRow] | bytes]:
        if derived_key is None:
            yield from super().iter_traces(None, since_ns, until_ns, batch_size)
            return
        # Both reads in one transaction of a connection of their own, so that no trace is in neither (derived
        # between the two) or in both (a late span between the two).
        conn = self._connect(autocommit=True)
        try:
            conn.execute("BEGIN")
            where, args = _window("t.start_ns", since_ns, until_ns)
            derived = conn.execute(_derived_sql(where), (derived_key, *args))
            where, args = _window("t.start_ns", since_ns, until_ns, "d.trace_no IS NULL")
            underived = conn.execute(_underived_sql(where), (derived_key, *args)).fetchmany(_FEW_UNDERIVED + 1)
            if len(underived) <= _FEW_UNDERIVED:
                underived.sort()
                chunks = (underived[i:i + 500] for i in range(0, len(underived), 500))
                spans: Iterator[Any] = (row for chunk in chunks for row in conn.execute(
                    f"SELECT trace_id, span_id, facts FROM spans WHERE trace_no IN ({_marks(chunk)}) "
                    "ORDER BY trace_id, span_id", [number for _, number in chunk]))
            else:  # a store still deriving: one pass, by trace id, the derivation looked up before the spans
                spans = conn.execute(f"SELECT s.trace_id, s.span_id, s.facts FROM traces t LEFT JOIN derived d ON "
                                     f"{_EXACT} JOIN spans s ON s.trace_no = t.trace_no{where} "
                                     "ORDER BY t.trace_id, s.span_id", (derived_key, *args))

            def span_batches() -> Iterator[list[SpanRow]]:
                while found := list(itertools.islice(spans, batch_size)):
                    yield _rows(self.path, found)

            pending = next(derived, None)
            for trace in group_traces(span_batches()):
                trace_id = trace[0].trace_id
                while pending is not None and pending[0] < trace_id:
                    yield pending[1]
                    pending = next(derived, None)
                yield trace
            while pending is not None:
                yield pending[1]
                pending = next(derived, None)
        finally:
            conn.close()

    def traces_of(self, derived_key: str | None, trace_ids: list[str],
                  batch_size: int = 10_000) -> Iterator[list[SpanRow] | bytes]:
        if derived_key is None:
            yield from super().traces_of(None, trace_ids, batch_size)
            return
        conn = self._connect(autocommit=True)  # as iter_traces: both reads of a chunk in one transaction
        try:
            conn.execute("BEGIN")
            for chunk in _chunks(sorted({t.lower() for t in trace_ids})):
                derived = dict(conn.execute(f"SELECT t.trace_id, d.body FROM traces t JOIN derived d ON {_EXACT} "
                                            f"WHERE t.trace_id IN ({_marks(chunk)})", (derived_key, *chunk)))
                unread = [t for t in chunk if t not in derived]
                spans = {rows[0].trace_id: rows for rows in group_traces([_rows(self.path, conn.execute(
                    f"SELECT s.trace_id, s.span_id, s.facts FROM traces t JOIN spans s ON s.trace_no = t.trace_no "
                    f"WHERE t.trace_id IN ({_marks(unread)}) ORDER BY t.trace_id, s.span_id", unread).fetchall())])
                         } if unread else {}
                for trace_id in chunk:
                    item = derived.get(trace_id) or spans.get(trace_id)
                    if item:
                        yield item
        finally:
            conn.close()

    def underived(self, derived_key: str, after: Cursor, limit: int) -> tuple[list[str], Cursor]:
        """By trace number: the next ``limit`` traces with no exact derivation (the join skips the others)."""
        found = self._read(
            f"SELECT t.trace_no, t.trace_id FROM traces t LEFT JOIN derived d ON {_EXACT} "
            "WHERE t.trace_no > ? AND d.trace_no IS NULL ORDER BY t.trace_no LIMIT ?", (derived_key, after or 0, limit))
        return [tid for _, tid in found], (found[-1][0] if found else None)

    def rows_to_derive(self, trace_ids: list[str]) -> list[tuple[str, int, list[SpanRow]]]:
        out: list[tuple[str, int, list[SpanRow]]] = []
        for chunk in _chunks(sorted({t.lower() for t in trace_ids})):
            # one statement for a trace's count and its spans: one moment
            found = self._read(f"SELECT s.trace_id, s.span_id, s.facts, t.span_count FROM traces t "
                               f"JOIN spans s ON s.trace_no = t.trace_no WHERE t.trace_id IN ({_marks(chunk)}) "
                               "ORDER BY t.trace_id, s.span_id", tuple(chunk))
            counts = {row[0]: row[3] for row in found}
            for trace in group_traces([_rows(self.path, [row[:3] for row in found])]):
                out.append((trace[0].trace_id, counts[trace[0].trace_id], trace))
        return out

    def write_derived(self, derived_key: str, items: list[tuple[str, int, bytes]]) -> None:
        if self._readonly:
            raise StoreError("this store was opened read-only")
        if not items:
            return
        with self._write_lock:
            conn = self._conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT OR REPLACE INTO derived(trace_no, span_count, key, body) "
                                 "SELECT trace_no, ?, ?, ? FROM traces WHERE trace_id = ?",
                                 [(count, derived_key, body, tid) for tid, count, body in items])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def sample_traces(self, since_ns: int, until_ns: int, limit: int | None) -> Sample:
        # left-padded to the digits read, the text orders as the number does
        key = f"substr('{'0' * SAMPLE_DIGITS}' || trace_id, -{SAMPLE_DIGITS})"
        ids = [r[0] for r in self._read(
            f"SELECT trace_id FROM traces WHERE start_ns >= ? AND start_ns < ? ORDER BY {key}, trace_id LIMIT ?",
            (since_ns, until_ns, -1 if limit is None else limit))]
        if limit is None or len(ids) < limit:
            return Sample(ids, len(ids), limit)
        count = self._read("SELECT count(*) FROM traces WHERE start_ns >= ? AND start_ns < ?", (since_ns, until_ns))
        return Sample(ids, count[0][0], limit)

    def rows_of(self, trace_ids: list[str], batch_size: int = 10_000) -> Iterator[list[SpanRow]]:
        batch: list[SpanRow] = []
        for chunk in _chunks(sorted({t.lower() for t in trace_ids})):
            batch += _rows(self.path, self._read(
                f"{_TRACE_ROWS} WHERE t.trace_id IN ({_marks(chunk)}) ORDER BY t.trace_id, s.start_ns",
                tuple(chunk)))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def server_spans_around(self, service: str, time_ns: int, slack_ns: int,
                            longest_ns: int = 120_000_000_000) -> list[SpanRow]:
        return _rows(self.path, self._read(
            f"{_ROW_SELECT} WHERE service=? AND kind IN ('server', 'consumer') "
            "AND start_ns BETWEEN ? AND ? AND end_ns >= ?",
            (service, time_ns - longest_ns, time_ns + slack_ns, time_ns - slack_ns)))

    def trace_rows(self, trace_id: str) -> list[SpanRow]:
        return _rows(self.path, self._read(f"{_ROW_SELECT} WHERE trace_no={_TRACE_NO} ORDER BY start_ns",
                                           (trace_id.lower(),)))

    def traces_by_keys(self, keys: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for chunk in _chunks(keys):
            for key, tid in self._read(f"SELECT key, trace_id FROM keys WHERE key IN ({_marks(chunk)})",
                                       tuple(chunk)):
                out.setdefault(key, []).append(tid)
        return out

    def known_traces(self, trace_ids: list[str]) -> list[str]:
        out: list[str] = []
        for chunk in _chunks(trace_ids):
            out += [r[0] for r in self._read(f"SELECT trace_id FROM traces WHERE trace_id IN ({_marks(chunk)})",
                                             tuple(chunk))]
        return out

    def server_services(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT service FROM spans WHERE kind IN ('server', 'consumer')")]

    def traces_by_key(self, key: str) -> list[str]:
        return [r[0] for r in self._read("SELECT trace_id FROM keys WHERE key=?", (key,))]

    def counts(self) -> dict[str, int]:
        conn = self._conn()
        return {
            "spans": conn.execute("SELECT count(*) FROM spans").fetchone()[0],
            "traces": conn.execute("SELECT count(*) FROM traces").fetchone()[0],
            "logs": conn.execute("SELECT count(*) FROM logs").fetchone()[0],
        }

    def logs_of_trace(self, trace_id: str) -> list[LogRecord]:
        rows = self._read(f"SELECT {_LOG_COLUMNS} FROM logs WHERE trace_id=? ORDER BY time_ns",
                          (trace_id.lower(),))
        return [_log_from_row(r)[1] for r in rows]

    def search_logs(self, query: LogQuery) -> list[tuple[int, LogRecord]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("service", query.service), ("trace_id", query.trace_id),
                              ("severity", query.severity)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value.lower() if column == "trace_id" else value)
        if query.text:
            clauses.append("instr(message, ?) > 0")
            params.append(query.text)
        if query.since_ns is not None:
            clauses.append("time_ns >= ?")
            params.append(query.since_ns)
        if query.until_ns is not None:
            clauses.append("time_ns < ?")
            params.append(query.until_ns)
        if query.unlinked_only:
            clauses.append("trace_id IS NULL")
        if query.source_prefix:
            clauses.append("substr(source, 1, ?) = ?")
            params += [len(query.source_prefix), query.source_prefix]
        if query.attribute:
            clauses.append("json_extract(attributes, ?) IS NOT NULL")
            params.append(f'$."{query.attribute}"')
        sql = f"SELECT {_LOG_COLUMNS} FROM logs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY time_ns LIMIT ?"
        params.append(-1 if not query.limit else query.limit)
        return [_log_from_row(r) for r in self._read(sql, tuple(params))]
