"""The command line as a user meets it: help, version, errors, exit codes, start-up weight."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from payscope import __version__
from tests.helpers import SCENARIOS, payscope

COMMANDS = {"run", "collect", "import", "ingest", "failures", "show", "logs", "analyze", "recommend", "demo", "sidecar",
            "tui"}


def test_help_lists_the_commands_that_exist() -> None:
    proc = payscope("--help", check=True)
    listed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert COMMANDS <= listed
    for command in ("import", "recommend"):
        assert payscope(command, "--help", check=True).stdout


def test_version() -> None:
    assert payscope("--version", check=True).stdout.strip() == f"payscope {__version__}"


def test_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = payscope("failures", "--store", str(tmp_path / "none.db"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "no payscope store" in missing.stderr
    bad_format = payscope("failures", "--store", str(tmp_path / "x.db"), "--format", "xml")
    assert bad_format.returncode == 2 and "--format 'xml'" in bad_format.stderr
    bad_since = payscope("import", "traces", str(SCENARIOS / "calm.otlp.jsonl.gz"), "--store", str(tmp_path / "x.db"))
    assert bad_since.returncode == 0
    since = payscope("failures", "--store", str(tmp_path / "x.db"), "--since", "yesterday")
    assert since.returncode == 2 and "is neither a duration" in since.stderr and since.stderr.count("\n") == 1
    unknown = payscope("show", "4bf92f3577b34da6a3ce929d0e0e4736", "--store", str(tmp_path / "x.db"))
    assert unknown.returncode == 2 and "no transaction" in unknown.stderr
    usage = payscope("failures", "--no-such-option")
    assert usage.returncode == 2


def test_store_from_environment(tmp_path: Path) -> None:
    store = tmp_path / "env.db"
    payscope("import", "traces", str(SCENARIOS / "calm.otlp.jsonl.gz"), env={"PAYSCOPE_STORE": str(store)},
             check=True)
    assert store.exists()
    proc = payscope("failures", "--format", "json", env={"PAYSCOPE_STORE": str(store)}, check=True)
    assert json.loads(proc.stdout) == {"failures": []}
    assert "no failed transactions" in payscope("failures", env={"PAYSCOPE_STORE": str(store)}).stdout


def test_help_and_commands_start_without_heavy_imports() -> None:
    code = ("import sys; from payscope import cli; "
            "heavy = [m for m in ('grpc', 'textual', 'opentelemetry.sdk', 'elasticsearch') if m in sys.modules]; "
            "print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def test_tracebacks_do_not_show_local_variables() -> None:
    from payscope.cli import app

    assert app.pretty_exceptions_show_locals is False


def test_failures_filter_by_outcome_service_and_since(tmp_path: Path) -> None:
    from tests.helpers import SCENARIOS, payscope_json

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "subscriptions.otlp.jsonl.gz"), "--store", store, check=True)
    every = payscope_json("failures", "--store", store, "--limit", "0")["failures"]
    outcomes = {r["outcome"] for r in every}
    assert "late_success" in outcomes and len(outcomes) >= 2
    late = payscope_json("failures", "--store", store, "--limit", "0", "--outcome", "late_success")["failures"]
    assert late and len(late) == sum(r["outcome"] == "late_success" for r in every)
    service = every[0]["services"][-1]
    through = payscope_json("failures", "--store", store, "--limit", "0", "--service", service)["failures"]
    assert through and all(service in r["services"] for r in through)
    assert len(through) == sum(service in r["services"] for r in every)
    assert payscope_json("failures", "--store", store, "--service", "no-such-service")["failures"] == []
    newest = every[0]["time"]
    assert [r["trace_id"] for r in payscope_json("failures", "--store", store, "--since", newest)["failures"]] \
        == [r["trace_id"] for r in every if r["time"] >= newest]
    assert payscope_json("failures", "--store", store, "--since", "1h")["failures"] == []  # recorded long ago
    table = payscope("failures", "--store", store, "--limit", "3", check=True).stdout.splitlines()
    assert "order" in table[0].split() and every[0]["order"] and every[0]["order"] in table[1]
    for args, says in ((["--outcome", "lost"], "--outcome 'lost'"), (["--limit", "-3"], "--limit -3"),
                       (["--since", "yesterday"], "--since 'yesterday'")):
        proc = payscope("failures", "--store", store, *args)
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = payscope("logs", "--store", store, "--limit", "-3")
    assert proc.returncode == 2 and "--limit -3" in proc.stderr


def test_analyze_and_recommend_read_the_traces_of_a_window_and_say_so(tmp_path: Path) -> None:
    from payscope.collector.store import open_store
    from payscope.timeparse import format_ns, parse_since_ns
    from tests.helpers import payscope_json

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "subscriptions.otlp.jsonl.gz"), "--store", store, check=True)
    with open_store(store, readonly=True) as opened:
        starts = sorted(t.start_ns for t in opened.traces(limit=None))
    split = format_ns(starts[len(starts) // 2])
    at = parse_since_ns(split, 0)
    every = payscope_json("analyze", "--store", store)
    before = payscope_json("analyze", "--store", store, "--until", split)
    after = payscope_json("analyze", "--store", store, "--since", split)
    assert every["stats"]["window"] is None and after["stats"]["window"] == {"from": split, "to": None}
    assert before["stats"]["traces"] == sum(s < at for s in starts) > 0
    assert after["stats"]["traces"] == sum(s >= at for s in starts) > 0
    assert before["stats"]["traces"] + after["stats"]["traces"] == every["stats"]["traces"] == len(starts)
    # one answer: the window's recommendations are the ones its analysis cites
    recommended = payscope_json("recommend", "timeouts", "--store", store, "--since", split)
    assert recommended["window"] == after["stats"]["window"]
    cited = {(e["caller"], e["callee"], e["operation"]): e["recommended_timeout_ms"] for e in after["edges"]}
    assert recommended["recommendations"]
    for r in recommended["recommendations"]:
        edge = r["edge"]
        assert cited[(edge["caller"], edge["callee"], edge["operation"])] == r["recommended"]["timeout_ms"]
    table = payscope("analyze", "--store", store, "--since", split, check=True).stdout.splitlines()
    assert table[0].startswith(f"of the traces that started from {split}: {after['stats']['transactions']} ")
    proc = payscope("analyze", "--store", store, "--since", split, "--until", format_ns(at - 1_000_000))
    assert proc.returncode == 2 and "--since" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = payscope("tui", "--store", store, "--since", "yesterday", timeout=30)  # refused before the screen
    assert proc.returncode == 2 and "--since 'yesterday'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_show_reads_the_window_and_sample_it_is_given_and_always_its_transaction(tmp_path: Path) -> None:
    """``show ID --sample N`` (or ``--since``) gives the transaction as the analysis of that sample gives it, as
    the TUI with the same options shows it; a transaction the sample or the window leaves out is read beside it,
    and the output says what was read. An unknown id is refused before anything is read."""
    from payscope.collector.store import open_store
    from payscope.timeparse import format_ns
    from tests.helpers import payscope_json

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "marketplace.otlp.jsonl.gz"), "--store", store, check=True)
    with open_store(store, readonly=True) as opened:
        summaries = opened.traces(limit=None)
        every, limit = len(summaries), len(summaries) // 3
        chosen = set(opened.sample_traces(0, 2**63 - 1, limit).trace_ids)
    sampled = payscope_json("analyze", "--store", store, "--sample", str(limit))
    cited = [t for f in sampled["findings"] for t in f["evidence"]["trace_ids"] if t in chosen]
    inside = payscope_json("show", cited[0], "--store", store, "--sample", str(limit))
    assert inside["window"] == sampled["stats"]["window"]
    assert inside["findings"] and all(f in sampled["findings"] for f in inside["findings"])

    whole = payscope_json("analyze", "--store", store)
    left_out = next(t for f in whole["findings"] for t in f["evidence"]["trace_ids"] if t not in chosen)
    beside = payscope_json("show", left_out, "--store", store, "--sample", str(limit))
    assert beside["trace_ids"] == [left_out] and beside["spans"]
    assert beside["window"]["sample"] == {"traces_read": limit + 1, "traces_in_window": every, "limit": limit,
                                          "complete": False}
    table = payscope("show", left_out, "--store", store, "--sample", str(limit), check=True).stdout
    if beside["findings"]:
        assert f"findings (of a sample of {limit + 1:,} of {every:,} traces" in table

    first = min(summaries, key=lambda s: s.start_ns)
    later = format_ns(max(s.start_ns for s in summaries))
    widened = payscope_json("show", first.trace_id, "--store", store, "--since", later)
    assert widened["window"]["from"] == format_ns(first.start_ns) and widened["spans"]

    proc = payscope("show", "f" * 32, "--store", store, "--sample", "5")
    assert proc.returncode == 2 and "no transaction" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _an_order_split_by_the_sample(tmp_path: Path) -> tuple[str, str, list[Any]]:
    """A store of 300 one-span orders but one, "ord-shared", in two traces: the first, in the store's sample of 100,
    charged the card at the bank and answered 504; the customer's retry, outside it and 3 s later, was told paid
    without a second charge. The store, the first trace's id, and the first trace's spans."""
    import random

    from payscope.collector.store import open_store
    from payscope.model import Span

    rng = random.Random(11)
    trace_ids = [format(rng.getrandbits(128), "032x") for _ in range(300)]
    by_sample_key = sorted(trace_ids, key=lambda t: (int(t[-14:], 16), t))  # the store's sample: the least first
    inside, outside = by_sample_key[0], by_sample_key[-1]
    spans = []
    for n, trace in enumerate(trace_ids):
        order = "ord-shared" if trace in (inside, outside) else f"ord-{n}"
        at = trace_ids.index(inside) if trace == outside else n  # the retry: 3 s after the first try
        start = 1_800_000_000_000_000_000 + at * 50_000_000 + (3_000_000_000 if trace == outside else 0)
        status = 504 if trace == inside else 200
        root = format(2 * n + 1, "016x")
        spans.append(Span(trace, root, None, "gateway", "POST /orders/{order_id}", "server", start,
                          start + 20_000_000, 2 if status >= 500 else 1, "",
                          {"http.request.method": "POST", "http.route": "/orders/{order_id}", "order_id": order,
                           "http.response.status_code": status}, [], {"service.name": "gateway"}))
        if trace == inside:  # the charge that went through before the gateway answered 504
            spans.append(Span(trace, format(2 * n + 2, "016x"), root, "gateway", "POST", "client",
                              start + 1_000_000, start + 15_000_000, 0, "",
                              {"http.request.method": "POST", "url.full": "http://bank/v1/charges",
                               "server.address": "bank", "http.response.status_code": 200}, [],
                              {"service.name": "gateway"}))
    store = str(tmp_path / "s.db")
    with open_store(store) as opened:
        opened.write(spans)
    return store, inside, [s for s in spans if s.trace_id == inside]


def test_show_with_a_sample_judges_the_transactions_order_on_every_trace_of_it(tmp_path: Path) -> None:
    """An order paid in two traces (a first try, then the customer's retry), one in the store's sample and one out
    of it: `show` of the first with `--sample` still sees the journey of two traces, as without a sample."""
    from tests.helpers import payscope_json

    store, inside, _ = _an_order_split_by_the_sample(tmp_path)
    whole = payscope_json("show", inside, "--store", store)
    assert whole["journey"] == {"order": "ord-shared", "traces": 2}
    sampled = payscope_json("show", inside, "--store", store, "--sample", "100")
    assert sampled["journey"] == whole["journey"] and sampled["transactions"] == whole["transactions"]
    assert sampled["window"]["sample"]["traces_read"] == 101  # the sample, and the order's other trace beside it


def test_a_sample_reads_the_other_traces_of_its_orders_and_judges_them_whole(tmp_path: Path) -> None:
    """An order in two traces, split by the store's sample: the first charged the card at the bank and told the
    customer it failed (a 504), the customer's retry was told paid without a second charge. Judged on the first
    alone, the order was charged but failed; judged whole, it is consistent. `analyze --sample` reads the order's
    other trace beside the sample and judges it whole, as without a sample, and says it read one trace more."""
    from payscope.collector.store import open_store
    from tests.helpers import payscope_json

    store, inside, first = _an_order_split_by_the_sample(tmp_path)
    whole = payscope_json("analyze", "--store", store)
    assert whole["stats"]["orders_to_reconcile"]["charged_but_failed"] == 0
    sampled = payscope_json("analyze", "--store", store, "--sample", "100")
    assert sampled["stats"]["window"]["sample"]["traces_read"] == 101  # the sample, and the order's other trace
    assert sampled["stats"]["orders_to_reconcile"] == whole["stats"]["orders_to_reconcile"]
    shown = payscope_json("show", inside, "--store", store, "--sample", "100")
    assert shown["journey"] == {"order": "ord-shared", "traces": 2}
    # judged on the first trace alone, the order would be charged but failed: what the sample would say without it
    alone = str(tmp_path / "alone.db")
    with open_store(alone) as opened:
        opened.write(first)
    assert payscope_json("analyze", "--store", alone)["stats"]["orders_to_reconcile"]["charged_but_failed"] == 1


def test_analyze_and_recommend_read_a_sample_of_the_traces_and_say_so(tmp_path: Path) -> None:
    """``--sample N`` reads the store's sample of N traces and nothing else: its analysis is the whole analysis of
    a store that holds only those traces (and the other traces of their orders: none here), and every output says
    how many of how many were read."""
    from payscope.collector.store import open_store
    from tests.helpers import payscope_json

    store, alone = str(tmp_path / "s.db"), str(tmp_path / "alone.db")
    payscope("import", "traces", str(SCENARIOS / "marketplace.otlp.jsonl.gz"), "--store", store, check=True)
    with open_store(store, readonly=True) as opened:
        every = len(opened.traces(limit=None))
        limit = every // 3
        chosen = opened.sample_traces(0, 2**63 - 1, limit).trace_ids
        assert len(chosen) == limit
        with open_store(alone) as copy:
            copy.write([s for t in chosen for s in opened.trace(t)])
    sampled = payscope_json("analyze", "--store", store, "--sample", str(limit))
    assert sampled["stats"]["window"] == {"from": None, "to": None, "sample": {
        "traces_read": limit, "traces_in_window": every, "limit": limit, "complete": False}}
    whole_of_those = payscope_json("analyze", "--store", alone)
    assert whole_of_those["stats"]["window"] is None
    for document in (sampled, whole_of_those):
        del document["stats"]["window"]
    assert sampled == whole_of_those
    assert sampled["stats"]["traces"] == limit and sampled["findings"]
    # a limit the store does not reach reads every trace, and says so
    unlimited = payscope_json("analyze", "--store", store)
    roomy = payscope_json("analyze", "--store", store, "--sample", str(every + 1))
    assert roomy["stats"]["window"]["sample"] == {"traces_read": every, "traces_in_window": every,
                                                   "limit": every + 1, "complete": True}
    roomy["stats"]["window"] = None
    assert roomy == unlimited == payscope_json("analyze", "--store", store, "--sample", "0")
    # one answer: the sample's recommendations are the ones its analysis cites, and the table says what was read
    recommended = payscope_json("recommend", "timeouts", "--store", store, "--sample", str(limit))
    assert recommended["window"]["sample"]["traces_read"] == limit
    cited = {(e["caller"], e["callee"], e["operation"]): e["recommended_timeout_ms"] for e in sampled["edges"]}
    assert recommended["recommendations"]
    for r in recommended["recommendations"]:
        edge = r["edge"]
        assert cited[(edge["caller"], edge["callee"], edge["operation"])] == r["recommended"]["timeout_ms"]
    said = f"of a sample of {limit:,} of {every:,} traces"
    assert payscope("analyze", "--store", store, "--sample", str(limit), check=True).stdout.startswith(said)
    assert payscope("recommend", "timeouts", "--store", store, "--sample", str(limit),
                    check=True).stdout.startswith(said)
    proc = payscope("analyze", "--store", store, "--sample", "-5")
    assert proc.returncode == 2 and "--sample -5" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    # reading every trace of a large store is said first, with the way to bound it
    from payscope.cli import whole_read_note

    with open_store(store, readonly=True) as opened:
        assert whole_read_note(opened, None, None) is None  # not that large
        note = whole_read_note(opened, None, None, large=every - 1)
        assert note and f"all {every:,} traces" in note and "--sample" in note
        assert whole_read_note(opened, None, limit, large=every - 1) is None
        assert whole_read_note(opened, (0, None), None, large=every - 1) is None


def test_help_takes_h_and_run_shows_its_command() -> None:
    short = payscope("-h", check=True).stdout
    assert short == payscope("--help", check=True).stdout
    run = payscope("run", "-h", check=True).stdout
    assert "payscope run [OPTIONS] -- CMD ARGS..." in run


HELP_PAGES = [[], ["run"], ["sidecar"], ["demo"], ["collect"], ["import", "traces"], ["ingest", "logs"],
            ["ingest", "config"], ["analyze"], ["failures"], ["show"], ["logs"], ["recommend", "timeouts"],
            ["compare"], ["tui"]]


def test_help_shows_no_type_placeholders() -> None:
    for command in HELP_PAGES:
        shown = payscope(*command, "-h", check=True, env={"COLUMNS": "100"}).stdout
        assert "Usage: payscope" in shown
        assert not re.search(r"<(?:str|int|bool|float|path|Path|list\[[^\]]*\])>", shown), (command, shown)


@pytest.mark.parametrize("args, says", [
    (["failures", "--bogus"], "No such option: --bogus"),
    (["failures", "--limit", "x"], "Invalid value for '--limit'"),
    (["show"], "Missing argument 'ID'"),
    (["analyze", "extra"], "unexpected extra argument"),
])
def test_a_usage_error_is_one_line_and_a_hint(args: list[str], says: str) -> None:
    proc = payscope(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("payscope: error:") and says in lines[0] and "-h')" in lines[0]


def test_failures_search_by_attribute_duration_and_words_as_the_tui_does(tmp_path: Path) -> None:
    from payscope.collector.store import open_store
    from payscope.tui.data import Filter, Source, failures
    from tests.helpers import payscope_json

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "marketplace.otlp.jsonl.gz"), "--store", store, check=True)
    every = payscope_json("failures", "--store", store, "--limit", "0")["failures"]
    with open_store(store, readonly=True) as opened:
        statuses = {row["trace_id"]: [s.attributes.get("http.response.status_code", s.attributes.get(
            "http.status_code")) for s in opened.trace(row["trace_id"])] for row in every}
    durations = sorted(r["duration_ms"] for r in every)
    middle = durations[len(durations) // 2]
    cases = {
        "http.status_code>=500": [r for r in every if any(isinstance(c, int) and c >= 500
                                                          for c in statuses[r["trace_id"]])],
        "http.status_code!=200": [r for r in every if 200 not in statuses[r["trace_id"]]],
        f"duration>={middle}ms": [r for r in every if r["duration_ms"] >= middle],
        f"max:{middle}ms": [r for r in every if r["duration_ms"] <= middle],
        every[0]["entry"].split(": ")[1].split()[0]: [r for r in every if every[0]["entry"].split(": ")[1].split()[0]
                                                      .lower() in r["entry"].lower() + " " + r["trace_id"]],
    }
    assert any(cases.values()) and any(len(c) < len(every) for c in cases.values())  # the cases tell rows apart
    with open_store(store, readonly=True) as opened:
        source = Source(opened)
        for i, (query, expected) in enumerate(cases.items()):
            page = failures(source, Filter(text=query), limit=len(every))  # the TUI's /
            assert [r["trace_id"] for r in page.rows] == [r["trace_id"] for r in expected], query
            if i % 2 == 0:  # and the command line, the same (every other case: each run loads the analysis)
                found = payscope_json("failures", "--store", store, "--limit", "0", "--search", query)["failures"]
                assert [r["trace_id"] for r in found] == [r["trace_id"] for r in expected], query
    chosen = every[len(every) // 2]["trace_id"]
    (tmp_path / "gw.log").write_text(f"2026-11-25 10:00:00,100 ERROR upstream said card_issuer_unreachable "
                                     f"trace_id={chosen}\n")
    payscope("ingest", "logs", str(tmp_path / "gw.log"), "--store", store, check=True)
    found = payscope_json("failures", "--store", store, "--limit", "0", "--search", "card_issuer_unreachable")
    assert [r["trace_id"] for r in found["failures"]] == [chosen]  # a word of a log line of the transaction
    with open_store(store, readonly=True) as opened:
        assert [r["trace_id"] for r in failures(Source(opened), Filter(text="log:issuer_unreachable")).rows] \
            == [chosen]
    proc = payscope("failures", "--store", store, "--search", "duration>=soon")
    assert proc.returncode == 2 and "duration>=soon" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
