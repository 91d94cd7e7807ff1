"""The official OpenTelemetry JavaScript SDK (a client nobody here wrote) exports to `payscope collect`.

Its HTTP exporters send chunked bodies; a receiver that only reads Content-Length stores nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from tests.helpers import CollectorProcess

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the JavaScript SDK test needs Node.js")
    if not (NODE_DIR / "node_modules" / "@opentelemetry" / "sdk-trace-base").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                       timeout=300, capture_output=True)
    return NODE_DIR / "node_modules"


@pytest.mark.parametrize("flavour", ["json", "proto"])
def test_javascript_sdk_exporter(node_modules: Path, collector: CollectorProcess, store_path: Path,
                                 flavour: str) -> None:
    proc = subprocess.run(["node", str(NODE_DIR / "client.js"), f"{collector.http_url}/v1/traces", flavour],
                          capture_output=True, text=True, timeout=60, cwd=NODE_DIR)
    assert proc.returncode == 0, proc.stderr
    trace_id = proc.stdout.strip()
    with open_store(str(store_path), readonly=True) as store:
        spans = store.trace(trace_id)
        assert {s.kind for s in spans} == {"server", "client"}
        assert all(s.service == "node-payments" for s in spans)
        client = next(s for s in spans if s.kind == "client")
        assert client.is_error and client.status_message == "ETIMEDOUT"
        summary = store.trace_summary(trace_id)
        assert summary is not None and summary.error_class == "timeout"


def test_a_node_service_in_the_middle_keeps_the_trace_whole(node_modules: Path, collector: CollectorProcess,
                                                            store_path: Path, tmp_path: Path) -> None:
    import os
    import signal
    import sys

    from tests.helpers import free_port
    from tests.test_instrumentation import _payscope_run, _wait_http

    bank_port, node_port = free_port(), free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", PAYSCOPE_QUIET="1")
    bank = _payscope_run("bank", collector, sys.executable, "bank.py", str(bank_port), str(tmp_path / "bank.log"),
                         env=env)
    node = subprocess.Popen(["node", str(NODE_DIR / "server.js"), str(node_port), f"http://127.0.0.1:{bank_port}",
                             f"{collector.http_url}/v1/traces"], cwd=NODE_DIR, stdout=subprocess.PIPE, text=True)
    try:
        _wait_http(bank_port)
        _wait_http(node_port)
        script = tmp_path / "shopper.py"
        script.write_text("import sys, requests\n"
                          "r = requests.post(sys.argv[1], json={}, timeout=5)\nprint(r.status_code)\n")
        proc = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "shopper", "--collector",
                               collector.http_url, "--", sys.executable, str(script),
                               f"http://127.0.0.1:{node_port}/orders/ord-9"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.stdout.strip() == "200", proc.stderr
        time.sleep(1.0)
    finally:
        bank.send_signal(signal.SIGTERM)
        node.send_signal(signal.SIGTERM)
        bank.communicate(timeout=20)
        node.communicate(timeout=20)
    with open_store(str(store_path), readonly=True) as store:
        traces = [t for t in store.traces(limit=None) if "shopper" in t.services]  # not the readiness probe
        assert len(traces) == 1
        spans = store.trace(traces[0].trace_id)
        assert {s.service for s in spans} == {"shopper", "node-orders", "bank"}
        by_id = {s.span_id: s for s in spans}
        bank_server = next(s for s in spans if s.service == "bank" and s.kind == "server")
        node_client = by_id[bank_server.parent_id or ""]
        assert node_client.service == "node-orders" and node_client.kind == "client"
        node_server = by_id[node_client.parent_id or ""]
        assert by_id[node_server.parent_id or ""].service == "shopper"
