"""The analyzer on traces with known faults: public scenarios, real traces, and planted topologies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from payscope.analyzers import engine, recommend
from payscope.analyzers.diagnose import diagnose
from payscope.analyzers.stats import percentile
from payscope.collector.importers import ImportReport, read_trace_file
from payscope.collector.otlp import parse_json_message, spans_from_request
from payscope.collector.store import group_traces
from payscope.model import SpanRow
from payscope.synth import Call, Service, Simulator, chain
from tests.helpers import REALDATA, SCENARIOS, payscope, payscope_json

JUDGED = {"timeout_inversion", "late_success", "timeout_below_tail", "retry_budget_overrun", "non_idempotent_retry",
          "network_latency"}


def _analysis_of(rows: list[SpanRow]) -> engine.Analysis:
    rows.sort(key=lambda s: s.trace_id)
    return diagnose(group_traces([rows]))


def _file_spans(path: Path) -> list[SpanRow]:
    return [s.row for batch in read_trace_file(path, ImportReport(str(path))) for s in batch.spans]


def _synth_spans(topology, requests: int = 2000, seed: int = 3) -> list[SpanRow]:  # type: ignore[no-untyped-def]
    sim = Simulator(topology, seed)
    sim.run(requests)
    return [s.row for line in sim.otlp_lines()
            for s in spans_from_request(parse_json_message(json.loads(line), ExportTraceServiceRequest)).spans]


def _found(analysis: engine.Analysis) -> set[tuple[str, str, str]]:
    return {(f.kind, f.edge[0], f.edge[1]) for f in analysis.findings}


@pytest.mark.parametrize("name", ["calm", "marketplace", "subscriptions", "remote-ledger"])
def test_public_scenarios(name: str) -> None:
    truth = json.loads((SCENARIOS / f"{name}.truth.json").read_text())
    analysis = _analysis_of(_file_spans(SCENARIOS / f"{name}.otlp.jsonl.gz"))
    assert len(analysis.traces) == truth["traces"]
    got = _found(analysis)
    expected = {tuple(x) for x in truth["expected"]}
    allowed = {tuple(x) for x in truth["allowed"]}
    assert expected <= got, f"missing {expected - got}"
    false_alarms = {g for g in got - expected - allowed if g[0] in JUDGED}
    assert not false_alarms


def test_scenario_cli_json_contract(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "subscriptions.otlp.jsonl.gz"), "--store", store, check=True)
    doc = payscope_json("analyze", "--store", store)
    assert set(doc) == {"findings", "edges", "clock_skew", "injected_faults", "stats"}
    first = doc["findings"][0]
    assert set(first) >= {"kind", "severity", "edge", "summary", "metrics", "evidence", "recommendation"}
    assert set(first["edge"]) == {"caller", "callee", "operation"}
    assert first["evidence"]["trace_ids"]
    skew = doc["clock_skew"]
    assert skew == [{"service": "card-processor", "offset_ms": pytest.approx(200, abs=1), "reference": "billing-api",
                     "samples": 2000, "corrected": True}]
    assert payscope("analyze", "--store", store, "--fail-on", "high").returncode == 1
    calm = str(tmp_path / "calm.db")
    payscope("import", "traces", str(SCENARIOS / "calm.otlp.jsonl.gz"), "--store", calm, check=True)
    assert payscope("analyze", "--store", calm, "--fail-on", "low").returncode == 0
    md = payscope("analyze", "--store", store, "--format", "markdown", check=True).stdout
    assert md.startswith("# payscope findings") and "late_success" in md


# --- planted faults, standard attributes only ------------------------------------------

def _healthy(skew_ms: float = 0.0, bank_instrumented: bool = True):  # type: ignore[no-untyped-def]
    return chain(
        Service("gateway", 2, route="/checkout/{order_id}", calls=[Call("order", 3000)], language="go"),
        Service("order", 10, route="/orders", calls=[Call("payment", 2500)], language="python"),
        Service("payment", 15, route="/payments", calls=[Call("bank", 2000)], language="node"),
        Service("bank", 120, sigma=0.5, route="/v1/charges", instrumented=bank_instrumented,
                clock_offset_ms=skew_ms))


def _faulty(skew_ms: float = 0.0, bank_instrumented: bool = True, key: bool = False):  # type: ignore[no-untyped-def]
    return chain(
        Service("gateway", 2, route="/checkout/{order_id}", calls=[Call("order", 1000)], language="go"),
        Service("order", 10, route="/orders", calls=[Call("payment", 2500)], language="python"),
        Service("payment", 15, route="/payments", language="node",
                calls=[Call("bank", 400, attempts=3, backoff_ms=100, idempotency_key=key)]),
        Service("bank", 120, sigma=0.5, tail_p=0.08, tail_ms=600, route="/v1/charges",
                instrumented=bank_instrumented, clock_offset_ms=skew_ms))


PLANTED = {
    ("timeout_inversion", "gateway", "order"),
    ("late_success", "payment", "bank"),
    ("timeout_below_tail", "payment", "bank"),
    ("non_idempotent_retry", "payment", "bank"),
}
TRUE_BUT_WEAK = {("late_success", "gateway", "order")}


@pytest.mark.parametrize("skew_ms", [0.0, 150.0, -150.0])
def test_healthy_topology_has_no_findings(skew_ms: float) -> None:
    analysis = _analysis_of(_synth_spans(_healthy(skew_ms)))
    assert analysis.findings == []
    assert {t.outcome for t in analysis.transactions.values()} == {"ok"}


@pytest.mark.parametrize("skew_ms", [0.0, 150.0])
def test_planted_faults_are_found_by_inference(skew_ms: float) -> None:
    analysis = _analysis_of(_synth_spans(_faulty(skew_ms)))
    got = _found(analysis)
    assert PLANTED <= got
    assert not {g for g in got - PLANTED - TRUE_BUT_WEAK if g[0] in JUDGED}
    bank = analysis.edges[("payment", "bank", "POST /v1/charges")]
    assert bank.timeout.source == "inferred" and bank.timeout.value_ms == pytest.approx(400, abs=2)
    assert bank.max_attempts == 3
    if skew_ms:
        assert [(o.service, round(o.offset_ms)) for o in analysis.offsets] == [("bank", 150)]
    late_traces = {c.trace_id for c in analysis.calls if c.late_success}
    for trace_id in late_traces:
        tx = analysis.transactions[trace_id]
        assert tx.outcome in ("late_success", "duplicate_charge") or tx.facts.root_ok
    assert {t.outcome for t in analysis.transactions.values()} >= {"duplicate_charge", "ok"}


def test_uninstrumented_callee_found_from_client_spans_alone() -> None:
    analysis = _analysis_of(_synth_spans(_faulty(bank_instrumented=False)))
    got = _found(analysis)
    assert {("timeout_below_tail", "payment", "bank"), ("non_idempotent_retry", "payment", "bank"),
            ("timeout_inversion", "gateway", "order")} <= got
    assert ("late_success", "payment", "bank") not in got  # nothing shows the bank finishing


def test_idempotency_key_makes_retries_safe() -> None:
    got = _found(_analysis_of(_synth_spans(_faulty(key=True))))
    assert ("non_idempotent_retry", "payment", "bank") not in got
    assert ("timeout_below_tail", "payment", "bank") in got


def test_retry_budget_overrun_when_attempts_outlast_the_caller() -> None:
    topo = chain(
        Service("api", 2, route="/renew/{order_id}", calls=[Call("billing", 1200)]),
        Service("billing", 5, route="/bill", calls=[Call("psp", 500, attempts=3, backoff_ms=50,
                                                        idempotency_key=True)]),
        Service("psp", 80, sigma=0.6, tail_p=0.15, tail_ms=700, route="/charges"))
    got = _found(_analysis_of(_synth_spans(topo)))
    assert ("retry_budget_overrun", "billing", "psp") in got


# --- recommendations -------------------------------------------------------------------

@pytest.mark.parametrize("topology", [_faulty(), _healthy()], ids=["faulty", "healthy"])
def test_recommendations_respect_tails_and_nest(topology) -> None:  # type: ignore[no-untyped-def]
    analysis = _analysis_of(_synth_spans(topology))
    recs = {r.edge.key[:2]: r for r in analysis.recommendations.values()}
    for rec in recs.values():
        p99 = percentile(rec.edge.tail(), 99)  # the samples a timeout is sized on (a queue left out, if any)
        assert rec.recommended.per_try_ms is not None and p99 is not None
        assert rec.recommended.per_try_ms >= p99 + recommend.RETRANSMIT_MS
        if not rec.edge.idempotent:
            assert rec.recommended.attempts == 1
    # deadlines shrink down the chain: each caller waits longer than its callee's whole budget
    gateway, order, payment = recs[("gateway", "order")], recs[("order", "payment")], recs[("payment", "bank")]
    assert gateway.recommended.per_try_ms > order.recommended.budget_ms() > payment.recommended.budget_ms()  # type: ignore[operator]
    sim = recommend.simulate(analysis, list(recs.values()))
    assert sim["after"]["failed"] <= sim["before"]["failed"]
    assert sim["after"]["duplicate_charge"] <= sim["before"]["duplicate_charge"]


@pytest.mark.parametrize("name", ["marketplace", "subscriptions"])
def test_simulated_recommendations_never_fail_more_on_scenarios(name: str) -> None:
    analysis = _analysis_of(_file_spans(SCENARIOS / f"{name}.otlp.jsonl.gz"))
    recs = list(analysis.recommendations.values())
    sim = recommend.simulate(analysis, recs)
    assert sim["after"]["failed"] <= sim["before"]["failed"]
    assert sim["after"]["late_success"] <= sim["before"]["late_success"]
    if name == "marketplace":
        assert sim["before"]["late_success"] > 0 and sim["after"]["late_success"] == 0


def test_recommend_cli_formats(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "marketplace.otlp.jsonl.gz"), "--store", store, check=True)
    doc = payscope_json("recommend", "timeouts", "--store", store, "--simulate")
    ledger = next(r for r in doc["recommendations"] if r["edge"]["callee"] == "ledger")
    assert ledger["current"] == {"timeout_ms": pytest.approx(300, abs=2), "source": "inferred", "attempts": 1}
    assert ledger["recommended"]["timeout_ms"] >= ledger["latency_ms"]["p99"]
    assert "requests" in ledger["snippets"] and "proxy_read_timeout" in ledger["snippets"]["nginx"]
    assert doc["simulation"]["after"]["late_success"] < doc["simulation"]["before"]["late_success"]
    yaml_text = payscope("recommend", "timeouts", "--store", store, "--format", "yaml", check=True).stdout
    import yaml

    assert yaml.safe_load(yaml_text)["recommendations"] == doc["recommendations"]
    table = payscope("recommend", "timeouts", "--store", store, check=True).stdout
    assert "wallet -> ledger" in table


def test_the_callers_budget_header_is_the_timeout_in_force() -> None:
    from payscope.semconv import derive

    def row(kind: str, sid: str, parent: str | None, service: str, attrs: dict[str, object], end: int) -> SpanRow:
        return derive("a" * 32, sid, parent, service, "POST /pay", kind, 0, end, 1, "", attrs, [])

    for header, value in (("http.request.header.x_envoy_expected_rq_timeout_ms", ["1500"]),
                          ("rpc.grpc.request.metadata.grpc-timeout", "1500m")):
        rows = [row("server", "1" * 16, None, "api", {}, 900_000_000),
                row("client", "2" * 16, "1" * 16, "api", {"http.request.method": "POST"}, 800_000_000),
                row("server", "3" * 16, "2" * 16, "pay", {"http.request.method": "POST", header: value},
                    790_000_000)]
        analysis = diagnose([rows])
        edge = analysis.edges[("api", "pay", "POST /pay")]
        assert (edge.timeout.value_ms, edge.timeout.source) == (1500.0, "captured"), header
        assert edge.timeout.evidence["captured_source"] == "header"


def test_a_followed_redirect_is_not_a_retry_after_a_timeout() -> None:
    """The OpenTelemetry Demo at start-up: the load generator's requests get a 308 from the frontend
    proxy and follow it, so one client span is answered by two server spans. That is one call, not a
    first attempt abandoned after a millisecond."""
    analysis = _analysis_of(_file_spans(REALDATA / "otel-tui_otel-demo_startup.otlp.jsonl.gz"))
    ingress = analysis.edges[("loadgenerator", "frontend-proxy", "ingress")]
    assert ingress.retries == 0 and not ingress.errors["timeout"]
    assert not (ingress.timeout.known and (ingress.timeout.value_ms or 0) < 100)
    assert not [f for f in analysis.findings if f.kind in JUDGED]


def test_loading_pauses_the_cyclic_collector_and_gives_it_back(tmp_path: Path) -> None:
    """The analysis is built with cyclic garbage collection paused (its records hold no cycles); afterwards, and
    after a store that fails mid-read, the collector runs again."""
    import gc

    from payscope.analyzers.loader import load
    from payscope.analyzers.views import analysis_document
    from payscope.collector.store import StoreError, open_store

    sim = Simulator(_healthy(), 1)
    sim.run(20)
    seen: list[bool] = []
    with open_store(str(tmp_path / "s.db")) as store:
        store.write([s for line in sim.otlp_lines() for s in
                     spans_from_request(parse_json_message(json.loads(line), ExportTraceServiceRequest)).spans])
        stored = store.iter_traces

        def watched(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(gc.isenabled())
            yield from stored(*args, **kwargs)

        def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
            yield from stored(*args, **kwargs)
            raise StoreError("the store went away")

        assert gc.isenabled()
        store.iter_traces = watched  # type: ignore[method-assign]
        assert load(store).calls and seen == [False] and gc.isenabled()
        store.iter_traces = failing  # type: ignore[method-assign]
        with pytest.raises(StoreError):
            load(store)
        assert gc.isenabled()
        # and what it builds holds no reference cycle: nothing of payscope's is left for the paused collector
        # to find (other threads of the test process may leave garbage of their own meanwhile)
        store.iter_traces = stored  # type: ignore[method-assign]
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            analysis = load(store)
            document = analysis_document(analysis)
            del analysis, document
            gc.collect()
            ours = [o for o in gc.garbage if getattr(o, "__module__", None) and str(o.__module__).startswith(
                "payscope") or type(o).__module__.startswith("payscope")]
            assert not ours, ours[:5]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()


def test_the_collector_stays_paused_until_the_last_build_in_any_thread_ends() -> None:
    """Two builds overlapping in two threads (TUI workers do): the first to end leaves the pause on for the
    other, and the collector runs again once both have ended."""
    import gc
    import threading

    from payscope.analyzers.memory import paused_cycle_collection

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def second() -> None:
        first_in.wait(5)
        with paused_cycle_collection():
            second_in.set()
            first_out.wait(5)
            seen["after the first ended"] = gc.isenabled()
    worker = threading.Thread(target=second)
    worker.start()
    assert gc.isenabled()
    with paused_cycle_collection():
        first_in.set()
        second_in.wait(5)
    first_out.set()
    worker.join(5)
    assert seen == {"after the first ended": False} and gc.isenabled()


def _checkout(gateway_waits_ms: float) -> list[SpanRow]:
    """One checkout: gateway -> order -> payment -> bank, the bank declines at 1045 ms and the decline travels back
    up; the gateway's call to order lasts ``gateway_waits_ms``, with no answer if it ends before order's does
    (its timeout fired) or with order's 402 if after."""
    ms = 1_000_000
    answered = gateway_waits_ms > 1120

    def row(span_id: str, parent: str | None, service: str, kind: str, start: float, end: float,
            error: str | None, peer: str | None = None, status: int | None = None) -> SpanRow:
        return SpanRow("ab" * 16, span_id, parent, service, f"POST /{service}", kind, int(start * ms), int(end * ms),
                       2 if error else 0, "", error, f"POST /{peer or service}", peer,
                       "POST" if kind == "client" else None, status, 0, False)

    return [
        row("01" * 8, None, "gateway", "server", 0, gateway_waits_ms + 10, "business" if answered else "timeout",
            status=402 if answered else 504),
        row("02" * 8, "01" * 8, "gateway", "client", 5, gateway_waits_ms, "business" if answered else "timeout",
            "order", 402 if answered else None),
        row("03" * 8, "02" * 8, "order", "server", 700, 1120, "business", status=402),
        row("04" * 8, "03" * 8, "order", "client", 720, 1060, "business", "payment", 402),
        row("05" * 8, "04" * 8, "payment", "server", 725, 1055, "business", status=402),
        row("06" * 8, "05" * 8, "payment", "client", 730, 1050, "business", "bank", 402),
        row("07" * 8, "06" * 8, "bank", "server", 735, 1045, "business", status=402),
    ]


@pytest.mark.parametrize(("gateway_waits_ms", "outcome", "hop", "error_class"), [
    (1020, "timeout", ("gateway", "order"), "timeout"),  # the gateway gave up before the decline came back
    (1130, "declined", ("payment", "bank"), "business"),  # the decline came back in time: the bank said no
])
def test_a_decline_that_comes_back_after_the_caller_gave_up_is_not_its_failing_hop(
        gateway_waits_ms: float, outcome: str, hop: tuple[str, str], error_class: str) -> None:
    (tx,) = _analysis_of(_checkout(gateway_waits_ms)).transactions.values()
    assert (tx.outcome, tx.failing_hop[:2] if tx.failing_hop else None, tx.error_class) == (outcome, hop, error_class)
