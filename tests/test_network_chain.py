"""A real chain under `payscope run` (frontend -> api -> ledger, http.server and requests), slowed twice: first
on the wire between api and ledger, then in ledger's own code.

Stand-in: this machine's kernel has no netem, so the slow network is a delaying TCP relay
(`payscope.demo.netdelay`) between api and ledger, holding ledger's answers for 150 ms.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from payscope.demo.netdelay import DelayingRelay
from tests.helpers import CollectorProcess, free_port, payscope_json, stop_all
from tests.test_instrumentation import SERVICES, _payscope_run, _wait_http

REQUESTS = 40
DELAY_MS = 150.0
SPIN_MS = 150


def _three_hops(store: Path, one_worker: bool = False, frontend_timeout_s: float = 5.0
                ) -> tuple[CollectorProcess, dict[str, int], dict[str, float], DelayingRelay, list[Any]]:
    """frontend -> api -> relay -> ledger under `payscope run`, into a collector writing ``store``; the relay's
    delay is ``delay["ms"]``. ``one_worker``: api serves one request at a time; ``frontend_timeout_s``: how long
    frontend waits for api."""
    collector = CollectorProcess(store, grpc=False)
    ports = {name: free_port() for name in ("frontend", "api", "ledger", "link")}
    delay = {"ms": 0.0}
    relay = DelayingRelay(ports["link"], ports["ledger"], lambda: delay["ms"]).start()
    base = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100")
    api_env = dict(base, NEXT_URL=f"http://127.0.0.1:{ports['link']}")
    if one_worker:
        api_env["HOP_THREADED"] = "0"
    procs = [
        _payscope_run("ledger", collector, sys.executable, "hop.py", str(ports["ledger"]), env=base),
        _payscope_run("api", collector, sys.executable, "hop.py", str(ports["api"]), env=api_env),
        _payscope_run("frontend", collector, sys.executable, "hop.py", str(ports["frontend"]),
                      env=dict(base, NEXT_URL=f"http://127.0.0.1:{ports['api']}",
                               NEXT_TIMEOUT=str(frontend_timeout_s))),
    ]
    return collector, ports, delay, relay, procs


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("netchain")
    store = tmp / "payscope.db"
    collector, ports, delay, relay, procs = _three_hops(store)

    def drive(query: str = "") -> tuple[float, float]:
        start = time.time()
        for _ in range(REQUESTS):
            urllib.request.urlopen(f"http://127.0.0.1:{ports['frontend']}/work?{query}", timeout=10).read()
        return start, time.time()

    try:
        for name in ("ledger", "api", "frontend"):
            _wait_http(ports[name])
        drive()  # warm-up: first connections, first imports
        healthy = drive()
        delay["ms"] = DELAY_MS
        slow_network = drive()
        delay["ms"] = 0.0
        slow_code = drive(f"spin_ms={SPIN_MS}")
        time.sleep(1.5)  # every batch out
        yield {"store": str(store), "healthy": healthy, "network": slow_network, "code": slow_code}
    finally:
        stop_all(procs)
        relay.stop()
        collector.stop()


def _window(pair: tuple[float, float]) -> str:
    return f"{pair[0]}..{pair[1]}"


def test_the_delayed_link_is_a_network_finding_there_and_nowhere_else(chain: dict[str, Any]) -> None:
    found = payscope_json("analyze", "--store", chain["store"])["findings"]
    network = {(f["edge"]["caller"], f["edge"]["callee"]): f for f in found if f["kind"] == "network_latency"}
    assert set(network) == {("api", "ledger")}, network
    # nothing else slowed with it: the time went on the path between the two
    assert network[("api", "ledger")]["metrics"]["cause"] == "link"


def test_compare_names_the_delayed_hop_as_network(chain: dict[str, Any]) -> None:
    doc = payscope_json("compare", "--store", chain["store"], "--baseline", _window(chain["healthy"]),
                        "--incident", _window(chain["network"]))
    first = doc["hops"][0]
    assert (first["service"], first["component"]) == ("ledger", "network"), doc["hops"]
    assert (first["edge"]["caller"], first["edge"]["callee"]) == ("api", "ledger")
    assert first["explains_ms"] == pytest.approx(DELAY_MS, rel=0.3)


def test_a_service_slow_in_its_own_code_is_ranked_as_service(chain: dict[str, Any]) -> None:
    doc = payscope_json("compare", "--store", chain["store"], "--baseline", _window(chain["healthy"]),
                        "--incident", _window(chain["code"]))
    first = doc["hops"][0]
    assert (first["service"], first["component"], first["edge"]) == ("ledger", "service", None), doc["hops"]
    assert not [h for h in doc["hops"] if h["component"] == "network"], doc["hops"]


def test_the_recommended_timeout_covers_the_delayed_calls(chain: dict[str, Any]) -> None:
    recs = payscope_json("recommend", "timeouts", "--store", chain["store"])["recommendations"]
    link = next(r for r in recs if (r["edge"]["caller"], r["edge"]["callee"]) == ("api", "ledger"))
    found = payscope_json("analyze", "--store", chain["store"])["findings"]
    network = next(f for f in found if f["kind"] == "network_latency")
    shown = payscope_json("show", network["evidence"]["trace_ids"][0], "--store", chain["store"])
    calls = [row["call"] for row in shown["spans"] if row["call"] and row["call"]["callee"] == "ledger"]
    assert calls and calls[0]["gap_ms"] >= DELAY_MS * 0.8  # show keeps client, server and gap apart
    assert link["recommended"]["timeout_ms"] >= DELAY_MS + link["latency_ms"]["p50"] * 0.5
    assert link["recommended"]["timeout_ms"] >= link["latency_ms"]["p99"]


def test_services_run_from_outside_any_payscope_folder() -> None:
    assert not (Path(SERVICES) / "payscope").exists()


def test_requests_waiting_for_a_busy_worker_are_a_queue_not_the_link(tmp_path: Path) -> None:
    """api calls a ledger that serves one request at a time (one worker): first one customer at a time, then four
    at once. The added gap is time queued in front of ledger, and the finding says so."""
    store = tmp_path / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    ports = {name: free_port() for name in ("api", "ledger")}
    base = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100")
    procs = [
        _payscope_run("ledger", collector, sys.executable, "hop.py", str(ports["ledger"]),
                      env=dict(base, HOP_THREADED="0")),
        _payscope_run("api", collector, sys.executable, "hop.py", str(ports["api"]),
                      env=dict(base, NEXT_URL=f"http://127.0.0.1:{ports['ledger']}")),
    ]

    def order(_: int = 0) -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/work?sleep_ms=40", timeout=20).read()

    try:
        for name in ("ledger", "api"):
            _wait_http(ports[name])
        one_at_a_time = time.time()
        for _ in range(REQUESTS):
            order()
        four_at_once = time.time()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(order, range(REQUESTS)))
        end = time.time()
        time.sleep(1.5)  # every batch out
    finally:
        stop_all(procs)
        collector.stop()
    found = payscope_json("analyze", "--store", str(store))["findings"]
    network = {(f["edge"]["caller"], f["edge"]["callee"]): f for f in found if f["kind"] == "network_latency"}
    assert set(network) == {("api", "ledger")}, network
    finding = network[("api", "ledger")]
    assert (finding["metrics"]["cause"], finding["metrics"]["common_cause"]) == ("callee_queue", "ledger")
    assert "queued in ledger" in finding["summary"] and "worker" in finding["recommendation"]["action"]
    # compare says the same: the added time is ledger's queue, and ledger's own requests took no longer
    doc = payscope_json("compare", "--store", str(store), "--baseline", f"{one_at_a_time}..{four_at_once}",
                        "--incident", f"{four_at_once}..{end}")
    first = doc["hops"][0]
    assert (first["service"], first["component"], first["consequence"]) == ("ledger", "queue", False), doc["hops"]
    assert not [h for h in doc["hops"] if h["component"] == "network"], doc["hops"]
    assert "more came than its workers could take" in first["sentence"]


def _four_at_once_then_a_slow_link(store: Path, frontend_timeout_s: float) -> tuple[tuple[float, float],
                                                                                   tuple[float, float]]:
    """frontend -> api (one worker) -> ledger: one customer at a time, then four at once throughout (the healthy
    window), then the same with the link between api and ledger slowed by DELAY_MS (the incident window). When
    frontend gives up on api, its customer's request fails (504) and api still works off what was given up."""
    collector, ports, delay, relay, procs = _three_hops(store, one_worker=True, frontend_timeout_s=frontend_timeout_s)

    def order(_: int = 0) -> None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['frontend']}/work?sleep_ms=20", timeout=30).read()
        except urllib.error.HTTPError as exc:
            assert exc.code == 504, exc  # frontend gave up on api

    def four_at_once() -> tuple[float, float]:
        start = time.time()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(order, range(REQUESTS)))
        return start, time.time()

    try:
        for name in ("ledger", "api", "frontend"):
            _wait_http(ports[name])
        for _ in range(REQUESTS // 2):  # one at a time: the link's usual gap, with no queue
            order()
        healthy = four_at_once()
        delay["ms"] = DELAY_MS
        slow_link = four_at_once()
        time.sleep(1.5 if frontend_timeout_s > 1 else REQUESTS * (DELAY_MS + 40) / 1000 + 1.5)  # all done, sent
    finally:
        stop_all(procs)
        relay.stop()
        collector.stop()
    return healthy, slow_link


def test_a_queue_behind_a_slow_link_is_ranked_after_the_link(tmp_path: Path) -> None:
    """frontend -> api (one worker) -> ledger, four customers at a time throughout; then the link between api and
    ledger slows. api's worker is held the longer, so requests queue in front of it for more time than the link
    itself adds: the queue is a consequence, and the link comes first.

    Stand-in: this machine's kernel has no netem, so the slow network is a delaying TCP relay
    (`payscope.demo.netdelay`) between api and ledger."""
    store = tmp_path / "payscope.db"
    healthy, slow_link = _four_at_once_then_a_slow_link(store, frontend_timeout_s=5.0)
    doc = payscope_json("compare", "--store", str(store), "--baseline", _window(healthy),
                        "--incident", _window(slow_link))
    first = doc["hops"][0]
    assert (first["service"], first["component"]) == ("ledger", "network"), doc["hops"]
    assert first["explains_ms"] == pytest.approx(DELAY_MS, rel=0.3)
    queue = next(h for h in doc["hops"] if h["component"] == "queue")
    assert queue["service"] == "api" and queue["consequence"], doc["hops"]
    assert queue["explains_ms"] > first["explains_ms"]  # the larger, and still second: it is what the link caused
    assert queue["held_ms"] == pytest.approx(DELAY_MS, rel=0.3)
    assert "a consequence of what slowed them" in queue["sentence"]


def test_requests_that_give_up_in_a_queue_are_led_to_what_held_its_workers(tmp_path: Path) -> None:
    """As above, but frontend waits only 300 ms for api: once the link slows, each request finds three ahead of it
    in api's queue (about 175 ms each) and frontend gives up before api even starts on it. The entry requests
    never reach the link; what they lost is api's queue, and what held api's worker is the link, named under the
    queue. Before, those calls had no known gap, the queue went unseen, and the time was put on the network
    between frontend and api.

    Stand-in: this machine's kernel has no netem, so the slow network is a delaying TCP relay
    (`payscope.demo.netdelay`) between api and ledger."""
    store = tmp_path / "payscope.db"
    healthy, slow_link = _four_at_once_then_a_slow_link(store, frontend_timeout_s=0.3)
    doc = payscope_json("compare", "--store", str(store), "--baseline", _window(healthy),
                        "--incident", _window(slow_link))
    first = doc["hops"][0]
    assert (first["service"], first["component"], first["consequence"]) == ("api", "queue", True), doc["hops"]
    assert first["held_ms"] == pytest.approx(DELAY_MS, rel=0.3)
    held = first["held_by"][0]
    assert (held["service"], held["component"], held["edge"]["caller"]) == ("ledger", "network", "api"), first
    assert held["explains_ms"] == pytest.approx(DELAY_MS, rel=0.3)
    assert not [h for h in doc["hops"] if h["component"] == "network" and h["service"] == "api"], doc["hops"]
    # what the entry requests lost stops at frontend's 300 ms; how long they sat in api's queue is said beside it
    left = first["left_waiting"]
    assert left is not None and left["calls"] >= 3 and left["wait_ms_p50"] > 300, first
    assert f"{left['calls']} calls into api were still in its queue when their caller gave up" in first["sentence"]
    found = payscope_json("analyze", "--store", str(store))["findings"]
    causes = {(f["edge"]["caller"], f["edge"]["callee"]): f["metrics"]["cause"] for f in found
              if f["kind"] == "network_latency"}
    assert causes.get(("frontend", "api")) in (None, "callee_queue") and causes.get(("api", "ledger")) == "link"
    # frontend's timeout is sized on api's work and its downstream budget, not on api's queue: one that covered
    # the seconds its requests queued would only let the queue grow
    (rec,) = [r for r in payscope_json("recommend", "timeouts", "--store", str(store))["recommendations"]
              if (r["edge"]["caller"], r["edge"]["callee"]) == ("frontend", "api")]
    assert any("waited for a free worker of api" in note for note in rec["notes"]), rec["notes"]
    assert rec["recommended"]["timeout_ms"] < rec["latency_ms"]["p99"] / 2, rec
