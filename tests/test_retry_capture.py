"""tenacity retry policies on the client spans of the calls they wrap, in a real program under
`payscope run` calling a real HTTP server that is slow at first."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from tests.helpers import CollectorProcess, payscope_json, serving

SCRIPT = """
import asyncio, sys
import httpx, requests, tenacity
from opentelemetry import trace

url = sys.argv[1]
tracer = trace.get_tracer("checkout")


@tenacity.retry(stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_fixed(0.05), reraise=True,
                retry=tenacity.retry_if_exception_type(requests.Timeout))
def charge():
    return requests.post(url + "/slow-twice", json={"amount": 5}, timeout=0.3).status_code


@tenacity.retry(stop=tenacity.stop_after_attempt(3) | tenacity.stop_after_delay(10), reraise=True)
async def refund():
    async with httpx.AsyncClient(timeout=2.0) as client:
        return (await client.post(url + "/fast")).status_code


with tracer.start_as_current_span("checkout"):
    print(charge())
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(2)):
        with attempt:
            print(httpx.get(url + "/fast", timeout=1.0).status_code)
    print(asyncio.run(refund()))
requests.get(url + "/fast", timeout=1.0)  # outside any retry policy
"""


class _SlowTwice(http.server.BaseHTTPRequestHandler):
    calls = 0

    def _answer(self) -> None:
        if self.path == "/slow-twice":
            type(self).calls += 1
            if type(self).calls <= 2:
                time.sleep(0.6)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        try:
            self.wfile.write(b"ok")
        except OSError:
            pass  # the client gave up

    do_GET = do_POST = _answer  # noqa: N815 - the stdlib's names

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def slow_server() -> Iterator[str]:
    _SlowTwice.calls = 0
    with serving(_SlowTwice) as url:
        yield url


def test_tenacity_attempts_and_policy_are_on_each_client_span(tmp_path: Path, slow_server: str,
                                                              collector: CollectorProcess, store_path: Path) -> None:
    (tmp_path / "checkout.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "checkout", "--collector",
                           collector.http_url, "--", sys.executable, "checkout.py", slow_server],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PAYSCOPE_QUIET="1"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "200", "200"]
    deadline = time.monotonic() + 10
    with open_store(str(store_path), readonly=True) as store:
        while time.monotonic() < deadline and len(store.traces(limit=None)) < 2:
            time.sleep(0.2)
        spans = [s for t in store.traces(limit=None) for s in store.trace(t.trace_id) if s.kind == "client"]
    by_path: dict[str, list[dict[str, object]]] = {}
    for span in sorted(spans, key=lambda s: s.start_ns):
        path = str(span.attributes.get("url.full") or span.attributes.get("http.url", "")).rsplit("/", 1)[-1]
        by_path.setdefault(path, []).append(dict(span.attributes))
    charge = by_path["slow-twice"]
    assert [a.get("http.request.resend_count", 0) for a in charge] == [0, 1, 2]
    assert all(a["payscope.retry.max_attempts"] == 4 and a["payscope.retry.library"] == "tenacity" for a in charge)
    fast = by_path["fast"]
    assert [a.get("payscope.retry.max_attempts") for a in fast] == [2, 3, 1]  # Retrying(), async @retry, none
    assert "payscope.retry.library" not in fast[2]
    # the analyzer reads the attempts as one retried call, and a retried POST without a key is a finding
    doc = payscope_json("analyze", "--store", str(store_path))
    retried = [f for f in doc["findings"] if f["kind"] == "non_idempotent_retry"]
    assert [f["edge"]["operation"] for f in retried] == ["POST /slow-twice"]
