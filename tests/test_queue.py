"""A payment that continues through a queue stays one transaction: a real Celery worker (prefork, two
processes) and a real producer, both under `payscope run`, with kombu's filesystem transport as the
broker (a real broker that needs no server)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from payscope.collector.store import open_store
from payscope.model import Span
from tests.helpers import CollectorProcess, payscope_json, stop_all

TASKS = textwrap.dedent("""
    import logging, os
    from celery import Celery

    folder = os.environ["QUEUE_DIR"]
    app = Celery("tasks", broker="filesystem://")
    app.conf.broker_transport_options = {"data_folder_in": folder, "data_folder_out": folder,
                                         "processed_folder": folder + "-done", "store_processed": True}
    app.conf.task_ignore_result = True
    log = logging.getLogger("tasks")


    @app.task
    def capture_payment(order_id, amount):
        log.warning("captured %s for order %s", amount, order_id)
""")
SHOP = textwrap.dedent("""
    import sys
    from opentelemetry import trace
    from tasks import capture_payment

    for order_id in sys.argv[1:]:
        with trace.get_tracer("shop").start_as_current_span(
                "POST /checkout", kind=trace.SpanKind.SERVER, attributes={"url.query": f"order_id={order_id}"}):
            capture_payment.delay(order_id, 12.5)
""")


def test_producer_and_consumer_are_one_trace(tmp_path: Path, collector: CollectorProcess, store_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    (tmp_path / "shop.py").write_text(SHOP)
    for folder in ("queue", "queue-done"):
        (tmp_path / folder).mkdir()
    env = dict(os.environ, QUEUE_DIR=str(tmp_path / "queue"), PYTHONPATH=str(tmp_path), PAYSCOPE_QUIET="1",
               OTEL_BSP_SCHEDULE_DELAY="100")
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", "payments-worker", "--collector",
                               collector.http_url, "--", sys.executable, "-m", "celery", "-A", "tasks", "worker",
                               "-c", "2", "--loglevel", "warning"],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    orders = ["ord-q1", "ord-q2", "ord-q3"]
    try:
        shop = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "shop", "--collector",
                               collector.http_url, "--", sys.executable, "shop.py", *orders],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert shop.returncode == 0, shop.stderr
        deadline = time.monotonic() + 45
        traces: dict[str, list[Span]] = {}
        with open_store(str(store_path), readonly=True) as store:
            while time.monotonic() < deadline:
                traces = {o: store.trace(t[0]) for o in orders if (t := store.traces_by_key(o))}
                if len(traces) == len(orders) and all(
                        any(s.service == "payments-worker" for s in spans) for spans in traces.values()):
                    break
                time.sleep(0.3)
    finally:
        stop_all([worker])
        log.close()
    for order_id in orders:
        spans = traces[order_id]
        kinds = {(s.service, s.kind) for s in spans}
        assert {("shop", "server"), ("shop", "producer"), ("payments-worker", "consumer")} <= kinds, (order_id, kinds)
        producer = next(s for s in spans if s.kind == "producer")
        consumer = next(s for s in spans if s.kind == "consumer")
        assert consumer.parent_id == producer.span_id
    # the worker's own log line names the trace its task belongs to
    worker_lines = [line for line in (tmp_path / "worker.log").read_text().splitlines() if "ord-q2" in line]
    trace_id = traces["ord-q2"][0].trace_id
    assert worker_lines and all(f"trace_id={trace_id}" in line for line in worker_lines), worker_lines
    shown = payscope_json("show", "ord-q2", "--store", str(store_path))
    assert shown["trace_ids"] == [trace_id]
