"""`payscope sidecar` in front of a service that is not instrumented at all (a plain Node.js HTTP
server): its requests join the caller's trace, its timeouts are seen, its answers pass unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from tests.helpers import CollectorProcess, free_port, node_server, payscope, wait_port

BANK_JS = """
const http = require("http");
http.createServer((req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", () => {
    const answer = () => {
      res.writeHead(200, {"Content-Type": "application/json", "X-Bank": "plain-node"});
      res.end(JSON.stringify({traceparent: req.headers["traceparent"] || null,
                              request_id: req.headers["x-request-id"] || null, body}));
    };
    if (req.url.startsWith("/slow")) setTimeout(answer, 1500); else answer();
  });
}).listen(Number(process.argv[2]), "127.0.0.1");
"""

CALLER = """
import json, sys
import requests
from opentelemetry import trace

base = sys.argv[1]
body = json.dumps({"amount": 40, "card": "4111 1111 1111 1111", "note": "é ü"}).encode()
with trace.get_tracer("payment").start_as_current_span("POST /pay", kind=trace.SpanKind.SERVER) as span:
    r = requests.post(base + "/charge?order_id=ord-s1", data=body, timeout=5,
                      headers={"Content-Type": "application/json", "Authorization": "Bearer side-s3cret"})
    print(json.dumps({"trace_id": format(span.get_span_context().trace_id, "032x"), "status": r.status_code,
                      "bank": r.headers.get("X-Bank"), "echo": r.json(), "sent": body.decode()}))
with trace.get_tracer("payment").start_as_current_span("POST /pay", kind=trace.SpanKind.SERVER):
    r = requests.post(base + "/slow?order_id=ord-s2", json={"amount": 1}, timeout=5)
    print(json.dumps({"status": r.status_code}))
"""


@pytest.fixture()
def bank(tmp_path: Path) -> Iterator[int]:
    if shutil.which("node") is None:
        pytest.skip("node not installed: the sidecar test puts it in front of a Node.js service")
    with node_server(BANK_JS, tmp_path) as port:
        yield port


def test_sidecar_puts_an_uninstrumented_service_into_the_trace(tmp_path: Path, bank: int,
                                                               collector: CollectorProcess, store_path: Path) -> None:
    port = free_port()
    sidecar = subprocess.Popen([sys.executable, "-m", "payscope", "sidecar", "--listen", f"127.0.0.1:{port}",
                                "--upstream", f"127.0.0.1:{bank}", "--service", "bank", "--collector",
                                collector.http_url, "--timeout", "1"],
                               env=dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100"),
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        (tmp_path / "caller.py").write_text(CALLER)
        done = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "payment", "--collector",
                               collector.http_url, "--", sys.executable, "caller.py", f"http://127.0.0.1:{port}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PAYSCOPE_QUIET="1"))
        assert done.returncode == 0, done.stderr
        first, second = (json.loads(line) for line in done.stdout.splitlines())
    finally:
        sidecar.send_signal(signal.SIGTERM)
        _, err = sidecar.communicate(timeout=20)
    assert sidecar.returncode == 0, err
    assert "payscope sidecar: bank on 127.0.0.1" in err
    # the answer and the request body pass unchanged; the service is told the trace and a request id
    assert (first["status"], first["bank"], first["echo"]["body"]) == (200, "plain-node", first["sent"])
    assert first["echo"]["traceparent"].split("-")[1] == first["trace_id"]
    assert first["echo"]["request_id"]
    assert second["status"] == 504  # the service took 1.5 s; the sidecar waits 1 s
    with open_store(str(store_path), readonly=True) as store:
        deadline = time.monotonic() + 10  # the caller's relay may still be sending after the caller exited
        while time.monotonic() < deadline and not (
                {s.service for s in store.trace(first["trace_id"])} == {"payment", "bank"}
                and store.traces_by_key("ord-s2") and len(store.trace(store.traces_by_key("ord-s2")[0])) == 3):
            time.sleep(0.2)
        spans = store.trace(first["trace_id"])
        rows = {r.span_id: r for r in store.trace_rows(first["trace_id"])}
        slow = store.trace_rows(store.traces_by_key("ord-s2")[0])
    bank_span = next(s for s in spans if s.service == "bank")
    client = next(s for s in spans if s.service == "payment" and s.kind == "client")
    assert bank_span.kind == "server" and bank_span.parent_id == client.span_id
    assert bank_span.attributes["payscope.order_id"] == "ord-s1" and bank_span.attributes["payscope.amount"] == "40"
    assert rows[bank_span.span_id].error_class is None
    assert bank_span.attributes["http.request.header.x-request-id"] == [first["echo"]["request_id"]]
    assert [r.error_class for r in slow if r.service == "bank"] == ["timeout"]
    conn = sqlite3.connect(store_path)
    blob = b"".join(bytes(r[0]) for r in conn.execute("SELECT body FROM spans"))
    conn.close()
    # the card's digits, not its first four: a port or an id in the spans may hold "4111" by chance
    assert b"side-s3cret" not in blob and b"4111 1111 1111" not in blob and b"4111111111111111" not in blob


def test_sidecar_refuses_a_bad_address_with_the_reason() -> None:
    proc = payscope("sidecar", "--listen", "nowhere", "--upstream", "127.0.0.1:1", "--service", "x")
    assert proc.returncode == 2 and "--listen 'nowhere' is not HOST:PORT" in proc.stderr
