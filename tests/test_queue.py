"""A payment that continues through a queue stays one transaction, with real brokers and real clients
under `payscope run`: Celery (a prefork worker with two processes, kombu's filesystem transport, which
needs no server) and RabbitMQ (Debian's rabbitmq-server, a private node per test run) with pika."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from payscope.model import Span
from tests.helpers import CollectorProcess, free_port, payscope_json, stop_all, wait_port

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


RABBITMQ = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's, running as the current user
PUBLISHER = textwrap.dedent("""
    import sys
    import pika
    from opentelemetry import trace

    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1])))
    channel = connection.channel()
    channel.queue_declare("captures")
    for order_id in sys.argv[2:]:
        with trace.get_tracer("shop").start_as_current_span(
                "POST /checkout", kind=trace.SpanKind.SERVER, attributes={"url.query": f"order_id={order_id}"}):
            channel.basic_publish(exchange="", routing_key="captures", body=order_id.encode())
    connection.close()
""")
CONSUMER = textwrap.dedent("""
    import logging, sys
    import pika

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log = logging.getLogger("settlement")
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", int(sys.argv[1])))
    channel = connection.channel()
    channel.queue_declare("captures")
    seen = []


    def on_message(channel, method, properties, body):
        log.warning("settled order %s", body.decode())
        channel.basic_ack(method.delivery_tag)
        seen.append(body)
        if len(seen) == int(sys.argv[2]):
            channel.stop_consuming()


    channel.basic_consume("captures", on_message)
    channel.start_consuming()
    connection.close()
    print("consumed", len(seen))
""")


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A private RabbitMQ node on free ports, with its own port mapper; both stopped afterwards."""
    if not RABBITMQ.exists():
        pytest.skip("rabbitmq-server is not installed (.ci/run installs it from Debian's packages)")
    home = tmp_path_factory.mktemp("rabbitmq")
    for folder in ("mnesia", "log"):
        (home / folder).mkdir()
    (home / "enabled_plugins").write_text("[].")
    port, dist, epmd = free_port(), free_port(), free_port()
    env = dict(os.environ, HOME=str(home), RABBITMQ_NODENAME=f"payscope{port}@localhost",
               RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(port), RABBITMQ_DIST_PORT=str(dist),
               ERL_EPMD_PORT=str(epmd), RABBITMQ_MNESIA_BASE=str(home / "mnesia"),
               RABBITMQ_LOG_BASE=str(home / "log"), RABBITMQ_ENABLED_PLUGINS_FILE=str(home / "enabled_plugins"),
               RABBITMQ_PID_FILE=str(home / "pid"), RABBITMQ_CONFIG_FILES=str(home / "conf.d"))
    with (home / "server.log").open("w") as log:
        node = subprocess.Popen([str(RABBITMQ)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_port(port, timeout=90)
        yield port
    finally:
        try:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        subprocess.run(["epmd", "-port", str(epmd), "-kill"], capture_output=True, env=env, timeout=10)


def test_rabbitmq_publish_and_consume_are_one_trace(rabbitmq: int, tmp_path: Path, collector: CollectorProcess,
                                                    store_path: Path) -> None:
    (tmp_path / "publisher.py").write_text(PUBLISHER)
    (tmp_path / "consumer.py").write_text(CONSUMER)
    env = dict(os.environ, PAYSCOPE_QUIET="1", OTEL_BSP_SCHEDULE_DELAY="100")
    orders = ["ord-r1", "ord-r2"]
    consumer = subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", "settlement", "--collector",
                                 collector.http_url, "--", sys.executable, "consumer.py", str(rabbitmq),
                                 str(len(orders))], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        published = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "shop", "--collector",
                                    collector.http_url, "--", sys.executable, "publisher.py", str(rabbitmq), *orders],
                                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        out, err = consumer.communicate(timeout=60)
    finally:
        stop_all([consumer])
    assert consumer.returncode == 0 and out.strip() == "consumed 2", err
    deadline = time.monotonic() + 10
    with open_store(str(store_path), readonly=True) as store:
        while time.monotonic() < deadline and not all(
                (t := store.traces_by_key(o)) and len({s.service for s in store.trace(t[0])}) == 2 for o in orders):
            time.sleep(0.2)
        traces = {o: store.trace(store.traces_by_key(o)[0]) for o in orders}
    for order_id, spans in traces.items():
        assert {(s.service, s.kind) for s in spans} >= {("shop", "producer"), ("settlement", "consumer")}, order_id
        line = next(line for line in err.splitlines() if order_id in line)
        assert f"trace_id={spans[0].trace_id}" in line  # the consumer's own log line names the trace
    # pika records each publish twice (its blocking channel wraps its channel): still one call, one edge
    doc = payscope_json("analyze", "--store", str(store_path))
    assert [(e["caller"], e["callee"], e["calls"]) for e in doc["edges"]] == [("shop", "settlement", 2)]
