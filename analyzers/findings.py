"""The timeout and retry findings: each rule names its evidence, or it does not fire."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from payscope.timeparse import format_ms as _ms
from payscope.timeparse import format_ns

from .calls import Call
from .engine import Analysis, Edge, EdgeKey, is_business_failure
from .gaps import Occupancy, gap_cause, left_waiting, occupancies, stretched
from .recommend import connect_timeout_ms
from .stats import fraction_above, percentile

SEVERITIES = ("info", "low", "medium", "high", "critical")
KINDS = ("timeout_inversion", "late_success", "timeout_below_tail", "timeout_missing", "retry_budget_overrun",
         "non_idempotent_retry", "deadline_not_propagated", "uniform_timeout", "connect_timeout_too_long",
         "network_latency", "tcc_anomaly")  # the stable finding names (docs/findings.md)
EVIDENCE_IDS = 5
# A timeout below the callee's healthy tail kills at least this share of healthy calls.
BELOW_TAIL_MIN_RATE = 0.01
# A callee without spans whose successes stay far below the timeout: this share of calls timing out in
# every fifth of the period is a slow path of its own, not sporadic trouble.
STEADY_TAIL_MIN_RATE = 0.03
STEADY_PARTS = 5
MIN_SAMPLES = 20
# network_latency: the gap (client minus server) is at least this long at the median, and at least as long as
# the callee's own time: most of what the caller waits is spent between the two.
NETWORK_MIN_MS = 20.0
NETWORK_MIN_CALLS = 3
NETWORK_GROWTH = 3.0  # ... or, in some stretch of the period, it ran at this many times its usual median
NETWORK_GROWTH_MIN_MS = 50.0  # ... and at least this much above it: a busy host's jitter stays below


@dataclass
class Finding:
    kind: str
    severity: str
    edge: EdgeKey
    summary: str
    explanation: str
    metrics: dict[str, Any] = field(default_factory=dict)
    trace_ids: list[str] = field(default_factory=list)
    recommendation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "severity": self.severity,
            "edge": {"caller": self.edge[0], "callee": self.edge[1], "operation": self.edge[2]},
            "summary": self.summary, "explanation": self.explanation,
            "metrics": self.metrics, "evidence": {"trace_ids": self.trace_ids[:EVIDENCE_IDS]},
            "recommendation": self.recommendation,
        }


def severity_at_least(severity: str, threshold: str) -> bool:
    return SEVERITIES.index(severity) >= SEVERITIES.index(threshold)


def _evidence(analysis: Analysis, calls: list[Call]) -> list[str]:
    """Trace ids of these calls, leaving out calls the callee refused and transactions that were declined: a
    decline says nothing of a timeout (a declined order's stock released without a timeout is no example of
    what a missing timeout does)."""
    def declined(trace_id: str) -> bool:
        tx = analysis.transactions.get(trace_id)
        return tx is not None and tx.outcome == "declined"

    return [c.trace_id for c in calls if not is_business_failure(c) and not declined(c.trace_id)]


def _name(edge: Edge) -> str:
    return f"{edge.caller} -> {edge.callee} ({edge.operation})"


# --- rules -------------------------------------------------------------------------

def late_success(analysis: Analysis, edge: Edge) -> Finding | None:
    late = edge.late_successes
    if not late:
        return None
    amount = sum(c.amount or 0.0 for c in late)
    after = sorted((c.server_end_ns or 0) - c.end_ns for c in late if (c.server_end_ns or 0) > c.end_ns)
    on_the_wire = len(late) - len(after)
    metrics: dict[str, Any] = {
        "late_successes": len(late), "calls": len(edge.calls),
        "finished_after_caller_gave_up": len(after), "answer_on_the_wire": on_the_wire,
        "median_ms_after_caller_gave_up": round(after[len(after) // 2] / 1e6, 1) if after else None,
        "timeout_ms": edge.timeout.value_ms,
    }
    if amount:
        metrics["amount_at_risk"] = round(amount, 2)
    how = []
    if after:
        how.append(f"{len(after)} finished the work {metrics['median_ms_after_caller_gave_up']:.0f} ms after "
                   f"{edge.caller} gave up (median)")
    if on_the_wire:
        how.append(f"{on_the_wire} had finished, their answer still on its way back, when {edge.caller} gave up")
    return Finding(
        "late_success", "critical" if edge.charge_like else "high", edge.key,
        f"{len(late)} calls {_name(edge)} succeeded after {edge.caller} had timed out",
        f"{edge.caller} gave up waiting, but {edge.callee} did the work: {' and '.join(how)}. "
        f"{edge.caller} reports a failure for something that happened"
        + (" - for a charge this means a customer was charged for an order marked failed." if edge.charge_like
           else "."),
        metrics, [c.trace_id for c in late],
        {"action": f"raise the timeout of {edge.caller} -> {edge.callee} above the callee's healthy tail, "
                   "and reconcile late results (or make the call idempotent and retry with the same key)",
         "timeout_ms": analysis.recommended_ms(edge.key)})


def timeout_below_tail(analysis: Analysis, edge: Edge) -> Finding | None:
    timeout = edge.timeout
    if not timeout.known or timeout.value_ms is None or len(edge.timed_out_ms) < 2:
        return None
    t = timeout.value_ms
    summary = None
    if edge.instrumented_callee and len(edge.tail()) >= MIN_SAMPLES:
        values = edge.tail()
        p99 = percentile(values, 99) or 0.0
        rate = fraction_above(values, t)
        if p99 <= t or rate < BELOW_TAIL_MIN_RATE:
            return None
        queued = "" if not edge.queued else (
            f" The {edge.queued} calls that waited for a free worker of {edge.callee} are left out: a queue is "
            "what a timeout should shed.")
        explanation = (f"The timeout cuts off {rate:.1%} of calls that {edge.callee} answered successfully "
                       f"(what {edge.caller} saw, counting calls {edge.callee} finished after {edge.caller} "
                       f"had stopped waiting). These are healthy but slow requests being turned into failures.{queued}")
    else:
        # The callee has no spans: successes are cut off at the timeout. Their tail reaching up to it,
        # with timeouts spread over the whole period rather than in one burst, says the same thing.
        values = edge.healthy_ms
        if len(values) < MIN_SAMPLES:
            return None
        p99 = percentile(values, 99) or 0.0
        rate = len(edge.timed_out_ms) / len(edge.calls)
        starts = sorted(c.start_ns for c in edge.calls)
        timeout_starts = sorted(c.start_ns for c in edge.calls if c.gave_up)
        window = starts[-1] - starts[0]
        spread = timeout_starts[-1] - timeout_starts[0]
        if rate < BELOW_TAIL_MIN_RATE or window <= 0 or spread < 0.5 * window:
            return None
        if p99 >= 0.6 * t:
            explanation = (f"{rate:.1%} of calls time out, spread over the whole period rather than in one "
                           f"incident, and successful calls reach right up to the timeout (p99 {_ms(p99)} of "
                           f"{_ms(t)}): {edge.callee}'s normal latency runs past it. {edge.callee} has no spans, so "
                           "its real tail beyond the timeout was never seen.")
        elif rate >= STEADY_TAIL_MIN_RATE and _steady(timeout_starts, starts[0], window):
            summary = (f"{_name(edge)} times out at {_ms(t)} on {rate:.1%} of calls, steadily: {edge.callee} has a "
                       "slow path longer than the timeout")
            explanation = (f"{rate:.1%} of calls time out, steadily through every part of the period, while "
                           f"successful calls stay well below the timeout (p99 {_ms(p99)} of {_ms(t)}): "
                           f"{edge.callee} has a slow path longer than the timeout, taken by a steady share of "
                           f"requests, not an incident. {edge.callee} has no spans, so whether those requests "
                           "would have succeeded was never seen.")
        else:
            return None
    recommended = analysis.recommended_ms(edge.key)
    return Finding(
        "timeout_below_tail", "high" if rate >= 0.05 else "medium", edge.key,
        summary or f"{_name(edge)} times out at {_ms(t)}, inside {edge.callee}'s normal latency (p99 {_ms(p99)})",
        explanation,
        {"timeout_ms": round(t, 1), "timeout_source": timeout.source, "callee_p99_ms": round(p99, 1),
         "callee_p50_ms": round(percentile(values, 50) or 0.0, 1),
         "expected_false_timeout_rate": round(rate, 4), "samples": len(values)},
        _evidence(analysis, [c for c in edge.calls if c.gave_up]),
        {"timeout_ms": recommended, "action": f"raise the per-try timeout to {_ms(recommended)}"})


def _steady(times: list[int], start: int, window: int) -> bool:
    """Whether events fall into every one of STEADY_PARTS equal parts of the window."""
    parts = {min(STEADY_PARTS - 1, (t - start) * STEADY_PARTS // window) for t in times}
    return len(parts) == STEADY_PARTS


def _waits(down: Edge) -> str:
    if down.timeout.source == "lower_bound":
        return "has waited"
    return "waits up to"


def _downstream_wait_ms(analysis: Analysis, edge: Edge) -> tuple[float, Edge] | None:
    """How long the callee is prepared to wait on its own slowest downstream call, per request."""
    best: tuple[float, Edge] | None = None
    for key in edge.downstream:
        down = analysis.edges.get(key)
        if down is None:
            continue
        budget = down.budget_ms()
        if budget is not None:
            wait = budget
        elif down.timeout.source == "lower_bound" and down.timeout.value_ms is not None:
            # It waited this long and succeeded, so its timeout is at least this.
            wait = down.timeout.value_ms
        else:
            continue
        if best is None or wait > best[0]:
            best = (wait, down)
    return best


def timeout_inversion(analysis: Analysis, edge: Edge) -> Finding | None:
    if not edge.timeout.known or edge.timeout.value_ms is None:
        return None
    if edge.timeout.source == "inferred" and len(edge.timed_out_ms) < 2:
        return None
    found = _downstream_wait_ms(analysis, edge)
    if found is None:
        return None
    wait, down = found
    self_ms = percentile(sorted(edge.self_ms), 50) or 0.0
    t = edge.timeout.value_ms
    if t > wait + self_ms:
        return None
    evidence = _evidence(analysis, [c for c in edge.calls if c.gave_up])
    return Finding(
        "timeout_inversion", "high", edge.key,
        f"{edge.caller} gives up on {edge.callee} after {_ms(t)}, but {edge.callee} {_waits(down)} "
        f"{_ms(wait)} on {down.callee}",
        f"{edge.callee} {_waits(down)} {_ms(wait)} for {down.callee} "
        f"({down.max_attempts} attempt(s), timeout {_ms(down.timeout.value_ms)}, {down.timeout.source}), "
        f"plus about {_ms(self_ms)} of its own "
        f"work, while its caller {edge.caller} stops waiting at {_ms(t)}. Whenever {down.callee} is slow, "
        f"{edge.caller} fails first and {edge.callee}'s work is wasted or completes unseen.",
        {"caller_timeout_ms": round(t, 1), "callee_downstream_wait_ms": round(wait, 1),
         "callee_self_ms": round(self_ms, 1), "downstream_edge": f"{down.caller} -> {down.callee}",
         "timeout_source": edge.timeout.source, "downstream_timeout_source": down.timeout.source},
        evidence,
        {"action": f"make {edge.caller}'s timeout larger than {edge.callee}'s whole downstream budget, or "
                   f"shrink {down.caller} -> {down.callee} so deadlines decrease down the chain",
         "timeout_ms": analysis.recommended_ms(edge.key)})


def _deadline_of(analysis: Analysis, edge: Edge) -> tuple[float, Edge] | None:
    """The tightest known timeout the caller's own callers apply to it."""
    best: tuple[float, Edge] | None = None
    for key in edge.upstream:
        up = analysis.edges.get(key)
        if up is not None and up.timeout.known and up.timeout.value_ms is not None:
            if best is None or up.timeout.value_ms < best[0]:
                best = (up.timeout.value_ms, up)
    return best


def retry_budget_overrun(analysis: Analysis, edge: Edge) -> Finding | None:
    worst = edge.budget_ms()
    if edge.max_attempts < 2 or worst is None or edge.timeout.value_ms is None:
        return None
    deadline = _deadline_of(analysis, edge)
    multiplied = [analysis.edges[k] for k in edge.upstream if k in analysis.edges
                  and analysis.edges[k].max_attempts >= 2]
    if deadline is not None and worst > deadline[0]:
        d, up = deadline
        chains = _evidence(analysis, [c for c in edge.calls if c.attempt >= 1])
        rec = analysis.recommendations.get(edge.key)
        return Finding(
            "retry_budget_overrun", "high" if edge.charge_like else "medium", edge.key,
            f"{edge.caller} may spend {_ms(worst)} on {edge.callee} ({edge.max_attempts} attempts of "
            f"{_ms(edge.timeout.value_ms)}), more than the {_ms(d)} its caller {up.caller} waits",
            f"Retries are only useful while someone is still waiting for the answer. {up.caller} stops waiting "
            f"for {edge.caller} after {_ms(d)}, but {edge.caller}'s retries to {edge.callee} can run to "
            f"{_ms(worst)}: the last attempts work for nobody and add load during an incident.",
            {"attempts": edge.max_attempts, "per_try_timeout_ms": round(edge.timeout.value_ms, 1),
             "backoff_ms": round(edge.backoff_ms, 1), "worst_case_ms": round(worst, 1),
             "caller_deadline_ms": round(d, 1), "deadline_edge": f"{up.caller} -> {up.callee}"},
            chains,
            {"action": "fit attempts x per-try timeout + backoff inside the caller's deadline",
             "timeout_ms": analysis.recommended_ms(edge.key),
             "max_attempts": rec.recommended.attempts if rec is not None else 1})
    if multiplied:
        up = max(multiplied, key=lambda e: e.max_attempts)
        total = up.max_attempts * edge.max_attempts
        return Finding(
            "retry_budget_overrun", "medium", edge.key,
            f"retries multiply: {up.caller} retries {edge.caller} x{up.max_attempts} and {edge.caller} retries "
            f"{edge.callee} x{edge.max_attempts} ({total} calls for one request)",
            "Retrying at more than one layer multiplies the load on the deepest service exactly when it is "
            "struggling. Retry at one layer only, usually the one closest to the user.",
            {"upstream_attempts": up.max_attempts, "attempts": edge.max_attempts, "total_attempts": total},
            _evidence(analysis, [c for c in edge.calls if c.attempt >= 1]),
            {"action": f"retry at one layer only (keep {up.caller}'s retries or {edge.caller}'s, not both)"})
    return None


def non_idempotent_retry(analysis: Analysis, edge: Edge) -> Finding | None:
    if edge.retries == 0 or edge.idempotent:
        return None
    retried = [c for c in edge.calls if c.attempt >= 1 and not c.idempotency_key]
    if not retried:
        return None
    dup = edge.duplicate_chains
    severity = "critical" if dup else ("high" if edge.charge_like else "medium")
    return Finding(
        "non_idempotent_retry", severity, edge.key,
        f"{edge.caller} retries {edge.operation} on {edge.callee} without an idempotency key"
        + (f"; {len(dup)} duplicate charges" if dup else ""),
        f"A retried {edge.operation} is a new request to {edge.callee}: if the first attempt was processed "
        f"(for example, it only timed out on the way back), the retry does the work twice"
        + (f". This happened {len(dup)} times: two attempts both succeeded." if dup else "."),
        {"retried_calls": len(retried), "duplicate_charges": len(dup), "max_attempts": edge.max_attempts,
         "calls_with_idempotency_key": round(edge.key_share, 3)},
        [ch[0].trace_id for ch in dup] + _evidence(analysis, retried),
        {"action": "send an Idempotency-Key header (the same on every attempt) or stop retrying this call",
         "retries": 0})


def timeout_missing(analysis: Analysis, edge: Edge) -> Finding | None:
    timeout = edge.timeout
    tail = analysis.recommended_ms(edge.key)
    if timeout.source == "captured" and timeout.value_ms is None:
        return Finding(
            "timeout_missing", "high", edge.key,
            f"{_name(edge)} has no timeout: the client waits forever",
            f"When {edge.callee} hangs, every {edge.caller} worker calling it hangs too, until the pool is "
            "exhausted and unrelated requests fail.",
            {"calls": len(edge.calls), "worst_ms": edge.healthy_ms[-1] if edge.healthy_ms else None},
            _evidence(analysis, edge.calls)[:EVIDENCE_IDS],
            {"timeout_ms": tail, "action": f"set a timeout of {_ms(tail)}"})
    if timeout.known and timeout.value_ms is not None:
        worst = edge.latency()[-1] if edge.latency() else None
        deadline = _deadline_of(analysis, edge)
        if worst and deadline and timeout.value_ms > 10 * worst and timeout.value_ms > deadline[0]:
            return Finding(
                "timeout_missing", "medium", edge.key,
                f"{_name(edge)} waits {_ms(timeout.value_ms)}, far above its worst healthy call ({_ms(worst)}) "
                f"and above its caller's {_ms(deadline[0])}",
                "A timeout this long protects nothing: the caller's own caller has long given up.",
                {"timeout_ms": timeout.value_ms, "worst_healthy_ms": worst, "caller_deadline_ms": deadline[0]},
                _evidence(analysis, edge.calls)[:EVIDENCE_IDS],
                {"timeout_ms": tail, "action": f"shorten the timeout to {_ms(tail)}"})
    return None


def deadline_not_propagated(analysis: Analysis, edge: Edge) -> Finding | None:
    """The callee starts new downstream work after its caller has given up on it."""
    by_span = {(c.trace_id, c.span_id): c for c in edge.calls if c.gave_up}
    if not by_span:
        return None
    orphans = []
    for key in edge.downstream:
        down = analysis.edges.get(key)
        if down is None:
            continue
        for c in down.calls:
            parent = by_span.get((c.trace_id, c.upstream or ""))
            if parent is not None and c.start_ns > parent.end_ns + 1_000_000:
                orphans.append(c)
    if len(orphans) < 2:
        return None
    return Finding(
        "deadline_not_propagated", "medium", edge.key,
        f"{edge.callee} starts {len(orphans)} downstream calls after {edge.caller} has already given up",
        f"{edge.caller} does not tell {edge.callee} how long it will wait (no deadline header), so "
        f"{edge.callee} keeps working - and calling others - for a request nobody is waiting for.",
        {"calls_after_deadline": len(orphans)}, _evidence(analysis, orphans),
        {"action": "propagate the remaining budget (grpc-timeout, x-envoy-expected-rq-timeout-ms) and "
                   "check it before each downstream call"})


def network_latency(analysis: Analysis) -> list[Finding]:
    """Edges whose time is lost between caller and callee, with where it went (:func:`gaps.gap_cause`)."""
    out = []
    busy: dict[str, Occupancy] | None = None  # every service's in-flight profile, made once when needed
    for edge in analysis.edges.values():
        if len(edge.gap_ms) < NETWORK_MIN_CALLS or len(edge.server_ms) < NETWORK_MIN_CALLS:
            continue
        gap50 = percentile(edge.gap_ms, 50) or 0.0
        server50 = percentile(edge.server_ms, 50) or 0.0
        growth = ""
        # a gap that grew for part of the period is judged on the calls of that part, even when it is large at
        # the median over the whole period: what the other calls lost (before it grew) is not what grew
        if (grown := _gap_growth(edge)) is not None:
            usual, gap50, when, slow = grown
            growth = f"The gap grew from {_ms(usual)} to {_ms(gap50)} at the median from {when} on."
        elif gap50 >= NETWORK_MIN_MS and gap50 >= server50:
            slow = [c for c in edge.calls if (c.gap_ms or 0.0) >= NETWORK_MIN_MS]
        else:
            continue
        busy = busy if busy is not None else occupancies(analysis)
        cause = gap_cause(analysis, edge, slow, grown=bool(growth), busy=busy)
        client50 = percentile(edge.observed_ms, 50) or 0.0
        # late successes count in what the caller's calls take as long as the callee took (Call.observed_ms)
        until = (f" until {edge.callee} answers (counting those {edge.caller} gave up on)"
                 if len(edge.observed_ms) > len(edge.healthy_ms) else "")
        unseen = left_waiting(slow)
        beyond = ""
        if unseen is not None:
            beyond = (f"{unseen.calls} of the {len(slow)} calls {'since then' if growth else 'that lost time'} "
                      f"were still waiting for {edge.callee} to pick them up when "
                      f"{edge.caller} gave up: they waited {_ms(unseen.wait_ms)} at the median before it did, so "
                      f"they lost more than is counted here, which stops where {edge.caller} stopped waiting.")
        where, action = _GAP_WORDS[cause.where]
        out.append(Finding(
            "network_latency", "high" if edge.charge_like else "medium", edge.key,
            f"{_name(edge)} loses {'at least ' if unseen is not None and unseen.most else ''}{_ms(gap50)} per "
            f"call between {edge.caller} and {edge.callee} "
            f"({edge.callee}'s own time {_ms(server50)}){where.format(s=cause.service)}",
            f"{edge.caller}'s calls to {edge.callee} take {_ms(client50)} at the median{until}, and {edge.callee} "
            f"spends {_ms(server50)} on the request itself: {_ms(gap50)} is lost between caller and callee (the "
            f"network, a proxy, a queue or a connection pool), not in {edge.callee}'s code. {growth} {beyond} "
            f"Where: {cause.because}. Timeouts on this call must cover what {edge.caller} sees, not what "
            f"{edge.callee}'s spans say.".replace("   ", " ").replace("  ", " "),
            {"client_ms": {"p50": round(client50, 2), "p99": round(percentile(edge.observed_ms, 99) or 0.0, 2)},
             "server_ms": {"p50": round(server50, 2), "p99": round(percentile(edge.server_ms, 99) or 0.0, 2)},
             "gap_ms": {"p50": round(gap50, 2), "p99": round(percentile(edge.gap_ms, 99) or 0.0, 2)},
             "calls": len(edge.gap_ms), "cause": cause.where, "common_cause": cause.service,
             "picked_up_after_give_up": None if unseen is None else {
                 "calls": unseen.calls, "of": len(slow), "wait_ms_p50": round(unseen.wait_ms, 2)}},
            # the calls that lost the most on the wire first
            [c.trace_id for c in sorted((c for c in edge.calls if c.gap_ms is not None),
                                        key=lambda c: -(c.gap_ms or 0.0))][:EVIDENCE_IDS],
            {"action": action.format(caller=edge.caller, callee=edge.callee),
             "timeout_ms": analysis.recommended_ms(edge.key)}))
    return out


# what each answer of gaps.gap_cause adds to the summary, and what to do about it
_GAP_WORDS = {
    "link": ("", "find what sits between {caller} and {callee} (network path, proxy, connection pool) and fix it "
                 "there; meanwhile size the timeout on what {caller} sees"),
    "callee_queue": (": queued in {s}", "give {callee} more workers, or shorten what holds them (its slowest "
                                        "downstream call); meanwhile size the timeout on what {caller} sees"),
    "caller": (": on {s}'s side", "look at {caller} itself (its host's network, its CPU, a process too busy to "
                                  "send and read); meanwhile size the timeout on what {caller} sees"),
    "callee": (": on {s}'s side", "look at {callee}'s host and network; meanwhile size the timeout on what "
                                  "{caller} sees"),
    "callee_starved": (": {s} is slow to pick its calls up", "look at {callee}'s CPU and runtime (throttling, a "
                                                             "noisy neighbour, pauses), not the network; meanwhile "
                                                             "size the timeout on what {caller} sees"),
}


def _gap_growth(edge: Edge) -> tuple[float, float, str, list[Call]] | None:
    """(usual gap, grown gap, when it started, the grown stretches' calls) when the gap grew for part of the
    period: two or more stretches (:func:`gaps.stretched`) run far above the quietest one."""
    parts, medians = stretched(edge)
    if len(parts) < 2:
        return None
    usual = min(medians)
    floor = max(usual + NETWORK_GROWTH_MIN_MS, NETWORK_GROWTH * max(usual, 1.0))
    grown = [part for part, m in zip(parts, medians, strict=True) if m >= floor]
    if len(grown) < 2:  # one slow stretch is a blip (a warm-up, a pause); a delay lasts
        return None
    return (usual, percentile(sorted(m for m in medians if m >= floor), 50) or 0.0,
            format_ns(min(part[0].start_ns for part in grown)), [c for part in grown for c in part])


def uniform_timeout(analysis: Analysis) -> list[Finding]:
    groups: dict[float, list[Edge]] = {}
    for edge in analysis.edges.values():
        if edge.timeout.source in ("captured", "declared") and edge.timeout.value_ms:
            groups.setdefault(round(edge.timeout.value_ms), []).append(edge)
    out = []
    for value, edges in groups.items():
        p50s: list[tuple[float, Edge]] = []
        for e in edges:
            p50 = percentile(e.latency(), 50) if len(e.latency()) >= MIN_SAMPLES else None
            if p50:
                p50s.append((p50, e))
        if len(p50s) < 3:
            continue
        lo, hi = min(p50s, key=lambda t: t[0]), max(p50s, key=lambda t: t[0])
        if hi[0] < 10 * lo[0]:
            continue
        out.append(Finding(
            "uniform_timeout", "low", lo[1].key,
            f"the same {_ms(value)} timeout is set on {len(p50s)} edges whose latency differs "
            f"{hi[0] / lo[0]:.0f}x",
            "One value copied everywhere is too long for fast callees (slow failure) or too short for slow "
            "ones. Set each edge from its own latency.",
            {"timeout_ms": value, "edges": [f"{e.caller} -> {e.callee}" for _, e in p50s],
             "fastest_p50_ms": lo[0], "slowest_p50_ms": hi[0]},
            [], {"action": "see `payscope recommend timeouts` for per-edge values"}))
    return out


def connect_timeout_too_long(analysis: Analysis, edge: Edge) -> Finding | None:
    connect = edge.connect_timeout_ms
    read = edge.timeout.value_ms
    if connect is None or read is None:
        return None
    if connect < read and connect < 3000:
        return None
    return Finding(
        "connect_timeout_too_long", "low", edge.key,
        f"{_name(edge)} waits {_ms(connect)} to connect (read timeout {_ms(read)})",
        "A TCP connection on a LAN opens in about a millisecond; a connect timeout as long as the read timeout "
        "(what a single timeout value sets), or of seconds, only delays noticing that the callee is down, and "
        "retries to a healthy replica start late.",
        {"connect_timeout_ms": connect, "read_timeout_ms": read}, [],
        {"connect_timeout_ms": connect_timeout_ms(analysis.recommended_ms(edge.key) or read),
         "action": "set the connect timeout on its own", "timeout_ms": analysis.recommended_ms(edge.key)})


def find(analysis: Analysis) -> list[Finding]:
    """Every finding, most severe first."""
    out: list[Finding] = []
    for edge in analysis.edges.values():
        for rule in (late_success, timeout_below_tail, non_idempotent_retry, connect_timeout_too_long,
                     timeout_inversion, retry_budget_overrun, timeout_missing, deadline_not_propagated):
            found = rule(analysis, edge)
            if found:
                out.append(found)
    out.extend(uniform_timeout(analysis))
    out.extend(network_latency(analysis))
    from .tcc import saga_anomalies, tcc_anomalies  # (they build on Finding)

    out.extend(tcc_anomalies(analysis))
    out.extend(saga_anomalies(analysis))
    out.sort(key=lambda f: (-SEVERITIES.index(f.severity), f.kind, f.edge))
    return out
