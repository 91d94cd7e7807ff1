"""What the commands print: the analysis, the recommendations and one transaction, as tables, Markdown, YAML."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from payscope.analyzers.views import fix_text
from payscope.timeparse import format_ms, format_ns

SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}


def sample_text(sample: dict[str, Any] | None) -> str:
    """How many of the traces a read limited by ``--sample`` took ("" when it took them all)."""
    if not sample or sample["complete"]:
        return ""
    return f"a sample of {sample['traces_read']:,} of {sample['traces_in_window']:,} traces"


def window_text(window: dict[str, Any] | None) -> str:
    """Which traces an analysis read, said before what it found in them."""
    if not window:
        return ""
    bounds = ([f"from {window['from']}"] if window.get("from") else []) + (
        [f"before {window['to']}"] if window.get("to") else [])
    started = f" that started {' and '.join(bounds)}" if bounds else ""
    sampled = sample_text(window.get("sample"))
    if sampled:
        return f"of {sampled}{started} (chosen by trace id; --sample 0 reads every trace)"
    return f"of the traces{started}" if started else ""


def counts_line(stats: dict[str, Any]) -> str:
    """What the analysis counted, each number named for what it counts."""
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(stats["outcomes"].items())) or "none"
    window = window_text(stats.get("window"))
    return (f"{window + ': ' if window else ''}"
            f"{stats['transactions']} transactions (traces) with {stats['calls']} calls over {stats['edges']} "
            f"edges, {stats['orders']} orders; transactions by outcome: {outcomes}; "
            f"orders charged twice: {stats['orders_charged_twice']}")


def no_findings_line(stats: dict[str, Any]) -> str:
    """What to say when no rule is met: that nothing failed, or where the failures that did are listed."""
    failed = sum(n for outcome, n in stats["outcomes"].items() if outcome not in ("ok", "recovered"))
    if not failed:
        return "no findings: no timeout, retry or network problem shows in this data"
    them = "them, each" if failed > 1 else "it"
    return (f"no findings: {failed} transaction{'s' if failed > 1 else ''} did not succeed (payscope failures lists "
            f"{them} with its failing hop), but no timeout, retry or network rule is met by the calls seen")


def print_table(document: dict[str, Any], console: Console) -> None:
    console.print(counts_line(document["stats"]), markup=False)
    mismatched = {k: v for k, v in document["stats"].get("orders_to_reconcile", {}).items() if v}
    if mismatched:
        console.print("orders to reconcile: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in mismatched.items())
                      + " (payscope reconcile lists them)", markup=False)
        worst = document["stats"].get("order_most_at_risk")
        if worst:
            console.print(f"  e.g. payscope show {worst}", markup=False)
    for skew in document["clock_skew"]:
        console.print(f"clock of {skew['service']} runs {skew['offset_ms']:+.1f} ms against {skew['reference']} "
                      f"({skew['samples']} call pairs); corrected before analysis")
    for line in injected_lines(document):
        console.print(line, markup=False)
    if not document["findings"]:
        console.print(no_findings_line(document["stats"]), markup=False)
        return
    for f in document["findings"]:
        edge = f["edge"]
        style = SEVERITY_STYLE.get(f["severity"], "")
        console.print()
        console.print(f"[{style}]{f['severity'].upper()}[/] {f['kind']}  {edge['caller']} -> {edge['callee']} "
                      f"({edge['operation']})")
        console.print(f"  {f['summary']}", markup=False)
        console.print(f"  {f['explanation']}", markup=False)
        console.print(f"  fix: {fix_text(f)}", markup=False)
        if f["evidence"]["trace_ids"]:
            console.print(f"  e.g. payscope show {f['evidence']['trace_ids'][0]}")


def injected_lines(document: dict[str, Any]) -> list[str]:
    """The faults the sidecar injected, said apart from the findings (they are not the system's own)."""
    return [f"injected by the sidecar: {f['kind']} on {f['calls']} calls {f['caller']} -> {f['callee']} "
            f"({f['operation']}); left out of the findings and the latency samples"
            for f in document.get("injected_faults", [])]


def markdown(document: dict[str, Any]) -> str:
    lines = ["# payscope findings", "", counts_line(document["stats"]), ""]
    lines += [f"- {line}" for line in injected_lines(document)] + ([""] if injected_lines(document) else [])
    if not document["findings"]:
        lines.append(no_findings_line(document["stats"]).capitalize() + ".")
    for f in document["findings"]:
        edge = f["edge"]
        lines += [f"## {f['severity']}: {f['kind']} — {edge['caller']} → {edge['callee']} ({edge['operation']})",
                  "", f["summary"], "", f["explanation"], "", f"**Fix:** {fix_text(f)}", ""]
        if f["metrics"]:
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in f["metrics"].items()]
            lines.append("")
        if f["evidence"]["trace_ids"]:
            lines += ["Example traces: " + ", ".join(f"`{t}`" for t in f["evidence"]["trace_ids"]), ""]
    return "\n".join(lines) + "\n"


def print_recommendations(document: dict[str, Any], console: Console, *, snippets: bool = False) -> None:
    if window_text(document.get("window")):
        console.print(window_text(document.get("window")), markup=False)
    console.print(f"{'edge':<48} {'now':>8} {'source':<11} {'p50':>7} {'p99':>7} {'p99.9':>7} "
                  f"{'recommend':>9} {'retries':>7} {'timeouts now':>12} {'after':>7}", markup=False)
    for r in document["recommendations"]:
        e, cur, rec, lat = r["edge"], r["current"], r["recommended"], r["latency_ms"]
        now = format_ms(cur["timeout_ms"]) if cur["source"] != "lower_bound" else f">={format_ms(cur['timeout_ms'])}"
        name = f"{e['caller']} -> {e['callee']} {e['operation']}"
        console.print(f"{name:<48} {now:>8} {cur['source']:<11} {format_ms(lat['p50']):>7} "
                      f"{format_ms(lat['p99']):>7} {format_ms(lat['p99.9']):>7} {format_ms(rec['timeout_ms']):>9} "
                      f"{rec['retries']:>7} {r['expected_timeout_rate']['before']:>12.2%} "
                      f"{r['expected_timeout_rate']['after']:>7.2%}", markup=False)
    console.print("(latency is what each caller saw of successful calls; the rates are of calls)", markup=False)
    for r in document["recommendations"]:
        for note in r["notes"]:
            console.print(f"note ({r['edge']['caller']} -> {r['edge']['callee']}): {note}", markup=False)
        if snippets and r["snippets"]:
            console.print(f"\n{r['edge']['caller']} -> {r['edge']['callee']}:", markup=False)
            for client, text in r["snippets"].items():
                if text:
                    console.print(f"  [{client}]", markup=False)
                    for line in text.splitlines():
                        console.print(f"    {line}", markup=False)
    if document.get("clients"):
        console.print("one client for several operations (a timeout that covers the slowest, the retries the least "
                      "retryable allows):", markup=False)
        for c in document["clients"]:
            console.print(f"  {c['caller']} -> {c['callee']} ({len(c['operations'])} operations): "
                          f"{format_ms(c['timeout_ms'])}, {c['retries']} retries", markup=False)
    sim = document.get("simulation")
    if sim:
        console.print("\nreplay of the recorded transactions (traces):")
        for label in ("recorded", "before", "after"):
            row = sim[label]
            console.print(f"  {label:<9} {row['transactions']} transactions: {row['failed']} failed, "
                          f"{row['late_success']} late successes; {row['duplicate_charge']} orders charged twice")
        if len({sim[label]["transactions"] for label in ("recorded", "before", "after")}) > 1:
            console.print("  (fewer transactions: a customer the replay tells \"paid\" does not ask again)",
                          markup=False)


def compare_lines(document: dict[str, Any]) -> list[str]:
    """`payscope compare` as lines to paste into an incident channel, best explanation first."""
    base, inc = document["baseline"], document["incident"]

    def read(window: dict[str, Any]) -> str:
        sampled = sample_text(window.get("sample"))
        return f" (from {sampled})" if sampled else ""

    lines = [f"baseline: {base['entry_requests']} entry requests{read(base)}, "
             f"p50 {format_ms(base['entry_ms']['p50'])}; "
             f"incident: {inc['entry_requests']}{read(inc)}, p50 {format_ms(inc['entry_ms']['p50'])}"]
    if not document["hops"]:
        lines.append("no hop grew above noise: " + document["noise"])
    for i, hop in enumerate(document["hops"], 1):
        first, *held = hop_lines(hop)
        lines.append(f"{i}. {first}")
        lines.extend(f"   {line}" for line in held)
    return lines


def hop_lines(hop: dict[str, Any]) -> list[str]:
    """One hop of `payscope compare`, and for a queue that is a consequence, what held its service's workers: as
    the command prints it and the TUI shows it."""
    return [f"[{hop['component']}] {hop['service']}: {hop['sentence']}"] + [
        f"held {hop['service']}'s workers: [{h['component']}] {h['service']}: {h['sentence']}"
        for h in hop.get("held_by") or ()]


def mismatch_counts(orders: list[dict[str, Any]]) -> dict[str, int]:
    from payscope.analyzers.orders import MISMATCHES

    return {kind: sum(kind in o["mismatches"] for o in orders) for kind in MISMATCHES}


def reconcile_lines(orders: list[dict[str, Any]]) -> list[str]:
    """`payscope reconcile` as a table: one order a row, the most money at risk first."""
    if not orders:
        return ["no order to reconcile: every order's charges agree with what its customer was told"]
    counts = ", ".join(f"{k} {v}" for k, v in mismatch_counts(orders).items() if v)
    lines = [f"{len(orders)} orders to reconcile: {counts}",
             f"{'order':24} {'told':9} {'charges':>7} {'at risk':>10}  {'why':38} first trace"]
    for o in orders:
        risk = "-" if o["amount_at_risk"] is None else f"{o['amount_at_risk']:.2f}"
        lines.append(f"{o['order'][:24]:24} {o['final']:9} {len(o['charges']):7} {risk:>10}  "
                     f"{', '.join(o['mismatches']):38} {o['trace_ids'][0]}")
    return lines


def reconcile_csv(orders: list[dict[str, Any]]) -> str:
    """One row an order, for a spreadsheet: the charges' trace ids and times in one cell each."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["order", "told", "mismatches", "charges", "charge_attempts", "refunds", "amount",
                     "amount_at_risk", "charge_times", "charge_trace_ids", "trace_ids"])
    for o in orders:
        writer.writerow([o["order"], o["final"], " ".join(o["mismatches"]), len(o["charges"]), o["charge_attempts"],
                         o["refunds"], "" if o["amount"] is None else o["amount"],
                         "" if o["amount_at_risk"] is None else o["amount_at_risk"],
                         " ".join(format_ns(c["time_ns"]) for c in o["charges"]),
                         " ".join(c["trace_id"] for c in o["charges"]), " ".join(o["trace_ids"])])
    return buffer.getvalue()


def chaos_lines(document: dict[str, Any]) -> list[str]:
    """What `payscope chaos` says of one experiment: the faults, the traffic, each edge, the verdict."""
    traffic = document["traffic"]
    faults = "; ".join(document["faults"])
    lines = [f"scenario {document['scenario']}: {faults} in front of {document['target']}"]
    if traffic["command_exit"] is None:
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(traffic["statuses"].items()))
        lines.append(f"traffic: {traffic['sent']} requests, {traffic['ok']} ok, {traffic['failed']} failed "
                     f"({statuses})")
    else:
        lines.append(f"traffic: the command exited {traffic['command_exit']}")
    if traffic.get("proxied") is not None:
        lines.append(f"through the proxy in front of {document['target']}: {traffic['proxied']} requests")
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(document["outcomes"].items())) or "none"
    lines.append(f"{document['transactions']} transactions recorded in the window: {outcomes}; "
                 f"orders charged twice: {document['orders_charged_twice']}")
    lines.append("edge                                          calls  injected  timed out  retried  late ok"
                 "  timeout  recommended  timeouts now -> recommended")
    for e in document["edges"]:
        rate = e["expected_timeout_rate"]
        rates = f"{rate['now']:.1%} -> {rate['recommended']:.1%}" if rate else "-"
        name = f"{e['caller']} -> {e['callee']} {e['operation']}"
        lines.append(f"{name[:45]:45} {e['calls']:6} {e['injected']:9} {e['timed_out']:10} {e['retried']:8} "
                     f"{e['late_success']:8}  {format_ms(e['timeout_ms']):>7}  "
                     f"{format_ms(e['recommended_timeout_ms']):>11}  {rates}")
    for f in document["findings"]:
        edge = f["edge"]
        lines.append(f"{f['severity'].upper()} {f['kind']}  {edge['caller']} -> {edge['callee']}: {f['summary']}")
    replay = document["with_recommended_timeouts"]
    after, recorded = replay["replayed"], replay["recorded"]
    lines.append(f"with the recommended timeouts (replayed): {after['failed']} failed, {after['late_success']} "
                 f"late successes, {after['duplicate_charge']} orders charged twice (recorded: {recorded['failed']}, "
                 f"{recorded['late_success']}, {recorded['duplicate_charge']})")
    if document["passed"]:
        lines.append("PASSED: every expectation held")
    else:
        lines += [f"FAILED: {failure}" for failure in document["failures"]]
    return lines


def yaml(document: Any) -> str:
    """The document as YAML."""
    import yaml as pyyaml

    return str(pyyaml.safe_dump(document, sort_keys=False, allow_unicode=True))


def call_times(call: dict[str, Any] | None) -> str:
    """client / server / gap of one call, as `show` prints them."""
    if not call:
        return ""
    parts = [f"client {format_ms(call['client_ms'])}"]
    if call.get("attempts_in_span", 1) > 1:  # the span retried inside itself: its last attempt's times
        parts[0] = f"last of {call['attempts_in_span']} attempts: " + parts[0]
    if call["server_ms"] is not None:
        parts.append(f"server {format_ms(call['server_ms'])}")
    if call["gap_ms"] is not None:
        parts.append(f"gap {'>=' if call.get('gap_at_least') else ''}{format_ms(call['gap_ms'])}")
    if call["late_success"]:
        parts.append("LATE SUCCESS")
    return "[" + " / ".join(parts) + "]"


def journey_lines(view: dict[str, Any]) -> list[str]:
    """An order's state and charges, then each of its traces in time order with what became of it (the head of
    `payscope show` and of the TUI's journey)."""
    lines = []
    order = view.get("order")
    if order:
        through = ", ".join(f"{format_ns(c['time_ns'])} ({c['caller_saw']})" for c in order["charges"]) or "none"
        lines.append(f"order {order['order']}: the customer was told {order['final']}; charges through: "
                     f"{len(order['charges'])} of {order['charge_attempts']} attempted: {through}"
                     + (f"; {', '.join(order['mismatches'])}" if order["mismatches"] else ""))
    for tx in view["transactions"]:
        hop = tx["failing_hop"]
        where = f" at {hop['caller']} -> {hop['callee']} ({hop['operation']})" if hop else ""
        lines.append((f"{tx['start']}  " if order else "") + f"trace {tx['trace_id']}: {tx['outcome']}{where}"
                     + (f" [{tx['error_class']}]" if tx["error_class"] else "")
                     + (f"  keys: {', '.join(tx['business_keys'])}" if tx["business_keys"] else ""))
    journey = view.get("journey")
    if journey:
        lines.append(f"part of order {journey['order']}, {journey['traces']} traces: "
                     f"payscope show {journey['order']}")
    return lines


def render_waterfall(view: dict[str, Any], width: int = 32) -> str:
    """The text waterfall of `payscope show`."""
    total = max(view["duration_ms"], 0.001)
    lines = [*journey_lines(view), ""]
    for row in view["spans"]:
        start = int(row["offset_ms"] / total * width)
        length = max(1, int(row["duration_ms"] / total * width))
        bar = " " * start + "#" * min(length, width - start)
        status = row["status"].upper() if row["status"] == "error" else ""
        cls = f" [{row['error_class']}]" if row["error_class"] else ""
        msg = f" {row['message']}" if row["message"] else ""
        label = "  " * row["depth"] + f"{row['service']}: {row['name']} ({row['kind']})"
        times = call_times(row.get("call"))
        lines.append(f"{bar:<{width}} {row['duration_ms']:>10.1f} ms  {label} {status}{cls}{msg} {times}".rstrip())
    if view["logs"]:
        lines.append("")
        lines.append("logs:")
        for rec in view["logs"]:
            lines.append(f"  {rec['time']} {rec['service']} {rec['level']} {rec['message']}  "
                         f"({rec['source']}, linked by {rec['link']['method']} {rec['link']['confidence']:.2f})")
    if view["findings"]:
        lines.append("")
        read = window_text(view.get("window")) or "of the whole store"
        lines.append(f"findings ({read}, with this transaction as evidence):")
        for f in view["findings"]:
            lines.append(f"  [{f['severity']}] {f['kind']}: {f['summary']}")
            lines.append(f"    fix: {fix_text(f)}")
    for skew in view["clock_skew"]:
        lines.append(f"(clock of {skew['service']} corrected by {skew['offset_ms']:+.1f} ms)")
    return "\n".join(lines)


def markdown_report(view: dict[str, Any]) -> str:
    """One transaction as Markdown, for an incident ticket."""
    lines = [f"# Transaction {', '.join(view['trace_ids'])}", ""]
    for tx in view["transactions"]:
        hop = tx["failing_hop"]
        lines.append(f"- **outcome:** {tx['outcome']}" + (f" at `{hop['caller']} -> {hop['callee']}` "
                                                          f"({hop['operation']})" if hop else "")
                     + (f", error class `{tx['error_class']}`" if tx["error_class"] else ""))
        if tx["business_keys"]:
            lines.append(f"- **business keys:** {', '.join(tx['business_keys'])}")
    lines += [f"- **started:** {view['start']}, **duration:** {view['duration_ms']:.1f} ms", "", "## Spans", "",
              "```", render_waterfall({**view, "logs": [], "findings": [], "clock_skew": []}), "```", ""]
    if view["findings"]:
        lines += ["## Findings", ""]
        for f in view["findings"]:
            lines += [f"- **{f['severity']} {f['kind']}**: {f['summary']}", f"  - fix: {fix_text(f)}"]
        lines.append("")
    if view["logs"]:
        lines += ["## Logs", "", "| time | service | level | message | linked by |", "| --- | --- | --- | --- | --- |"]
        for r in view["logs"]:
            message = r["message"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['time']} | {r['service']} | {r['level']} | {message} | {r['link']['method']} |")
    return "\n".join(lines) + "\n"
