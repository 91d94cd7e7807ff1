"""The sidecar streams: 100 MB each way and a slow chunked answer pass through byte-identical in bounded memory,
over kept-alive connections; and its fault injection hits the share asked for, each fault marked on its span."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payscope.collector.store import open_store
from tests.helpers import CollectorProcess, free_port, node_server, payscope, wait_port

UPSTREAM_JS = r"""
const http = require("http");
const crypto = require("crypto");
http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/sink") {            // reads the body, answers its length and sha256
    const hash = crypto.createHash("sha256");
    let bytes = 0;
    req.on("data", (c) => { bytes += c.length; hash.update(c); });
    req.on("end", () => { res.writeHead(200, {"Content-Type": "application/json"});
                          res.end(JSON.stringify({bytes, sha256: hash.digest("hex")})); });
  } else if (url.pathname === "/source") {   // MB blocks of 1 MiB, block i filled with byte i % 251
    const total = Number(url.searchParams.get("mb"));
    res.writeHead(200, {"Content-Type": "application/octet-stream", "Content-Length": String(total << 20)});
    let i = 0;
    const more = () => {
      while (i < total) { if (!res.write(Buffer.alloc(1 << 20, i++ % 251))) { res.once("drain", more); return; } }
      res.end();
    };
    more();
  } else if (url.pathname === "/drip") {     // 10 chunks, 150 ms apart, chunked
    res.writeHead(200, {"Content-Type": "text/plain"});
    let i = 0;
    const t = setInterval(() => { res.write(`chunk ${i}\n`); if (++i === 10) { clearInterval(t); res.end(); } }, 150);
  } else {
    req.resume();
    req.on("end", () => { res.writeHead(200, {"Content-Type": "application/json"}); res.end('{"ok":true}'); });
  }
}).listen(Number(process.argv[2]), "127.0.0.1");
"""

PEAK_GROWTH_BOUND_MB = 48  # what 100 MB each way may add to the sidecar's peak RSS


@pytest.fixture()
def upstream(tmp_path: Path) -> Iterator[int]:
    if shutil.which("node") is None:
        pytest.skip("node not installed: the upstream is a plain Node.js server")
    with node_server(UPSTREAM_JS, tmp_path) as port:
        yield port


def _sidecar(upstream: int, collector: CollectorProcess, *extra: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "payscope", "sidecar", "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{upstream}", "--service", "bank", "--collector",
                             collector.http_url, "--timeout", "5", *extra],
                            env=dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100"), stderr=subprocess.PIPE, text=True)
    wait_port(port)
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_100_mb_each_way_and_a_slow_stream_pass_through_whole_in_bounded_memory(
        upstream: int, collector: CollectorProcess) -> None:
    proc, port = _sidecar(upstream, collector)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # one kept-alive connection throughout
        conn.request("GET", "/ping")
        assert conn.getresponse().read() == b'{"ok":true}'
        baseline_kib = _kib(proc.pid, "VmRSS")

        sent = hashlib.sha256()

        def upload() -> Iterator[bytes]:
            for i in range(100):
                block = bytes([i % 251]) * (1 << 20)
                sent.update(block)
                yield block

        conn.request("POST", "/sink", body=upload(), encode_chunked=True,
                     headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"})
        answer = json.loads(conn.getresponse().read())
        assert answer == {"bytes": 100 << 20, "sha256": sent.hexdigest()}

        conn.request("GET", "/source?mb=100")
        response = conn.getresponse()
        assert response.getheader("Content-Length") == str(100 << 20)
        got, expected, size = hashlib.sha256(), hashlib.sha256(), 0
        for i in range(100):
            expected.update(bytes([i % 251]) * (1 << 20))
        while chunk := response.read(1 << 16):
            got.update(chunk)
            size += len(chunk)
        assert (size, got.hexdigest()) == (100 << 20, expected.hexdigest())

        start = time.monotonic()
        conn.request("GET", "/drip")
        response = conn.getresponse()
        first = response.read1()
        first_at = time.monotonic() - start
        body = first + response.read()
        total = time.monotonic() - start
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert first_at < total / 2, (first_at, total)  # the first chunk came before the last was sent
        assert body == b"".join(f"chunk {i}\n".encode() for i in range(10))
        peak_kib = _kib(proc.pid, "VmHWM")
        conn.close()
    finally:
        err = _stop(proc)
    assert "payscope sidecar: bank on 127.0.0.1" in err
    assert (peak_kib - baseline_kib) / 1024 < PEAK_GROWTH_BOUND_MB, (baseline_kib, peak_kib)


def test_injected_faults_hit_the_share_asked_for_and_are_marked(upstream: int, collector: CollectorProcess,
                                                               store_path: Path) -> None:
    admin = free_port()
    proc, port = _sidecar(upstream, collector, "--delay", "200ms@30%@/slow*", "--abort", "503@20%@POST /pay*",
                          "--admin", f"127.0.0.1:{admin}")
    n = 300
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        aborted = 0
        for i in range(n):
            conn.request("POST", f"/pay/{i}", body=b"{}", headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status == 503:
                aborted += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        delayed = 0
        for i in range(100):
            start = time.monotonic()
            conn.request("GET", f"/slow/{i}")
            conn.getresponse().read()
            delayed += time.monotonic() - start >= 0.2
        listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/faults", timeout=5).read())
        assert [f["kind"] for f in listed] == ["delay", "abort"]
        cleared = urllib.request.Request(f"http://127.0.0.1:{admin}/faults", data=b"[]", method="PUT")
        assert json.loads(urllib.request.urlopen(cleared, timeout=5).read()) == []
        after = 0
        for i in range(50):
            conn.request("POST", f"/pay/after-{i}", body=b"{}")
            response = conn.getresponse()
            response.read()
            after += response.status == 503
        conn.close()
    finally:
        err = _stop(proc)
    assert "FAULT INJECTION ON: delay 200 ms on 30% of requests to /slow*" in err
    # binomial: n=300, p=0.2 -> mean 60, sd 6.9; n=100, p=0.3 -> mean 30, sd 4.6; four sd either side
    assert 32 <= aborted <= 88, aborted
    assert 12 <= delayed <= 48, delayed
    assert after == 0
    with open_store(str(store_path), readonly=True) as store:
        deadline = time.monotonic() + 15
        marked: dict[str, int] = {}
        while time.monotonic() < deadline:
            spans = [s for t in store.traces(limit=None) for s in store.trace(t.trace_id)]
            marked = {}
            for s in spans:
                kind = s.attributes.get("payscope.fault.kind")
                if kind:
                    marked[str(kind)] = marked.get(str(kind), 0) + 1
            if len(spans) >= n + 150 and marked.get("abort") == aborted:
                break
            time.sleep(0.3)
    assert marked == {"abort": aborted, "delay": marked.get("delay", 0)} and marked.get("delay", 0) >= delayed


@pytest.mark.parametrize("args, said", [
    (("--delay", "300ms@150%"), "share must be a percentage"),
    (("--delay", "soon@10%"), "delay must be a duration"),
    (("--abort", "200@5%"), "HTTP error status"),
    (("--reset", "5@1%"), "a reset takes no value"),
    (("--admin", "0.0.0.0:9999"), "this machine only"),
])
def test_a_bad_fault_is_one_line_and_exit_2(args: tuple[str, ...], said: str) -> None:
    done = payscope("sidecar", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--service", "x", *args)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


CHAOS_CALLER = """
import json, sys, time, urllib.request
import requests
from opentelemetry import trace

base, admin = sys.argv[1], sys.argv[2]
tracer = trace.get_tracer("checkout")

def traffic(n):
    for i in range(n):
        with tracer.start_as_current_span("POST /checkout", kind=trace.SpanKind.SERVER) as span:
            try:
                requests.post(base + "/charge", json={"amount": 5}, timeout=0.25)
            except requests.Timeout:
                span.set_status(trace.Status(trace.StatusCode.ERROR, "bank timed out"))
        time.sleep(0.02)

t0 = time.time()
traffic(40)
t1 = time.time()
rules = json.dumps([{"kind": "delay", "value": "400ms", "share": "50%", "route": "/charge"}]).encode()
urllib.request.urlopen(urllib.request.Request(admin + "/faults", data=rules, method="PUT"), timeout=5).read()
traffic(40)
print(json.dumps({"baseline": [t0, t1], "incident": [t1, time.time()]}))
"""


def test_the_analysis_says_an_injected_delay_is_injected(tmp_path: Path, upstream: int, collector: CollectorProcess,
                                                         store_path: Path) -> None:
    """A Python service under `payscope run` calls the Node upstream through the sidecar with a 250 ms timeout;
    half way, a 400 ms delay is injected into half its calls. `analyze` reports the timeouts as injected and judges
    nothing from their time; `compare` puts the lost time on the injected fault."""
    admin = free_port()
    proc, port = _sidecar(upstream, collector, "--admin", f"127.0.0.1:{admin}")
    try:
        (tmp_path / "caller.py").write_text(CHAOS_CALLER)
        done = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "checkout", "--collector",
                               collector.http_url, "--", sys.executable, "caller.py", f"http://127.0.0.1:{port}",
                               f"http://127.0.0.1:{admin}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PAYSCOPE_QUIET="1"))
        assert done.returncode == 0, done.stderr
        windows = json.loads(done.stdout.splitlines()[-1])
    finally:
        _stop(proc)
    with open_store(str(store_path), readonly=True) as store:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and store.counts()["spans"] < 80 * 3:
            time.sleep(0.3)
    analysed = json.loads(payscope("analyze", "--store", str(store_path), "--format", "json", check=True).stdout)
    injected = [f for f in analysed["injected_faults"] if f["callee"] == "bank"]
    assert injected and injected[0]["kind"] == "delay" and 8 <= injected[0]["calls"] <= 35, analysed["injected_faults"]
    # nothing judged from the injected calls' time: the caller's own single connect/read value may still show
    from_time = {"timeout_below_tail", "late_success", "network_latency", "timeout_missing", "timeout_inversion"}
    assert [f["kind"] for f in analysed["findings"] if f["edge"]["callee"] == "bank" and f["kind"] in from_time] == []
    assert analysed["stats"]["outcomes"].get("injected", 0) >= 5, analysed["stats"]
    table = payscope("analyze", "--store", str(store_path), check=True).stdout
    assert "injected by the sidecar: delay on" in table
    window = lambda w: f"{w[0]:.3f}..{w[1]:.3f}"  # noqa: E731
    compared = json.loads(payscope("compare", "--store", str(store_path), "--format", "json", "--baseline",
                                   window(windows["baseline"]), "--incident", window(windows["incident"]),
                                   check=True).stdout)
    first = compared["hops"][0]
    assert (first["component"], first["service"]) == ("injected", "bank"), compared["hops"][:3]


def test_a_reset_fault_cuts_the_connection_and_is_marked(upstream: int, collector: CollectorProcess,
                                                         store_path: Path) -> None:
    proc, port = _sidecar(upstream, collector, "--reset", "@100%@/boom")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            conn.request("POST", "/boom", body=b"{}")
            conn.getresponse().read()
        conn.close()
        fine = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        fine.request("GET", "/ping")
        assert fine.getresponse().read() == b'{"ok":true}'  # other routes untouched
        fine.close()
    finally:
        err = _stop(proc)
    assert "Traceback" not in err, err
    with open_store(str(store_path), readonly=True) as store:
        deadline = time.monotonic() + 10
        reset: list[Any] = []
        while not reset and time.monotonic() < deadline:
            reset = [s for t in store.traces(limit=None) for s in store.trace(t.trace_id)
                     if s.attributes.get("payscope.fault.kind") == "reset"]
            time.sleep(0.2)
    assert len(reset) == 1 and reset[0].attributes["error.type"] == "connection_reset" and reset[0].status_code == 2
