"""A real chain under `payscope run` (frontend -> api -> ledger, http.server and requests), slowed twice: first
on the wire between api and ledger, then in ledger's own code.

Stand-in: this machine's kernel has no netem, so the slow network is a delaying TCP relay
(`payscope.demo.netdelay`) between api and ledger, holding ledger's answers for 150 ms.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payscope.demo.netdelay import DelayingRelay
from tests.helpers import CollectorProcess, free_port, payscope_json, stop_all
from tests.test_instrumentation import SERVICES, _payscope_run, _wait_http

REQUESTS = 40
DELAY_MS = 150.0
SPIN_MS = 150


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("netchain")
    store = tmp / "payscope.db"
    collector = CollectorProcess(store, grpc=False)
    ports = {name: free_port() for name in ("frontend", "api", "ledger", "link")}
    delay = {"ms": 0.0}
    relay = DelayingRelay(ports["link"], ports["ledger"], lambda: delay["ms"]).start()
    base = dict(os.environ, OTEL_BSP_SCHEDULE_DELAY="100")
    procs = [
        _payscope_run("ledger", collector, sys.executable, "hop.py", str(ports["ledger"]), env=base),
        _payscope_run("api", collector, sys.executable, "hop.py", str(ports["api"]),
                      env=dict(base, NEXT_URL=f"http://127.0.0.1:{ports['link']}")),
        _payscope_run("frontend", collector, sys.executable, "hop.py", str(ports["frontend"]),
                      env=dict(base, NEXT_URL=f"http://127.0.0.1:{ports['api']}")),
    ]

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
    network = {(f["edge"]["caller"], f["edge"]["callee"]) for f in found if f["kind"] == "network_latency"}
    assert network == {("api", "ledger")}, network


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
