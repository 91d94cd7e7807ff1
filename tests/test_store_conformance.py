"""The rules every storage backend keeps (see collector/store/api.py); run against each backend."""

from __future__ import annotations

import gzip
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from payscope.collector.importers import ImportReport, read_trace_file
from payscope.collector.store import SAMPLE_DIGITS, LogQuery, Sample, Store, open_store
from payscope.collector.store.embedded import SCHEMA_VERSION
from payscope.errors import StoreError
from payscope.model import STATUS_ERROR, STATUS_OK, LogRecord, Span

BACKENDS = ["embedded", "elasticsearch"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    opened: list[Store] = []
    url = str(tmp_path / "conformance.db") if request.param == "embedded" else request.getfixturevalue("es_url")

    def make() -> Store:
        store = open_store(url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


T1 = "a" * 32
T2 = "b" * 32


def span(trace: str, sid: str, parent: str | None, service: str, kind: str, start_ms: int, end_ms: int,
         status: int = STATUS_OK, **attrs: object) -> Span:
    return Span(trace, sid, parent, service, f"{kind} op", kind, start_ms * 1_000_000, end_ms * 1_000_000,
                status, "boom" if status == STATUS_ERROR else "", dict(attrs), [], {"service.name": service})


def sample_trace(trace: str, failed: bool, start_ms: int = 1000) -> list[Span]:
    s = start_ms
    return [
        span(trace, "1000000000000001", None, "gateway", "server", s, s + 100, order_id="o-" + trace[:4]),
        span(trace, "1000000000000002", "1000000000000001", "gateway", "client", s + 1, s + 99,
             STATUS_ERROR if failed else STATUS_OK, **{"server.address": "order"}),
        span(trace, "1000000000000003", "1000000000000002", "order", "server", s + 2, s + 98),
    ]


def test_writes_are_idempotent(backend: Callable[[], Store]) -> None:
    store = backend()
    assert store.write(sample_trace(T1, False)) == (3, 0)
    assert store.write(sample_trace(T1, False)) == (0, 0)
    assert store.counts()["spans"] == 3
    log = LogRecord(time_ns=1, service="order", message="charged", source="order.log:1")
    assert store.write(logs=[log]) == (0, 1)
    assert store.write(logs=[log]) == (0, 0)


def _summary_fields(store: Store, trace: str) -> tuple[object, ...]:
    found = store.trace_summary(trace)
    assert found is not None
    return (found.start_ns, found.end_ns, found.root_service, found.root_name, found.span_count, found.error_count,
            sorted(found.services), found.error_class, found.error_service)


def test_a_summary_is_the_same_however_its_spans_arrive(backend: Callable[[], Store], tmp_path: Path) -> None:
    spans = sample_trace(T1, True) + [
        span(T1, "1000000000000004", "1000000000000003", "order", "client", 1003, 1050, STATUS_ERROR,
             **{"server.address": "payment"}),
        span(T1, "1000000000000005", "1000000000000004", "payment", "server", 1004, 1200)]
    whole = open_store(str(tmp_path / "whole.db"))
    whole.write(spans)
    expected = _summary_fields(whole, T1)
    whole.close()
    assert expected[2:4] == ("gateway", "server op") and expected[4:6] == (5, 2)
    assert expected[1] == 1200 * 1_000_000 and expected[7:] == ("business", "order")
    store = backend()
    # children before their root, a span twice, and the root last: the root may arrive after all
    assert store.write([spans[4], spans[2]]) == (2, 0)
    assert _summary_fields(store, T1)[2:3] == ("order",)  # the earliest so far, until the root comes
    assert store.write([spans[2], spans[3], spans[1]]) == (2, 0)
    assert store.write([spans[0], spans[0], spans[4]]) == (1, 0)
    assert _summary_fields(store, T1) == expected


def test_summaries_asked_together_are_those_asked_one_by_one(backend: Callable[[], Store]) -> None:
    """``trace_summaries`` answers as ``trace_summary`` does for each trace, in any spelling of its id, and
    leaves out the traces it does not know; past a thousand at once too (Elasticsearch asks in pages)."""
    store = backend()
    traces = [f"{n:032x}" for n in range(1, 1_203)]
    store.write([s for n, t in enumerate(traces) for s in sample_trace(t, n % 3 == 0, 1000 + n)])
    unknown = "f" * 32
    got = store.trace_summaries([traces[5].upper(), *traces, unknown, traces[7]])
    assert sorted(got) == sorted(traces)
    for t in (traces[0], traces[5], traces[1_000], traces[-1]):
        one = store.trace_summary(t)
        assert one is not None and got[t] == one
    assert got[traces[3]].error_count == 1 and got[traces[4]].error_count == 0
    assert store.trace_summaries([]) == {} and store.trace_summaries([unknown]) == {}


def test_whole_traces_asked_together_are_those_asked_one_by_one(backend: Callable[[], Store]) -> None:
    """``traces_whole`` gives each stored trace's spans as ``trace`` does (the same order, every field), whatever
    the spelling of its id, and leaves out the traces it does not know."""
    store = backend()
    traces = [f"{n:032x}" for n in range(1, 40)]
    store.write([s for n, t in enumerate(traces) for s in reversed(sample_trace(t, n % 2 == 0, 1000 + n))])
    got = store.traces_whole([traces[3].upper(), *traces[:30], "f" * 32])
    assert sorted(got) == sorted(traces[:30])
    for t in traces[:30]:
        assert got[t] == store.trace(t) and len(got[t]) == 3
    assert store.traces_whole([]) == {} and store.traces_whole(["f" * 32]) == {}


def test_trace_by_id_is_ordered_and_whole(backend: Callable[[], Store]) -> None:
    store = backend()
    spans = sample_trace(T1, True)
    store.write(list(reversed(spans)))
    got = store.trace(T1)
    assert [s.span_id for s in got] == [s.span_id for s in spans]
    assert got[1].attributes == {"server.address": "order"}
    assert got[0].resource == {"service.name": "gateway"}
    assert store.trace("c" * 32) == []


def test_failed_traces_newest_first_and_bounded_by_time(backend: Callable[[], Store]) -> None:
    store = backend()
    store.write(sample_trace(T1, True, 1000) + sample_trace(T2, False, 2000))
    store.write(sample_trace("d" * 32, True, 3000))
    failed = store.failed_traces()
    assert [f.trace_id for f in failed] == ["d" * 32, T1]
    assert failed[0].root_service == "gateway" and failed[0].error_count == 1
    assert [f.trace_id for f in store.failed_traces(since_ns=2_000_000_000)] == ["d" * 32]
    assert [t.trace_id for t in store.traces(limit=1)] == ["d" * 32]


def test_logs_of_trace_and_search(backend: Callable[[], Store]) -> None:
    store = backend()
    store.write(logs=[
        LogRecord(time_ns=3, service="order", message="charge ok", trace_id=T1, link_method="trace_id"),
        LogRecord(time_ns=1, service="order", message="charge start", trace_id=T1, link_method="trace_id"),
        LogRecord(time_ns=2, service="pay", message="pool refreshed"),
    ])
    assert [r.message for r in store.logs_of_trace(T1)] == ["charge start", "charge ok"]
    found = store.search_logs(LogQuery(text="pool"))
    assert [r.message for _, r in found] == ["pool refreshed"]
    assert [r.message for _, r in store.search_logs(LogQuery(unlinked_only=True))] == ["pool refreshed"]
    log_id = found[0][0]
    store.update_log_links([(log_id, T2, None, "time_window", 0.7)])
    assert store.logs_of_trace(T2)[0].link_method == "time_window"


def test_log_sources_filter_and_update(backend: Callable[[], Store]) -> None:
    store = backend()
    store.write(logs=[LogRecord(time_ns=5, service="bank", message="charged", source="otlp"),
                      LogRecord(time_ns=5, service="bank", message="charged", source="bank.log:1")])
    sent = store.search_logs(LogQuery(source_prefix="otlp"))
    assert [r.source for _, r in sent] == ["otlp"]
    store.update_log_sources([(sent[0][0], "otlp + bank.log:1")])
    assert sorted(r.source for _, r in store.search_logs(LogQuery())) == ["bank.log:1", "otlp + bank.log:1"]


def test_distinct_log_records_are_never_merged(backend: Callable[[], Store]) -> None:
    store = backend()
    same = {"time_ns": 7, "service": "pay", "message": "retrying charge", "source": "otlp"}
    new = store.write(logs=[LogRecord(**same, trace_id=T1), LogRecord(**same, trace_id=T2),
                            LogRecord(**same, host="b"), LogRecord(**same, trace_id=T1)])[1]
    assert new == 3  # the fourth is the first again


def test_business_keys_find_traces(backend: Callable[[], Store]) -> None:
    store = backend()
    store.write(sample_trace(T1, False))
    assert store.traces_by_key("o-aaaa") == [T1]
    assert store.traces_by_key("nothing") == []


def test_iter_rows_keeps_traces_contiguous_and_derives(backend: Callable[[], Store]) -> None:
    store = backend()
    store.write(sample_trace(T2, False) + sample_trace(T1, True))
    rows = [r for batch in store.iter_rows(batch_size=2) for r in batch]
    assert [r.trace_id for r in rows] == sorted(r.trace_id for r in rows) and len(rows) == 6
    client = next(r for r in store.trace_rows(T1) if r.kind == "client")
    assert client.peer == "order" and client.error_class == "business"
    assert next(r for r in store.trace_rows(T1) if r.kind == "server" and r.service == "gateway").keys == ("o-aaaa",)


def test_a_window_is_sampled_in_the_store_by_the_random_end_of_trace_ids(backend: Callable[[], Store]) -> None:
    rng = random.Random(7)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(30)]
    ids += [f"{rng.getrandbits(64):016x}" for _ in range(6)]  # Zipkin's 64-bit trace ids
    ids += [f"{1_700_000_000 + i:08x}{rng.getrandbits(96):024x}" for i in range(10)]  # time first, as X-Ray's
    starts = {t: rng.randrange(1000, 2000) for t in ids}
    # traces that started before the window but have spans in it, with the least keys of all: never sampled
    early = [f"{rng.getrandbits(72):018x}{i:014x}" for i in range(4)]
    spans = [s for t in ids for s in sample_trace(t, False, starts[t])]
    spans += [s for t in early for s in sample_trace(t, False, 950)]
    spans += [span(t, "1000000000000009", "1000000000000001", "gateway", "client", 1100, 1150) for t in early]
    spans += sample_trace("f" * 32, False, 2000)  # starts where the window ends: outside it
    store = backend()
    store.write(spans)

    def key(t: str) -> tuple[int, str]:
        return int(t[-SAMPLE_DIGITS:], 16), t

    inside = sorted(ids, key=key)
    assert inside[:12] != sorted(ids)[:12] and inside[:12] != sorted(ids, key=starts.__getitem__)[:12]
    lo, hi = 1000 * 1_000_000, 2000 * 1_000_000
    sample = store.sample_traces(lo, hi, 12)
    assert sample.trace_ids == inside[:12] and not sample.complete
    assert len(ids) <= sample.in_window <= len(ids) + len(early)  # an estimate may count the early ones too
    assert store.sample_traces(lo, hi, 3).trace_ids == inside[:3]
    assert store.sample_traces(lo, hi, 100) == Sample(inside, len(ids), 100)
    assert store.sample_traces(lo, hi, None) == Sample(inside, len(ids), None)
    assert store.sample_traces(0, 1, 5) == Sample([], 0, 5)

    rows = [r for batch in store.rows_of(inside[:5] + [T1], batch_size=4) for r in batch]
    assert [r.trace_id for r in rows] == sorted(r.trace_id for r in rows)
    for t in inside[:5]:
        assert [r.span_id for r in rows if r.trace_id == t] == [r.span_id for r in store.trace_rows(t)]
    assert {r.trace_id for r in rows} == set(inside[:5])


def test_the_rows_of_a_window_are_those_of_the_traces_that_started_in_it(backend: Callable[[], Store]) -> None:
    inside = [f"{i:032x}" for i in range(1, 6)]
    before = "a" * 32  # started before the window, with a span in it: not in the window
    late = "b" * 32    # started in the window, with a span after it: in the window, whole
    after = "c" * 32   # starts where the window ends: outside it
    spans = [s for i, t in enumerate(inside) for s in sample_trace(t, i % 2 == 0, 1000 + 100 * i)]
    spans += sample_trace(before, False, 950) + [span(before, "1000000000000009", "1000000000000001", "gateway",
                                                      "client", 1100, 1150)]
    spans += sample_trace(late, True, 1900) + [span(late, "1000000000000009", "1000000000000001", "gateway",
                                                    "client", 2500, 2600)]
    spans += sample_trace(after, False, 2000)
    store = backend()
    store.write(spans)
    lo, hi = 1000 * 1_000_000, 2000 * 1_000_000

    def read(since: int | None, until: int | None) -> dict[str, list[str]]:
        rows = [r for batch in store.iter_rows(batch_size=3, since_ns=since, until_ns=until) for r in batch]
        runs = [t for i, t in enumerate(r.trace_id for r in rows) if i == 0 or rows[i - 1].trace_id != t]
        assert len(runs) == len(set(runs))  # a trace's spans together
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r.trace_id, []).append(r.span_id)
        return out

    every = read(None, None)
    assert set(every) == {*inside, before, late, after}
    window = read(lo, hi)
    assert set(window) == {*inside, late}
    assert all(sorted(window[t]) == sorted(every[t]) for t in window)  # whole traces
    assert set(read(lo, None)) == {*inside, late, after} and set(read(None, hi)) == {*inside, before, late}
    assert read(0, 1) == {}


def test_a_derivation_is_given_back_only_while_its_trace_has_the_spans_it_was_made_from(
        backend: Callable[[], Store]) -> None:
    store = backend()
    assert store.keeps_derivations
    early = "0" * 31 + "1"  # starts before the window
    store.write(sample_trace(T2, False, 1500) + sample_trace(T1, True, 1200) + sample_trace(early, False, 900))
    found = store.rows_to_derive([T2, T1, "d" * 32])
    assert sorted((t, n) for t, n, _ in found) == [(T1, 3), (T2, 3)]
    assert all([r.trace_id for r in rows] == [t] * 3 for t, _, rows in found)
    for t, _, rows in found:  # the spans given are the spans an analysis reads of that trace
        assert [r.span_id for r in rows] == [r.span_id for r in next(
            i for i in store.iter_traces() if not isinstance(i, bytes) and i[0].trace_id == t)]
    store.write_derived("k", [(T1, 3, b"one"), (T2, 2, b"made from two spans"), (early, 3, b"early")])
    store.write_derived("k", [(T1, 3, b"one")])  # the same derivation twice: kept once

    def read(key: str | None, since: int | None = None, until: int | None = None) -> list[object]:
        return [i if isinstance(i, bytes) else (i[0].trace_id, len(i))
                for i in store.iter_traces(key, since, until, batch_size=2)]


    def read_of(key: str | None, trace_ids: list[str]) -> list[object]:  # chosen traces, as a sample reads them
        return [i if isinstance(i, bytes) else (i[0].trace_id, len(i))
                for i in store.traces_of(key, trace_ids, batch_size=2)]

    assert read("k") == [b"early", b"one", (T2, 3)]  # by trace id; T2's derivation counted other spans
    assert read("other key") == read(None) == [(early, 3), (T1, 3), (T2, 3)]
    assert read("k", 1000 * 1_000_000, 2000 * 1_000_000) == [b"one", (T2, 3)]
    assert read_of("k", [T2, "d" * 32, T1.upper()]) == [b"one", (T2, 3)]  # by trace id; one never stored: none
    assert read_of(None, [T1, early]) == [(early, 3), (T1, 3)] and read_of("k", []) == []
    store.write([span(T1, "1000000000000004", "1000000000000001", "gateway", "client", 1250, 1260)])
    assert read("k") == [b"early", (T1, 4), (T2, 3)]  # a late span: read from the spans again
    assert read_of("k", [T1, T2, early]) == [b"early", (T1, 4), (T2, 3)]
    store.write_derived("k", [(T1, 4, b"with the late span")])
    assert read("k") == [b"early", b"with the late span", (T2, 3)]
    assert read_of("k", [T1]) == [b"with the late span"]

    # the backlog: traces with no exact derivation, found in bounded steps until the scan says it is done
    found, cursor = store.underived("k", None, 1)
    steps = 1
    while cursor is not None:
        page, cursor = store.underived("k", cursor, 1)
        found, steps = found + page, steps + 1
    assert found == [T2] and steps >= 2  # a step looks at no more than it was asked to
    assert sorted(store.underived("other key", None, 10)[0]) == sorted([early, T1, T2])


def test_meta_round_trip(backend: Callable[[], Store]) -> None:
    store = backend()
    store.set_meta("declared_timeouts", "[]")
    assert store.get_meta("declared_timeouts") == "[]"
    assert store.get_meta("missing") is None


# --- embedded-only rules -------------------------------------------------------------

def test_embedded_records_schema_version_and_refuses_another(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    open_store(str(path)).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99.*upgrade payscope"):
        open_store(str(path))


@pytest.mark.parametrize("version", [5, 6, 7, 8])
def test_embedded_upgrades_a_store_written_by_an_earlier_version_to_what_this_version_writes(
        tmp_path: Path, version: int) -> None:
    from payscope.collector.logingest import ingest
    from tests.helpers import DATA

    inputs = DATA / "stores"  # v5.db.gz ... v8.db.gz were written from these by earlier versions (see README)
    old = tmp_path / f"v{version}.db"
    old.write_bytes(gzip.decompress((inputs / f"v{version}.db.gz").read_bytes()))
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(version),)
    conn.close()
    fresh = tmp_path / "fresh.db"
    with open_store(str(fresh)) as store:
        for name in ("checkout-part.otlp.jsonl.gz", "keys.otlp.json"):
            for batch in read_trace_file(inputs / name, ImportReport(name)):
                store.write(batch.spans, batch.logs)
    with open_store(str(fresh)) as store:
        from payscope.analyzers.correlate import Linker

        ingest(store, [str(inputs / "payment.log")], linker=Linker(store))

    def everything(path: Path) -> tuple[object, ...]:
        with open_store(str(path), readonly=True) as store:
            rows = sorted((r for batch in store.iter_rows() for r in batch), key=lambda r: (r.trace_id, r.span_id))
            summaries = sorted(((t.trace_id, t.start_ns, t.end_ns, t.root_service, t.root_name, t.span_count,
                                 t.error_count, t.services, t.error_class, t.error_service)
                                for t in store.traces(limit=None)), key=str)
            logs = sorted((r.time_ns, r.message, r.trace_id, r.link_method) for _, r in
                          store.search_logs(LogQuery(limit=None)))
            spans = [(s.name, s.attributes) for s in store.trace("7a" * 16)]
            return store.counts(), rows, summaries, logs, spans, store.traces_by_key("ord-9001")

    upgraded = everything(old)  # read-only, by a user who may write the file: upgraded in place, once
    assert upgraded == everything(fresh)
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    schema = "SELECT name, sql FROM sqlite_master"  # no table of old left, every index as this version makes it
    assert set(conn.execute(schema)) == set(sqlite3.connect(fresh).execute(schema))
    conn.close()
    late = span("7a" * 16, "1000000000000009", "1000000000000003", "payment", "client", 1767000100030,
                1767000100031, STATUS_ERROR, **{"server.address": "ledger"})
    for path in (old, fresh):  # a span arriving after the upgrade is folded in by the ranks the upgrade kept
        with open_store(str(path)) as store:
            assert store.write([late]) == (1, 0)
    assert everything(old)[2] == everything(fresh)[2]
    with open_store(str(old), readonly=True) as store:
        summary = store.trace_summary("7a" * 16)
        assert summary is not None and (summary.error_service, summary.root_service) == ("payment", "order")
    counts, rows, _, logs, _, keyed = upgraded
    assert counts["spans"] == 1303 and len(logs) == 2 and keyed == ["7a" * 16]
    rich = {r.span_id: r for r in rows if r.trace_id == "7a" * 16}
    assert rich["1000000000000002"].timeout_read_ms == 800.0 and rich["1000000000000002"].idempotency_key is True
    assert rich["1000000000000003"].fault == "delay" and "rid:req-77" in rich["1000000000000001"].keys
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    conn.execute("UPDATE meta SET value='3' WHERE key='schema_version'")  # older than any upgrade kept
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 3.*import its traces again"):
        open_store(str(old), readonly=True)


def test_embedded_pairs_traces_with_their_derivations_from_the_index_alone(tmp_path: Path) -> None:
    """The analysis reads the derivations in trace id order from the trace id index alone (schema 9: it holds the
    number and span count the pairing needs), and finds the traces without one front to back."""
    from payscope.collector.store import embedded

    path = tmp_path / "s.db"
    open_store(str(path)).close()
    conn = sqlite3.connect(path)

    def plan(sql: str) -> str:
        return " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))

    paired = plan(embedded._derived_sql("").replace("?", "'k'"))
    assert "SCAN t USING COVERING INDEX traces_id" in paired and "TEMP B-TREE" not in paired, paired
    missing = plan(embedded._underived_sql(" WHERE d.trace_no IS NULL").replace("?", "'k'"))
    assert "SCAN t" in missing and "INDEX traces_id" not in missing and "TEMP B-TREE" not in missing, missing
    conn.close()


def test_embedded_refuses_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a database\n" * 100)
    with pytest.raises(StoreError, match="not a payscope store"):
        open_store(str(path))
    with pytest.raises(StoreError, match="no payscope store"):
        open_store(str(tmp_path / "missing.db"), readonly=True)


@pytest.mark.parametrize("sql, index", [
    ("SELECT * FROM traces WHERE error_count > 0 AND start_ns >= 5 ORDER BY start_ns DESC",
     "traces_failed"),
    ("SELECT * FROM spans WHERE trace_no = (SELECT trace_no FROM traces WHERE trace_id = 'x')", "spans_trace"),
    ("SELECT * FROM traces WHERE trace_id = 'x'", "traces_id"),
    ("SELECT * FROM logs WHERE trace_id = 'x' ORDER BY time_ns", "logs_trace"),
])
def test_embedded_answers_the_hot_questions_from_indexes(tmp_path: Path, sql: str, index: str) -> None:
    path = tmp_path / "s.db"
    open_store(str(path)).close()
    conn = sqlite3.connect(path)
    plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
    conn.close()
    assert index in plan and "SCAN spans" not in plan and "SCAN logs" not in plan, plan
