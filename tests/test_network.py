"""Network latency on real traces (Nezha: Online Boutique and TrainTicket with injected network delays and a CPU
fault): `payscope compare` names the injected service and whether the time went to the network or its code,
recommendations cover what callers saw, and healthy windows rank nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payscope.analyzers.compare import SAMPLE
from payscope.analyzers.loader import load_sampled
from payscope.collector.store import open_store
from payscope.collector.store.embedded import EmbeddedStore
from payscope.model import SpanRow
from tests.helpers import REALDATA, SCENARIOS, payscope, payscope_json

NEZHA = REALDATA / "nezha"
CASES = json.loads((NEZHA / "cases.json").read_text())


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for case in CASES:
        store = str(tmp_path_factory.mktemp("nezha") / "n.db")
        payscope("import", "traces", *[str(NEZHA / f) for f in case["files"]], "--store", store, check=True)
        out[case["id"]] = store
    return out


def _window(pair: list[float]) -> str:
    return f"{pair[0]}..{pair[1] + 0.001}"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_compare_ranks_the_injected_service_first(case: dict[str, Any], stores: dict[str, str]) -> None:
    doc = payscope_json("compare", "--store", stores[case["id"]], "--baseline", _window(case["baseline"]),
                        "--incident", _window(case["incident"]))
    assert set(doc) >= {"baseline", "incident", "hops"}
    first = doc["hops"][0]
    assert set(first) >= {"service", "component", "edge", "baseline_ms", "incident_ms", "explains_ms"}
    assert (first["service"], first["component"]) == (case["service"], case["component"]), doc["hops"][:3]
    if first["component"] == "network":
        assert first["edge"]["callee"] == case["service"] or first["edge"]["caller"] == case["service"]
    table = payscope("compare", "--store", stores[case["id"]], "--baseline", _window(case["baseline"]),
                     "--incident", _window(case["incident"]), check=True).stdout
    assert table.splitlines()[1].startswith(f"1. [{case['component']}] {case['service']}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_two_healthy_windows_rank_nothing(case: dict[str, Any], stores: dict[str, str]) -> None:
    start, end = case["baseline"]
    middle = (start + end) / 2
    doc = payscope_json("compare", "--store", stores[case["id"]], "--baseline", f"{start}..{middle}",
                        "--incident", f"{middle}..{end + 0.001}")
    assert doc["baseline"]["entry_requests"] > 0 and doc["incident"]["entry_requests"] > 0
    assert doc["hops"] == [], doc["hops"]
    assert "noise" in doc["noise"]


def test_the_payment_delay_is_a_network_finding_and_its_timeout_covers_what_checkout_saw(
        stores: dict[str, str]) -> None:
    case = CASES[0]
    store = stores[case["id"]]
    found = payscope_json("analyze", "--store", store)["findings"]
    network = [f for f in found if f["kind"] == "network_latency"]
    charge = [f for f in network if f["edge"]["callee"] == "paymentservice"]
    assert charge and "between" in charge[0]["explanation"]
    recs = payscope_json("recommend", "timeouts", "--store", store)["recommendations"]
    with open_store(store, readonly=True) as opened:
        rows = [r for t in opened.traces(limit=None) for r in opened.trace_rows(t.trace_id)]
    answers: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        if r.parent_id:
            answers.setdefault((r.trace_id, r.parent_id), []).append(r)
    for rec in recs:
        edge = rec["edge"]
        # what each caller saw of its successful calls, from the client spans themselves
        seen = sorted((r.end_ns - r.start_ns) / 1e6 for r in rows if r.kind == "client" and r.error_class is None
                      and r.service == edge["caller"]
                      and any(s.parent_id == r.span_id and s.service == edge["callee"]
                              and s.operation == edge["operation"] for s in answers.get((r.trace_id, r.span_id), [])))
        if len(seen) < 2:
            continue
        p99 = seen[max(0, -(-99 * len(seen) // 100) - 1)]
        assert rec["recommended"]["timeout_ms"] >= p99, (edge, p99)
        after = sum(v > rec["recommended"]["timeout_ms"] for v in seen) / len(seen)
        if after:  # a recommendation that cuts successful calls says by how much
            assert any("cuts" in note for note in rec["notes"]), rec["notes"]
        # each further attempt fails as often again
        expected = after ** rec["recommended"]["attempts"]
        assert rec["expected_timeout_rate"]["after"] == pytest.approx(expected, abs=0.002), edge


def test_a_hop_mostly_on_the_wire_is_a_network_finding(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "remote-ledger.otlp.jsonl.gz"), "--store", store, check=True)
    found = {(f["kind"], f["edge"]["caller"], f["edge"]["callee"]): f
             for f in payscope_json("analyze", "--store", store)["findings"]}
    finding = found[("network_latency", "wallet", "ledger-dc2")]
    metrics = finding["metrics"]
    assert metrics["gap_ms"]["p50"] > metrics["server_ms"]["p50"]
    assert ("network_latency", "wallet", "ledger-dc2") in found and ("late_success", "wallet", "ledger-dc2") in found


@pytest.mark.parametrize("args, says", [
    (["--incident", "10..5"], "ends before it starts"),
    (["--incident", "yesterday"], "FROM..TO"),
    (["--baseline", "0..20", "--incident", "10..30"], "overlap"),
    (["--baseline", "0..10", "--incident", "20..30"], "no entry requests"),
    (["--incident", "1661147574..1661147600", "--sample", "-1"], "--sample -1"),
])
def test_bad_windows_exit_2_with_one_line(args: list[str], says: str, stores: dict[str, str]) -> None:
    proc = payscope("compare", "--store", stores[CASES[0]["id"]], *args)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_incident_alone_is_compared_with_as_long_just_before_it(stores: dict[str, str]) -> None:
    case = CASES[2]  # TrainTicket: the baseline minute is a separate recording, so the time before is empty
    start, end = case["incident"]
    half = (end - start) / 2
    doc = payscope_json("compare", "--store", stores[case["id"]], "--incident", f"{start + half}..{end + 0.001}")
    assert doc["baseline"]["to_ns"] == int((start + half) * 1e9)
    assert doc["baseline"]["from_ns"] == pytest.approx(int((start + half) * 1e9) - (doc["incident"]["to_ns"]
                                                       - doc["incident"]["from_ns"]), abs=2)
    assert doc["baseline"]["entry_requests"] > 0


class _NoWholeReads(EmbeddedStore):
    """The real store, refusing to be read whole: what `payscope compare` must never need."""

    def iter_rows(self, batch_size: int = 10_000) -> Iterator[list[SpanRow]]:
        raise AssertionError("compare read every span of the store")


def test_compare_reads_the_stores_sample_of_each_window_and_says_so(stores: dict[str, str]) -> None:
    case = CASES[0]
    base, inc = (tuple(int(v * 1e9) for v in _span(case[w])) for w in ("baseline", "incident"))
    with _NoWholeReads(stores[case["id"]], readonly=True) as store:
        analysis, samples = load_sampled(store, [base, inc], 150)
        chosen = [store.sample_traces(*window, 150).trace_ids for window in (base, inc)]
    assert [s.trace_ids for s in samples] == chosen and all(len(ids) == 150 for ids in chosen)
    assert set(analysis.traces) == set(chosen[0]) | set(chosen[1])
    assert samples[0].in_window > 150 and samples[1].in_window > 150 and not samples[0].complete

    args = ["compare", "--store", stores[case["id"]], "--baseline", _window(case["baseline"]),
            "--incident", _window(case["incident"])]
    whole = payscope_json(*args, "--sample", "0")
    assert whole["incident"]["sample"] == {"traces_read": samples[1].in_window,
                                           "traces_in_window": samples[1].in_window, "limit": None, "complete": True}
    sampled = payscope_json(*args, "--sample", "150")
    assert sampled["incident"]["sample"] == {"traces_read": 150, "traces_in_window": samples[1].in_window,
                                             "limit": 150, "complete": False}
    assert sampled["incident"]["entry_requests"] <= 150 < whole["incident"]["entry_requests"]
    table = payscope(*args, "--sample", "150", check=True).stdout
    assert f"(from a sample of 150 of {samples[1].in_window:,} traces)" in table.splitlines()[0]
    assert f"(default {SAMPLE:,})" in payscope("compare", "--help", check=True).stdout


def _span(pair: list[float]) -> tuple[float, float]:
    return pair[0], pair[1] + 0.001
