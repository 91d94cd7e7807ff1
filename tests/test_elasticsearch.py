"""The Elasticsearch backend against a real Elasticsearch 8.12.2 (tests/elastic.py): the same answers as the
embedded store, real SDK exporters through two collectors, another pipeline's documents, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from payscope.collector.decoding import INLINE_BELOW_BYTES
from payscope.collector.store import open_store
from payscope.timeparse import format_ns
from tests.helpers import CollectorProcess, free_port, payscope, payscope_json

DATA = Path(__file__).parent / "data"
SCENARIO = DATA / "scenarios" / "marketplace.otlp.jsonl.gz"
OTEL_DEMO = DATA / "realdata" / "otel-demo_envoy15s_timeout_masked.otlp.json"


def _json(*args: str) -> Any:
    return payscope_json(*args)


@pytest.fixture(scope="module")
def both_stores(tmp_path_factory: pytest.TempPathFactory, elasticsearch_node: Any) -> tuple[str, str]:
    """The same scenario imported into an embedded store and into Elasticsearch."""
    from tests import elastic

    elastic.wipe(elasticsearch_node)
    embedded = str(tmp_path_factory.mktemp("emb") / "s.db")
    es = elasticsearch_node.url.replace("http://", "es://")
    for store in (embedded, es):
        done = payscope("import", "traces", str(SCENARIO), "--store", store)
        assert done.returncode == 0, done.stderr
    return embedded, es


@pytest.mark.parametrize("command", [
    ("analyze",),
    ("failures", "--limit", "0"),
    ("failures", "--limit", "7", "--outcome", "timeout"),
    ("recommend", "timeouts"),
    ("compare", "--incident"),
    ("compare", "--sample", "20", "--incident"),  # both stores choose the same sample
    ("analyze", "--sample", "300"),  # ... and here
    ("recommend", "timeouts", "--sample", "300"),
    ("analyze", "--since"),  # both stores choose the traces that started in the second half
    ("recommend", "timeouts", "--since"),
])
def test_every_command_answers_as_on_the_embedded_store(both_stores: tuple[str, str], command: tuple[str, ...]) -> None:
    embedded, es = both_stores
    if command[-1] == "--incident":  # the second half of the data against the first
        with open_store(embedded, readonly=True) as store:
            starts = [t.start_ns for t in store.traces(limit=None)]
        middle, last = (min(starts) + max(starts)) // 2 // 10**9, max(starts) // 10**9 + 1
        command = (*command, f"{middle}..{last}")
    if command[-1] == "--since":
        with open_store(embedded, readonly=True) as store:
            starts = sorted(t.start_ns for t in store.traces(limit=None))
        command = (*command, format_ns(starts[len(starts) // 2]))
    assert _json(*command, "--store", es) == _json(*command, "--store", embedded)


def test_show_a_failed_transaction_as_on_the_embedded_store(both_stores: tuple[str, str]) -> None:
    embedded, es = both_stores
    failed = _json("failures", "--limit", "3", "--store", embedded)["failures"]
    assert failed
    for f in failed:
        assert _json("show", f["trace_id"], "--store", es) == \
            _json("show", f["trace_id"], "--store", embedded)


def test_a_reader_gets_its_answers_compressed(both_stores: tuple[str, str]) -> None:
    """Read-only commands ask Elasticsearch for gzip: the same answer in a fraction of the bytes (counted by a
    relay in front of the node)."""
    from payscope.demo.netdelay import DelayingRelay

    _, es = both_stores
    sent = {}
    for setting in ("", "?compress=off"):
        port = free_port()
        with DelayingRelay(port, int(es.rsplit(":", 1)[1]), lambda: 0.0) as relay:
            answer = _json("failures", "--limit", "0", "--store", f"es://127.0.0.1:{port}{setting}")
            sent[setting] = (relay.answered_bytes, answer)
    assert sent[""][1] == sent["?compress=off"][1] and sent[""][1]["failures"]
    assert sent[""][0] < 0.5 * sent["?compress=off"][0]


@pytest.mark.anyio
async def test_the_tui_lists_and_opens_the_same_failures(both_stores: tuple[str, str]) -> None:
    from payscope.tui.app import TransactionScreen, build

    rows: dict[str, list[Any]] = {}
    for store in both_stores:
        app = build(store, refresh_seconds=3600)
        async with app.run_test(size=(160, 45)) as pilot:
            for _ in range(100):
                await pilot.pause(0.1)
                if app.screen.query_one("#failures").row_count:
                    break
            table = app.screen.query_one("#failures")
            rows[store] = [table.get_row_at(i) for i in range(table.row_count)]
            await pilot.press("enter")
            for _ in range(100):
                await pilot.pause(0.1)
                if isinstance(app.screen, TransactionScreen) and app.screen.query("#findings"):
                    break
            assert isinstance(app.screen, TransactionScreen)
    embedded, es = both_stores
    assert rows[es] and [str(r) for r in rows[es]] == [str(r) for r in rows[embedded]]


def _derived(url: str) -> tuple[int, int]:
    """How many traces the analysis is given as a derivation, and how many as spans."""
    from payscope.analyzers.derived import KEY

    with open_store(url, readonly=True) as store:
        items = list(store.iter_traces(KEY))
    return sum(isinstance(i, bytes) for i in items), sum(not isinstance(i, bytes) for i in items)


def test_two_collectors_with_sdk_exporters_store_each_span_once(es_url: str, elasticsearch_node: Any) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode

    # each collector derives the traces it wrote to once they settle: after 3 s, longer than a refresh, so that
    # the later of the two sees the other's spans
    collectors = [CollectorProcess(es_url, grpc=False, extra=("--settle-seconds", "3")) for _ in range(2)]
    try:
        assert all("es://" in c.banner for c in collectors)
        providers = []
        for service, collector in (("checkout", collectors[0]), ("payment", collectors[1])):
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{collector.http_url}/v1/traces"),
                                                           max_export_batch_size=64))
            providers.append(provider)
        checkout, payment = (p.get_tracer("tests") for p in providers)
        trace_ids = []
        for i in range(120):
            entry = {"http.route": "/checkout", "app.order.id": f"ord-{i}"}
            with checkout.start_as_current_span("POST /checkout", kind=SpanKind.SERVER, attributes=entry) as root:
                with checkout.start_as_current_span("POST", kind=SpanKind.CLIENT,
                                                    attributes={"server.address": "payment"}) as client:
                    with payment.start_as_current_span("POST /pay", kind=SpanKind.SERVER,
                                                       attributes={"http.route": "/pay"}) as server:
                        if i % 10 == 0:
                            server.set_status(Status(StatusCode.ERROR, "card declined"))
                    if i % 10 == 0:
                        client.set_status(Status(StatusCode.ERROR, "card declined"))
            trace_ids.append(format(root.get_span_context().trace_id, "032x"))
        for provider in providers:
            provider.shutdown()  # flushes: every export was acknowledged by its collector
        deadline = time.monotonic() + 30
        while _derived(es_url) != (120, 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _derived(es_url) == (120, 0)
    finally:
        for collector in collectors:
            collector.stop()
    settled = _json("analyze", "--store", es_url)
    elasticsearch_node.request("DELETE", "/_data_stream/payscope-derived")
    assert _derived(es_url) == (0, 120) and _json("analyze", "--store", es_url) == settled
    with open_store(es_url, readonly=True) as store:
        assert store.counts()["spans"] == 360
        assert store.counts()["traces"] == 120
        whole = store.trace(trace_ids[0])
        assert [(s.service, s.kind) for s in whole] == [("checkout", "server"), ("checkout", "client"),
                                                        ("payment", "server")]
        failed = store.failed_traces(limit=None)
        assert sorted(f.trace_id for f in failed) == sorted(trace_ids[::10])
        assert store.traces_by_key("ord-7") == [trace_ids[7]]
    # the same batch again (a retry after a lost acknowledgement) stores nothing twice
    with open_store(es_url) as store:
        assert store.write(whole) == (0, 0)


def _otel_mode_doc(span: Any) -> dict[str, Any]:
    """A span as the OpenTelemetry Collector's Elasticsearch exporter writes it in `otel` mapping mode."""
    from payscope.collector.store.elastic import iso_ns

    doc = {"@timestamp": iso_ns(span.start_ns), "trace_id": span.trace_id, "span_id": span.span_id,
           "name": span.name, "kind": span.kind.capitalize(), "duration": span.end_ns - span.start_ns,
           "status": {"code": {0: "Unset", 1: "Ok", 2: "Error"}[span.status_code]},
           "attributes": span.attributes, "resource": {"attributes": span.resource},
           "scope": {"name": "io.opentelemetry.demo"},
           "data_stream": {"type": "traces", "dataset": "generic.otel", "namespace": "default"}}
    if span.parent_id:
        doc["parent_span_id"] = span.parent_id
    if span.status_message:
        doc["status"]["message"] = span.status_message
    return doc


# The mapping Elasticsearch 8.16+ gives the exporter's data streams (traces-otel@mappings), with its
# `passthrough` attribute objects written as the `subobjects: false` objects that 8.12 has.
_OTEL_TEMPLATE = {
    "index_patterns": ["traces-generic.otel-*"], "data_stream": {}, "priority": 300,
    "template": {"mappings": {
        "dynamic_templates": [{"strings": {"match_mapping_type": "string",
                                           "mapping": {"type": "keyword", "ignore_above": 1024}}}],
        "properties": {
            "@timestamp": {"type": "date_nanos"}, "trace_id": {"type": "keyword"}, "span_id": {"type": "keyword"},
            "parent_span_id": {"type": "keyword"}, "name": {"type": "keyword"}, "kind": {"type": "keyword"},
            "duration": {"type": "long"}, "attributes": {"type": "object", "subobjects": False},
            "resource": {"properties": {"attributes": {"type": "object", "subobjects": False}}}}}},
}
# What Filebeat's index template maps the ECS fields a log line carries to.
_ECS_MAPPING = {"properties": {
    "@timestamp": {"type": "date"}, "message": {"type": "match_only_text"}, "trace.id": {"type": "keyword"},
    "span.id": {"type": "keyword"}, "service.name": {"type": "keyword"}, "log.level": {"type": "keyword"},
    "host.name": {"type": "keyword"}}}


def test_another_pipelines_otel_traces_and_ecs_logs_are_read_and_analysed(es_url: str, tmp_path: Path,
                                                                         elasticsearch_node: Any) -> None:
    from elasticsearch import Elasticsearch
    from elasticsearch.helpers import bulk

    embedded = str(tmp_path / "expected.db")
    assert payscope("import", "traces", str(OTEL_DEMO), "--store", embedded).returncode == 0
    with open_store(embedded, readonly=True) as store:
        spans = [s for t in store.traces(limit=None) for s in store.trace(t.trace_id)]
        failed = store.failed_traces(limit=None)
    client = Elasticsearch(elasticsearch_node.url)
    client.indices.put_index_template(name="otel-like", **_OTEL_TEMPLATE)
    bulk(client, ({"_op_type": "create", "_index": "traces-generic.otel-default", "_source": _otel_mode_doc(s)}
                  for s in spans), refresh="wait_for")
    client.indices.create(index="filebeat-8.12.2", mappings=_ECS_MAPPING)
    lines = [{"@timestamp": f.start_ns // 1_000_000, "message": f"upstream request timeout for {f.trace_id[:8]}",
              "trace": {"id": f.trace_id}, "service": {"name": f.root_service}, "log": {"level": "ERROR"}}
             for f in failed]
    bulk(client, ({"_index": "filebeat-8.12.2", "_source": line} for line in lines), refresh="wait_for")
    client.close()

    foreign = ("--store", es_url, "--traces-index", "traces-generic.otel-default", "--logs-index", "filebeat-*")
    assert _json("analyze", *foreign) == _json("analyze", "--store", embedded)
    listed = _json("failures", "--limit", "0", *foreign)["failures"]
    assert [f["trace_id"] for f in listed] == \
        [f["trace_id"] for f in _json("failures", "--limit", "0", "--store", embedded)["failures"]]
    shown = payscope("show", failed[0].trace_id, *foreign, check=True).stdout
    assert f"upstream request timeout for {failed[0].trace_id[:8]}" in shown
    refused = payscope("import", "traces", str(SCENARIO), "--store", es_url + "?traces=traces-generic.otel-default")
    assert refused.returncode == 2 and "own data streams" in refused.stderr


@pytest.mark.parametrize("store, said", [
    ("es://", "no host"),
    ("es://127.0.0.1:{free}", "connection refused"),  # a port nothing listens on, taken when the test runs
    ("es://no-such-host.invalid:9200", "cannot reach Elasticsearch"),
    ("es://127.0.0.1:9200?compress=maybe", "compress must be on or off"),
])
def test_a_store_that_cannot_be_used_is_one_line_and_exit_2(store: str, said: str) -> None:
    done = payscope("failures", "--store", store.replace("{free}", str(free_port())))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_credentials_in_the_url_are_never_shown(elasticsearch_node: Any) -> None:
    port = free_port()
    done = payscope("failures", "--store", f"https://admin:hunter2-secret@127.0.0.1:{port}")
    assert done.returncode == 2 and "hunter2" not in done.stderr + done.stdout, done.stderr


def test_an_index_with_an_incompatible_mapping_is_named(elasticsearch_node: Any, es_url: str) -> None:
    from elasticsearch import Elasticsearch

    client = Elasticsearch(elasticsearch_node.url)
    client.indices.put_index_template(name="someone-elses", index_patterns=["traces-payscope.otel-*"],
                                      data_stream={}, priority=900,
                                      template={"mappings": {"properties": {"trace_id": {"type": "long"}}}})
    try:
        done = payscope("import", "traces", str(SCENARIO), "--store", es_url)
        assert done.returncode == 2 and "maps trace_id as long" in done.stderr, done.stderr
    finally:
        client.indices.delete_index_template(name="someone-elses")
        client.close()


def test_a_red_index_is_refused_only_when_it_is_one_payscope_reads(elasticsearch_node: Any, es_url: str) -> None:
    """A primary that can never be assigned (required on a node that does not exist) makes the cluster red. A
    stranger's red index does not stop payscope; a red index it is told to read is one line and exit 2."""
    from elasticsearch import Elasticsearch

    client = Elasticsearch(elasticsearch_node.url)
    client.indices.create(index="someone-elses-red", wait_for_active_shards="0", settings={
        "number_of_replicas": 0, "index.routing.allocation.require._name": "no-such-node"})
    try:
        assert client.options(ignore_status=408).cluster.health(timeout="1s")["status"] == "red"
        assert payscope("import", "traces", str(SCENARIO), "--store", es_url).returncode == 0
        done = payscope("failures", "--store", es_url, "--traces-index", "someone-elses-red")
        assert done.returncode == 2, done.stderr
        assert "is red for payscope's indices" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) <= 2
    finally:
        client.indices.delete(index="someone-elses-red")
        client.close()


def test_the_collector_refuses_an_unreachable_elasticsearch_at_start() -> None:
    done = subprocess.run([sys.executable, "-m", "payscope", "collect", "--store", f"es://127.0.0.1:{free_port()}",
                           "--http", f"127.0.0.1:{free_port()}", "--grpc", "off"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "connection refused" in done.stderr and "Traceback" not in done.stderr
    assert json.dumps(done.stderr).count("\\n") <= 2


def _request(trace: int, spans: int = 5) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attr = resource_spans.resource.attributes.add()
    attr.key, attr.value.string_value = "service.name", "checkout"
    scope = resource_spans.scope_spans.add()
    start = 1_764_590_000_000_000_000 + trace * 1_000_000
    for i in range(spans):
        span = scope.spans.add(trace_id=trace.to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"),
                               name="POST /checkout", kind=2 if i == 0 else 3,
                               start_time_unix_nano=start + i, end_time_unix_nano=start + 1_000_000 - i)
        if i:
            span.parent_span_id = (1).to_bytes(8, "big")
    return request.SerializeToString()


def test_a_decoding_process_writes_to_elasticsearch_itself_and_hands_back_what_it_cannot(es_url: str) -> None:
    """A collector's decoding process opens the store again at its address and bulk-writes what it decoded
    (each process a bulk request at once), sending back only which traces; when Elasticsearch cannot take
    the write, the request comes back whole for the collector's writer, whose spool keeps it."""
    from payscope.collector.decoding import decode_and_store, opened_here

    with open_store(es_url) as collector_store:
        address = collector_store.address()
        assert address == es_url
        body = _request(7, 1_000)
        assert len(body) >= INLINE_BELOW_BYTES
        stored = decode_and_store("traces", body, "application/x-protobuf", 10_000, address)
        assert stored.spans == [] and stored.stored is not None and stored.stored.spans == 1_000
        assert stored.stored.trace_ids == [f"{7:032x}"]
        # told (as the collector's writer is told of each request a decoding process stored), the collector's own
        # handle reads what the decoding process wrote at once, as it reads its own writes
        collector_store.written_elsewhere()
        assert len(collector_store.trace(f"{7:032x}")) == 1_000
        assert opened_here(address).counts()["spans"] == 1_000

        unreachable = f"es://127.0.0.1:{free_port()}"
        handed_back = decode_and_store("traces", _request(8, 1_000), "application/x-protobuf", 10_000, unreachable)
        assert handed_back.stored is None and len(handed_back.spans) == 1_000
    with open_store(es_url, readonly=True) as reader:
        assert reader.address() is None
    with open_store(es_url + "?traces=traces-generic.otel-default", readonly=False) as foreign:
        assert foreign.address() is None  # another pipeline's indices are never written


def test_log_lines_linked_and_stored_by_worker_processes_on_elasticsearch_are_linked_as_here(
        es_url: str, elasticsearch_node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ingest logs` on Elasticsearch: workers open the store at its address, link their chunks by ids and store
    them; the main process reads what they stored (the templates their lines taught, the report) as its own, so
    the links are those of one process reading the file whole."""
    from payscope.analyzers import correlate
    from payscope.collector import logingest
    from tests import elastic
    from tests.test_logs import _busy_service, _linked_by

    monkeypatch.setattr(correlate.Linker, "_learn_stored", lambda self, service, times: None)
    results = {}
    for workers in (0, 2):
        elastic.wipe(elasticsearch_node)
        text, _ = _busy_service(es_url, seconds=10.0, seed=7)
        log = tmp_path / f"payment-{workers}.log"
        log.write_text(text)
        monkeypatch.setattr(logingest, "CHUNK_LINES", 61 if workers else 10**9)
        results[workers] = _linked_by(es_url, log, workers)
    assert results[2] == results[0]
    linked, stored, records = results[2]
    assert stored == len(records) > 300
    assert linked["trace_id"] > 50 and linked["time_window"] > 20


@pytest.mark.parametrize("spans", [5, 1_000], ids=["small requests, the writer", "large, decoding processes"])
def test_elasticsearch_stopped_under_load_loses_nothing_acknowledged(es_url: str, elasticsearch_node: Any,
                                                                     tmp_path: Path, spans: int) -> None:
    """Elasticsearch is stopped while a client sends, and started again: the collector acknowledges from its
    disk spool meanwhile, and every acknowledged span is stored once. Small requests are decoded and written
    in the collector's process; a large one (64 KiB or more) is decoded and written by a decoding process,
    which hands it back to the writer, and so to the spool, while Elasticsearch cannot take it."""
    import itertools
    import threading
    import time
    import urllib.error
    import urllib.request

    from tests import elastic

    spool = tmp_path / "spool"
    collector = CollectorProcess(es_url, grpc=False, extra=("--spool", str(spool)))
    acknowledged: list[int] = []
    attempts = itertools.count(1)
    refused = 0

    def send(count: int) -> None:
        nonlocal refused
        for _ in range(count):
            trace = next(attempts)
            body = _request(trace, spans)
            assert (len(body) >= INLINE_BELOW_BYTES) == (spans > 5)
            req = urllib.request.Request(f"{collector.http_url}/v1/traces", data=body, method="POST",
                                         headers={"Content-Type": "application/x-protobuf"})
            try:
                with urllib.request.urlopen(req, timeout=30) as response:
                    assert response.status == 200
                acknowledged.append(trace)
            except urllib.error.HTTPError:
                refused += 1  # not acknowledged: the client would retry it; it need not be stored
            time.sleep(0.01)

    outage = threading.Event()

    def send_during_outage() -> None:
        while not outage.is_set() and len(acknowledged) < (5_000 if spans == 5 else 60):  # bounded
            send(1)

    try:
        send(60 if spans == 5 else 20)
        elasticsearch_node.stop()
        sender = threading.Thread(target=send_during_outage, daemon=True)
        sender.start()
        time.sleep(3)
        spooled = len(list(spool.glob("*.batch*")))
        elastic.restart(elasticsearch_node)
        outage.set()
        sender.join(timeout=60)
        send(60 if spans == 5 else 20)
        deadline = time.monotonic() + 90
        while list(spool.glob("*.batch*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not list(spool.glob("*.batch*")), "the spool was not replayed"
    finally:
        collector.stop()
    assert spooled > 0, "nothing was spooled while Elasticsearch was down"
    with open_store(es_url, readonly=True) as store:
        counts = store.counts()
        assert counts["spans"] == spans * len(acknowledged), (counts, len(acknowledged), refused)
        assert sorted(store.known_traces([f"{t:032x}" for t in acknowledged])) == \
            sorted(f"{t:032x}" for t in acknowledged)


def test_security_on_tls_and_an_api_key_as_in_a_real_cluster(tmp_path: Path) -> None:
    """A second node with security on and TLS on HTTP: payscope logs in with an API key and trusts the CA file;
    a bad key, a wrong password and an untrusted certificate each get one line, exit 2, and no secret."""
    from tests import elastic

    password = "pw-" + "x7Q2" * 4
    with elastic.running(name="payscope-secure", secure=True, users={"admin": password}) as node:
        created = node.request("POST", "/_security/api_key", {"name": "payscope-test"})
        assert isinstance(created, dict)
        key = created["encoded"]
        store = node.url  # https://127.0.0.1:PORT
        good = {"PAYSCOPE_ES_API_KEY": key, "PAYSCOPE_ES_CA_FILE": str(node.ca)}
        done = payscope("import", "traces", str(SCENARIO), "--store", store, env=good)
        assert done.returncode == 0, done.stderr
        listed = json.loads(payscope("failures", "--store", store, "--format", "json", "--limit", "5",
                                     env=good, check=True).stdout)["failures"]
        assert len(listed) == 5
        for env, said in (
            ({**good, "PAYSCOPE_ES_API_KEY": "bm90LWEta2V5Om5vcGU="}, "refused the credentials"),
            ({"PAYSCOPE_ES_USERNAME": "admin", "PAYSCOPE_ES_PASSWORD": "wrong-" + password,
              "PAYSCOPE_ES_CA_FILE": str(node.ca)}, "refused the credentials"),
            ({"PAYSCOPE_ES_API_KEY": key}, "not trusted"),
        ):
            done = payscope("failures", "--store", store, env=env)
            shown = done.stdout + done.stderr
            assert done.returncode == 2 and said in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) <= 2 and "Traceback" not in shown
            assert key not in shown and password not in shown and "bm90LWEta2V5" not in shown
        basic = {"PAYSCOPE_ES_USERNAME": "admin", "PAYSCOPE_ES_PASSWORD": password, "PAYSCOPE_ES_CA_FILE": str(node.ca)}
        assert payscope("failures", "--store", store, "--limit", "1", env=basic).returncode == 0


def test_a_three_node_cluster_loses_a_node_under_load_and_goes_on(tmp_path: Path) -> None:
    """Three nodes, one replica: one node is killed (SIGKILL) while a collector writes; every acknowledged span
    is stored once, and the analysis runs on what is left."""
    import itertools
    import threading
    import time
    import urllib.error
    import urllib.request

    from tests import elastic

    with elastic.cluster(3) as nodes:
        url = "es://" + ",".join(n.url.removeprefix("http://") for n in nodes)
        collector = CollectorProcess(url, grpc=False, extra=("--spool", str(tmp_path / "spool")))
        acknowledged: list[int] = []
        attempts = itertools.count(1)
        done = threading.Event()

        def send() -> None:
            while not done.is_set() and len(acknowledged) < 3_000:  # bounded
                trace = next(attempts)
                req = urllib.request.Request(f"{collector.http_url}/v1/traces", data=_request(trace),
                                             method="POST", headers={"Content-Type": "application/x-protobuf"})
                try:
                    with urllib.request.urlopen(req, timeout=30):
                        acknowledged.append(trace)
                except urllib.error.HTTPError:
                    pass  # not acknowledged: a real client retries it
                time.sleep(0.01)

        sender = threading.Thread(target=send, daemon=True)
        try:
            sender.start()
            while len(acknowledged) < 100:
                time.sleep(0.1)
            replicas = nodes[0].request("GET", "/traces-payscope.otel-default/_settings")
            assert isinstance(replicas, dict)
            assert {v["settings"]["index"]["number_of_replicas"] for v in replicas.values()} == {"1"}
            nodes[1].stop(hard=True)
            before = len(acknowledged)
            deadline = time.monotonic() + 60
            while len(acknowledged) < before + 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(acknowledged) >= before + 200, "ingestion stopped with one node of three gone"
            done.set()
            sender.join(timeout=60)
            spool = tmp_path / "spool"
            deadline = time.monotonic() + 90
            while list(spool.glob("*.batch*")) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            done.set()
            collector.stop()
        with open_store(url, readonly=True) as store:
            assert store.counts()["spans"] == 5 * len(acknowledged)
        analysed = payscope("analyze", "--store", url, "--format", "json")
        assert analysed.returncode == 0, analysed.stderr
        assert json.loads(analysed.stdout)["stats"]["traces"] == len(acknowledged)


def test_failed_lists_beyond_one_aggregation_page_are_whole_and_ordered(es_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Deeper than one ordered terms aggregation holds (shrunk here to 4), the failed list is paged whole with a
    composite aggregation: every trace, newest first, never silently fewer."""
    from payscope.collector.store import elastic as backend
    from tests.test_store_conformance import sample_trace

    monkeypatch.setattr(backend, "_MAX_TERMS", 4)
    ids = [f"{i:032x}" for i in range(1, 12)]
    with open_store(es_url) as store:
        for i, trace_id in enumerate(ids):
            store.write(sample_trace(trace_id, failed=i % 3 != 0, start_ms=1000 * (i + 1)))
        failed = [t for i, t in enumerate(ids) if i % 3 != 0]
        assert [s.trace_id for s in store.failed_traces(limit=None)] == failed[::-1]
        assert [s.trace_id for s in store.failed_traces(limit=3, offset=2)] == failed[::-1][2:5]
        assert [s.trace_id for s in store.traces(limit=None)] == ids[::-1]
        assert len(store.traces(limit=2, offset=9)) == 2


def test_timestamps_are_written_to_the_nanosecond_whatever_their_order() -> None:
    """``@timestamp`` text (each second's text is kept for the next span): the same as formatting each time, for
    times in order, in the same second, out of order, and before 1970."""
    import random
    from datetime import datetime, timezone

    from payscope.collector.store.elastic import iso_ns

    def plain(ns: int) -> str:
        seconds, frac = divmod(ns, 1_000_000_000)
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"

    rng = random.Random(3)
    times = sorted(1_800_000_000_000_000_000 + rng.randint(0, 5 * 10**9) for _ in range(2_000))
    times += [rng.randint(-10**18, 4 * 10**18) for _ in range(2_000)]
    assert [iso_ns(t) for t in times] == [plain(t) for t in times]


def test_a_bulk_action_line_holds_its_id_whatever_the_id_holds() -> None:
    """A document id is written into the bulk body as JSON: an id from an imported file that holds a quote or a
    line break stays one id of one action, and never ends the line to start another."""
    from payscope.collector.store.elastic import _create

    for doc_id in ("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", 'x"}}\n{"delete":{"_index":"payscope-meta"}}',
                   "é\u2028\\"):
        line = _create("traces-payscope.otel-default", doc_id)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line) == {"create": {"_index": "traces-payscope.otel-default", "_id": doc_id}}
