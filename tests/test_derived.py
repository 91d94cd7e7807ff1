"""A trace's calls derived once and stored: an analysis that reads them says exactly what one from the spans says."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from payscope.analyzers import derived
from payscope.analyzers.loader import load
from payscope.analyzers.views import analysis_document
from payscope.collector.importers import ImportReport, read_trace_file
from payscope.collector.store import open_store
from tests.helpers import DATA, REALDATA, SCENARIOS, CollectorProcess, payscope, payscope_json

SOURCES = [*sorted(SCENARIOS.glob("*.otlp.jsonl.gz")), REALDATA / "hotrod_redis-timeout_retries.otlp.json",
           REALDATA / "otel-demo_envoy15s_timeout_masked.otlp.json",
           REALDATA / "zipkin_smartthings-oauth-authorization.zipkinv2.json",
           DATA / "stores" / "keys.otlp.json"]  # every derived fact of a span: a captured timeout, keys, a fault


def _document(path: Path | str) -> str:
    with open_store(str(path), readonly=True) as store:
        return json.dumps(analysis_document(load(store)), sort_keys=True, default=str)


def _kinds(path: Path | str) -> tuple[int, int]:
    """How many traces the analysis is given as a derivation, and how many as spans."""
    with open_store(str(path), readonly=True) as store:
        items = list(store.iter_traces(derived.KEY))
    return sum(isinstance(i, bytes) for i in items), sum(not isinstance(i, bytes) for i in items)


def _settled(path: Path | str, traces: int) -> bool:
    """Whether all ``traces`` of the store are given to the analysis as derivations within 20 s."""
    deadline = time.monotonic() + 20
    while _kinds(path) != (traces, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _kinds(path) == (traces, 0)


def _stored(source: Path, path: Path | str) -> Path | str:
    with open_store(str(path)) as store:
        for batch in read_trace_file(source, ImportReport(str(source))):
            store.write(batch.spans, batch.logs)
    return path


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name.split(".")[0])
def test_an_analysis_of_derived_traces_says_what_one_of_their_spans_says(source: Path, tmp_path: Path) -> None:
    spans_only = _stored(source, tmp_path / "spans.db")
    settled = tmp_path / "settled.db"
    shutil.copy(spans_only, settled)
    with open_store(str(settled)) as store:
        count = derived.settle(store)
    assert count > 0 and _kinds(settled) == (count, 0) and _kinds(spans_only) == (0, count)
    assert _document(settled) == _document(spans_only)


def test_a_late_span_sends_its_trace_back_to_its_spans(tmp_path: Path) -> None:
    """A span that arrives after its trace was derived: that trace is read from its spans again (the
    derivation no longer matches its span count), the others still from their derivations, and the
    analysis is the one of all the spans."""
    source = SCENARIOS / "marketplace.otlp.jsonl.gz"
    batches = list(read_trace_file(source, ImportReport(str(source))))
    spans = [s for b in batches for s in b.spans]
    late = next(s for s in spans if s.row.kind == "client" and s.row.parent_id)
    whole = tmp_path / "whole.db"
    with open_store(str(whole)) as store:
        store.write(spans)
    partial = tmp_path / "partial.db"
    with open_store(str(partial)) as store:
        store.write([s for s in spans if s is not late])
        traces = derived.settle(store)
        store.write([late])
    assert _kinds(partial) == (traces - 1, 1)
    assert _document(partial) == _document(whole)
    with open_store(str(partial)) as store:
        assert derived.settle(store) == 1  # derived again, with the late span
    assert _kinds(partial) == (traces, 0) and _document(partial) == _document(whole)


ES_SOURCES = [SCENARIOS / "marketplace.otlp.jsonl.gz", REALDATA / "otel-demo_envoy15s_timeout_masked.otlp.json",
              DATA / "stores" / "keys.otlp.json"]


@pytest.mark.parametrize("source", ES_SOURCES, ids=lambda p: p.name.split(".")[0])
def test_on_elasticsearch_an_analysis_of_derived_traces_says_what_one_of_their_spans_says(source: Path,
                                                                                        es_url: str) -> None:
    _stored(source, es_url)
    from_spans = _document(es_url)
    with open_store(es_url) as store:
        count = derived.derive(store, [t.trace_id for t in store.traces(limit=None)])
    assert count > 0 and _kinds(es_url) == (count, 0)
    assert _document(es_url) == from_spans


def test_on_elasticsearch_a_late_span_sends_its_trace_back_to_its_spans(es_url: str, elasticsearch_node: Any) -> None:
    source = SCENARIOS / "marketplace.otlp.jsonl.gz"
    spans = [s for b in read_trace_file(source, ImportReport(str(source))) for s in b.spans]
    late = next(s for s in spans if s.row.kind == "client" and s.row.parent_id)
    with open_store(es_url) as store:
        store.write([s for s in spans if s is not late])
        traces = derived.derive(store, [t.trace_id for t in store.traces(limit=None)])
        store.write([late])
    assert _kinds(es_url) == (traces - 1, 1)
    mixed = _document(es_url)
    elasticsearch_node.request("DELETE", "/_data_stream/payscope-derived")
    assert _kinds(es_url) == (0, traces) and _document(es_url) == mixed


def test_a_derivation_made_by_other_code_is_not_read(tmp_path: Path) -> None:
    path = _stored(SCENARIOS / "calm.otlp.jsonl.gz", tmp_path / "s.db")
    with open_store(str(path)) as store:
        derived.settle(store)
    conn = sqlite3.connect(path)
    with conn:  # as another payscope version would have left them: a key of its own, a body this one cannot read
        conn.execute("UPDATE derived SET key = 'other', body = x'00'")
    conn.close()
    with open_store(str(path), readonly=True) as store:
        assert all(not isinstance(i, bytes) for i in store.iter_traces(derived.KEY))
        assert load(store).calls


def test_import_derives_the_traces_it_imported(tmp_path: Path) -> None:
    """`payscope import traces` derives the traces it stored; traces already in the store from elsewhere (a
    collector that has not derived them yet) are left to it."""
    store = _stored(REALDATA / "hotrod_redis-timeout_retries.otlp.json", tmp_path / "s.db")
    before = _kinds(store)
    payscope("import", "traces", str(SCENARIOS / "subscriptions.otlp.jsonl.gz"), "--store", str(store), check=True)
    with open_store(str(store), readonly=True) as opened:
        imported = [i for i in opened.iter_traces(derived.KEY) if isinstance(i, bytes)]
    assert before[0] == 0 and len(imported) > 0 and _kinds(store) == (len(imported), before[1])


def test_the_collector_derives_traces_once_they_settle(tmp_path: Path) -> None:
    """Real SDK exporters into `payscope collect`: a trace is derived only after no span came for it for
    --settle-seconds, and the analysis of the store then reads it derived and says what the spans say."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    store_path = tmp_path / "s.db"
    collector = CollectorProcess(store_path, grpc=False, extra=("--settle-seconds", "1.5"))
    try:
        provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{collector.http_url}/v1/traces")))
        tracer = provider.get_tracer("tests")
        for n in range(5):
            with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER,
                                              attributes={"http.request.method": "POST", "http.route": "/checkout"}):
                with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT, attributes={
                        "http.request.method": "POST", "server.address": "payment",
                        "url.full": f"http://payment/pay/{n}"}):
                    pass
        provider.force_flush()
        assert _kinds(store_path) == (0, 5)  # just written: not settled yet
        assert _settled(store_path, 5)
        provider.shutdown()
    finally:
        collector.stop()
    settled = payscope_json("analyze", "--store", str(store_path))
    with sqlite3.connect(store_path) as conn:
        conn.execute("DELETE FROM derived")
    assert _kinds(store_path) == (0, 5)
    assert payscope_json("analyze", "--store", str(store_path)) == settled


def test_traces_a_decoding_process_stored_are_derived_and_counted_as_the_writers(tmp_path: Path) -> None:
    """A request large enough to be decoded and stored by a decoding process (not by the collector's writer): its
    traces are derived once they settle all the same, and its spans are counted in what the collector stored."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from payscope.collector.decoding import INLINE_BELOW_BYTES

    store_path = tmp_path / "s.db"
    collector = CollectorProcess(store_path, grpc=False, extra=("--settle-seconds", "1.5", "--workers", "2"))
    try:
        exporter = OTLPSpanExporter(endpoint=f"{collector.http_url}/v1/traces")
        provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=4096, max_export_batch_size=4096,
                                                       schedule_delay_millis=60_000))
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("tests")
        time.sleep(1.5)  # the collector's scan for traces stored before it started has found the store empty
        for n in range(120):
            with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER, attributes={
                    "http.request.method": "POST", "http.route": "/checkout", "url.path": "/checkout",
                    "user_agent.original": "python-requests/2.32.3 " + "x" * 40}):
                for step in range(4):
                    with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT, attributes={
                            "http.request.method": "POST", "server.address": "payment",
                            "url.full": f"http://payment/pay/{n}/{step}"}):
                        pass
        provider.force_flush()
        # the one request the exporter sent, as it encodes it: large enough for a decoding process to store
        assert len(encode_spans(memory.get_finished_spans()).SerializeToString()) >= INLINE_BELOW_BYTES
        assert _kinds(store_path) == (0, 120)
        assert _settled(store_path, 120)
        provider.shutdown()
    finally:
        said = collector.stop()
    assert "600 spans and 0 log records stored this run" in said
    assert "120 traces" in said


@pytest.mark.parametrize("backend", ["embedded", "elasticsearch"])
def test_a_collector_derives_the_traces_stored_before_it_started(backend: str, tmp_path: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    """Traces a collector never wrote (stored before it started, by a collector that stopped before they settled):
    its backlog scan finds them once it is idle, on either backend."""
    store = str(tmp_path / "s.db") if backend == "embedded" else request.getfixturevalue("es_url")
    _stored(SCENARIOS / "calm.otlp.jsonl.gz", store)
    before = _kinds(store)
    assert before[0] == 0 and before[1] > 0
    collector = CollectorProcess(store, grpc=False, extra=("--settle-seconds", "1"))
    try:
        deadline = time.monotonic() + 60
        while _kinds(store) != (before[1], 0) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        said = collector.stop()
    assert _kinds(store) == (before[1], 0)
    assert f"{before[1]} traces derived for the analysis" in said  # the stop line counts them


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name.split(".")[0])
def test_the_order_a_store_gives_its_traces_in_changes_nothing(source: Path, tmp_path: Path) -> None:
    """A store gives its traces in the order it reads fastest (the embedded store: as first stored). Half of them
    derived, the same store's traces given by trace id, in reverse and shuffled give one document, byte for byte:
    the analysis puts them in trace id order itself, and an address two services answer equally often is named
    the same whatever came first."""
    import random

    path = _stored(source, tmp_path / "store.db")
    with open_store(str(path)) as store:
        half = sorted(t.trace_id for t in store.traces(limit=None))[::2]
        derived.derive(store, half)
        stored = store.iter_traces
        items = list(stored(derived.KEY))
        assert any(isinstance(i, bytes) for i in items) or len(items) < 2
        documents = set()
        for order in ("by trace id", "reversed", "shuffled"):
            def given(*args: Any, order: str = order, **kwargs: Any) -> Any:
                found = list(stored(*args, **kwargs))
                by_id = sorted(found, key=lambda i: derived.thaw(i)[0].trace_id if isinstance(i, bytes)
                               else i[0].trace_id)
                if order == "reversed":
                    by_id.reverse()
                elif order == "shuffled":
                    random.Random(3).shuffle(by_id)
                return iter(by_id)

            store.iter_traces = given  # type: ignore[method-assign]
            documents.add(json.dumps(analysis_document(load(store)), sort_keys=True, default=str))
        store.iter_traces = stored  # type: ignore[method-assign]
    assert len(documents) == 1


def test_an_address_two_services_answer_equally_often_gets_one_name_in_any_order(tmp_path: Path) -> None:
    """"pay.internal" answered once by pay-b and once by pay-a; a third call to it got no answer. Its callee is
    named after the address's answerers, and with as many votes for each, the first by name, whichever trace is
    read first."""
    from payscope.analyzers.engine import collect_calls
    from tests.test_store_conformance import span

    def trace(n: int, answered_by: str | None) -> list[Any]:
        trace_id, s = f"{n:032x}", 1000 * n
        spans = [span(trace_id, "1000000000000001", None, "front", "server", s, s + 100),
                 span(trace_id, "1000000000000002", "1000000000000001", "front", "client", s + 1, s + 90,
                      **{"server.address": "pay.internal", "http.request.method": "POST"})]
        if answered_by:
            spans.append(span(trace_id, "1000000000000003", "1000000000000002", answered_by, "server", s + 2, s + 80))
        return spans

    with open_store(str(tmp_path / "s.db")) as store:
        store.write(trace(1, "pay-b") + trace(2, "pay-a") + trace(3, None))
        items = list(store.iter_traces(None))
    named = set()
    for order in (items, items[::-1], [items[1], items[0], items[2]]):
        _, calls = collect_calls(order)
        (unanswered,) = [c for c in calls if c.trace_id == f"{3:032x}"]
        named.add(unanswered.callee)
    assert named == {"pay-a"}


@pytest.mark.parametrize("source", SOURCES[:2], ids=lambda p: p.name.split(".")[0])
def test_the_traces_without_a_derivation_are_read_alone_or_in_one_pass_alike(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A settled store's few traces without an exact derivation are found first and their spans read alone; a
    store with many reads every trace's spans in one pass. Both give each trace once, by trace id."""
    from payscope.collector.store import embedded

    path = _stored(source, tmp_path / "store.db")
    with open_store(str(path)) as store:
        ids = sorted(t.trace_id for t in store.traces(limit=None))
        derived.derive(store, ids[::3])

        def read() -> list[object]:
            return [i if isinstance(i, bytes) else [(r.trace_id, r.span_id) for r in i]
                    for i in store.iter_traces(derived.KEY, batch_size=7)]

        apart = read()
        monkeypatch.setattr(embedded, "_FEW_UNDERIVED", 1)  # "many": more than one
        assert read() == apart
    order = [derived.thaw(i)[0].trace_id if isinstance(i, bytes) else i[0][0] for i in apart]
    assert order == ids and sum(isinstance(i, bytes) for i in apart) == len(ids[::3])


def test_calls_read_back_share_their_trace_id_and_entry_span_strings(tmp_path: Path) -> None:
    """Read back from derivations (or from spans), a trace's calls hold its trace id as one string, and a call whose
    entry span is its parent holds one string for both: about 150 bytes a call, a tenth of an analysis' memory."""
    from payscope.analyzers.engine import collect_calls

    path = _stored(SOURCES[0], tmp_path / "store.db")
    with open_store(str(path)) as store:
        spans_only = list(store.iter_traces(derived.KEY))
        derived.settle(store)
        settled = list(store.iter_traces(derived.KEY))
    assert all(isinstance(i, bytes) for i in settled)
    for items in (spans_only, settled):
        facts, calls = collect_calls(items)
        assert calls and all(c.trace_id is facts[c.trace_id].trace_id for c in calls)
        same = [c for c in calls if c.entry_span_id == c.parent_id and c.parent_id is not None]
        assert same and all(c.entry_span_id is c.parent_id for c in same)
