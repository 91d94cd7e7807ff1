"""`payscope run` over real services in separate processes: gunicorn (2 workers), uvicorn, plain scripts.

shopper (requests) -> order (Flask on gunicorn, httpx) -> payment (FastAPI on uvicorn, aiohttp) -> bank
(http.server). One order is slow at the bank: order's 0.5 s timeout fires while payment goes on.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from tests.helpers import CollectorProcess, free_port, payscope, payscope_json, stop_all, wait_port

SERVICES = Path(__file__).parent / "services"
DELAYS = [20, 30, 900, 25]
SLOW = "ord-1002"


def _payscope_run(service: str, collector: CollectorProcess, *command: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", service,
                             "--collector", collector.http_url, "--", *command],
                            cwd=SERVICES, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_http(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on {port}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("chain")
    store_path = tmp / "payscope.db"
    collector = CollectorProcess(store_path, grpc=False)
    ports = {name: free_port() for name in ("bank", "payment", "order")}
    logs = {name: tmp / f"{name}.log" for name in ("bank", "payment", "order", "shopper")}
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", OTEL_BLRP_SCHEDULE_DELAY="100",
               BANK_URL=f"http://127.0.0.1:{ports['bank']}", PAYMENT_URL=f"http://127.0.0.1:{ports['payment']}",
               PAYMENT_LOG=str(logs["payment"]), ORDER_LOG=str(logs["order"]),
               OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST="authorization,x-request-id")
    procs = [
        _payscope_run("bank", collector, sys.executable, "bank.py", str(ports["bank"]), str(logs["bank"]), env=env),
        _payscope_run("payment", collector, sys.executable, "-m", "uvicorn", "payment:app", "--host", "127.0.0.1",
                      "--port", str(ports["payment"]), "--log-level", "warning", env=env),
        _payscope_run("order", collector, sys.executable, "-m", "gunicorn", "-w", "2", "-b",
                      f"127.0.0.1:{ports['order']}", "order:app", env=env),
    ]
    try:
        for port in ports.values():
            _wait_http(port)
        shopper = subprocess.run(
            [sys.executable, "-m", "payscope", "run", "--service", "shopper", "--collector", collector.http_url, "--",
             sys.executable, "shopper.py", f"http://127.0.0.1:{ports['order']}", str(logs["shopper"]),
             ",".join(map(str, DELAYS))], cwd=SERVICES, env=env, capture_output=True, text=True, timeout=60)
        assert shopper.returncode == 0, shopper.stderr
        time.sleep(1.5)  # payment finishes the slow charge after order gave up; let every batch go out
        yield {"store": store_path, "logs": logs, "shopper": shopper}
    finally:
        stop_all(procs)
        collector.stop()


def _order_traces(store_path: Path) -> dict[str, str]:
    with open_store(str(store_path), readonly=True) as store:
        return {f"ord-{1000 + i}": store.traces_by_key(f"ord-{1000 + i}")[0] for i in range(len(DELAYS))}


def test_one_trace_id_end_to_end(chain: dict[str, object]) -> None:
    store_path = chain["store"]
    assert isinstance(store_path, Path)
    traces = _order_traces(store_path)
    with open_store(str(store_path), readonly=True) as store:
        for order_id, trace_id in traces.items():
            services = {s.service for s in store.trace(trace_id)}
            expected = {"shopper", "order", "payment", "bank"}
            assert services == expected, (order_id, services)


def test_every_client_span_has_its_timeout_and_source(chain: dict[str, object]) -> None:
    store_path = chain["store"]
    assert isinstance(store_path, Path)
    seen: dict[str, tuple[object, ...]] = {}
    with open_store(str(store_path), readonly=True) as store:
        for trace_id in _order_traces(store_path).values():
            for span in store.trace(trace_id):
                if span.kind != "client":
                    continue
                a = span.attributes
                assert "payscope.timeout.source" in a, (span.service, span.name, a)
                seen[span.service] = (a["payscope.timeout.source"], a.get("payscope.timeout.connect_ms"),
                                      a.get("payscope.timeout.read_ms"), a.get("payscope.timeout.total_ms"))
    assert seen["shopper"] == ("argument", 500.0, 2000.0, None)       # requests, timeout=(0.5, 2.0)
    assert seen["order"] == ("client", 200.0, 500.0, None)            # httpx.Timeout(0.5, connect=0.2)
    assert seen["payment"] == ("session", 200.0, None, 1000.0)        # aiohttp ClientTimeout(total=1)


def test_the_timed_out_call_is_a_timeout_and_a_late_success(chain: dict[str, object]) -> None:
    store_path = chain["store"]
    assert isinstance(store_path, Path)
    slow = _order_traces(store_path)[SLOW]
    shown = payscope_json("show", SLOW, "--store", str(store_path))
    assert shown["trace_ids"] == [slow]
    tx = shown["transactions"][0]
    assert tx["outcome"] == "late_success"
    assert (tx["failing_hop"]["caller"], tx["failing_hop"]["callee"]) == ("order", "payment")
    assert tx["error_class"] == "timeout"
    doc = payscope_json("analyze", "--store", str(store_path))
    late = [f for f in doc["findings"] if f["kind"] == "late_success"]
    assert [(f["edge"]["caller"], f["edge"]["callee"]) for f in late] == [("order", "payment")]
    order_payment = next(e for e in doc["edges"] if (e["caller"], e["callee"]) == ("order", "payment"))
    assert order_payment["timeout"]["source"] == "captured" and order_payment["timeout"]["value_ms"] == 500.0


def test_log_lines_carry_the_trace_id(chain: dict[str, object]) -> None:
    store_path, logs = chain["store"], chain["logs"]
    assert isinstance(store_path, Path) and isinstance(logs, dict)
    slow = _order_traces(store_path)[SLOW]
    for service in ("order", "payment", "bank"):
        text = logs[service].read_text()
        lines = [line for line in text.splitlines() if SLOW in line]
        assert lines and all(f"trace_id={slow}" in line for line in lines), (service, lines)
    with open_store(str(store_path), readonly=True) as store:
        exported = store.logs_of_trace(slow)
        assert {r.service for r in exported} >= {"order", "payment", "bank"}


def test_no_card_number_or_authorization_reaches_the_store(chain: dict[str, object]) -> None:
    store_path = chain["store"]
    assert isinstance(store_path, Path)
    conn = sqlite3.connect(store_path)
    blob = b"".join(bytes(r[0]) for r in conn.execute("SELECT body FROM spans"))
    text = " ".join(str(r) for r in conn.execute("SELECT * FROM logs"))
    conn.close()
    assert b"top-secret-token" not in blob and "top-secret-token" not in text
    # the shopper's card, 4111 1111 1111 1111, in any spelling, or its first four digits on their own; not the four
    # digits inside another number (a random port such as 54111 in a URL)
    assert not re.search(rb"(?<![0-9])4111(?:[ -]?1111){0,3}(?![0-9])", blob), blob


def test_output_and_exit_code_pass_through_even_without_a_collector(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text("import sys, logging\nlogging.basicConfig(level=logging.INFO)\n"
                      "print('hello', sys.argv[1:])\nlogging.getLogger('x').info('to stderr')\n"
                      "sys.stdout.write(sys.stdin.read().upper())\nsys.exit(7)\n")
    plain = subprocess.run([sys.executable, str(script), "a", "b"], input="paid\n", capture_output=True, text=True)
    dead = f"http://127.0.0.1:{free_port()}"
    wrapped = payscope("run", "--collector", dead, "--", sys.executable, str(script), "a", "b", input_text="paid\n",
                       env={"PAYSCOPE_QUIET": "1"})
    assert (wrapped.returncode, wrapped.stdout, wrapped.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert plain.returncode == 7
    # not quiet: what payscope adds to the service's stderr is its own one-line notices, never an exporter's log
    told = payscope("run", "--collector", dead, "--", sys.executable, str(script), "a", "b", input_text="paid\n")
    added = [line for line in told.stderr.splitlines() if line not in plain.stderr.splitlines()]
    assert told.returncode == 7 and all(line.startswith("payscope:") for line in added), added


def test_b3_and_jaeger_headers_are_continued(tmp_path: Path, collector: CollectorProcess, store_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100")
    server = _payscope_run("bank", collector, sys.executable, "bank.py", str(port), str(tmp_path / "b.log"), env=env)
    try:
        _wait_http(port)
        cases = {
            "b3-single": ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
                          "80f198ee56343ba864fe8b2a57d3eff7"),
            "b3-multi": ("X-B3-TraceId", "463ac35c9f6413ad48485a3953bb6124", "463ac35c9f6413ad48485a3953bb6124"),
            "jaeger": ("uber-trace-id", "5f0b7f5fd3e3cf4a4b0c3d2e1f0a9b8c:a1b2c3d4e5f60718:0:1",
                       "5f0b7f5fd3e3cf4a4b0c3d2e1f0a9b8c"),
        }
        for header, value, _ in cases.values():
            headers = {header: value}
            if header == "X-B3-TraceId":
                headers.update({"X-B3-SpanId": "a2fb4a1d1a96d312", "X-B3-Sampled": "1"})
            req = urllib.request.Request(f"http://127.0.0.1:{port}/charge", data=b"{}", headers=headers)
            urllib.request.urlopen(req, timeout=5).read()
        deadline = time.monotonic() + 10
        with open_store(str(store_path), readonly=True) as store:
            while time.monotonic() < deadline and not all(store.trace(t) for _, _, t in cases.values()):
                time.sleep(0.2)
            for name, (_, _, trace_id) in cases.items():
                assert store.trace(trace_id), f"{name}: the incoming trace was restarted, not continued"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=10)


@pytest.mark.parametrize("mode", ["client", "stream"])
def test_grpc_deadlines_are_recorded(mode: str, tmp_path: Path, collector: CollectorProcess,
                                     store_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", PAYSCOPE_QUIET="1")
    server = _payscope_run("bank", collector, sys.executable, "grpc_pair.py", "server", str(port), env=env)
    sleeps = "10,600" if mode == "client" else "10,200"  # a stream of three parts: 30 ms, then 600 ms
    try:
        wait_port(port)
        client = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "payment", "--collector",
                                 collector.http_url, "--", sys.executable, "grpc_pair.py", mode, str(port),
                                 "0.25", sleeps], cwd=SERVICES, env=env, capture_output=True, text=True, timeout=60)
        assert client.stdout.split() == ["OK", "DEADLINE_EXCEEDED"], client.stderr
        time.sleep(1.0)
    finally:
        stop_all([server])
    with open_store(str(store_path), readonly=True) as store:
        clients = [s for t in store.traces(limit=None) for s in store.trace(t.trace_id) if s.kind == "client"]
        rows = [r for t in store.traces(limit=None) for r in store.trace_rows(t.trace_id) if r.kind == "client"]
    assert len(clients) == 2
    assert {s.name for s in clients} == {"/payments.Bank/Charge" if mode == "client" else "/payments.Bank/Settle"}
    assert all(s.attributes["payscope.timeout.total_ms"] == 250.0 and
               s.attributes["payscope.timeout.source"] == "argument" for s in clients)
    assert sorted(r.error_class or "ok" for r in rows) == ["ok", "timeout"]
