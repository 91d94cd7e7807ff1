"""`payscope chaos` against the demo's real services: the bank slowed by the sidecar's injected delay. With the
demo's timeouts as shipped, the experiment finds the non-idempotent retry and the late success, and fails;
with the demo's `--fixed` settings (payscope's own recommendations), the same scenario passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, payscope

SCENARIO = """
name = "the bank slows down"
settle = "2s"

[proxy]
listen = "127.0.0.1:{proxy}"
upstream = "127.0.0.1:{bank}"
service = "bank"

[[fault]]
delay = "350ms"
share = "50%"
route = "POST /v1/charges"

[traffic]
url = "{gateway}/orders/chaos-{label}-{{n}}"
method = "POST"
body = '{{"amount": 25}}'
headers = {{ "Content-Type" = "application/json" }}
requests = 40
concurrency = 4

[expect]
absent = ["late_success", "duplicate_charge", "non_idempotent_retry"]
"""


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory, demo_store: Path) -> dict[str, Any]:
    from payscope.demo import FAULTY, System, fixed_settings

    out = {}
    for label, settings in (("shipped", dict(FAULTY)), ("fixed", fixed_settings(demo_store))):
        tmp = tmp_path_factory.mktemp(f"chaos-{label}")
        proxy = free_port()
        system = System(tmp / "payscope.db", tmp / "logs", settings, seed=5, bank_url=f"http://127.0.0.1:{proxy}")
        system.start()  # no sale peak: the only slowness is the injected one
        try:
            scenario = tmp / "bank-slows.toml"
            scenario.write_text(SCENARIO.format(proxy=proxy, bank=system.ports["bank"], gateway=system.gateway,
                                                label=label))
            done = payscope("chaos", str(scenario), "--store", str(tmp / "payscope.db"), "--collector",
                            f"http://127.0.0.1:{system.ports['collector']}", "--format", "json", timeout=300)
        finally:
            system.stop()
        out[label] = (done, settings)
    return out


def _findings(doc: dict[str, Any]) -> set[str]:
    return {f["kind"] for f in doc["findings"]}


def test_the_shipped_timeouts_fail_the_experiment(experiments: dict[str, Any]) -> None:
    done, _ = experiments["shipped"]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert {"non_idempotent_retry", "late_success"} <= _findings(doc)
    assert not doc["passed"] and any(f.startswith("late_success: found on") for f in doc["failures"])
    (bank,) = [e for e in doc["edges"] if (e["caller"], e["callee"]) == ("payment", "bank")]
    assert bank["injected"] > 0 and bank["timed_out"] > 0 and bank["retried"] > 0
    assert doc["traffic"]["sent"] == 40
    assert "delay 350 ms on 50% of requests" in doc["faults"][0]
    assert "FAULT INJECTION ON" in done.stderr


def test_the_recommended_timeouts_pass_the_same_experiment(experiments: dict[str, Any]) -> None:
    done, settings = experiments["fixed"]
    assert float(settings["PAYMENT_BANK_TIMEOUT"]) > 0.4  # the recommendation, not the shipped value
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["passed"] and not {"non_idempotent_retry", "late_success"} & _findings(doc)
    (bank,) = [e for e in doc["edges"] if (e["caller"], e["callee"]) == ("payment", "bank")] or [
        pytest.fail(f"no payment -> bank calls under {settings}: {doc['traffic']}, {doc['edges']}")]
    assert bank["injected"] > 0  # the faults were there: the timeouts held under them
    assert doc["orders_charged_twice"] == 0


@pytest.mark.parametrize("change, message", [
    (('delay = "350ms"', 'delay = "350ms"\ncolour = "red"'), "unknown key 'colour'"),
    (('share = "50%"', 'share = "150%"'), "the share must be a percentage above 0% and at most 100%"),
    (('requests = 40', 'requests = 0'), "requests must be a whole number from 1 to"),
    (('absent = ["late_success"', 'absent = ["late_sucess"'), "'late_sucess' is not a finding"),
    (("[traffic]", "[trafic]"), "unknown key 'trafic'"),
])
def test_a_bad_scenario_is_refused_in_one_line(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = SCENARIO.format(proxy=free_port(), bank=free_port(), gateway="http://127.0.0.1:9", label="bad")
    assert change[0] in text
    scenario = tmp_path / "bad.toml"
    scenario.write_text(text.replace(*change))
    done = payscope("chaos", str(scenario), "--store", str(tmp_path / "payscope.db"))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_an_upstream_that_refuses_is_named(tmp_path: Path) -> None:
    closed = free_port()
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO.format(proxy=free_port(), bank=closed, gateway="http://127.0.0.1:9", label="x"))
    done = payscope("chaos", str(scenario), "--store", str(tmp_path / "payscope.db"))
    assert done.returncode == 2 and f"127.0.0.1:{closed} refuses connections" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_report_waits_for_spans_that_come_after_the_settle_time(tmp_path: Path) -> None:
    """A loaded machine's exporters send their last batches late: the report must not be read before they land."""
    import threading
    import time

    from payscope.chaos import _settle
    from payscope.collector.store import open_store
    from tests.test_store_conformance import sample_trace

    path = str(tmp_path / "payscope.db")
    with open_store(path) as store:
        store.write(sample_trace("a" * 32, False))

    def late_batches() -> None:  # two batches, 0.8 s and 1.6 s after the settle time of 0.2 s
        for n, trace in enumerate(("b" * 32, "c" * 32)):
            time.sleep(0.8)
            with open_store(path) as writer:
                writer.write(sample_trace(trace, False, start_ms=2000 + n))

    writer = threading.Thread(target=late_batches)
    started = time.monotonic()
    writer.start()
    _settle(path, 0.2)
    waited = time.monotonic() - started
    writer.join()
    with open_store(path, readonly=True) as store:
        assert store.counts()["spans"] == 9
    assert waited >= 1.6 + 1.0  # the last batch, then a quiet second


def test_the_report_waits_through_a_stalled_collector_for_a_trace_of_every_answered_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collector that stalls (a loaded machine) stores nothing for longer than the quiet time: the report waits on,
    since two requests were answered and only one of their traces is stored, until the second arrives."""
    import threading
    import time

    from payscope import chaos
    from payscope.chaos import _settle
    from payscope.collector.store import open_store
    from tests.test_store_conformance import sample_trace

    monkeypatch.setattr(chaos, "EXPECT_LIMIT_S", 2.0)  # 15 s in use
    path = str(tmp_path / "payscope.db")
    since_ns = 1_000 * 1_000_000
    with open_store(path) as store:
        store.write(sample_trace("a" * 32, False, start_ms=1_500))

    def stalled() -> None:  # the second trace 2.5 s later: more than a quiet second after the first
        time.sleep(2.5)
        with open_store(path) as writer:
            writer.write(sample_trace("b" * 32, False, start_ms=1_600))

    writer = threading.Thread(target=stalled)
    started = time.monotonic()
    writer.start()
    _settle(path, 0.2, since_ns, expected=2)
    waited = time.monotonic() - started
    writer.join()
    assert waited >= 2.5
    started = time.monotonic()
    _settle(path, 0.2, since_ns, expected=3)  # a request whose entry has no spans: waited for, within bounds
    assert 0.2 + 1.0 + 2.0 <= time.monotonic() - started < 0.2 + 1.0 + 2.0 + 2.0


def test_an_experiment_that_reaches_no_call_of_the_service_does_not_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An experiment judged on no call says nothing of the timeouts: traffic that never reaches the proxy fails it
    ("not exercised"), and so does traffic through the proxy whose spans never reach the store (here: no collector
    listens). A store that is not there is said before any traffic is sent."""
    import http.server
    import threading

    from payscope import chaos
    from payscope.collector.store import open_store

    bank = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=bank.serve_forever, daemon=True).start()
    proxy = free_port()
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO.format(proxy=proxy, bank=bank.server_address[1],
                                        gateway=f"http://127.0.0.1:{free_port()}", label="none")
                        .replace("requests = 40", "requests = 3").replace('settle = "2s"', 'settle = "0.2s"'))
    store = tmp_path / "payscope.db"
    nowhere = f"http://127.0.0.1:{free_port()}"
    try:
        missing = payscope("chaos", str(scenario), "--store", str(store))
        with open_store(str(store)):
            pass
        done = payscope("chaos", str(scenario), "--store", str(store), "--format", "json", "--collector", nowhere)
        table = payscope("chaos", str(scenario), "--store", str(store), "--collector", nowhere)
        # the traffic through the proxy itself, and the proxy's spans sent where no collector listens
        monkeypatch.setattr(chaos, "EXPECT_LIMIT_S", 1.0)
        through = chaos.load_scenario(scenario)
        assert through.traffic.url is not None
        through.traffic.url = f"http://127.0.0.1:{proxy}/v1/charges?n={{n}}"
        lost = chaos.run(through, str(store), nowhere, say=lambda line: None)
    finally:
        bank.shutdown()
        bank.server_close()
    assert missing.returncode == 2 and "no payscope store at" in missing.stderr, missing.stderr
    assert "FAULT INJECTION" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["failures"] == ["no request went through the proxy in front of bank: the faults were not exercised"]
    assert doc["traffic"]["sent"] == 3 and doc["traffic"]["failed"] == 3 and doc["traffic"]["proxied"] == 0
    assert table.returncode == 1 and "through the proxy in front of bank: 0 requests" in table.stdout, table.stdout
    assert "no request went through the proxy in front of bank" in table.stdout
    assert lost["traffic"]["proxied"] == 3 and lost["traffic"]["sent"] == 3 and not lost["passed"]
    assert lost["failures"] == ["the proxy took 3 requests in front of bank, and the store holds none of them in the "
                                "window: their spans did not arrive"]
