"""The SkyWalking bridge: `sw8` headers written by the real Apache SkyWalking Python agent continue as one
trace through services under `payscope run`, and go on as `sw8` to the next hop when asked to."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payscope.collector.store import open_store
from payscope.instrumentation import sw8
from tests.helpers import CollectorProcess, free_port, stop_all
from tests.test_instrumentation import SERVICES, _wait_http

CALLS = 3


def _run(service: str, collector: CollectorProcess, port: int, *flags: str, env: dict[str, str]) -> Any:
    return subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", service, *flags,
                             "--collector", collector.http_url, "--", sys.executable, "hop.py", str(port)],
                            cwd=SERVICES, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pytest.importorskip("skywalking", reason="the caller is instrumented by apache-skywalking")
    import json

    store = tmp_path_factory.mktemp("sw8") / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    api, ledger = free_port(), free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100")
    procs = [_run("ledger", collector, ledger, env=env),
             _run("api", collector, api, "--emit-sw8", env=dict(env, NEXT_URL=f"http://127.0.0.1:{ledger}"))]
    try:
        _wait_http(ledger)
        _wait_http(api)
        caller = subprocess.run([sys.executable, "skywalking_caller.py", f"http://127.0.0.1:{api}/work", str(CALLS)],
                                cwd=SERVICES, capture_output=True, text=True, timeout=60)
        assert caller.returncode == 0, caller.stderr[-2000:]
        calls = json.loads(caller.stdout.strip().splitlines()[-1])
        time.sleep(1.5)  # every batch out
    finally:
        stop_all(procs)
        collector.stop()
    with open_store(str(store), readonly=True) as opened:
        traces = [opened.trace_rows(s.trace_id) for s in opened.traces(limit=None)]
    # (the readiness probes of "/" are traces of their own)
    rows = [r for trace in traces if any("/work" in r.operation for r in trace) for r in trace]
    yield {"calls": calls, "rows": rows}


def test_a_skywalking_trace_continues_through_payscope_run(bridged: dict[str, Any]) -> None:
    calls, rows = bridged["calls"], bridged["rows"]
    sw_traces = [c["trace"] for c in calls]
    assert len(set(sw_traces)) == CALLS
    # the Python agent's trace ids are 32 hex digits: they are the OpenTelemetry trace ids as they are
    assert {r.trace_id for r in rows} == set(sw_traces)
    for trace_id in sw_traces:
        spans = {(r.service, r.kind): r for r in rows if r.trace_id == trace_id}
        assert set(spans) == {("api", "server"), ("api", "client"), ("ledger", "server")}
        assert spans[("api", "client")].parent_id == spans[("api", "server")].span_id
        assert spans[("ledger", "server")].parent_id == spans[("api", "client")].span_id
    for call in calls:  # api's parent is the agent's exit span, named by sw8's segment and span
        received = sw8.parse(call["answer"]["received"]["sw8"])
        assert received is not None and received.trace == call["trace"] and received.service == "storefront"
        (server,) = [r for r in rows if r.trace_id == call["trace"] and r.service == "api" and r.kind == "server"]
        assert server.parent_id == format(sw8.parent_span_id_of(received.segment, received.span), "016x")


def test_sw8_goes_on_to_the_next_hop_with_the_skywalking_trace_id(bridged: dict[str, Any]) -> None:
    for call in bridged["calls"]:
        at_ledger = call["answer"]["next"]["received"]
        onward = sw8.parse(at_ledger["sw8"])
        assert onward is not None and onward.trace == call["trace"] and onward.service == "api"
        traceparent = at_ledger["traceparent"].split("-")
        assert traceparent[1] == call["trace"] and onward.segment == traceparent[2]  # both name api's client span
        assert sw8.parent_span_id_of(onward.segment, onward.span) == int(traceparent[2], 16)


@pytest.mark.parametrize("header", [
    "1-bm90LWEtdHJhY2U=",                                 # too few fields
    "2-YQ==-Yg==-0-Yw==-ZA==-ZQ==-Zg==",                  # sample flag neither 0 nor 1
    "1-YQ==-Yg==-x-Yw==-ZA==-ZQ==-Zg==",                  # span id not a number
    "1-%%%-Yg==-0-Yw==-ZA==-ZQ==-Zg==",                   # not base64
])
def test_a_malformed_sw8_is_ignored(header: str) -> None:
    assert sw8.parse(header) is None


def test_a_java_agent_trace_id_maps_to_one_otel_id_everywhere() -> None:
    java = sw8.Sw8(True, "a1b2c3d4e5.54.17335230000010001", "f0e1d2c3.60.17335230000020000", 3, "acquirer",
                   "acquirer-7d9f@10.0.0.7", "POST:/authorize", "ledger:8080")
    parsed = sw8.parse(java.header())
    assert parsed == java
    first = sw8.trace_id_of(parsed.trace)
    assert first == sw8.trace_id_of("a1b2c3d4e5.54.17335230000010001") and 0 < first < 2**128
    assert first != sw8.trace_id_of("a1b2c3d4e5.54.17335230000010002")
    assert sw8.parent_span_id_of(parsed.segment, 3) != sw8.parent_span_id_of(parsed.segment, 4)


ECHO_JS = r"""
const http = require("http");
http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    res.writeHead(200, {"Content-Type": "application/json"});
    const received = {traceparent: req.headers["traceparent"] || null, sw8: req.headers["sw8"] || null};
    res.end(JSON.stringify({received}));
  });
}).listen(Number(process.argv[2]), "127.0.0.1");
"""


def test_the_sidecar_takes_sw8_in_and_sends_it_on(tmp_path: Path) -> None:
    import json
    import shutil
    import signal

    from tests.helpers import node_server, wait_port

    pytest.importorskip("skywalking", reason="the caller is instrumented by apache-skywalking")
    if shutil.which("node") is None:
        pytest.skip("node not installed: the service behind the sidecar is a plain Node.js server")
    store = tmp_path / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    port = free_port()
    with node_server(ECHO_JS, tmp_path) as upstream:
        sidecar = subprocess.Popen([sys.executable, "-m", "payscope", "sidecar", "--listen", f"127.0.0.1:{port}",
                                    "--upstream", f"127.0.0.1:{upstream}", "--service", "acquirer", "--emit-sw8",
                                    "--collector", collector.http_url],
                                   env=dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100"), stderr=subprocess.PIPE)
        try:
            wait_port(port)
            caller = subprocess.run([sys.executable, "skywalking_caller.py", f"http://127.0.0.1:{port}/authorize",
                                     "2"], cwd=SERVICES, capture_output=True, text=True, timeout=60)
            assert caller.returncode == 0, caller.stderr[-2000:]
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.communicate(timeout=30)
            collector.stop()
    calls = json.loads(caller.stdout.strip().splitlines()[-1])
    with open_store(str(store), readonly=True) as opened:
        spans = {s.trace_id: opened.trace_rows(s.trace_id) for s in opened.traces(limit=None)}
    assert set(spans) == {c["trace"] for c in calls}
    for call in calls:
        (server,) = spans[call["trace"]]
        onward = sw8.parse(call["answer"]["received"]["sw8"])
        assert onward is not None and onward.trace == call["trace"] and onward.service == "acquirer"
        assert onward.segment == server.span_id == call["answer"]["received"]["traceparent"].split("-")[2]
