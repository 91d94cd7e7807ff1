"""`payscope reconcile` on the demo's real services, held against ground truth the analysis never reads: the
bank's own ledger (its log line for every charge it made) and the gateway's access log (what each customer was
told last)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

from tests.helpers import payscope


def _truth(demo_store: Path) -> tuple[Counter[str], dict[str, str]]:
    logs = demo_store.with_name(demo_store.stem + "-demo-logs")
    ledger = Counter(re.findall(r"charged order (\S+) amount", (logs / "bank.log").read_text()))
    told: dict[str, str] = {}
    for line in (logs / "gateway-access.log").read_text().splitlines():
        found = re.search(r'"POST /orders/(\S+) HTTP/1\.1" (\d{3})', line)
        if found:
            told[found.group(1)] = found.group(2)  # the last line of an order is its last answer
    return ledger, told


def test_reconcile_agrees_with_the_banks_ledger_and_what_customers_were_told(demo_store: Path) -> None:
    ledger, told = _truth(demo_store)
    done = payscope("reconcile", "--store", str(demo_store), "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    by_order = {o["order"]: o for o in doc["orders"]}
    twice = {o for o, n in ledger.items() if n >= 2}
    charged_but_failed = {o for o, n in ledger.items() if n >= 1 and told.get(o) != "200"}
    assert twice and charged_but_failed  # the demo's shipped timeouts make both
    found_twice = {k for k, o in by_order.items() if "charged_twice" in o["mismatches"]}
    found_failed = {k for k, o in by_order.items() if "charged_but_failed" in o["mismatches"]}
    assert found_twice <= twice and len(found_twice) >= 0.97 * len(twice)
    assert found_failed <= charged_but_failed and len(found_failed) >= 0.97 * len(charged_but_failed)
    agree = [k for k, o in by_order.items() if len(o["charges"]) == ledger[k]]
    assert len(agree) >= 0.97 * len(by_order)  # each charge the bank made, counted once
    assert doc["counts"] == {"charged_but_failed": len(found_failed), "charged_twice": len(found_twice),
                             "paid_without_charge": 0}
    risks = [o["amount_at_risk"] for o in doc["orders"]]
    assert risks == sorted(risks, reverse=True) and risks[0] > 0  # the most money first


def test_reconcile_csv_has_one_row_an_order(demo_store: Path) -> None:
    as_json = json.loads(payscope("reconcile", "--store", str(demo_store), "-f", "json", check=True).stdout)
    done = payscope("reconcile", "--store", str(demo_store), "--format", "csv", check=True)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["order"] for r in rows] == [o["order"] for o in as_json["orders"]]
    first, expected = rows[0], as_json["orders"][0]
    assert int(first["charges"]) == len(expected["charges"]) == len(first["charge_trace_ids"].split())
    assert float(first["amount_at_risk"]) == expected["amount_at_risk"]
    table = payscope("reconcile", "--store", str(demo_store), check=True).stdout
    assert table.startswith(f"{len(rows)} orders to reconcile") and expected["order"] in table


def test_reconcile_refuses_an_unknown_format(tmp_path: Path) -> None:
    done = payscope("reconcile", "--store", str(tmp_path / "x.db"), "--format", "xlsx")
    assert done.returncode == 2 and "xlsx" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_show_of_an_order_gives_the_same_charges_and_state_as_reconcile(demo_store: Path) -> None:
    doc = json.loads(payscope("reconcile", "--store", str(demo_store), "-f", "json", check=True).stdout)
    listed = doc["orders"][0]
    shown = json.loads(payscope("show", listed["order"], "--store", str(demo_store), "-f", "json",
                                check=True).stdout)
    assert shown["order"] == listed  # one answer: the same charges, state and mismatches
    assert set(shown["trace_ids"]) == set(listed["trace_ids"])
    table = payscope("show", listed["order"], "--store", str(demo_store), check=True).stdout
    assert table.startswith(f"order {listed['order']}: the customer was told {listed['final']}")


def test_failures_by_problem_lists_the_orders_the_bank_charged_twice(demo_store: Path) -> None:
    ledger, _ = _truth(demo_store)
    twice = {o for o, n in ledger.items() if n >= 2}
    rows = json.loads(payscope("failures", "--store", str(demo_store), "--problem", "charged_twice", "--limit", "0",
                               "-f", "json", check=True).stdout)["failures"]
    listed = {r["order"] for r in rows}
    assert listed <= twice and len(listed) >= 0.97 * len(twice)
    assert all("charged_twice" in r["problems"] for r in rows)
    doc = json.loads(payscope("reconcile", "--store", str(demo_store), "-f", "json", check=True).stdout)
    traces = {t for o in doc["orders"] if "charged_twice" in o["mismatches"] for t in o["trace_ids"]}
    assert {r["trace_id"] for r in rows} == traces  # every trace of those orders, the same as reconcile's
    every = json.loads(payscope("failures", "--store", str(demo_store), "--problem", "any", "--limit", "0",
                                "-f", "json", check=True).stdout)["failures"]
    assert {r["trace_id"] for r in every} == {t for o in doc["orders"] for t in o["trace_ids"]}
    table = payscope("failures", "--store", str(demo_store), "--problem", "charged_twice", check=True).stdout
    assert re.search(r"\((?:\w+, )*charged_twice(?:, \w+)*\)$", table.splitlines()[1])  # the row names them


def test_failures_refuses_an_unknown_problem(tmp_path: Path) -> None:
    done = payscope("failures", "--store", str(tmp_path / "x.db"), "--problem", "charged_thrice")
    assert done.returncode == 2 and "charged_thrice" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_analyze_and_the_demo_point_at_the_order_most_at_risk(demo_store: Path) -> None:
    doc = json.loads(payscope("reconcile", "--store", str(demo_store), "-f", "json", check=True).stdout)
    first = doc["orders"][0]["order"]
    stats = json.loads(payscope("analyze", "--store", str(demo_store), "-f", "json", check=True).stdout)["stats"]
    assert stats["order_most_at_risk"] == first
    assert f"e.g. payscope show {first}" in (demo_store.parent / "demo.stdout").read_text()


def test_an_oauth_authorization_is_no_charge(tmp_path: Path) -> None:
    """A real production trace of an OAuth authorization (Zipkin, no method attributes: `post /authorization/code`,
    then `delete /authorization/code/_code_`) holds no payment: no order to reconcile, nothing charged twice."""
    from tests.helpers import REALDATA

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(REALDATA / "zipkin_smartthings-oauth-authorization.zipkinv2.json"),
             "--store", store, check=True)
    found = json.loads(payscope("reconcile", "--store", store, "--format", "json", check=True).stdout)
    assert found["orders"] == [] and not any(found["counts"].values())
    stats = json.loads(payscope("analyze", "--store", store, "--format", "json", check=True).stdout)["stats"]
    assert stats["orders_charged_twice"] == 0 and stats["calls"] > 50


def test_what_counts_as_a_charge_and_a_method_named_only_in_the_span_name() -> None:
    from payscope.analyzers.orders import _CHARGE, _REFUND, Rules, _role_of
    from payscope.semconv import derive

    def method(name: str, **attrs: object) -> str | None:
        return derive("a" * 32, "b" * 16, None, "svc", name, "client", 0, 1, 0, "", dict(attrs), []).method

    assert method("delete /authorization/code/{code}") == "DELETE"
    assert method("HTTP POST") == "POST" and method("GET /orders/{id}") == "GET"
    assert method("GET /orders", **{"http.request.method": "POST"}) == "POST"  # the attribute speaks first
    assert method("DELETE orders") is None and method("SELECT payments") is None and method("get_user") is None

    def role(callee: str, operation: str) -> int:
        return _role_of(Rules(), "POST", callee, operation)

    assert role("auth", "post /authorization/code") == role("datamgmt", "authorize") == 0
    assert role("acquirer", "POST /authorize") == role("psp", "POST /v1/authorisations") == _CHARGE
    assert role("bank", "POST /charges") == role("payments", "Authorize") == _CHARGE
    assert role("bank", "POST /charges/{id}/refund") == role("psp", "CancelCharge") == _REFUND  # a refund first
    assert _role_of(Rules(), "GET", "bank", "GET /charges") == 0 and _role_of(Rules(), None, "psp", "Charge") == _CHARGE


def test_a_trace_that_charged_nothing_and_names_no_order_is_shown_as_no_order(tmp_path: Path) -> None:
    """HotROD's dispatch (a real capture: a customer lookup, a driver search, route lookups) is no payment: `show`
    says what became of the trace, and no "the customer was told paid"."""
    from tests.helpers import REALDATA

    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(REALDATA / "hotrod_redis-timeout_retries.otlp.json"), "--store", store,
             check=True)
    trace = "fe65c5beefbe4e96119efbba3da07e99"
    view = json.loads(payscope("show", trace, "--store", store, "--format", "json", check=True).stdout)
    # it went well, its Redis timeouts retried: recovered, as `failures` lists it (test_one_answer.py)
    assert view["order"] is None and [t["outcome"] for t in view["transactions"]] == ["recovered"]
    table = payscope("show", trace, "--store", store, check=True).stdout
    assert table.startswith(f"trace {trace}: recovered") and "told paid" not in table
    stats = json.loads(payscope("analyze", "--store", store, "--format", "json", check=True).stdout)["stats"]
    assert stats["orders"] == 0 and stats["transactions"] == 1  # counted as a transaction, not as an order


def test_reconcile_in_a_window_reads_its_traces_and_gives_the_answer_analyze_gives(demo_store: Path) -> None:
    """``reconcile --since/--until`` judges the orders of the traces that started in the window, as ``analyze`` and
    ``failures`` with the same window do, and says which traces it read."""
    from payscope.collector.store import open_store
    from payscope.timeparse import format_ns

    with open_store(str(demo_store), readonly=True) as opened:
        starts = sorted(s.start_ns for s in opened.traces(limit=None))
    since, until = format_ns(starts[len(starts) // 3]), format_ns(starts[2 * len(starts) // 3])
    window = ["--store", str(demo_store), "--since", since, "--until", until]
    doc = json.loads(payscope("reconcile", *window, "-f", "json", check=True).stdout)
    analysis = json.loads(payscope("analyze", *window, "-f", "json", check=True).stdout)
    assert doc["window"] == analysis["stats"]["window"] == {"from": since, "to": until}
    assert doc["counts"] == analysis["stats"]["orders_to_reconcile"] and doc["orders"]
    whole = json.loads(payscope("reconcile", "--store", str(demo_store), "-f", "json", check=True).stdout)
    assert whole["window"] is None and len(doc["orders"]) < len(whole["orders"])
    with open_store(str(demo_store), readonly=True) as opened:
        read = {t.trace_id for t in opened.traces(limit=None) if since <= format_ns(t.start_ns) < until}
    assert all(set(o["trace_ids"]) <= read for o in doc["orders"])  # nothing from outside the window
    table = payscope("reconcile", *window, check=True).stdout
    assert table.startswith(f"of the traces that started from {since} and before {until}\n")
