"""The documents `payscope analyze` and `payscope recommend timeouts` print, in every format."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from . import engine, findings, recommend

SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}


def analysis_document(store: Any, *, now_ns: int | None = None) -> dict[str, Any]:
    """The JSON contract of `payscope analyze --format json`."""
    return document_of(engine.analyze(store, now_ns=now_ns))


def document_of(analysis: engine.Analysis) -> dict[str, Any]:
    found = findings.find(analysis)
    outcomes: dict[str, int] = {}
    for tx in analysis.transactions.values():
        outcomes[tx.outcome] = outcomes.get(tx.outcome, 0) + 1
    return {
        "findings": [f.to_json() for f in found],
        "edges": [e.to_json() for _, e in sorted(analysis.edges.items())],
        "clock_skew": [o.to_json() for o in analysis.offsets],
        "stats": {"traces": len(analysis.traces), "calls": len(analysis.calls), "edges": len(analysis.edges),
                  "outcomes": outcomes,
                  "findings_by_severity": {s: sum(f.severity == s for f in found) for s in findings.SEVERITIES
                                           if any(f.severity == s for f in found)}},
    }


def print_table(document: dict[str, Any], console: Console) -> None:
    stats = document["stats"]
    console.print(f"{stats['traces']} transactions, {stats['calls']} calls over {stats['edges']} edges; "
                  f"outcomes: {', '.join(f'{k} {v}' for k, v in sorted(stats['outcomes'].items())) or 'none'}")
    for skew in document["clock_skew"]:
        console.print(f"clock of {skew['service']} runs {skew['offset_ms']:+.1f} ms against {skew['reference']} "
                      f"({skew['samples']} call pairs); corrected before analysis")
    if not document["findings"]:
        console.print("no findings: no timeout or retry misconfiguration shows in this data")
        return
    for f in document["findings"]:
        edge = f["edge"]
        style = SEVERITY_STYLE.get(f["severity"], "")
        console.print()
        console.print(f"[{style}]{f['severity'].upper()}[/] {f['kind']}  {edge['caller']} -> {edge['callee']} "
                      f"({edge['operation']})")
        console.print(f"  {f['summary']}", markup=False)
        console.print(f"  {f['explanation']}", markup=False)
        rec = f["recommendation"]
        if rec.get("action"):
            console.print(f"  fix: {rec['action']}"
                          + (f" (timeout {rec['timeout_ms']:.0f} ms)" if rec.get("timeout_ms") else ""))
        if f["evidence"]["trace_ids"]:
            console.print(f"  e.g. payscope show {f['evidence']['trace_ids'][0]}")


def markdown(document: dict[str, Any]) -> str:
    lines = ["# payscope findings", ""]
    if not document["findings"]:
        lines.append("No findings.")
    for f in document["findings"]:
        edge = f["edge"]
        lines += [f"## {f['severity']}: {f['kind']} — {edge['caller']} → {edge['callee']} ({edge['operation']})",
                  "", f["summary"], "", f["explanation"], ""]
        if f["recommendation"].get("action"):
            lines += [f"**Fix:** {f['recommendation']['action']}", ""]
        if f["metrics"]:
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in f["metrics"].items()]
            lines.append("")
        if f["evidence"]["trace_ids"]:
            lines += ["Example traces: " + ", ".join(f"`{t}`" for t in f["evidence"]["trace_ids"]), ""]
    return "\n".join(lines) + "\n"


def recommendation_document(store: Any, *, simulate: bool = False) -> dict[str, Any]:
    analysis = engine.analyze(store)
    recs = recommend.recommend(analysis)
    document: dict[str, Any] = {"recommendations": [r.to_json() for r in recs]}
    if simulate:
        document["simulation"] = recommend.simulate(analysis, recs)
    return document


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.0f}ms"


def print_recommendations(document: dict[str, Any], console: Console, *, snippets: bool = False) -> None:
    console.print(f"{'edge':<48} {'now':>8} {'source':<11} {'p50':>7} {'p99':>7} {'p99.9':>7} "
                  f"{'recommend':>9} {'retries':>7} {'timeouts now':>12} {'after':>7}", markup=False)
    for r in document["recommendations"]:
        e, cur, rec, lat = r["edge"], r["current"], r["recommended"], r["latency_ms"]
        now = _fmt_ms(cur["timeout_ms"]) if cur["source"] != "lower_bound" else f">={_fmt_ms(cur['timeout_ms'])}"
        name = f"{e['caller']} -> {e['callee']} {e['operation']}"
        console.print(f"{name:<48} {now:>8} {cur['source']:<11} {_fmt_ms(lat['p50']):>7} {_fmt_ms(lat['p99']):>7} "
                      f"{_fmt_ms(lat['p99.9']):>7} {_fmt_ms(rec['timeout_ms']):>9} {rec['retries']:>7} "
                      f"{r['expected_timeout_rate']['before']:>12.2%} {r['expected_timeout_rate']['after']:>7.2%}",
                      markup=False)
    for r in document["recommendations"]:
        for note in r["notes"]:
            console.print(f"note ({r['edge']['caller']} -> {r['edge']['callee']}): {note}")
        if snippets and r["snippets"]:
            console.print(f"\n{r['edge']['caller']} -> {r['edge']['callee']}:")
            for client, text in r["snippets"].items():
                if text:
                    console.print(f"  [{client}]", markup=False)
                    for line in text.splitlines():
                        console.print(f"    {line}", markup=False)
    sim = document.get("simulation")
    if sim:
        console.print("\nreplay of the recorded transactions:")
        for label in ("recorded", "before", "after"):
            row = sim[label]
            console.print(f"  {label:<9} {row['transactions']} transactions: {row['failed']} failed, "
                          f"{row['late_success']} late successes, {row['duplicate_charge']} duplicate charges")


def yaml(document: Any) -> str:
    """The document as YAML."""
    import yaml as pyyaml

    return str(pyyaml.safe_dump(document, sort_keys=False, allow_unicode=True))
