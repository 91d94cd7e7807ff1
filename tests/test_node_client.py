"""The official OpenTelemetry JavaScript SDK (a client nobody here wrote) exports to `payscope collect`.

Its HTTP exporters send chunked bodies; a receiver that only reads Content-Length stores nothing.
"""

from __future__ import annotations

import shutil
import subprocess
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
