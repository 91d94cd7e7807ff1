"""The analyzer on topologies it was not written against: random trees of services (fan-out, skewed
clocks, services without spans, business errors, keyed retries) built with the simulator, standard
OpenTelemetry attributes only. Healthy ones must give no judged finding; one planted fault must be
found, and nothing else judged that is not true."""

from __future__ import annotations

import math
import random

import pytest

from payscope.synth import Call, Service, Topology
from tests.test_analyzer import JUDGED, _analysis_of, _found, _synth_spans

LANGUAGES = ["java", "go", "node", "python"]


def _healthy(seed: int) -> Topology:
    """3-7 services in a random tree; every timeout well above what its callee can take."""
    rng = random.Random(seed)
    names = [f"svc{i}" for i in range(rng.randint(3, 7))]
    services = {}
    for i, name in enumerate(names):
        median = rng.choice([1, 2, 5, 10, 20, 50, 120])
        services[name] = Service(
            name, median, sigma=rng.uniform(0.2, 0.6), language=rng.choice(LANGUAGES),
            instrumented=i == 0 or rng.random() > 0.15, clock_offset_ms=rng.choice([0, 0, rng.uniform(-900, 900)]),
            error_rate=rng.choice([0, 0, 0.01, 0.03]), route=f"/{name}/work", method=rng.choice(["POST", "GET"]),
            tail_p=rng.choice([0, 0, 0.01]), tail_ms=median * rng.uniform(2, 4))
    children: dict[str, list[str]] = {name: [] for name in names}
    for i in range(1, len(names)):
        children[names[rng.randrange(i)]].append(names[i])
    for name in names:
        services[name].instrumented |= bool(children[name])  # a service without spans breaks the trace below it

    def worst_ms(name: str) -> float:
        s = services[name]
        own = s.median_ms * math.exp(3.3 * s.sigma) * (s.tail_ms / s.median_ms if s.tail_p else 1)
        return own + sum(c.attempts * (c.timeout_ms or 0) + (c.attempts - 1) * c.backoff_ms + 5 for c in s.calls)

    for name in reversed(names):
        for child in children[name]:
            attempts = rng.choice([1, 1, 2, 3])
            services[name].calls.append(Call(
                child, timeout_ms=round(worst_ms(child) * rng.uniform(1.5, 3) + 20), attempts=attempts,
                backoff_ms=rng.choice([20, 50, 100]),
                idempotency_key=attempts > 1 and services[child].method == "POST"))
    return Topology(services, names[0])


@pytest.mark.parametrize("seed", range(6))
def test_random_healthy_topologies_give_no_judged_finding(seed: int) -> None:
    analysis = _analysis_of(_synth_spans(_healthy(seed), requests=1500, seed=seed))
    assert len(analysis.traces) == 1500 and len(analysis.edges) >= 2  # there was something to judge
    assert all(r.recommended.per_try_ms for r in analysis.recommendations.values())
    assert not [f for f in analysis.findings if f.kind in JUDGED]


def _parents(topology: Topology) -> dict[str, tuple[str, Call]]:
    return {c.callee: (s.name, c) for s in topology.services.values() for c in s.calls}


def _plant(seed: int, fault: str) -> tuple[Topology, set[tuple[str, str, str]], set[tuple[str, str, str]]]:
    rng = random.Random(seed)
    topology = _healthy(seed)
    services, parents = topology.services, _parents(topology)
    leaves = [n for n, s in services.items() if not s.calls and n in parents]
    if fault in ("inversion", "retry_budget_overrun"):
        leaves = [n for n in leaves if parents[n][0] in parents]
    callee = rng.choice(leaves)
    caller, call = parents[callee]
    c = services[callee]
    call.attempts, call.idempotency_key = 1, False
    expected: set[tuple[str, str, str]] = set()
    allowed: set[tuple[str, str, str]] = set()
    if fault == "below_tail":  # a slow path well past a timeout set just above the normal latency
        call.timeout_ms = round(max(c.median_ms * math.exp(3.1 * c.sigma) * 2, c.median_ms * 3) + 5)
        c.tail_p, c.tail_ms = 0.06, max(200.0, 12 * c.median_ms, call.timeout_ms * 3)
        expected.add(("timeout_below_tail", caller, callee))
        if c.instrumented:
            expected.add(("late_success", caller, callee))
    elif fault == "inversion":  # the caller's caller gives up while the caller still waits
        grand, outer = parents[caller]
        c.tail_p, c.tail_ms, c.sigma = 0.05, max(300.0, 10 * c.median_ms), 0.2
        call.timeout_ms = round(c.tail_ms * 4)
        outer.attempts = 1
        outer.timeout_ms = round(c.tail_ms * 0.5 + services[caller].median_ms * 2)
        expected.add(("timeout_inversion", grand, caller))
        allowed |= {("late_success", grand, caller), ("timeout_below_tail", grand, caller)}
    elif fault == "retry_budget_overrun":  # three tries of a slow callee outlast the caller's own caller
        grand, outer = parents[caller]
        call.timeout_ms = round(max(c.median_ms * 4, 100, services[caller].median_ms * 3))
        call.attempts, call.backoff_ms, call.idempotency_key = 3, 50, True
        c.tail_p, c.tail_ms = 0.15, call.timeout_ms * 3
        outer.attempts = 1
        s = services[caller]
        outer.timeout_ms = round(0.75 * (3 * call.timeout_ms + 100) + s.median_ms * math.exp(2 * s.sigma))
        expected.add(("retry_budget_overrun", caller, callee))
        allowed |= {("timeout_inversion", grand, caller), ("late_success", grand, caller),
                    ("timeout_below_tail", grand, caller), ("timeout_below_tail", caller, callee),
                    ("late_success", caller, callee)}
    else:  # a charge retried after errors, without an idempotency key
        c.method, c.error_rate = "POST", 0.1
        call.attempts = 3
        expected.add(("non_idempotent_retry", caller, callee))
    for s in services.values():  # failures travel up: retries above them are true findings too
        for other in s.calls:
            if other.attempts > 1:
                allowed.add(("retry_budget_overrun", s.name, other.callee))
                if not other.idempotency_key and services[other.callee].method == "POST":
                    allowed.add(("non_idempotent_retry", s.name, other.callee))
    return topology, expected, allowed


@pytest.mark.parametrize(("seed", "fault"), [(1, "below_tail"), (6, "below_tail"), (8, "below_tail"),
                                             (4, "inversion"), (12, "inversion"), (3, "non_idempotent_retry"),
                                             (7, "non_idempotent_retry"), (8, "retry_budget_overrun"),
                                             (13, "retry_budget_overrun")])
def test_a_planted_fault_in_a_random_topology_is_found(seed: int, fault: str) -> None:
    topology, expected, allowed = _plant(seed, fault)
    got = _found(_analysis_of(_synth_spans(topology, requests=1500, seed=seed)))
    assert expected <= got, f"missing {expected - got}"
    assert not {g for g in got - expected - allowed if g[0] in JUDGED}


def test_a_callee_without_spans_and_a_steady_slow_path_is_below_tail_a_rare_one_is_not() -> None:
    def topology(tail_p: float) -> Topology:
        return Topology({
            "api": Service("api", 5, route="/pay", calls=[Call("psp", 150)]),
            "psp": Service("psp", 20, sigma=0.3, tail_p=tail_p, tail_ms=900, instrumented=False, route="/charge"),
        }, "api")

    steady = [f for f in _analysis_of(_synth_spans(topology(0.06), requests=2000)).findings
              if f.kind in JUDGED]
    assert [(f.kind, f.edge[:2]) for f in steady] == [("timeout_below_tail", ("api", "psp"))]
    assert "slow path longer than the timeout" in steady[0].summary  # not "inside its normal latency"
    assert steady[0].recommendation["timeout_ms"] >= 300  # past the cut-off slow path, not the fast successes
    rare = _found(_analysis_of(_synth_spans(topology(0.015), requests=2000)))
    assert not {g for g in rare if g[0] in JUDGED}
