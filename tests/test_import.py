"""`payscope import traces` on every format, real files first."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from tests.helpers import DATA, REALDATA, SCENARIOS, payscope, payscope_json


def _import(store: Path, *files: Path) -> list[dict]:  # type: ignore[type-arg]
    return payscope_json("import", "traces", *map(str, files), "--store", str(store))["files"]


def test_otlp_json_lines_gzip_and_twice_is_once(store_path: Path) -> None:
    first = _import(store_path, SCENARIOS / "marketplace.otlp.jsonl.gz")[0]
    assert first["format"] == "otlp" and first["spans"] == 14000 and first["new_spans"] == 14000
    again = _import(store_path, SCENARIOS / "marketplace.otlp.jsonl.gz")[0]
    assert again["spans"] == 14000 and again["new_spans"] == 0
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts() == {"spans": 14000, "traces": 2000, "logs": 0}


def test_otlp_single_document_real_otel_demo(store_path: Path) -> None:
    report = _import(store_path, REALDATA / "otel-demo_envoy15s_timeout_masked.otlp.json")[0]
    assert report["format"] == "otlp" and report["spans"] == 26
    manifest = json.loads((REALDATA / "otel-demo_envoy15s_timeout_masked.manifest.json").read_text())
    shown = payscope_json("show", manifest["trace_id"], "--store", str(store_path))
    proxy = [s for s in shown["spans"] if s["service"] == "frontend-proxy" and s["status"] == "error"]
    assert proxy and proxy[0]["duration_ms"] > 15000
    hop = shown["transactions"][0]["failing_hop"]
    assert hop["callee"] == manifest["expected"]["locus_service"]  # the proxy gave up on frontend
    # one trace is too few for any rule: the table says so, and where the failure is listed, not that all is well
    table = payscope("analyze", "--store", str(store_path), check=True).stdout
    assert "no findings: 1 transaction did not succeed (payscope failures lists it" in table, table
    assert "no timeout, retry or network problem shows" not in table


def test_otlp_lines_with_logs_real_otel_tui(store_path: Path) -> None:
    report = _import(store_path, REALDATA / "otel-tui_otel-demo_startup.otlp.jsonl.gz")[0]
    assert report["spans"] == 547 and report["logs"] > 0
    failures = payscope_json("failures", "--store", str(store_path), "--limit", "0")["failures"]
    classes = {f["error_class"] for f in failures}
    assert "connection" in classes or "timeout" in classes


def test_zipkin_v2_real_production_trace(store_path: Path) -> None:
    report = _import(store_path, REALDATA / "zipkin_smartthings-oauth-authorization.zipkinv2.json")[0]
    assert report["format"] == "zipkin" and report["spans"] >= 175
    with open_store(str(store_path), readonly=True) as store:
        summary = store.traces(limit=5)[0]
        assert len(summary.services) == 8
        spans = store.trace(summary.trace_id)
        assert any(s.attributes.get("http.status_code") == 401 for s in spans)


def test_jaeger_json(store_path: Path) -> None:
    report = _import(store_path, DATA / "jaeger_checkout.json")[0]
    assert report["format"] == "jaeger" and report["spans"] == 3
    shown = payscope_json("show", "5b8aa5a2d2c872e8321cf37308d69df2", "--store", str(store_path))
    tx = shown["transactions"][0]
    assert tx["outcome"] == "late_success"  # the PSP answered 200 after payment had given up
    assert tx["failing_hop"]["caller"] == "payment" and tx["failing_hop"]["callee"] == "psp"


def test_out_of_order_spans_and_missing_root(tmp_path: Path, store_path: Path) -> None:
    doc = json.loads((REALDATA / "hotrod_redis-timeout_retries.otlp.json").read_text())
    spans = [(rs, ss, sp) for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for sp in ss["spans"]]
    root = next(sp for _, _, sp in spans if not sp.get("parentSpanId"))
    lines = []
    rng = random.Random(4)
    rng.shuffle(spans)
    for rs, ss, sp in spans:
        if sp is root:
            continue
        lines.append(json.dumps({"resourceSpans": [{"resource": rs["resource"],
                                                    "scopeSpans": [{"scope": ss.get("scope", {}), "spans": [sp]}]}]}))
    path = tmp_path / "shuffled.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    report = _import(store_path, path)[0]
    assert report["spans"] == len(spans) - 1
    shown = payscope_json("show", root["traceId"], "--store", str(store_path))
    assert len(shown["spans"]) == len(spans) - 1
    assert shown["spans"][0]["depth"] == 0 and shown["spans"][0]["span_id"] != root["spanId"]
    with open_store(str(store_path), readonly=True) as store:
        retried = [s for s in store.trace(root["traceId"]) if s.is_error]
        assert retried and all("redis timeout" in s.status_message or s.events for s in retried)


def test_bad_lines_are_reported_with_their_line_and_the_rest_kept(tmp_path: Path, store_path: Path) -> None:
    good = gzip.decompress((SCENARIOS / "calm.otlp.jsonl.gz").read_bytes()).decode().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([good[0], "{not json", good[1], '{"resourceSpans": "nope"}']) + "\n")
    proc = payscope("import", "traces", str(broken), "--store", str(store_path))
    assert proc.returncode == 0
    assert f"{broken}:2" in proc.stderr and f"{broken}:4" in proc.stderr
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == sum(len(json.loads(x)["resourceSpans"][0]["scopeSpans"][0]["spans"])
                                              for x in good[:2])


def test_a_truncated_gzip_is_refused_whole(tmp_path: Path, store_path: Path) -> None:
    data = (SCENARIOS / "calm.otlp.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    good = SCENARIOS / "marketplace.otlp.jsonl.gz"
    proc = payscope("import", "traces", str(good), str(cut), "--store", str(store_path))
    assert proc.returncode == 2 and "truncated gzip" in proc.stderr and str(cut) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not store_path.exists()  # checked before anything was stored, the good file too


@pytest.mark.parametrize("name, text, says", [
    ("jaeger-spans.json", '{"data":[{"traceID":"abc","spans":"nope"}]}', "spans is str, not a list"),
    ("jaeger-start.json", '{"data":[{"traceID":"abc","spans":[{"traceID":"abc","spanID":"1"}]}]}', "no startTime"),
    ("jaeger-tags.json", '{"data":[{"traceID":"abc","spans":[{"traceID":"abc","spanID":"1","startTime":1,'
                         '"tags":"x"}]}]}', "tags are not a list"),
    ("zipkin-ids.json", '[{"traceId":"abc","id":1}]', "traceId 'abc' is not 16 or 32 hex digits"),
    ("zipkin-id.json", '[{"traceId":"' + "a" * 32 + '","id":1,"timestamp":5}]', "id 1 is not 16 hex digits"),
])
def test_malformed_jaeger_and_zipkin_with_nothing_readable_are_refused(name: str, text: str, says: str, tmp_path: Path,
                                                        store_path: Path) -> None:
    path = tmp_path / name
    path.write_text(text)
    proc = payscope("import", "traces", str(path), "--store", str(store_path))
    assert proc.returncode == 2 and says in proc.stderr and name in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == 0


@pytest.mark.parametrize("fmt", ["jaeger", "zipkin"])
def test_a_bad_span_is_skipped_and_reported_and_the_rest_stored(fmt: str, tmp_path: Path,
                                                                 store_path: Path) -> None:
    good = [{"traceId": "a" * 32, "id": f"{i:016x}", "timestamp": 1_700_000_000_000_000 + i, "duration": 10,
             "name": "get", "localEndpoint": {"serviceName": "shop"}} for i in range(1, 6)]
    bad = [{"traceId": "a" * 32, "id": "c" * 16},  # no timestamp
           {"traceId": "a" * 32, "id": "d" * 16, "timestamp": 2**62, "duration": 1}]  # past the year 2262
    if fmt == "zipkin":
        document: object = good[:2] + bad + good[2:]
    else:
        def jaeger(z: dict) -> dict:
            span = {"traceID": z["traceId"], "spanID": z["id"], "operationName": "get", "processID": "p1"}
            if "timestamp" in z:
                span |= {"startTime": z["timestamp"], "duration": z.get("duration", 0)}
            return span
        document = {"data": [{"traceID": "a" * 32, "processes": {"p1": {"serviceName": "shop"}},
                              "spans": [jaeger(z) for z in good[:2] + bad + good[2:]]}]}
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps(document))
    proc = payscope("import", "traces", str(path), "--store", str(store_path))
    assert proc.returncode == 0, proc.stderr
    assert f"{path}" in proc.stderr and "span 2" in proc.stderr and "span 3" in proc.stderr
    assert "2262" in proc.stderr and "2 rejected" in proc.stdout
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == 5


def test_unknown_file_is_a_clear_error(tmp_path: Path, store_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    proc = payscope("import", "traces", str(path), "--store", str(store_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("payscope: error:") and "not a trace file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    missing = payscope("import", "traces", str(tmp_path / "nope.json"), "--store", str(store_path))
    assert missing.returncode == 2 and "no such file" in missing.stderr
