"""Business keys from what requests carry (query, headers, JSON bodies), on the server spans of real
services started by `payscope run`, while the application still reads the body it was sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from payscope.instrumentation.keys import from_json, from_pairs, key_names
from tests.helpers import CollectorProcess, free_port, stop_all, wait_port

APPS = {
    "flask": textwrap.dedent("""
        from flask import Flask, jsonify, request

        app = Flask(__name__)


        @app.post("/pay")
        def pay():
            return jsonify({"seen": request.get_json()})
    """),
    "fastapi": textwrap.dedent("""
        from fastapi import FastAPI, Request

        app = FastAPI()


        @app.post("/pay")
        async def pay(request: Request):
            return {"seen": await request.json()}
    """),
}
COMMANDS = {
    "flask": ["-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "keyed_flask:app"],
    "fastapi": ["-m", "uvicorn", "keyed_fastapi:app", "--host", "127.0.0.1", "--port", "{port}", "--log-level",
                "warning"],
}


def test_names_are_matched_loosely_and_configurably() -> None:
    names = key_names("basket=order_id,txn.ref=payment_id")
    assert from_pairs([("orderId", "o-1"), ("X-Payment-Id", "p-1"), ("Amount", "3")], names) == {
        "order_id": "o-1", "payment_id": "p-1", "amount": "3"}
    assert from_pairs([("basket", "b-7")], names) == {"order_id": "b-7"}
    body = json.dumps({"txn": {"ref": "t-9"}, "order": {"id": "o-2", "lines": [1]}, "amount": {"value": 12.5}})
    assert from_json(body.encode(), names) == {"payment_id": "t-9", "order_id": "o-2", "amount": "12.5"}
    assert from_json(b"[1, 2]", names) == {} and from_json(b"{not json", names) == {}
    assert from_json(json.dumps({"id": "x", "paid": True}).encode(), names) == {}  # no guessing from "id"


@pytest.mark.parametrize("framework", ["flask", "fastapi"])
def test_json_body_and_header_keys_reach_the_server_span(framework: str, tmp_path: Path,
                                                         collector: CollectorProcess, store_path: Path) -> None:
    (tmp_path / f"keyed_{framework}.py").write_text(APPS[framework])
    port = free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", PAYSCOPE_QUIET="1", PYTHONPATH=str(tmp_path))
    command = [part.format(port=port) for part in COMMANDS[framework]]
    server = subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", "pay", "--collector",
                               collector.http_url, "--", sys.executable, *command], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        body = {"order": {"id": "ord-77"}, "amount": 12.5, "note": "x" * 100}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/pay?channel=web", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "X-Payment-Id": "pay-9"})
        answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert answer == {"seen": body}  # the application still read the whole body
        deadline = time.monotonic() + 10
        with open_store(str(store_path), readonly=True) as store:
            while time.monotonic() < deadline and not store.traces_by_key("ord-77"):
                time.sleep(0.2)
            found = store.traces_by_key("ord-77")
            assert found, "the order id in the JSON body did not reach the store"
            server_spans = [s for s in store.trace(found[0]) if s.kind == "server"]
    finally:
        stop_all([server])
    assert len(server_spans) == 1
    attrs = server_spans[0].attributes
    assert (attrs["payscope.order_id"], attrs["payscope.payment_id"], attrs["payscope.amount"]) == (
        "ord-77", "pay-9", "12.5")


SCRIPT = """
from opentelemetry import trace
with trace.get_tracer("t").start_as_current_span("GET /pay", kind=trace.SpanKind.SERVER,
                                                 attributes={"url.query": "basket=b-41&total=9.90"}):
    pass
"""


def test_payscope_toml_names_the_service_the_collector_and_more_keys(tmp_path: Path, collector: CollectorProcess,
                                                                     store_path: Path) -> None:
    (tmp_path / "job.py").write_text(SCRIPT)
    (tmp_path / "payscope.toml").write_text(textwrap.dedent(f"""
        [run]
        service = "checkout"
        collector = "{collector.http_url}"
        quiet = true

        [keys]
        order_id = ["basket"]
        amount = "total"
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("OTEL_SERVICE_NAME", "PAYSCOPE_COLLECTOR")}
    done = subprocess.run([sys.executable, "-m", "payscope", "run", "--", sys.executable, "job.py"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # quiet = true: no start-up line
    deadline = time.monotonic() + 10
    with open_store(str(store_path), readonly=True) as store:
        while time.monotonic() < deadline and not store.traces_by_key("b-41"):
            time.sleep(0.2)
        found = store.traces_by_key("b-41")
        assert found
        (span,) = store.trace(found[0])
    assert span.service == "checkout" and span.attributes["payscope.amount"] == "9.90"


@pytest.mark.parametrize(("text", "message"), [
    ("[run]\nservise = 'x'\n", "[run] servise is not a setting"),
    ("[run]\nexport = 'sometimes'\n", "export must be \"relay\" or \"inprocess\""),
    ("[run]\nemit_sw8 = 'yes'\n", "[run] emit_sw8 must be true or false"),
    ("[keys]\ncustomer_id = ['c']\n", "[keys] customer_id is not a business key"),
    ("[rnu]\n", "unknown table [rnu]"),
    ("[run\nservice = 'x'\n", "not valid TOML"),
])
def test_a_bad_payscope_toml_is_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "payscope.toml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "payscope", "run", "--", sys.executable, "-c", "print('ran')"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""  # the program did not run
    assert "payscope.toml" in done.stderr and message in done.stderr, done.stderr


RELAYING_APP = textwrap.dedent("""
    import os
    import requests
    from flask import Flask, jsonify

    app = Flask(__name__)


    @app.get("/pay")
    def pay():
        echoed = requests.get(os.environ["ECHO_URL"], timeout=5).json()
        return jsonify(echoed)
""")


def test_a_configured_request_id_header_is_recorded_and_passed_on(tmp_path: Path, collector: CollectorProcess,
                                                                   store_path: Path) -> None:
    import http.server
    import threading

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            payload = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    echo = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    (tmp_path / "relaying.py").write_text(RELAYING_APP)
    (tmp_path / "payscope.toml").write_text('[run]\nrequest_id_header = "X-Correlation-ID"\n')
    port = free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", PAYSCOPE_QUIET="1", PYTHONPATH=str(tmp_path),
               ECHO_URL=f"http://127.0.0.1:{echo.server_address[1]}/")
    server = subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", "gateway", "--collector",
                               collector.http_url, "--", sys.executable, "-m", "gunicorn", "-w", "1", "-b",
                               f"127.0.0.1:{port}", "relaying:app"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/pay", headers={"X-Correlation-ID": "corr-123"})
        echoed = json.loads(urllib.request.urlopen(request, timeout=10).read())
        deadline = time.monotonic() + 10
        with open_store(str(store_path), readonly=True) as store:
            while time.monotonic() < deadline and not store.traces(limit=None):
                time.sleep(0.2)
            (summary,) = store.traces(limit=None)
            server_span = next(s for s in store.trace(summary.trace_id) if s.kind == "server")
    finally:
        stop_all([server])
        echo.shutdown()
        echo.server_close()
    assert echoed["x-correlation-id"] == "corr-123" and "x-request-id" not in echoed  # passed on, under its name
    assert server_span.attributes["payscope.request_id"] == "corr-123"


def test_emit_sw8_in_payscope_toml_reaches_the_program(tmp_path: Path) -> None:
    (tmp_path / "payscope.toml").write_text("[run]\nemit_sw8 = true\nquiet = true\n")
    env = {k: v for k, v in os.environ.items() if k != "PAYSCOPE_EMIT_SW8"}
    done = subprocess.run([sys.executable, "-m", "payscope", "run", "--", sys.executable, "-c",
                           "import os; print(os.environ.get('PAYSCOPE_EMIT_SW8'))"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


@pytest.mark.parametrize("key", ["OrderId", "order_id", "app.payment.ID", "Request_ID", "x-request-id"])
def test_a_spans_keys_do_not_depend_on_how_its_request_was_decoded(key: str) -> None:
    """The collector takes a fast path for a request with nothing to mask and decodes the rest whole. A span's
    business keys and request ids are the same either way, in any spelling of the key."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from payscope.collector.otlp import spans_from_request

    def request(masked_elsewhere: bool) -> ExportTraceServiceRequest:
        req = ExportTraceServiceRequest()
        scope = req.resource_spans.add().scope_spans.add()
        for i, value in enumerate(("ord-4417", "the card's cvv was asked for") if masked_elsewhere else ("ord-4417",)):
            span = scope.spans.add(trace_id=bytes([i + 1]) * 16, span_id=bytes([i + 1]) * 8, name="POST /pay",
                                   kind=2, start_time_unix_nano=1, end_time_unix_nano=2)
            kv = span.attributes.add()
            kv.key, kv.value.string_value = (key, value) if i == 0 else ("note", value)
        return req

    fast, careful = (spans_from_request(request(flag)).spans[0].row for flag in (False, True))
    expected = ("rid:ord-4417",) if "request" in key.lower() else ("ord-4417",)
    assert fast.keys == careful.keys == expected
