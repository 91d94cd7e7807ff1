"""`payscope sidecar --egress`: a forward proxy for a non-Python service's outbound calls. A Node.js service
pointed at it with HTTP_PROXY calls a bank; its calls become client spans and an edge, the bank gets a
traceparent naming that span, and the service's own timeout, seen as it hanging up, is inferred."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from payscope.instrumentation.sidecar import RELAY_DRAIN_S
from tests.helpers import CollectorProcess, free_port, node_server, payscope, payscope_json, wait_port
from tests.test_sidecar_stream import _stop

CALLER_TIMEOUT_MS = 250
BANK_SLOW_MS = 2000  # far past the caller's timeout: a hang-up seen only when the bank answers would show
# Noticing a hang-up takes a turn of the sidecar's event loop after the caller's timer fires; on a loaded
# 2-core machine that has taken over 150 ms. Each span's duration is allowed this much beyond the timeout.
HANGUP_SLACK_MS = 500
# The other way, a span can be a little shorter than the timeout: the sidecar's span begins when the request
# reaches its handler, a moment after the caller started its timer, and Node counts its timers from the
# event loop's cached clock, so a timer can fire a fraction of a millisecond early by the wall clock.
EARLY_MS = 10

BANK_JS = r"""
const http = require("http");
http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  req.resume();
  req.on("end", () => setTimeout(() => {
    res.writeHead(200, {"Content-Type": "application/json"});
    res.end(JSON.stringify({traceparent: req.headers["traceparent"] || null}));
  }, Number(url.searchParams.get("ms") || 0)));
}).listen(Number(process.argv[2]), "127.0.0.1");
"""

# A checkout service that knows nothing of tracing: it sends its calls to the bank through HTTP_PROXY, in
# absolute form as proxy-aware clients do, and gives up after CALLER_TIMEOUT_MS.
CHECKOUT_JS = r"""
const http = require("http");
const proxy = new URL(process.env.HTTP_PROXY);
const agent = new http.Agent({keepAlive: true});
http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  const target = `http://127.0.0.1:${process.env.BANK_PORT}/v1/charges?ms=${url.searchParams.get("ms")}`;
  const body = JSON.stringify({order_id: url.searchParams.get("order"), amount: 12.5});
  const call = http.request({host: proxy.hostname, port: proxy.port, method: "POST", path: target, agent,
                             headers: {"Content-Type": "application/json", "Content-Length": Buffer.byteLength(body)}},
    (answer) => { let text = ""; answer.on("data", (c) => (text += c));
                  answer.on("end", () => { res.writeHead(200); res.end(text); }); });
  call.setTimeout(Number(process.env.CALLER_TIMEOUT_MS), () => call.destroy(new Error("timeout")));
  call.on("error", () => { res.writeHead(504); res.end("bank timed out"); });
  call.end(body);
}).listen(Number(process.argv[2]), "127.0.0.1");
"""


@pytest.fixture()
def node() -> None:
    if shutil.which("node") is None:
        pytest.skip("node not installed: the service here is a plain Node.js server")


def _sidecar(collector: CollectorProcess, mode: tuple[str, ...] = ("--egress",),
             service: str = "checkout") -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "payscope", "sidecar", *mode, "--listen", f"127.0.0.1:{port}",
                             "--service", service, "--collector", collector.http_url, "--timeout", "5"],
                            env=dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100"), stderr=subprocess.PIPE, text=True)
    wait_port(port)
    return proc, port


@pytest.fixture()
def egress(node: None, collector: CollectorProcess) -> Iterator[int]:
    proc, port = _sidecar(collector)
    try:
        yield port
    finally:
        if proc.poll() is None:
            _stop(proc)


def test_a_non_python_services_calls_become_an_edge_with_its_timeout_inferred(
        tmp_path: Path, egress: int, collector: CollectorProcess, store_path: Path) -> None:
    with node_server(BANK_JS, tmp_path) as bank, \
            node_server(CHECKOUT_JS.replace("process.env.BANK_PORT", str(bank))
                        .replace("process.env.HTTP_PROXY", json.dumps(f"http://127.0.0.1:{egress}"))
                        .replace("process.env.CALLER_TIMEOUT_MS", str(CALLER_TIMEOUT_MS)), tmp_path) as checkout:
        answers = []
        conn = http.client.HTTPConnection("127.0.0.1", checkout, timeout=10)
        for i in range(16):
            slow = i % 4 == 3  # 4 of 16 calls take longer than the caller waits
            conn.request("GET", f"/pay?order=ord-e{i}&ms={BANK_SLOW_MS if slow else 15}")
            answer = conn.getresponse()
            answers.append((slow, answer.status, answer.read()))
        conn.close()
    assert [status for _, status, _ in answers] == [504 if i % 4 == 3 else 200 for i in range(16)]
    assert all(text == b"bank timed out" for slow, _, text in answers if slow)
    seen = [json.loads(text)["traceparent"] for slow, _, text in answers if not slow]
    assert all(tp and tp.startswith("00-") for tp in seen)  # the bank was told which span called it
    collector.stop()

    with open_store(str(store_path), readonly=True) as store:
        rows = [r for s in store.traces(limit=None) for r in store.trace_rows(s.trace_id)]
    assert len(rows) == 16 and {(r.service, r.kind) for r in rows} == {("checkout", "client")}
    by_span = {r.span_id: r for r in rows}
    assert all(tp.split("-")[2] in by_span for tp in seen)
    timed_out = [r for r in rows if r.error_class == "timeout"]
    assert len(timed_out) == 4
    waited = sorted((r.end_ns - r.start_ns) / 1e6 for r in timed_out)
    assert all(CALLER_TIMEOUT_MS - EARLY_MS <= ms < CALLER_TIMEOUT_MS + HANGUP_SLACK_MS for ms in waited), waited
    assert {k for r in rows for k in r.keys} >= {f"ord-e{i}" for i in range(16)}  # from the JSON bodies

    edges = payscope_json("analyze", "--store", str(store_path), "--format", "json")["edges"]
    (edge,) = [e for e in edges if e["caller"] == "checkout"]
    assert edge["timeout"]["source"] == "inferred"
    assert CALLER_TIMEOUT_MS - EARLY_MS <= edge["timeout"]["value_ms"] < CALLER_TIMEOUT_MS + 150


def test_egress_refuses_what_it_cannot_see(egress: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", egress, timeout=5)
    conn.request("GET", "/v1/charges")  # a request meant for a server, not for a proxy
    answer = conn.getresponse()
    assert answer.status == 400 and b"absolute http:// URL" in answer.read()
    conn = http.client.HTTPConnection("127.0.0.1", egress, timeout=5)
    conn.request("CONNECT", "bank.example:443")
    assert conn.getresponse().status == 400


def test_upstream_or_egress_one_of_the_two() -> None:
    for extra in ((), ("--egress", "--upstream", "127.0.0.1:9")):
        proc = payscope("sidecar", "--listen", f"127.0.0.1:{free_port()}", "--service", "x", *extra)
        assert proc.returncode == 2 and "one of the two" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", [("--egress",), ("--upstream", "127.0.0.1:9")])
def test_a_sidecar_that_carried_nothing_stops_at_once(collector: CollectorProcess, mode: tuple[str, ...]) -> None:
    """Its relay is told the sidecar is done even when no span ever went to it, so a stop does not sit out the
    relay's drain wait (RELAY_DRAIN_S) for nothing."""
    proc, _ = _sidecar(collector, mode, service="idle")
    started = time.monotonic()
    _stop(proc)
    assert time.monotonic() - started < RELAY_DRAIN_S / 3
