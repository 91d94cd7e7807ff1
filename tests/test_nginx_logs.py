"""Logs written by real programs, linked to the right transactions: a real nginx in front of the chain.

shopper -> nginx (proxy_read_timeout 300 ms, access log with request ids) -> order (gunicorn, --timeout 2)
-> payment -> bank. Two orders are slow: nginx gives up first. One request outlives gunicorn's timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import LogQuery, open_store
from tests.helpers import CollectorProcess, free_port, payscope, payscope_json, stop_all
from tests.test_instrumentation import SERVICES, _payscope_run, _wait_http

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
DELAYS = [20, 600, 30, 650, 25]
SLOW = ["ord-1001", "ord-1003"]

NGINX_CONF = """
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    log_format payscope '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
                        '"$http_referer" "$http_user_agent" rt=$request_time urt=$upstream_response_time '
                        'rid=$request_id us=$upstream_status msec=$msec';
    access_log {tmp}/nginx-access.log payscope;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{order_port};
            proxy_set_header X-Request-ID $request_id;
            proxy_read_timeout 300ms;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/run installs it from Debian's packages)")
    tmp = tmp_path_factory.mktemp("nginx")
    store_path = tmp / "payscope.db"
    collector = CollectorProcess(store_path, grpc=False)
    ports = {name: free_port() for name in ("bank", "payment", "order", "nginx")}
    logs = {name: tmp / f"{name}.log" for name in ("bank", "payment", "order", "shopper")}
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", OTEL_BLRP_SCHEDULE_DELAY="100",
               BANK_URL=f"http://127.0.0.1:{ports['bank']}", PAYMENT_URL=f"http://127.0.0.1:{ports['payment']}",
               PAYMENT_LOG=str(logs["payment"]), ORDER_LOG=str(logs["order"]), PAYSCOPE_QUIET="1")
    procs = [
        _payscope_run("bank", collector, sys.executable, "bank.py", str(ports["bank"]), str(logs["bank"]), env=env),
        _payscope_run("payment", collector, sys.executable, "-m", "uvicorn", "payment:app", "--host", "127.0.0.1",
                      "--port", str(ports["payment"]), "--log-level", "warning", env=env),
        _payscope_run("order", collector, sys.executable, "-m", "gunicorn", "-w", "2", "--timeout", "2",
                      "--error-logfile", str(tmp / "gunicorn.log"), "-b", f"127.0.0.1:{ports['order']}", "order:app",
                      env=env),
    ]
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=ports["nginx"], order_port=ports["order"],
                                      user="user root;" if os.geteuid() == 0 else ""))
    nginx = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log"),
                              "-g", "daemon off;"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(nginx)  # type: ignore[arg-type]
    try:
        for port in ports.values():
            _wait_http(port)
        shopper = subprocess.run(
            [sys.executable, "-m", "payscope", "run", "--service", "shopper", "--collector", collector.http_url, "--",
             sys.executable, "shopper.py", f"http://127.0.0.1:{ports['nginx']}", str(logs["shopper"]),
             ",".join(map(str, DELAYS))], cwd=SERVICES, env=env, capture_output=True, text=True, timeout=60)
        assert shopper.returncode == 0, shopper.stderr
        try:  # outlives gunicorn's 2 s worker timeout: the arbiter kills the worker
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{ports['order']}/sleep/4", data=b""),
                                   timeout=10)
        except OSError:
            pass
        time.sleep(1.5)
        yield {"store": store_path, "tmp": tmp, **logs}
    finally:
        stop_all(procs)
        collector.stop()


def _ingest(world: dict[str, Path], *paths: tuple[str, Path]) -> None:
    for service, path in paths:
        payscope("ingest", "logs", str(path), "--service", service, "--store", str(world["store"]), check=True)


def test_every_line_lands_on_its_transaction_with_its_method(world: dict[str, Path]) -> None:
    tmp = world["tmp"]
    _ingest(world, ("gateway", tmp / "nginx-access.log"), ("gateway", tmp / "nginx-error.log"),
            ("order", world["order"]), ("payment", world["payment"]), ("bank", world["bank"]),
            ("order", tmp / "gunicorn.log"))
    with open_store(str(world["store"]), readonly=True) as store:
        trace_of = {f"ord-{1000 + i}": store.traces_by_key(f"ord-{1000 + i}")[0] for i in range(len(DELAYS))}
        records = [r for _, r in store.search_logs(LogQuery(limit=None))]
    access = [r for r in records if r.source.startswith("nginx-access") and "/orders/" in r.message]
    assert len(access) == len(DELAYS)
    for r in access:
        order_id = r.attributes["path"].split("/")[2].split("?")[0]
        assert (r.link_method, r.trace_id) == ("request_id", trace_of[order_id]), r
        assert (r.attributes["status"] == "504") == (order_id in SLOW)
    timeouts = [r for r in records if r.source.startswith("nginx-error") and "upstream timed out" in r.message]
    assert len(timeouts) == len(SLOW)
    for r in timeouts:
        order_id = r.attributes["path"].split("/")[2].split("?")[0]
        assert (r.link_method, r.trace_id) == ("business_key", trace_of[order_id])
    for service in ("order", "payment", "bank"):
        # a line also sent over OTLP is that one record, with both sources
        lines = [r for r in records if f"{service}.log:" in r.source]
        assert len(lines) == len({r.source for r in lines}), service
        assert lines and all(r.link_method == "trace_id" for r in lines), service
        for r in lines:
            mentioned = [o for o in trace_of if o in r.message]
            if mentioned:
                assert r.trace_id == trace_of[mentioned[0]]
    with open_store(str(world["store"]), readonly=True) as store:
        for r in access:  # nginx's request id went on from order to payment, though order's code never passes it
            payment = [s for s in store.trace(r.trace_id or "") if s.service == "payment" and s.kind == "server"]
            assert payment and payment[0].attributes["http.request.header.x_request_id"] == [r.attributes["request_id"]]
    killed = [r for r in records if r.source.startswith("gunicorn") and "WORKER TIMEOUT" in r.message]
    assert killed and killed[0].attributes["event"] == "worker_timeout" and killed[0].severity == "FATAL"


def test_the_gateway_shows_up_in_the_analysis_from_its_logs(world: dict[str, Path]) -> None:
    test_every_line_lands_on_its_transaction_with_its_method(world)  # idempotent: the same lines twice are once
    doc = payscope_json("analyze", "--store", str(world["store"]))
    edges = {(e["caller"], e["callee"]): e for e in doc["edges"]}
    gateway = edges[("gateway", "order")]
    assert gateway["timeout"]["source"] == "inferred"
    assert 295 <= gateway["timeout"]["value_ms"] <= 320  # proxy_read_timeout 300ms, read off the access log
    kinds = {(f["kind"], f["edge"]["caller"], f["edge"]["callee"]) for f in doc["findings"]}
    # nginx waits 300 ms for order, which itself waits up to 500 ms for payment
    assert ("timeout_inversion", "gateway", "order") in kinds
