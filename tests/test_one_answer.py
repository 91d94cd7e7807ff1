"""One fact, one answer: every command and screen gives the same recommended timeout for an edge, and a
declined card is a decline, never a timeout problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from payscope.timeparse import format_ms
from payscope.tui.app import TransactionScreen, build
from tests.helpers import REALDATA, SCENARIOS, payscope, payscope_json

TIMEOUT_KINDS = {"timeout_inversion", "timeout_below_tail", "timeout_missing", "late_success",
                 "connect_timeout_too_long", "retry_budget_overrun", "deadline_not_propagated"}


def _edge(d: dict[str, Any]) -> tuple[str, str, str]:
    return (d["caller"], d["callee"], d["operation"])


async def _tui_text(store: str, trace_id: str, widget: str) -> str:
    """What the TUI's screen of one transaction shows in ``widget``."""
    app = build(store, refresh_seconds=3600)
    async with app.run_test(size=(160, 50)) as pilot:
        await app.push_screen(TransactionScreen(trace_id))
        for _ in range(100):
            await pilot.pause(0.1)
            screen = app.screen
            if isinstance(screen, TransactionScreen) and screen.view is not None:
                break
        await pilot.pause(0.3)
        return str(app.screen.query_one(widget).render())


def _check_one_answer(store: str) -> int:
    """Every surface against `recommend`; returns how many edges with a finding were compared."""
    recs = payscope_json("recommend", "timeouts", "--store", store)["recommendations"]
    recommended = {_edge(r["edge"]): r["recommended"]["timeout_ms"] for r in recs}
    snippets = {_edge(r["edge"]): r["snippets"] for r in recs}
    analysis = payscope_json("analyze", "--store", store)
    for edge in analysis["edges"]:
        assert edge["recommended_timeout_ms"] == recommended[_edge(edge)]
    compared = set()
    for finding in analysis["findings"]:
        value = finding["recommendation"].get("timeout_ms")
        if value is None:
            continue
        key = _edge(finding["edge"])
        assert value == recommended[key], (finding["kind"], key)
        compared.add(key)
        connect = finding["recommendation"].get("connect_timeout_ms")
        if connect is not None:  # the connect timeout the finding asks for is the one the snippets set
            assert connect <= value and f"connect={connect / 1000:g})" in snippets[key]["httpx"], snippets[key]
        if not finding["evidence"]["trace_ids"]:
            continue
        trace_id = finding["evidence"]["trace_ids"][0]
        shown = payscope_json("show", trace_id, "--store", store)
        same = [f for f in shown["findings"] if f["kind"] == finding["kind"] and _edge(f["edge"]) == key]
        assert same and same[0]["recommendation"]["timeout_ms"] == value
        text = pytest.importorskip("anyio").run(_tui_text, store, trace_id, "#findings")
        assert f"recommended timeout {format_ms(value)}" in text, text
    return len(compared)


@pytest.mark.parametrize("name", ["marketplace", "subscriptions", "remote-ledger"])
def test_one_recommended_value_everywhere_on_scenarios(name: str, tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / f"{name}.otlp.jsonl.gz"), "--store", store, check=True)
    assert _check_one_answer(store) >= 1


def test_one_recommended_value_everywhere_on_the_demo(demo_store: Path) -> None:
    assert _check_one_answer(str(demo_store)) >= 2


def test_a_declined_card_is_declined_and_no_timeout_problem(demo_store: Path) -> None:
    """The demo's bank declines the same cards every run (402): those orders are business failures."""
    rows = payscope_json("failures", "--store", str(demo_store), "--limit", "0")["failures"]
    declined = [r for r in rows if r["outcome"] == "declined"]
    assert declined, sorted({r["outcome"] for r in rows})
    for row in declined:
        assert row["error_class"] == "business"
        assert not set(row["findings"]) & TIMEOUT_KINDS, row
        shown = payscope_json("show", row["trace_id"], "--store", str(demo_store))
        assert shown["transactions"][0]["outcome"] == "declined"
        assert not {f["kind"] for f in shown["findings"]} & TIMEOUT_KINDS
    analysis = payscope_json("analyze", "--store", str(demo_store))
    evidence = {t for f in analysis["findings"] if f["kind"] in TIMEOUT_KINDS for t in f["evidence"]["trace_ids"]}
    assert not evidence & {r["trace_id"] for r in declined}


def test_a_transaction_saved_by_retries_is_recovered_everywhere(tmp_path: Path) -> None:
    """HotROD's dispatch (real spans): three Redis calls time out and are retried, and the request succeeds. Every
    command and screen calls it what the failures list calls it: recovered, not a failure and not plain ok."""
    store = str(tmp_path / "h.db")
    payscope("import", "traces", str(REALDATA / "hotrod_redis-timeout_retries.otlp.json"), "--store", store,
             check=True)
    trace_id = "fe65c5beefbe4e96119efbba3da07e99"
    rows = payscope_json("failures", "--store", store, "--limit", "0")["failures"]
    assert [(r["trace_id"], r["outcome"]) for r in rows] == [(trace_id, "recovered")]
    assert payscope_json("analyze", "--store", store)["stats"]["outcomes"] == {"recovered": 1}
    assert [t["outcome"] for t in payscope_json("show", trace_id, "--store", store)["transactions"]] == ["recovered"]
    assert f"trace {trace_id}: recovered" in payscope("show", trace_id, "--store", store, check=True).stdout
    summary = pytest.importorskip("anyio").run(_tui_text, store, trace_id, "#summary")
    assert f"trace {trace_id}: recovered" in summary, summary
