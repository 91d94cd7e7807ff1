"""TCC anomalies produced for real: a coordinator and an account service (Flask, requests) under `payscope run`,
the account's try/confirm/cancel written without TCC's guards. Planted faults (a slow try, a lost try, a slow
confirm) make the coordinator's timeouts and retry produce an empty rollback, a suspension and a repeated
confirm; the account service's own log says which orders, and the analysis must name the same ones. A run
without faults finds none.

And a three-step saga (inventory, payment, shipping, each a service of its own) whose orchestrator forgets
the first compensation when the last step times out: the inventory's own log says which reservations were
left behind, and the analysis must name those orders, and not the ones compensated properly."""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CollectorProcess, free_port, payscope_json, stop_all
from tests.test_instrumentation import SERVICES, _wait_http

# the planted fault of each order: the query string the driver sends the coordinator
PLAN = {"slow_try": "hold_try_ms=450", "lost_try": "lose_try=1", "slow_confirm": "hold_confirm_ms=300", "none": ""}


def _run(service: str, collector: CollectorProcess, *command: str, env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "payscope", "run", "--service", service, "--collector",
                             collector.http_url, "--", *command], cwd=SERVICES, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _system(tmp: Path, faults: bool) -> dict[str, Any]:
    store = tmp / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    account, coordinator = free_port(), free_port()
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", ACCOUNT_URL=f"http://127.0.0.1:{account}",
               NOWHERE_URL=f"http://127.0.0.1:{free_port()}")
    log = tmp / "account.log"
    procs = [_run("account", collector, sys.executable, "tcc_account.py", str(account), str(log), env=env),
             _run("payments", collector, sys.executable, "tcc_coordinator.py", str(coordinator), env=env)]
    planted: dict[str, str] = {}
    try:
        _wait_http(account)
        _wait_http(coordinator)
        plan = [(f"ord-t{i:03d}", list(PLAN)[i % len(PLAN)] if faults else "none") for i in range(24)]
        if not faults:  # a declined order that its customer pays again: a second global transaction, no anomaly
            plan += [("ord-r000", "declined"), ("ord-r000", "none")]
        for order, kind in plan:
            planted[order] = kind
            query = "decline=1" if kind == "declined" else PLAN[kind]
            request = urllib.request.Request(f"http://127.0.0.1:{coordinator}/pay/{order}?{query}",
                                             data=b"", method="POST")
            try:
                urllib.request.urlopen(request, timeout=10).read()
            except urllib.error.HTTPError:
                pass  # a failed payment: the coordinator cancelled it
        time.sleep(1.5)  # the slow phases finish, every batch goes out
    finally:
        stop_all(procs)
        collector.stop()
    return {"store": str(store), "log": log.read_text(), "planted": planted}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _system(tmp_path_factory.mktemp("tcc-faults"), faults=True)


def _tcc(store: str) -> list[dict[str, Any]]:
    return [f for f in payscope_json("analyze", "--store", store, "--format", "json")["findings"]
            if f["kind"] == "tcc_anomaly"]


def _logged(log: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, log))


def test_each_anomaly_is_found_with_the_orders_the_account_logged(faulty: dict[str, Any]) -> None:
    (finding,) = _tcc(faulty["store"])
    assert finding["edge"] == {"caller": "payments", "callee": "account", "operation": "POST /tcc/{phase}"}
    orders = finding["metrics"]["orders"]
    log = faulty["log"]
    truth = {"suspension": _logged(log, r"froze [\d.]+ for order (\S+) after its cancel"),
             "empty_rollback": _logged(log, r"cancelled order (\S+) with nothing frozen"),
             "repeated_confirm": _logged(log, r"confirmed order (\S+) again")}
    assert all(truth.values())  # the planted faults produced every anomaly for real
    for name, expected in truth.items():
        assert set(orders.get(name, [])) == expected, name
    planted = faulty["planted"]
    assert truth["suspension"] == {o for o, kind in planted.items() if kind == "slow_try"}
    assert truth["repeated_confirm"] == {o for o, kind in planted.items() if kind == "slow_confirm"}
    assert finding["severity"] == "critical" and "repeated_cancel" not in orders


def test_without_faults_there_is_no_tcc_anomaly(tmp_path: Path) -> None:
    clean = _system(tmp_path, faults=False)
    assert "again" not in clean["log"] and "nothing frozen" not in clean["log"]
    # the retry's try follows the declined attempt's cancel: the account, which keys by order, says so
    assert "froze 25.00 for order ord-r000 after its cancel" in clean["log"]
    assert _tcc(clean["store"]) == []  # ... but each try has its own cancel or confirm: nothing is left frozen
    found = payscope_json("analyze", "--store", clean["store"], "--format", "json")
    assert any(e["operation"] == "POST /tcc/try" for e in found["edges"])  # the phases were seen, and judged fine


def test_phase_names_are_recognised_in_common_shapes() -> None:
    from payscope.analyzers.orders import rules_from
    from payscope.analyzers.tcc import phase_of

    assert phase_of("POST /tcc/try") == ("try", "POST /tcc/{phase}")
    assert phase_of("POST /accounts/{id}/cancel") == ("cancel", "POST /accounts/{id}/{phase}")
    assert phase_of("AccountService/Confirm") == ("confirm", "AccountService/{phase}")
    assert phase_of("POST /orders/{order_id}") is None and phase_of("POST /retry-policy") is None
    assert phase_of("POST /try/cancel") is None  # two phase words: not one phase of one resource
    # words of its own, mapped in payscope.toml [orders]
    mapped = rules_from({"tcc_try": "hold", "tcc_confirm": "take", "tcc_cancel": "release$"}, "payscope.toml")
    assert [phase_of(op, mapped) for op in ("POST /stock/hold", "POST /stock/take", "POST /stock/release")] == [
        ("try", "POST /stock/{phase}"), ("confirm", "POST /stock/{phase}"), ("cancel", "POST /stock/{phase}")]
    assert phase_of("POST /stock/hold") is None and phase_of("POST /tcc/try", mapped) == ("try", "POST /tcc/{phase}")


# --- a three-step saga ------------------------------------------------------------------------

SAGA_PLAN = {"none": "", "ship_fails": "fail=ship", "ship_times_out": "slow=ship", "charge_fails": "fail=charge"}


def _saga(tmp: Path, faults: bool) -> dict[str, Any]:
    store = tmp / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    ports = {name: free_port() for name in ("inventory", "payment", "shipping", "orders")}
    logs = {name: tmp / f"{name}.log" for name in ("inventory", "payment", "shipping")}
    env = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100", INVENTORY_URL=f"http://127.0.0.1:{ports['inventory']}",
               PAYMENT_URL=f"http://127.0.0.1:{ports['payment']}", SHIPPING_URL=f"http://127.0.0.1:{ports['shipping']}")
    procs = [_run(name, collector, sys.executable, "saga_step.py", str(ports[name]), action, str(logs[name]), env=env)
             for name, action in (("inventory", "reserve"), ("payment", "charge"), ("shipping", "ship"))]
    procs.append(_run("orders", collector, sys.executable, "saga_orchestrator.py", str(ports["orders"]), env=env))
    planted: dict[str, str] = {}
    try:
        for port in ports.values():
            _wait_http(port)
        for i in range(16):
            kind = list(SAGA_PLAN)[i % len(SAGA_PLAN)] if faults else "none"
            order = f"ord-s{i:03d}"
            planted[order] = kind
            request = urllib.request.Request(f"http://127.0.0.1:{ports['orders']}/orders/{order}?{SAGA_PLAN[kind]}",
                                             data=b"", method="POST")
            try:
                urllib.request.urlopen(request, timeout=10).read()
            except urllib.error.HTTPError:
                pass
        time.sleep(1.5)
    finally:
        stop_all(procs)
        collector.stop()
    return {"store": str(store), "inventory": logs["inventory"].read_text(), "planted": planted}


def test_a_saga_step_left_uncompensated_is_found_with_its_orders(tmp_path: Path) -> None:
    saga = _saga(tmp_path, faults=True)
    reserved = _logged(saga["inventory"], r"reserve done for order (\S+)")
    released = _logged(saga["inventory"], r"reserve compensated for order (\S+)")
    failed = {o for o, kind in saga["planted"].items() if kind != "none"}
    truth = (reserved - released) & failed  # the inventory's own record: held for an order that failed
    assert truth == {o for o, kind in saga["planted"].items() if kind == "ship_times_out"}
    (finding,) = [f for f in _tcc(saga["store"]) if "compensation_missing" in f["metrics"]["orders"]]
    assert finding["edge"] == {"caller": "orders", "callee": "inventory", "operation": "POST /reserve"}
    assert set(finding["metrics"]["orders"]["compensation_missing"]) == truth
    assert "POST /reserve/cancel" in finding["recommendation"]["action"]


def test_a_saga_without_faults_is_fine(tmp_path: Path) -> None:
    saga = _saga(tmp_path, faults=False)
    assert _tcc(saga["store"]) == []
