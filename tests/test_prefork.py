"""Pre-fork servers under `payscope run`: every worker exports its own spans, none lost, none duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from payscope.model import Span
from tests.helpers import CollectorProcess, free_port
from tests.test_instrumentation import SERVICES, _wait_http

REQUESTS = 40
ROUNDS = 8

SERVERS = {
    "gunicorn-sync": ["-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "order:app"],
    "gunicorn-sync-preload": ["-m", "gunicorn", "-w", "2", "--preload", "-b", "127.0.0.1:{port}", "order:app"],
    "gunicorn-gthread": ["-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4", "-b", "127.0.0.1:{port}",
                         "order:app"],
    "uvicorn-workers": ["-m", "uvicorn", "payment:app", "--workers", "2", "--host", "127.0.0.1", "--port", "{port}",
                        "--log-level", "warning"],
}


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_each_worker_exports_everything_once(server: str, tmp_path: Path) -> None:
    store = tmp_path / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    port = free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", PAYSCOPE_QUIET="1", ORDER_LOG=str(tmp_path / "o.log"),
               PAYMENT_LOG=str(tmp_path / "p.log"), PAYMENT_URL="http://127.0.0.1:9", BANK_URL="http://127.0.0.1:9")
    args = [a.replace("{port}", str(port)) for a in SERVERS[server]]
    proc = subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", "svc", "--collector",
                             collector.http_url, "--", sys.executable, *args], cwd=SERVICES, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def served() -> list[Span]:
        if not store.exists():
            return []
        with open_store(str(store), readonly=True) as opened:
            return [s for t in opened.traces(limit=None) for s in opened.trace(t.trace_id)
                    if s.kind == "server" and ("sleep" in s.name or "pay" in s.name)]  # not the readiness probe

    sent = 0
    try:
        _wait_http(port)
        path = "/sleep/0" if server.startswith("gunicorn") else "/pay/x1?delay_ms=0"

        def hit(_: int) -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}"),
                                       timeout=10).read()
            except OSError:
                pass  # payment's bank is unreachable on purpose: the server span is what counts

        # rounds of concurrent requests, so that both workers serve, until both have (a worker may take a while
        # to start on a loaded machine), at most ROUNDS of them
        for _ in range(ROUNDS):
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(hit, range(REQUESTS)))
            sent += REQUESTS
            time.sleep(1.0)
            if len({s.attributes.get("process.pid") for s in served()}) >= 2:
                break
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        time.sleep(0.5)
        collector.stop()
    servers = served()
    assert len(servers) == sent  # none lost, none twice
    pids = {s.attributes.get("process.pid") for s in servers}
    assert len(pids) >= 2, f"all requests were served by one process: {pids}"
