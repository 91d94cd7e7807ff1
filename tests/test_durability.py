"""The collector under load: readers in other processes, and kill -9 loses nothing acknowledged.

Each test runs with batches small enough to be decoded and written in the collector's own process, and with
batches large enough to be decoded and stored by its decoding processes (``INLINE_BELOW_BYTES``)."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from payscope.collector.decoding import INLINE_BELOW_BYTES
from payscope.collector.store import open_store
from tests.helpers import CollectorProcess

SMALL, LARGE = 20, 1200  # spans a batch: decoded where they arrive, and stored by a decoding process

READER = r"""
import sys, time
from payscope.collector.store import open_store
store = open_store(sys.argv[1], readonly=True)
deadline = time.monotonic() + float(sys.argv[2])
reads = torn = 0
while time.monotonic() < deadline:
    for summary in store.traces(limit=50):
        spans = store.trace(summary.trace_id)
        if len(spans) != int(sys.argv[3]):
            torn += 1
    store.failed_traces(limit=20)
    reads += 1
print(reads, torn)
"""


def batch(n: int, spans: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "load"
    ss = rs.scope_spans.add()
    for i in range(spans):
        sp = ss.spans.add()
        sp.trace_id = n.to_bytes(16, "big")
        sp.span_id = (i + 1).to_bytes(8, "big")
        if i:
            sp.parent_span_id = (1).to_bytes(8, "big")
        sp.name = f"op{i}"
        sp.kind = 2 if i == 0 else 3
        sp.start_time_unix_nano = 1_700_000_000_000_000_000 + n * 1000 + i
        sp.end_time_unix_nano = sp.start_time_unix_nano + 5_000_000
        if i == 3 and n % 7 == 0:
            sp.status.code = 2
    return req.SerializeToString()


def test_a_large_batch_is_one_a_decoding_process_stores() -> None:
    assert len(batch(1, SMALL)) < INLINE_BELOW_BYTES <= len(batch(1, LARGE))


def sender(port: int, first: int, count: int, acked: list[int], stop: threading.Event, spans: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for n in range(first, first + count):
            if stop.is_set():
                return
            try:
                conn.request("POST", "/v1/traces", body=batch(n, spans),
                             headers={"Content-Type": "application/x-protobuf"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    acked.append(n)
            except (OSError, http.client.HTTPException):
                return  # the collector died: whatever was acknowledged so far must be kept
    finally:
        conn.close()


@pytest.mark.parametrize("spans", [SMALL, LARGE])
def test_readers_in_other_processes_never_see_half_a_batch(store_path: Path, spans: int) -> None:
    collector = CollectorProcess(store_path, grpc=False, extra=("--workers", "2"))
    batches = 150 if spans == SMALL else 10
    try:
        acked: list[int] = []
        stop = threading.Event()
        senders = [threading.Thread(target=sender, args=(collector.http_port, 1 + k * 10_000, batches, acked, stop,
                                                         spans))
                   for k in range(3)]
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(store_path), "4", str(spans)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=60)
        for proc in readers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            reads, torn = map(int, out.split())
            assert reads > 0 and torn == 0
            assert "locked" not in err
        assert len(acked) == 3 * batches
    finally:
        collector.stop()


@pytest.mark.parametrize("spans", [SMALL, LARGE])
def test_kill_9_keeps_every_acknowledged_batch(store_path: Path, spans: int) -> None:
    collector = CollectorProcess(store_path, grpc=False, extra=("--workers", "2"))
    acked: list[int] = []
    stop = threading.Event()
    enough = 200 if spans == SMALL else 20
    senders = [threading.Thread(target=sender, args=(collector.http_port, 1 + k * 100_000, 5000, acked, stop, spans))
               for k in range(4)]
    for t in senders:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < enough and time.monotonic() < deadline:
        time.sleep(0.05)
    collector.kill9()
    stop.set()
    for t in senders:
        t.join(timeout=30)
    assert len(acked) >= enough
    with open_store(str(store_path)) as store:  # reopening recovers the WAL
        for n in acked:
            assert len(store.trace(n.to_bytes(16, "big").hex())) == spans, n
    again = CollectorProcess(store_path, grpc=False)
    again.stop()
    assert again.proc.returncode == 0
