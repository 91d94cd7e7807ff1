"""`payscope tui`: Textual's Pilot over a store filled by the demo's real services, snapshots, and tmux."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from payscope.tui import data
from payscope.tui.app import CompareScreen, EdgesScreen, FailuresScreen, HelpScreen, TransactionScreen, build
from payscope.tui.widgets import Waterfall
from tests.helpers import demo_bank_link_leads, payscope, payscope_json

SAMPLE = Path(__file__).parent.parent / "payscope" / "samples" / "checkout.otlp.jsonl.gz"


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


async def _settle(app, pilot) -> None:  # type: ignore[no-untyped-def]
    """Until no worker runs and what they posted has been drawn."""
    for _ in range(50):
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        if not any(w.is_running for w in app.workers):
            break
    await pilot.pause(0.3)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause(0.2)


def _status(app) -> str:  # type: ignore[no-untyped-def]
    return str(app.screen.query_one("#status").render())


@pytest.mark.anyio
async def test_failures_filter_search_and_open(demo_store: Path, tmp_path: Path) -> None:
    failures = payscope_json("failures", "--store", str(demo_store), "--limit", "0")["failures"]
    keyed = next(f for f in failures if f["keys"])
    app = build(str(demo_store), refresh_seconds=3600, report_dir=str(tmp_path))
    async with app.run_test(size=(140, 44)) as pilot:
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, FailuresScreen) and screen.rows
        every = len(failures)
        assert _status(app).startswith(f"{len(screen.rows)} of {every} failed transactions" if every > data.PAGE
                                       else f"{every} failed transactions")
        seen = []
        for _ in range(len(data.OUTCOMES)):  # each outcome filter shows rows: those with none are skipped
            await pilot.press("o")
            await _settle(app, pilot)
            if "all outcomes" in _status(app):
                break
            outcome = screen.flt.outcome
            seen.append(outcome)
            assert screen.rows and all(r["outcome"] == outcome for r in screen.rows)
            assert screen.total == sum(f["outcome"] == outcome for f in failures)
        assert "all outcomes" in _status(app)
        assert set(seen) == {f["outcome"] for f in failures}
        inconsistent = payscope_json("failures", "--store", str(demo_store), "--problem", "any", "--limit", "0")
        await pilot.press("p")  # the order problem filter: the first with rows, as `failures --problem` lists
        await _settle(app, pilot)
        problem = screen.flt.problem
        assert problem is not None and f"problem={problem}" in _status(app)
        expected = [f for f in inconsistent["failures"] if problem in f["problems"]]
        assert screen.total == len(expected) and {r["trace_id"] for r in screen.rows} <= {
            f["trace_id"] for f in expected}
        assert all(problem in r["problems"] for r in screen.rows)
        while screen.flt.problem is not None:  # round to no problem filter, through the others with rows
            await pilot.press("p")
            await _settle(app, pilot)
        assert "problem=" not in _status(app)
        await pilot.press("slash")
        await pilot.press(*keyed["keys"][0], "enter")
        await _settle(app, pilot)
        assert screen.rows and all(keyed["keys"][0] in r["keys"] for r in screen.rows)
        await pilot.press("enter")
        await _settle(app, pilot)
        tx = app.screen
        assert isinstance(tx, TransactionScreen) and tx.view is not None
        waterfall = tx.query_one(Waterfall)
        assert len(waterfall.shown) == len(tx.view["spans"]) > 3
        assert tx.query_one("#logs").row_count == max(1, len(tx.view["logs"]))
        assert "status" in str(tx.query_one("#details").render())
        before = len(waterfall.shown)
        await pilot.press("space")  # the root folds: only it is left
        assert len(waterfall.shown) == 1 < before
        await pilot.press("space", "down", "down")
        assert waterfall.cursor == 2
        await pilot.press("c")
        assert app.clipboard == tx.trace_id
        await pilot.press("e")
        report = tmp_path / f"payscope-{tx.trace_id[:16]}.md"
        assert report.exists() and report.read_text().startswith("# Transaction")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, FailuresScreen)
        await pilot.press("q")


@pytest.mark.anyio
async def test_edges_screen_draws_the_timeout_on_the_histogram(demo_store: Path) -> None:
    app = build(str(demo_store), refresh_seconds=3600)
    async with app.run_test(size=(140, 44)) as pilot:
        await _settle(app, pilot)
        await pilot.press("t")
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, EdgesScreen)
        pairs = {(e["caller"], e["callee"]) for e in screen.edges}
        assert {("gateway", "order"), ("order", "payment"), ("payment", "bank"), ("order", "inventory")} <= pairs
        index = next(i for i, e in enumerate(screen.edges) if (e["caller"], e["callee"]) == ("payment", "bank"))
        for _ in range(index):
            await pilot.press("down")
        await pilot.pause(0.2)
        text = str(screen.query_one("#histogram").render())
        assert "payment -> bank" in text and "timeout 400 ms" in text


@pytest.mark.anyio
async def test_new_failures_appear_without_moving_the_cursor(tmp_path: Path) -> None:
    store_path = tmp_path / "live.db"
    payscope("import", "traces", str(SAMPLE), "--store", str(store_path), check=True)
    app = build(str(store_path), refresh_seconds=0.3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, FailuresScreen)
        table = screen.query_one("#failures")
        await pilot.press("down", "down")
        chosen = screen.rows[table.cursor_row]["trace_id"]
        count = len(screen.rows)
        from tests.test_store_conformance import sample_trace

        with open_store(str(store_path)) as store:  # a new failure, newer than everything shown
            store.write(sample_trace("f" * 32, True, start_ms=int(time.time() * 1000)))
        for _ in range(20):
            await pilot.pause(0.2)
            if len(screen.rows) > count:
                break
        assert screen.rows[0]["trace_id"] == "f" * 32
        assert screen.rows[table.cursor_row]["trace_id"] == chosen


@pytest.mark.anyio
@pytest.mark.parametrize("bound", ["since", "sample"])
async def test_a_window_of_time_or_a_sample_lists_the_failures_of_the_traces_read(tmp_path: Path, bound: str) -> None:
    """`tui --since` lists the failures of the traces that started in the window, `tui --sample N` those of the
    store's sample of N traces: as `analyze` reads them."""
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import failure_rows
    from payscope.timeparse import format_ns
    from tests.helpers import SCENARIOS

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "subscriptions.otlp.jsonl.gz"), "--store", store, check=True)
    with open_store(store, readonly=True) as opened:
        starts = sorted(t.start_ns for t in opened.traces(limit=None))
        split, limit = starts[len(starts) // 2], len(starts) // 2
        read = ({t.trace_id for t in opened.traces(limit=None) if t.start_ns >= split} if bound == "since"
                else set(opened.sample_traces(0, 2**63 - 1, limit).trace_ids))
        every = failure_rows(opened, load(opened), limit=None)
        expected = failure_rows(opened, load(opened, window=(split, None)) if bound == "since"
                                else load(opened, sample=limit), limit=None)
    assert 0 < len(expected) < len(every) and {r["trace_id"] for r in expected} <= read
    app = build(store, refresh_seconds=3600, **({"since": format_ns(split)} if bound == "since" else {"sample": limit}))
    async with app.run_test(size=(140, 44)) as pilot:
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, FailuresScreen)
        assert [r["trace_id"] for r in screen.rows] == [r["trace_id"] for r in expected][:data.PAGE]
        said = f"since {format_ns(split)}" if bound == "since" else f"a sample of {limit:,} traces and their orders"
        assert screen.total == len(expected) and said in app.sub_title


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("snap") / "sample.db"
    payscope("import", "traces", str(SAMPLE), "--store", str(path), check=True)
    return str(path)


def _app(store: str):  # type: ignore[no-untyped-def]
    return build(store, refresh_seconds=3600)


def test_snapshot_failures(snap_compare, sample_store: str) -> None:  # type: ignore[no-untyped-def]
    async def settle(pilot) -> None:  # type: ignore[no-untyped-def]
        await _settle(pilot.app, pilot)

    assert snap_compare(_app(sample_store), terminal_size=(120, 32), run_before=settle)


def test_snapshot_transaction(snap_compare, sample_store: str) -> None:  # type: ignore[no-untyped-def]
    async def open_first(pilot) -> None:  # type: ignore[no-untyped-def]
        await _settle(pilot.app, pilot)
        await pilot.press("enter")
        await _settle(pilot.app, pilot)

    assert snap_compare(_app(sample_store), terminal_size=(120, 40), run_before=open_first)


def test_snapshot_edges(snap_compare, sample_store: str) -> None:  # type: ignore[no-untyped-def]
    async def edges(pilot) -> None:  # type: ignore[no-untyped-def]
        await _settle(pilot.app, pilot)
        await pilot.press("t")
        await _settle(pilot.app, pilot)
        await pilot.press("down", "down", "down")
        await pilot.pause(0.2)

    assert snap_compare(_app(sample_store), terminal_size=(120, 40), run_before=edges)


@pytest.mark.parametrize("size", [(80, 24), (160, 45)])
def test_snapshot_failures_and_transaction_at_80x24_and_160x45(snap_compare, sample_store: str,  # type: ignore[no-untyped-def]
                                                               size: tuple[int, int]) -> None:
    async def open_first(pilot) -> None:  # type: ignore[no-untyped-def]
        await _settle(pilot.app, pilot)
        await pilot.press("enter")
        await _settle(pilot.app, pilot)

    assert snap_compare(_app(sample_store), terminal_size=size, run_before=open_first)


def test_snapshot_help_keeps_its_border_at_80x24(snap_compare, sample_store: str) -> None:  # type: ignore[no-untyped-def]
    async def help_open(pilot) -> None:  # type: ignore[no-untyped-def]
        await _settle(pilot.app, pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.3)

    assert snap_compare(_app(sample_store), terminal_size=(80, 24), run_before=help_open)


@pytest.mark.anyio
async def test_at_80x24_the_fix_is_one_key_from_the_failed_list(sample_store: str) -> None:
    app = _app(sample_store)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(app, pilot)
        table = app.screen.query_one("#failures")
        first = table.get_row_at(0)
        assert first[1] in data.OUTCOMES and len(first[1]) <= 16  # the outcome in full, within 80 columns
        await pilot.press("enter")
        await _settle(app, pilot)
        assert isinstance(app.screen, TransactionScreen) and app.screen.has_class("narrow")
        findings = app.screen.query_one("#findings-box")
        text = str(app.screen.query_one("#findings").render())
        assert findings.region.height >= 6 and "fix:" in text and "recommended timeout" in text
        assert findings.max_scroll_x == 0  # nothing cut off to the right: the text wraps


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_a_real_terminal(demo_store: Path, tmp_path: Path) -> None:
    failures = payscope_json("failures", "--store", str(demo_store), "--limit", "0")["failures"]
    keyed = next(f for f in failures if f["keys"])
    order_id = keyed["keys"][0]
    session = f"payscope-test-{int(time.time() * 1000)}"
    # COLUMNS and LINES in the environment would win over the terminal's own size (shutil.get_terminal_size)
    cmd = f"env -u COLUMNS -u LINES {sys.executable} -m payscope tui --store {demo_store}"
    # A tmux server of the test's own, with no user config: a server already running on this machine (its
    # options, an attached client of another size) would otherwise decide the size of the window.
    tmux = ["tmux", "-L", session, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "140", "-y", "44", cmd], check=True)
    subprocess.run([*tmux, "set-option", "-t", session, "window-size", "manual"], check=True)
    subprocess.run([*tmux, "resize-window", "-t", session, "-x", "140", "-y", "44"], check=True)
    size = subprocess.run([*tmux, "display-message", "-p", "-t", session, "#{pane_width}x#{pane_height}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert size == "140x44", size  # the wide layout, where the log table has its "linked by" column

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared:\n{screen()}")

    def status() -> str:
        """The failed list's first line: how many, and which outcome it shows."""
        return next((line for line in screen().splitlines() if "failed transactions" in line), "")

    def keys(*k: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", session, *k], check=True)

    try:
        wait_for("failed transactions")
        keys("o")
        wait_for("outcome=")
        for _ in range(len(data.OUTCOMES)):
            if "all outcomes" in status():
                break
            before = status()
            keys("o")
            # one key at a time: a second "o" sent before the first is drawn (a busy machine) would step past
            # "all outcomes"
            deadline = time.monotonic() + 20
            while status() == before and time.monotonic() < deadline:
                time.sleep(0.2)
        wait_for("all outcomes")
        keys("/")
        # typed only once the search box is drawn: a key that reached the list first would be one of its own
        # bindings ("o" of the order id steps the outcome filter)
        wait_for("enter to apply, empty to clear")
        keys("-l", order_id)
        keys("Enter")
        wait_for(f"search={order_id!r}")
        deadline = time.monotonic() + 20  # the status line changes first; the rows follow from the worker
        rows: list[str] = []
        while not rows and time.monotonic() < deadline:
            rows = [line for line in screen().splitlines() if order_id in line and "search=" not in line]
            time.sleep(0.2)
        assert rows, f"no row of {order_id} in the list:\n{screen()}"
        keys("Enter")
        shown = wait_for("linked by")
        deadline = time.monotonic() + 20  # the log table's header shows while the trace still loads: wait for rows
        while not ("trace_id" in shown or "request_id" in shown) and time.monotonic() < deadline:
            time.sleep(0.2)
            shown = screen()
        assert "trace_id" in shown or "request_id" in shown  # its log lines, with how each was linked
        assert keyed["trace_id"] in shown or order_id in shown
        keys("q")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = subprocess.run([*tmux, "has-session", "-t", session], capture_output=True).returncode == 0
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, "q did not quit"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)



@pytest.mark.anyio
async def test_compare_from_the_failed_list_names_the_bank_link(demo_store: Path) -> None:
    import json

    with open_store(str(demo_store), readonly=True) as opened:
        peak = json.loads(opened.get_meta("demo_peak") or "{}")
    app = build(str(demo_store), refresh_seconds=3600)
    async with app.run_test(size=(140, 44)) as pilot:
        await _settle(app, pilot)
        await pilot.press("c")
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, CompareScreen) and screen.document is not None
        assert "requests) against incident" in str(screen.query_one("#compare-status").render())
        await pilot.press("w")
        await pilot.press(*f"{peak['traffic_start']}..{peak['start']} {peak['start']}..{peak['end']}", "enter")
        await _settle(app, pilot)
        assert demo_bank_link_leads(screen.document["hops"]), screen.document["hops"]
        table = screen.query_one("#hops")
        assert table.row_count == len(screen.document["hops"])
        # a queue its workers' own slowness caused is marked, as in the document (the demo's order service)
        marked = [table.get_row_at(i)[-1] for i in range(table.row_count)]
        assert marked == ["yes" if hop["consequence"] else "" for hop in screen.document["hops"]]
        assert "bank" in str(screen.query_one("#hop-sentence").render())
        await pilot.press("escape")
        assert isinstance(app.screen, FailuresScreen)


@pytest.mark.anyio
async def test_the_failed_list_pages_through_the_whole_store(demo_store: Path) -> None:
    every = payscope_json("failures", "--store", str(demo_store), "--limit", "0")["failures"]
    assert len(every) > data.PAGE, "the demo store holds more failures than one page"
    app = build(str(demo_store), refresh_seconds=3600)
    async with app.run_test(size=(140, 44)) as pilot:
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, FailuresScreen)
        assert len(screen.rows) == data.PAGE and _status(app).startswith(f"{data.PAGE} of {len(every)} failed")
        table = screen.query_one("#failures")
        for _ in range(len(every) // data.PAGE + 1):  # to the last row loaded, page after page
            table.move_cursor(row=table.row_count - 1)
            await _settle(app, pilot)
        assert [r["trace_id"] for r in screen.rows] == [f["trace_id"] for f in every]
        assert _status(app).startswith(f"{len(every)} failed transactions")


@pytest.mark.anyio
async def test_failures_since_and_the_tui_since_give_each_transaction_one_answer(demo_store: Path) -> None:
    """From the sale peak on: the same transactions, outcomes and findings, worst first, in `payscope failures
    --since` and in the TUI's list (both analyse the traces that started since then, not the whole store)."""
    from payscope.timeparse import format_ns

    with open_store(str(demo_store), readonly=True) as opened:
        peak = json.loads(opened.get_meta("demo_peak") or "{}")
    since = format_ns(int(peak["start"] * 1e9))
    listed = payscope_json("failures", "--store", str(demo_store), "--since", since, "--limit", "0")["failures"]
    assert listed and all(r["time"] >= since for r in listed)
    app = build(str(demo_store), refresh_seconds=3600, since=since)
    async with app.run_test(size=(140, 44)) as pilot:
        await _settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, FailuresScreen)
        assert screen.total == len(listed)
        assert screen.rows == listed[:len(screen.rows)]


@pytest.mark.anyio
async def test_a_transaction_opens_its_orders_journey(demo_store: Path, tmp_path: Path) -> None:
    reconciled = payscope_json("reconcile", "--store", str(demo_store))["orders"]
    order = next(o for o in reconciled if len(o["trace_ids"]) >= 2)  # a customer's retry: two traces or more
    app = build(str(demo_store), refresh_seconds=3600, report_dir=str(tmp_path))
    async with app.run_test(size=(160, 45)) as pilot:
        await _settle(app, pilot)
        await pilot.press("slash", *order["trace_ids"][-1], "enter")  # the retry's trace, found by its id
        await _settle(app, pilot)
        await pilot.press("enter")
        await _settle(app, pilot)
        tx = app.screen
        assert isinstance(tx, TransactionScreen) and tx.view is not None
        assert tx.view["trace_ids"] == [order["trace_ids"][-1]]
        hint = str(tx.query_one("#journey").render())
        assert f"part of order {order['order']} ({len(order['trace_ids'])} traces)" in hint
        await pilot.press("o")
        await _settle(app, pilot)
        journey = app.screen
        assert isinstance(journey, TransactionScreen) and journey is not tx and journey.view is not None
        assert journey.view["order"] == order  # the same charges and state as reconcile
        shown = str(journey.query_one("#journey").render())
        assert shown.startswith(f"order {order['order']}: the customer was told {order['final']}")
        # every trace of the order, in time order
        assert [shown.index(t) for t in order["trace_ids"]] == sorted(shown.index(t) for t in order["trace_ids"])
        await pilot.press("o")  # the whole order is shown already
        await _settle(app, pilot)
        assert app.screen is journey
        await pilot.press("escape")
        await _settle(app, pilot)
        assert app.screen is tx


@pytest.mark.anyio
async def test_a_span_that_retried_inside_itself_gives_its_last_attempts_times_in_the_details(
        demo_store: Path) -> None:
    """payment's client retries the bank inside one span: selected, its details give the call's times as `show`
    does, and say they are the last attempt's."""
    failures = payscope_json("failures", "--store", str(demo_store), "--limit", "0")["failures"]
    found = None
    for failure in failures[:60]:
        rows = payscope_json("show", failure["trace_id"], "--store", str(demo_store))["spans"]
        retried = [r for r in rows if r["call"] and r["call"]["attempts_in_span"] > 1]
        if retried:
            found = failure["trace_id"], retried[0]
            break
    assert found is not None, "the demo's payment service retries the bank within one span"
    trace_id, row = found
    app = build(str(demo_store), refresh_seconds=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await _settle(app, pilot)
        await pilot.press("slash", *trace_id, "enter")
        await _settle(app, pilot)
        await pilot.press("enter")
        await _settle(app, pilot)
        waterfall = app.screen.query_one(Waterfall)
        while waterfall.selected is not None and waterfall.selected["span_id"] != row["span_id"]:
            before = waterfall.cursor
            await pilot.press("down")
            assert waterfall.cursor == before + 1
        await _settle(app, pilot)
        details = str(app.screen.query_one("#details").render())
        assert f"call to bank: [last of {row['call']['attempts_in_span']} attempts: client " in details, details
