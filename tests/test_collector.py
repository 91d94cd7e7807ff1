"""`payscope collect` over real sockets: the official OpenTelemetry SDK exporters, and bad requests."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import time
import zlib
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from payscope.collector.store import open_store
from tests.helpers import CollectorProcess, payscope_json


def _provider(exporter):  # type: ignore[no-untyped-def]
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _emit_payment(provider) -> str:  # type: ignore[no-untyped-def]
    from opentelemetry.trace import SpanKind, Status, StatusCode

    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER,
                                      attributes={"http.request.method": "POST", "http.route": "/checkout",
                                                  "app.order.id": "ord-8812"}) as root:
        with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "POST", "server.address": "payment", "url.full": "http://payment/pay",
                "http.request.header.authorization": "Bearer s3cr3t",
                "payment.note": "card 4111 1111 1111 1111 cvv=123"}) as client:
            client.set_status(Status(StatusCode.ERROR, "ReadTimeout"))
    return format(root.get_span_context().trace_id, "032x")


def test_sdk_http_exporter_spans_and_logs_reach_the_store(collector: CollectorProcess, store_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

    assert "storing in" in collector.banner and str(store_path) in collector.banner
    provider = _provider(OTLPSpanExporter(endpoint=f"{collector.http_url}/v1/traces"))
    trace_id = _emit_payment(provider)
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{collector.http_url}/v1/logs")))
    logger = logging.getLogger("payscope-test-sdk")
    handler = LoggingHandler(logger_provider=logger_provider)
    logger.addHandler(handler)
    logger.propagate = False
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("log-here") as sp:
        logger.error("charge for order ord-8812 timed out, Authorization: Bearer abc.def")
        log_trace = format(sp.get_span_context().trace_id, "032x")
    logger.removeHandler(handler)
    logger_provider.shutdown()
    provider.shutdown()

    with open_store(str(store_path), readonly=True) as store:
        spans = store.trace(trace_id)
        assert {s.kind for s in spans} == {"server", "client"}
        client = next(s for s in spans if s.kind == "client")
        assert client.attributes["http.request.header.authorization"] == "[REDACTED]"
        assert "4111" not in json.dumps(client.attributes) and "cvv=123" not in json.dumps(client.attributes)
        assert store.traces_by_key("ord-8812") == [trace_id]
        logs = store.logs_of_trace(log_trace)
        assert len(logs) == 1 and logs[0].severity == "ERROR" and logs[0].link_method == "trace_id"
        assert "abc.def" not in logs[0].message
    failures = payscope_json("failures", "--store", str(store_path))["failures"]
    assert failures[0]["trace_id"] == trace_id and failures[0]["error_class"] == "timeout"
    shown = payscope_json("show", "ord-8812", "--store", str(store_path))
    assert shown["trace_ids"] == [trace_id] and len(shown["spans"]) == 2


def test_sdk_grpc_exporter_reaches_the_store(collector: CollectorProcess, store_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = _provider(OTLPSpanExporter(endpoint=f"127.0.0.1:{collector.grpc_port}", insecure=True))
    trace_id = _emit_payment(provider)
    provider.shutdown()
    with open_store(str(store_path), readonly=True) as store:
        assert len(store.trace(trace_id)) == 2


def _request_bytes(n_spans: int = 3, trace_byte: int = 7) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "raw"
    ss = rs.scope_spans.add()
    for i in range(n_spans):
        sp = ss.spans.add()
        sp.trace_id = bytes([trace_byte]) * 16
        sp.span_id = (i + 1).to_bytes(8, "big")
        sp.name = f"op{i}"
        sp.start_time_unix_nano = 1_000_000_000 + i
        sp.end_time_unix_nano = 2_000_000_000
    return req.SerializeToString()


def _post(port: int, body: bytes, headers: dict[str, str], path: str = "/v1/traces",
          chunked: bool = False) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if chunked:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 100):
            piece = body[i:i + 100]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
    else:
        conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, dict(resp.getheaders())


PB = {"Content-Type": "application/x-protobuf"}


def test_chunked_gzip_and_json_bodies_are_stored(collector: CollectorProcess, store_path: Path) -> None:
    status, _, _ = _post(collector.http_port, _request_bytes(trace_byte=1), PB, chunked=True)
    assert status == 200
    status, _, _ = _post(collector.http_port, gzip.compress(_request_bytes(trace_byte=2)),
                         {**PB, "Content-Encoding": "gzip"})
    assert status == 200
    doc = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "j"}}]},
                              "scopeSpans": [{"spans": [{"traceId": "03" * 16, "spanId": "0a" * 8, "name": "x",
                                                         "kind": 2, "startTimeUnixNano": "5",
                                                         "endTimeUnixNano": "9"}]}]}]}
    status, body, headers = _post(collector.http_port, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    with open_store(str(store_path), readonly=True) as store:
        assert len(store.trace("01" * 16)) == 3
        assert len(store.trace("02" * 16)) == 3
        assert store.trace("03" * 16)[0].kind == "server"


def test_invalid_spans_get_partial_success_and_the_rest_is_stored(collector: CollectorProcess,
                                                                  store_path: Path) -> None:
    req = ExportTraceServiceRequest.FromString(_request_bytes(trace_byte=4))
    bad = req.resource_spans[0].scope_spans[0].spans.add()
    bad.trace_id = b"\x00" * 16
    bad.span_id = b"\x01" * 8
    status, body, _ = _post(collector.http_port, req.SerializeToString(), PB)
    assert status == 200
    response = ExportTraceServiceResponse.FromString(body)
    assert response.partial_success.rejected_spans == 1
    assert "trace id" in response.partial_success.error_message
    with open_store(str(store_path), readonly=True) as store:
        assert len(store.trace("04" * 16)) == 3


@pytest.mark.parametrize("body, headers, status, reason", [
    (b"\xff\xff\xff\xff garbage", PB, 400, "malformed protobuf"),
    (b'{"resourceSpans": [', {"Content-Type": "application/json"}, 400, "malformed JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
     {"Content-Type": "application/json"}, 400, "not a hex string"),
    (b"hello", {"Content-Type": "text/plain"}, 415, "unsupported Content-Type"),
    (b"\x1f\x8bnot really gzip", {**PB, "Content-Encoding": "gzip"}, 400, "not valid gzip"),
])
def test_bad_requests_get_a_clear_4xx_and_store_nothing(collector: CollectorProcess, store_path: Path,
                                                        body: bytes, headers: dict[str, str], status: int,
                                                        reason: str) -> None:
    got, data, _ = _post(collector.http_port, body, headers)
    assert got == status
    assert reason in data.decode("utf-8", "replace")
    ok, _, _ = _post(collector.http_port, _request_bytes(trace_byte=5), PB)
    assert ok == 200  # still serving
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == 3


def test_oversized_body_and_gzip_bomb_are_refused(collector: CollectorProcess, store_path: Path) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=30)
    conn.putrequest("POST", "/v1/traces")
    conn.putheader("Content-Type", "application/x-protobuf")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"larger than the limit" in resp.read()
    conn.close()
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = bomb.compress(b"\x00" * (200 * 1024 * 1024)) + bomb.flush()
    assert len(payload) < 1024 * 1024
    status, data, _ = _post(collector.http_port, payload, {**PB, "Content-Encoding": "gzip"})
    assert status == 413 and b"inflates past" in data
    ok, _, _ = _post(collector.http_port, _request_bytes(trace_byte=6), PB)
    assert ok == 200
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == 3


def test_sigterm_stops_cleanly_and_reports(store_path: Path) -> None:
    proc = CollectorProcess(store_path, grpc=False)
    status, _, _ = _post(proc.http_port, _request_bytes(trace_byte=8), PB)
    assert status == 200
    rest = proc.stop()
    assert proc.proc.returncode == 0
    assert "3 spans" in rest
    time.sleep(0.1)
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == 3


def _large_request(card: str) -> bytes:
    """Over the size decoded in a worker: 800 spans of a payment flow, one with a card number in text, one
    with a card number as an integer, and one invalid (a zero trace id)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "payment"
    ss = rs.scope_spans.add()
    for i in range(800):
        sp = ss.spans.add()
        sp.trace_id = (1000 + i // 8).to_bytes(16, "big")
        sp.span_id = (i + 1).to_bytes(8, "big")
        if i % 8:
            sp.parent_span_id = i.to_bytes(8, "big")
        sp.kind = 2 if i % 2 == 0 else 3
        sp.name = "POST /charges/{order_id}"
        sp.start_time_unix_nano = 1_767_000_000_000_000_000 + i * 1_000_000
        sp.end_time_unix_nano = sp.start_time_unix_nano + 5_000_000 + i * 1000
        for key, value in (("http.request.method", "POST"), ("http.route", "/charges/{order_id}"),
                           ("url.path", f"/charges/ord-{i // 8}"), ("server.address", "bank")):
            kv = sp.attributes.add()
            kv.key, kv.value.string_value = key, value
        kv = sp.attributes.add()
        kv.key, kv.value.int_value = "http.response.status_code", 504 if i % 50 == 0 else 200
    ss.spans[3].attributes.add(key="payment.note").value.string_value = f"card {card} declined"
    ss.spans[5].attributes.add(key="payment.pan").value.int_value = int(card)
    bad = ss.spans.add()
    bad.trace_id, bad.span_id = b"\x00" * 16, b"\x09" * 8
    return req.SerializeToString()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def _running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_large_requests_decode_in_worker_processes_exactly_as_in_process(tmp_path: Path) -> None:
    from payscope.collector.decoding import INLINE_BELOW_BYTES

    card = "4111111111111111"
    body = _large_request(card)
    assert len(body) > INLINE_BELOW_BYTES
    stored = {}
    for workers in ("2", "0"):
        path = tmp_path / f"workers-{workers}.db"
        proc = CollectorProcess(path, grpc=False, extra=("--workers", workers))
        try:
            status, answer, _ = _post(proc.http_port, body, PB)
            assert status == 200
            response = ExportTraceServiceResponse.FromString(answer)
            assert response.partial_success.rejected_spans == 1
            assert "trace id" in response.partial_success.error_message
            bad, reason, _ = _post(proc.http_port, b"\xff" * (INLINE_BELOW_BYTES + 10), PB)
            assert bad == 400 and b"malformed protobuf" in reason
            decoders = [p for p in _children(proc.proc.pid) if b"multiprocessing" in
                        (Path("/proc") / str(p) / "cmdline").read_bytes()]
            assert bool(decoders) == (workers != "0")
        finally:
            if workers == "0":
                proc.stop()
            else:  # killed with -9, its decoding processes leave by themselves
                proc.kill9()
                deadline = time.monotonic() + 10
                while any(_running(p) for p in decoders) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not any(_running(p) for p in decoders)
        with open_store(str(path), readonly=True) as store:
            rows = sorted((r for batch in store.iter_rows() for r in batch), key=lambda r: r.span_id)
            assert len(rows) == 800
            bodies = [s.attributes for s in store.trace((1000).to_bytes(16, "big").hex())]
        stored[workers] = rows, bodies
        assert not any(card.encode() in f.read_bytes() for f in tmp_path.glob(f"{path.name}*"))
    assert stored["2"] == stored["0"]
    assert any(r.error_class == "timeout" for r in stored["2"][0])
    assert ("ord-0",) in {r.keys for r in stored["2"][0]}


def test_a_worker_that_does_not_answer_is_done_without_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed while the executor starts another can leave the executor's threads stuck and its tasks
    never answered (CPython's own race): the wait for a worker is bounded, the task done where it was asked."""
    from payscope.collector import decoding

    pool = decoding.WorkerPool(1)
    try:
        assert pool.answer(pool.submit(abs, -2), lambda: "here") == 2  # started, and answering
        monkeypatch.setattr(decoding, "WORKER_ANSWER_S", 0.3)
        started = time.monotonic()
        assert pool.answer(pool.submit(time.sleep, 6), lambda: "here") == "here"
        assert time.monotonic() - started < 4
        monkeypatch.undo()
        # the silent worker still sleeps; a new one answers the next task
        assert pool.answer(pool.submit(abs, -3), lambda: "here") == 3
    finally:
        pool.close()
