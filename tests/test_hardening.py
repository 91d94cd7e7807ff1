"""The collector under hostile or careless clients, over real sockets: no stall on kept-alive connections,
no client harmed by another's bad value, stalled clients dropped, every bad request answered with its
reason, nobody let in without the token, and the store readable by its owner only."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import stat
import statistics
import threading
import time
import zlib
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from payscope.collector.receivers import READ_TIMEOUT_S
from payscope.collector.store import open_store
from tests.helpers import CollectorProcess, payscope

PB = {"Content-Type": "application/x-protobuf"}


def _request(service: str, trace_byte: int, n: int = 5, *, end_ns: int = 2_000_000_000,
             status_code: str | None = None) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", service
    ss = rs.scope_spans.add()
    for i in range(n):
        sp = ss.spans.add()
        sp.trace_id = trace_byte.to_bytes(2, "big") * 8
        sp.span_id = (i + 1).to_bytes(8, "big")
        sp.name, sp.kind = f"{service}-op", 2
        sp.start_time_unix_nano, sp.end_time_unix_nano = 1_000_000_000, end_ns if i == 0 else 2_000_000_000
        if status_code is not None:
            a = sp.attributes.add()
            a.key, a.value.string_value = "http.response.status_code", status_code
    return req.SerializeToString()


def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str] = PB,
          path: str = "/v1/traces") -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_a_reused_connection_answers_in_milliseconds_not_40(collector: CollectorProcess) -> None:
    # Nagle's algorithm meeting the client's delayed ACK holds each answer about 40 ms on a kept-alive
    # connection; with TCP_NODELAY an empty request takes well under a millisecond here.
    conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=10)
    times = []
    for _ in range(25):
        start = time.perf_counter()
        status, _ = _post(conn, b"")
        times.append(time.perf_counter() - start)
        assert status == 200
    conn.close()
    assert statistics.median(times) < 0.015, times


def test_a_bad_value_fails_only_its_own_spans_and_every_span_keeps_its_resource(
        collector: CollectorProcess, store_path: Path) -> None:
    results: dict[str, list[tuple[int, bytes]]] = {}

    def client(name: str, number: int, bad: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=30)
        out = results.setdefault(name, [])
        for i in range(40):
            body = _request(name, 1000 * number + i, end_ns=2**64 - 1 if bad else 2_000_000_000,
                            status_code="9" * 30 if bad else "200")
            out.append(_post(conn, body))
        conn.close()

    threads = [threading.Thread(target=client, args=(f"good{i}", i + 1, False)) for i in range(4)]
    threads.append(threading.Thread(target=client, args=("bad", 5, True)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, answers in results.items():
        assert all(status == 200 for status, _ in answers), (name, answers[:2])
        rejected = [ExportTraceServiceResponse.FromString(body).partial_success for _, body in answers]
        if name == "bad":  # its one span past the year 2262 is rejected with the reason, the others stored
            assert all(r.rejected_spans == 1 and "2262" in r.error_message for r in rejected)
        else:
            assert all(r.rejected_spans == 0 for r in rejected)
    with open_store(str(store_path), readonly=True) as store:
        counts = store.counts()
        assert counts["spans"] == 4 * 40 * 5 + 40 * 4
        for summary in store.traces(limit=None):
            for span in store.trace(summary.trace_id):
                assert span.resource["service.name"] == span.service and span.name == f"{span.service}-op"
    shown = payscope("failures", "--store", str(store_path))
    assert shown.returncode == 0, shown.stderr


def test_stalled_clients_do_not_lock_out_a_good_one(collector: CollectorProcess) -> None:
    stalled = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", collector.http_port), timeout=5)
            if i % 2:  # headers begun and never finished
                sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")
            else:  # a chunked body begun and never finished
                sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n10\r\nabc")
            stalled.append(sock)
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=5)
        status, _ = _post(conn, _request("good", 1))
        conn.close()
        # locked out, it would have waited for a stalled client to be dropped after READ_TIMEOUT_S
        assert status == 200 and time.monotonic() - start < READ_TIMEOUT_S / 5
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("body, headers, says", [
    (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, "nested deeper"),
    (b'{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"\\ud800"}}]},'
     b'"scopeSpans":[{"spans":[{"traceId":"' + b"ab" * 16 + b'","spanId":"' + b"cd" * 8 + b'","name":"x",'
     b'"startTimeUnixNano":"1","endTimeUnixNano":"2"}]}]}]}', {"Content-Type": "application/json"}, None),
    ("truncated", {**PB, "Content-Encoding": "gzip"}, "truncated"),
    (b"\x0a\xff\xff\xff\xff\x0f", PB, "malformed protobuf"),
])
def test_every_hostile_body_gets_an_answer_with_its_reason(body: bytes | str, headers: dict[str, str],
                                                           says: str | None, collector: CollectorProcess,
                                                           store_path: Path) -> None:
    if body == "truncated":  # cut at a flush point: what came before still inflates
        deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
        full = _request("cut", 9, n=100)
        body = deflater.compress(full[: len(full) // 2]) + deflater.flush(zlib.Z_FULL_FLUSH)
        assert len(gzip.GzipFile(fileobj=__import__("io").BytesIO(body)).read1()) > 0
    conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=10)
    status, answer = _post(conn, body, headers)  # type: ignore[arg-type]
    conn.close()
    if says is None:  # a lone surrogate is stored as U+FFFD
        assert status == 200
        with open_store(str(store_path), readonly=True) as store:
            assert store.trace("ab" * 16)[0].service == "\ufffd"
    else:
        assert status == 400 and says in answer.decode("utf-8", "replace"), answer
        with open_store(str(store_path), readonly=True) as store:
            assert store.counts()["spans"] == 0  # never a 200 with half the spans


def test_grpc_says_invalid_argument_for_a_malformed_request(collector: CollectorProcess) -> None:
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}")
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
    with pytest.raises(grpc.RpcError) as raised:
        export(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    answer = export(_request("grpc", 3, end_ns=2**64 - 1), timeout=10)  # a value out of range: not retried
    assert answer.partial_success.rejected_spans == 1 and "2262" in answer.partial_success.error_message
    channel.close()


def test_beyond_this_machine_a_token_is_required(tmp_path: Path, store_path: Path) -> None:
    proc = payscope("collect", "--store", str(store_path), "--http", "0.0.0.0:0", "--grpc", "off", timeout=30)
    assert proc.returncode == 2 and "--token-file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not store_path.exists()

    token_file = tmp_path / "token"
    token_file.write_text("k3ep-th1s-0ut-of-l0gs\n")
    collector = CollectorProcess(store_path, grpc=False, extra=("--token-file", str(token_file)))
    try:
        for headers, expected in ((PB, 401), ({**PB, "Authorization": "Bearer wrong-token-of-some-size"}, 401),
                                  ({**PB, "Authorization": "Bearer k3ep-th1s-0ut-of-l0gs"}, 200)):
            conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=10)
            assert _post(conn, _request("t", 1), headers)[0] == expected
            conn.close()
    finally:
        said = collector.banner + collector.stop()
    assert "k3ep" not in said
    for path in (store_path, Path(f"{store_path}-wal"), Path(f"{store_path}-shm")):
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_tls_with_the_token(tmp_path: Path, store_path: Path) -> None:
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    token_file = tmp_path / "token"
    token_file.write_text("an-honest-token-for-tls")
    collector = CollectorProcess(store_path, grpc=False, extra=("--token-file", str(token_file),
                                                               "--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        assert "https://" in collector.banner
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", collector.http_port, timeout=10, context=context)
        status, _ = _post(conn, _request("tls", 1), {**PB, "Authorization": "Bearer an-honest-token-for-tls"})
        conn.close()
        assert status == 200
    finally:
        collector.stop()
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == 5


def test_json_error_bodies_are_google_rpc_status(collector: CollectorProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=10)
    status, body = _post(conn, b"{nope", {"Content-Type": "application/json"})
    conn.close()
    assert status == 400 and json.loads(body)["code"] == 3


def test_concurrent_large_bodies_stay_under_the_memory_bound(collector: CollectorProcess) -> None:
    from payscope.collector.receivers import MAX_ITEMS_PER_REQUEST, MEMORY_BOUND_BYTES

    template = ExportTraceServiceRequest.FromString(_request("big", 1, n=MAX_ITEMS_PER_REQUEST))
    for i, span in enumerate(template.resource_spans[0].scope_spans[0].spans):
        span.trace_id = (i // 10 + 1).to_bytes(16, "big")
    body = gzip.compress(template.SerializeToString(), 1)
    bodies = [body] * 5  # five clients at once, each with the most spans a request may hold
    answers: list[int] = []

    def send(body: bytes) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", collector.http_port, timeout=120)
        answers.append(_post(conn, body, {**PB, "Content-Encoding": "gzip"})[0])
        conn.close()

    threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = Path(f"/proc/{collector.proc.pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    assert set(answers) <= {200, 503} and 200 in answers, answers  # taken, or turned away to retry: never lost
    assert peak < MEMORY_BOUND_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"


def test_a_request_that_waits_too_long_for_a_decoder_is_told_to_retry(tmp_path: Path) -> None:
    """Every decoder busy (held here, as a long burst of large requests holds them): a request waits a bounded
    time and is answered 503 with Retry-After, so the exporter backs off instead of timing out; once a decoder is
    free the same request is stored."""
    from payscope.collector.receivers import HTTPReceiver, Receiver
    from payscope.collector.writer import BatchWriter

    with open_store(str(tmp_path / "payscope.db")) as store:
        writer = BatchWriter(store)
        receiver = Receiver(writer, decode_wait_s=0.5)
        http_receiver = HTTPReceiver(receiver, "127.0.0.1", 0)
        http_receiver.start()
        held = 0
        try:
            while receiver._decoding.acquire(blocking=False):
                held += 1
            conn = http.client.HTTPConnection("127.0.0.1", http_receiver.port, timeout=10)
            started = time.monotonic()
            conn.request("POST", "/v1/traces", body=_request("busy", 7), headers=PB)
            response = conn.getresponse()
            body, waited = response.read(), time.monotonic() - started
            assert response.status == 503 and response.getheader("Retry-After") == "1", body
            assert b"every decoder busy" in body and 0.5 <= waited < 5
            for _ in range(held):
                receiver._decoding.release()
            held = 0
            assert _post(conn, _request("busy", 7))[0] == 200
            conn.close()
        finally:
            for _ in range(held):
                receiver._decoding.release()
            http_receiver.stop()
            writer.close()
        assert store.counts()["spans"] == 5
