"""Timeout and retry recommendations per edge, and a replay of recorded latencies under them."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .calls import Call
from .engine import Analysis, Edge, EdgeKey, call_budget_ms
from .gaps import occupancies, usual_gap_ms
from .orders import Order, charging_calls
from .stats import fraction_above, median, ms, nice_ceil_ms, percentile

MARGIN = 1.25          # over the healthy p99
NESTED_MARGIN = 1.1    # a caller waits this much longer than its callee's whole budget
MIN_TIMEOUT_MS = 10.0
# Linux's least TCP retransmission timeout: one lost segment adds at least this much to a call, so a timeout
# closer than this above the tail turns a single lost packet (or a GC pause, a starved host) into a failure.
RETRANSMIT_MS = 200.0
OUTLIER_FACTOR = 4.0   # a success slower than this many p99s is an outlier, not the tail to cover
MIN_TAIL_SAMPLES = 20  # fewer successes than this give no tail: cover the longest one seen
QUEUE_PASSES = 8        # the replay of a queue stops when what it counts no longer changes, or after these passes
GAVE_UP_PAST_MS = 0.001  # an attempt its caller gave up on lasted longer than the timeout: replayed this much past


@dataclass
class Setting:
    """What an edge runs under: per-try timeout (None = waits forever), attempts, backoff."""

    per_try_ms: float | None
    attempts: int = 1
    backoff_ms: float = 0.0

    def budget_ms(self) -> float | None:
        if self.per_try_ms is None:
            return None
        return call_budget_ms(self.per_try_ms, self.attempts, self.backoff_ms)


@dataclass
class Recommendation:
    edge: Edge
    current: Setting
    recommended: Setting
    reason: str
    timeout_rate_before: float
    timeout_rate_after: float
    notes: list[str] = field(default_factory=list)
    timeout_rate_after_queued: float | None = None  # of timeout_rate_after, the calls only the queue fails

    def to_json(self) -> dict[str, Any]:
        e = self.edge
        pct = e.percentiles()
        return {
            "edge": {"caller": e.caller, "callee": e.callee, "operation": e.operation},
            "current": {"timeout_ms": e.timeout.value_ms and round(e.timeout.value_ms, 1),
                        "source": e.timeout.source, "attempts": self.current.attempts},
            "latency_ms": {k: None if v is None else round(v, 1) for k, v in pct.items()},
            "samples": len(e.latency()), "censored_calls": len(e.censored_ms),
            "recommended": {"timeout_ms": self.recommended.per_try_ms, "attempts": self.recommended.attempts,
                            "retries": self.recommended.attempts - 1,
                            "backoff_ms": self.recommended.backoff_ms,
                            "budget_ms": self.recommended.budget_ms()},
            "idempotent": e.idempotent,
            "expected_timeout_rate": {"before": round(self.timeout_rate_before, 4),
                                      "after": round(self.timeout_rate_after, 4),
                                      "after_queued": None if self.timeout_rate_after_queued is None
                                      else round(self.timeout_rate_after_queued, 4)},
            "reason": self.reason, "notes": self.notes,
            "snippets": snippets(e, self.recommended),
        }


def current_setting(edge: Edge) -> Setting:
    value = edge.timeout.value_ms if edge.timeout.known else None
    return Setting(value, max(1, edge.max_attempts), edge.backoff_ms)


class _Budgets:
    """Each edge's setting, its callees' first (a method, not a recursive closure: that would hold the tables in
    a reference cycle only the cyclic collector frees)."""

    def __init__(self, edges: dict[EdgeKey, Edge]) -> None:
        self.edges = edges
        self.memo: dict[EdgeKey, Setting] = {}
        self.visiting: set[EdgeKey] = set()
        self.reasons: dict[EdgeKey, str] = {}

    def setting(self, key: EdgeKey) -> Setting:
        if key in self.memo:
            return self.memo[key]
        edge = self.edges[key]
        if key in self.visiting:  # a cycle: fall back to the edge's own tail
            return Setting(tail_timeout(edge))
        self.visiting.add(key)
        tail = tail_timeout(edge)
        # The callee makes its downstream calls one after another: their budgets add up.
        downstream = sum(self.setting(k).budget_ms() or 0.0 for k in edge.downstream if k in self.edges)
        self_p99 = percentile(sorted(edge.self_ms), 99) or 0.0
        nested = (downstream + self_p99) * NESTED_MARGIN if downstream else 0.0
        per_try = tail
        reason = (f"caller-observed p99 x {MARGIN:g}, and at least {RETRANSMIT_MS:.0f} ms above it (p99.9 where "
                  "there are 1000+ samples)")
        if len(edge.tail()) < MIN_TAIL_SAMPLES:
            reason = (f"only {len(edge.tail())} successful calls, too few for a tail: covers the longest "
                      "the caller saw")
        if per_try is None:
            per_try = edge.timeout.value_ms if edge.timeout.known else None
            reason = "no healthy samples: keep the current value"
        if per_try is not None and nested > per_try:
            per_try = nice_ceil_ms(nested)
            reason = f"covers {edge.callee}'s own downstream budget ({nested:.0f} ms with margin)"
        attempts = 1
        backoff = 0.0
        if edge.idempotent and per_try is not None:
            attempts = 2
            backoff = nice_ceil_ms(max(MIN_TIMEOUT_MS, (percentile(edge.tail(), 50) or 10.0) / 2))
        result = Setting(None if per_try is None else max(MIN_TIMEOUT_MS, per_try), attempts, backoff)
        self.memo[key] = result
        self.reasons[key] = reason
        self.visiting.discard(key)
        return result


def recommend(analysis: Analysis) -> list[Recommendation]:
    """One recommendation per edge; callers' timeouts cover their callees' whole budgets."""
    edges = analysis.edges
    budgets = _Budgets(edges)
    out = []
    for key, edge in sorted(edges.items()):
        rec = budgets.setting(key)
        cur = current_setting(edge)
        before = timeout_rate(edge, cur.per_try_ms)
        after = timeout_rate(edge, rec.per_try_ms)
        # of one try's failures, those of the queue (with retries, a queued try may be followed by one that is not)
        queued_after = queued_timeout_rate(edge, rec.per_try_ms) if rec.attempts == 1 else None
        notes = []
        if edge.queued:
            note = (f"{edge.queued} calls that waited for a free worker of {edge.callee} (its queue, not its work) "
                    "are left out of the tail: a timeout that covers a queue only lets it grow")
            if queued_after:
                note += (f"; {queued_after:.2%} of the recorded calls time out after only because they waited "
                         f"there (of the {after:.2%}): more workers for {edge.callee}, or less held by each, fix "
                         "those (the replay, --simulate, serves that queue again under the settings)")
            notes.append(note)
        cut = fraction_above(edge.tail(), rec.per_try_ms) if rec.per_try_ms is not None else 0.0
        if cut:
            notes.append(f"cuts {cut:.2%} of the successful calls the caller saw (outliers beyond "
                         f"{OUTLIER_FACTOR:g}x the p99)")
        if edge.censored_ms:
            notes.append(f"{len(edge.censored_ms)} calls were given up with no answer: how long they would have "
                         "taken was never seen, so they count as timing out after too")
        if not edge.idempotent and cur.attempts > 1:
            notes.append("retries removed: the call is not idempotent (send an Idempotency-Key to retry safely)")
        if not edge.instrumented_callee and edge.timed_out_ms:
            notes.append(f"{edge.callee} has no spans: latency above the current timeout was never observed, "
                         "so the tail may be longer than shown")
        out.append(Recommendation(edge, cur, rec, budgets.reasons[key], before, after ** rec.attempts, notes,
                                  queued_after))
    return out


def per_client(recs: list[Recommendation]) -> dict[tuple[str, str], tuple[list[str], Setting]]:
    """One setting for each caller -> callee, with the operations it serves: a client object (an httpx.Client, a
    requests Session, an nginx upstream) usually serves every operation on a callee with one timeout, which must
    cover the operation that needs the longest (of those with a recommendation), and may retry no more than the
    least retryable operation allows. `recommend timeouts` and the demo's ``--fixed`` both read it."""
    groups: dict[tuple[str, str], list[Recommendation]] = defaultdict(list)
    for r in recs:
        groups[(r.edge.caller, r.edge.callee)].append(r)
    out = {}
    for pair, group in sorted(groups.items()):
        tries = [t for r in group if (t := r.recommended.per_try_ms) is not None]
        attempts = min(r.recommended.attempts for r in group)
        backoff = max(r.recommended.backoff_ms for r in group) if attempts > 1 else 0.0
        out[pair] = (sorted(r.edge.operation for r in group), Setting(max(tries, default=None), attempts, backoff))
    return out


def timeout_rate(edge: Edge, per_try_ms: float | None) -> float:
    """The share of calls a per-try timeout fails, from what the caller saw: successes slower than it, and
    calls given up without an answer, whose length was never seen (counted as failing under any timeout)."""
    observed = edge.latency()
    total = len(observed) + len(edge.censored_ms)
    if not total:
        return 0.0
    slow = fraction_above(observed, per_try_ms) * len(observed) if per_try_ms is not None else 0.0
    return (slow + len(edge.censored_ms)) / total


def queued_timeout_rate(edge: Edge, per_try_ms: float | None) -> float:
    """The share of :func:`timeout_rate`'s calls that a per-try timeout fails only because they waited in the
    callee's queue: slower than it in :meth:`Edge.latency`, and left out of :meth:`Edge.tail` as queued."""
    observed, tail = edge.latency(), edge.tail()
    total = len(observed) + len(edge.censored_ms)
    if per_try_ms is None or not total or tail is observed:
        return 0.0
    slow = fraction_above(observed, per_try_ms) * len(observed)
    slow_unqueued = fraction_above(tail, per_try_ms) * len(tail)
    return max(0.0, slow - slow_unqueued) / total


def tail_timeout(edge: Edge) -> float | None:
    """A per-try timeout from the tail of what the caller saw of successful calls (``Edge.tail``: without a
    queue at the callee)."""
    values = edge.tail()
    p99 = percentile(values, 99)
    if p99 is None:
        return None
    target = max(p99 * MARGIN, p99 + RETRANSMIT_MS)
    if len(values) >= 1000:
        target = max(target, percentile(values, 99.9) or target)
    worst = values[-1]
    if worst <= OUTLIER_FACTOR * p99 or len(values) < MIN_TAIL_SAMPLES:
        # Cutting off a call that succeeded in the recorded data would turn a success into a failure.
        target = max(target, worst * 1.05)
    if edge.censored_ms and edge.timeout.value_ms and len(edge.censored_ms) >= 0.01 * len(edge.calls):
        # Calls given up with no answer lasted at least the timeout: the real tail lies beyond it.
        target = max(target, edge.timeout.value_ms * 2)
    return nice_ceil_ms(max(MIN_TIMEOUT_MS, target))


# --- snippets ------------------------------------------------------------------

def connect_timeout_ms(per_try_ms: float) -> float:
    """The connect timeout to set beside a per-try timeout: a quarter of it, from 50 ms to 500 ms, never above it.
    A TCP connection on a LAN opens in about a millisecond; longer only delays noticing a callee that is down.
    The one rule: the snippets and the ``connect_timeout_too_long`` finding both ask it."""
    return min(per_try_ms, max(50.0, min(500.0, per_try_ms / 4)))


def snippets(edge: Edge, rec: Setting) -> dict[str, str]:
    """Ready-to-paste configuration for the clients that could own this edge."""
    if rec.per_try_ms is None:
        return {}
    t = rec.per_try_ms / 1000
    connect = connect_timeout_ms(rec.per_try_ms) / 1000
    retries = rec.attempts - 1
    budget_s = (rec.budget_ms() or rec.per_try_ms) / 1000
    out = {
        "requests": (f"session.post(url, json=body, timeout=({connect:g}, {t:g}))"
                     + (f"\n# retries: HTTPAdapter(max_retries=Retry(total={retries}, backoff_factor="
                        f"{rec.backoff_ms / 1000:g}, allowed_methods=None))" if retries else "")),
        "httpx": f"httpx.Client(timeout=httpx.Timeout({t:g}, connect={connect:g}))"
                 + (f"\n# transport=httpx.HTTPTransport(retries={retries})" if retries else ""),
        "aiohttp": f"aiohttp.ClientTimeout(total={t:g}, sock_connect={connect:g})",
        "grpc": f"stub.Method(request, timeout={t:g})",
        "nginx": (f"proxy_connect_timeout {int(connect * 1000)}ms;\nproxy_read_timeout {int(t * 1000)}ms;\n"
                  f"proxy_next_upstream_tries {rec.attempts};"),
        "envoy": (f"timeout: {budget_s:g}s\nretry_policy:\n  num_retries: {retries}\n"
                  f"  per_try_timeout: {t:g}s"),
    }
    return out


# --- replay --------------------------------------------------------------------

@dataclass
class ReplayResult:
    transactions: int
    failed: int
    late_success: int
    duplicate_charge: int

    def to_json(self) -> dict[str, int]:
        return {"transactions": self.transactions, "failed": self.failed, "late_success": self.late_success,
                "duplicate_charge": self.duplicate_charge}


def _queue_waits(arrivals: list[tuple[float, float, int]], workers: int) -> dict[int, float]:
    """How long each call waits for a worker of a service that has ``workers``: ``arrivals`` are (when the call
    reaches it, ms; the work it holds a worker for, ms; the call's id), taken first come, first served, each by the
    first worker free, whether or not its caller still waits."""
    free_at = [0.0] * max(1, workers)  # a heap of the moments each worker is free again
    waits = {}
    # calls that arrive at the same moment are taken in the order the replay made them, never by their ids
    for arrival, _, work, key in sorted((arrival, i, work, key) for i, (arrival, work, key) in enumerate(arrivals)):
        start = max(arrival, free_at[0])
        heapq.heapreplace(free_at, start + work)
        waits[key] = start - arrival
    return waits


def replay(analysis: Analysis, settings: dict[EdgeKey, Setting]) -> ReplayResult:
    """Replay each recorded transaction's latencies under ``settings``, transactions in the order they began.

    A callee's time is its recorded server time with its own downstream calls
    replayed in turn. Retries past the recorded attempts take the edge's median
    healthy latency. A timed-out call whose callee has no spans is assumed to
    have taken longer than any timeout (its real latency was never seen).

    A customer the replay tells "failed" asks again as recorded; once told "paid", the order's later asked
    traces are not made (a callback or consumed event still is), so they add no load and count nowhere.

    A callee whose calls queued for a free worker (``gaps.leave_out_queues`` left them out of an edge's tail) is
    replayed with its workers, as many as it ever had requests in flight: each call made into it arrives when it
    was sent (plus half the edge's usual gap, the wire), waits for the first free worker (:func:`_queue_waits`)
    and holds it for its replayed work. So its queue grows or drains with the work the settings give each request
    and with the requests the replay makes, not as recorded. Which requests are made depends on the waits and the
    waits on them: the replay starts from the recorded waits, and replays again with the waits the last pass's
    requests make until what it counts stays the same (at most QUEUE_PASSES passes).
    """
    busy = occupancies(analysis)
    workers = {edge.callee: busy[edge.callee].ceiling for edge in analysis.edges.values()
               if edge.tail_ms is not None and edge.callee in busy}
    wire_ms = {edge.key: usual_gap_ms(edge) for edge in analysis.edges.values() if edge.callee in workers}
    chains_by_parent: dict[tuple[str, str | None], list[list[Call]]] = defaultdict(list)
    groups: dict[tuple[str, str | None, str, str], list[Call]] = defaultdict(list)
    for c in analysis.calls:
        groups[(c.trace_id, c.parent_id, c.callee, c.operation)].append(c)
    for (trace_id, _, _, _), calls in groups.items():
        calls.sort(key=lambda c: c.start_ns)
        # the server span of the caller that made these calls: its upstream client span id
        chains_by_parent[(trace_id, calls[0].upstream)].append(calls)
    back_ms: dict[EdgeKey, float] = {}  # the answer's way back: half the gap of a successful call
    for key, edge in analysis.edges.items():
        back_ms[key] = (median(edge.gap_ms) or 0.0) / 2
    charging = charging_calls(analysis)
    orders = analysis.orders()
    order_of_trace = {t: order.key for order in orders.values() for t in order.trace_ids}
    in_order = sorted(analysis.traces.items(), key=lambda item: item[1].start_ns)
    recorded_waits = {id(c): max(0.0, ms(c.server_start_ns - c.start_ns) - wire_ms[c.edge] / 2)
                      for c in analysis.calls if c.edge in wire_ms and c.server_start_ns is not None} if workers else {}

    def one_pass(waits: dict[int, float], arrivals: dict[str, list[tuple[float, float, int]]]) -> ReplayResult:
        done: dict[int, tuple[float, bool]] = {}  # each recorded attempt replayed once: it arrives once

        def run_chain(chain: list[Call]) -> tuple[float, bool, bool, int, int]:
            """(time the caller spent, success, a late success happened, attempts the callee carried out (answered
            well, in time or after the caller gave up), attempts made)."""
            edge = analysis.edges[chain[0].edge]
            setting = settings.get(edge.key) or current_setting(edge)
            spent = 0.0
            server_successes = 0
            late = False
            for i in range(setting.attempts):
                if i:
                    spent += setting.backoff_ms
                recorded = chain[i] if i < len(chain) else None
                latency, server_ok = attempt_latency(edge, recorded)
                limit = setting.per_try_ms
                if limit is None or latency <= limit:
                    spent += latency
                    if server_ok:
                        return spent, True, late, server_successes + 1, i + 1
                    continue
                spent += limit
                if server_ok:
                    server_successes += 1
                    late = True
            return spent, False, late, server_successes, setting.attempts

        def attempt_latency(edge: Edge, call: Call | None) -> tuple[float, bool]:
            if call is None:
                return (percentile(edge.latency(), 50) or 0.0), True
            if id(call) not in done:
                done[id(call)] = replayed_attempt(edge, call)
            return done[id(call)]

        def replayed_attempt(edge: Edge, call: Call) -> tuple[float, bool]:
            """How long the caller would wait for this attempt with no timeout, and whether it would succeed:
            what the caller saw, with the callee's own calls replayed in place of what they took."""
            if call.server_start_ns is None or call.server_end_ns is None:
                if call.gave_up:  # no answer: how long it would have taken was never seen
                    return float("inf"), False
                return ms(call.duration_ns), call.ok
            client = ms(call.duration_ns)
            if call.gave_up:  # cut short: it would have lasted until the callee finished and its answer came back,
                # and longer than the timeout its caller gave up at (an attempt's own length may be inferred shorter)
                fired = edge.timeout.value_ms + GAVE_UP_PAST_MS if edge.timeout.known and edge.timeout.value_ms else 0.0
                client = max(client, fired, ms(call.server_end_ns - call.start_ns) + back_ms.get(edge.key, 0.0))
            children = chains_by_parent.get((call.trace_id, call.span_id), [])
            recorded_children = sum(ms(ch[-1].end_ns - ch[0].start_ns) for ch in children)
            replayed = 0.0
            children_ok = True
            for ch in children:
                spent, child_ok, _, _, _ = run_chain(ch)
                replayed += spent
                if not child_ok:
                    children_ok = False
                    break
            # A callee that failed only because one of its own calls failed succeeds when that call now does.
            failed_by_child = any(not ch[-1].ok for ch in children)
            ok = children_ok and (bool(call.server_ok) or failed_by_child)
            if edge.callee in workers:  # its own time replayed, and the wait for a worker the replayed load makes
                work = max(0.0, ms(call.server_end_ns - call.server_start_ns) - recorded_children + replayed)
                wire = wire_ms[edge.key]
                arrivals[edge.callee].append((call.start_ns / 1e6 + wire / 2, work, id(call)))
                wait = waits.get(id(call), recorded_waits.get(id(call), 0.0))
                return wire + wait + work, ok
            return max(0.0, client - recorded_children + replayed), ok

        paid: set[str] = set()
        made = failed = late_total = 0
        charges: dict[str, int] = {}
        for trace_id, facts in in_order:
            order_key = order_of_trace.get(trace_id)
            if facts.asked and order_key in paid:
                continue  # told paid, the customer asks no more
            made += 1
            top = chains_by_parent.get((trace_id, None), [])
            any_fail = any_late = False
            through = 0
            for ch in top:
                ok, late, charged = _walk(ch, run_chain, chains_by_parent, charging)
                any_fail |= not ok
                any_late |= late
                through += charged
            if not top and not facts.root_ok:
                any_fail = True
            failed += any_fail
            late_total += any_late and any_fail
            charges[trace_id] = through
            if facts.asked and not any_fail and order_key is not None:
                paid.add(order_key)
        twice = sum(_charged_twice(order, charges) for order in orders.values())
        return ReplayResult(made, failed, late_total, twice)

    waits: dict[int, float] = {}
    result = None
    for _ in range(QUEUE_PASSES if workers else 1):
        arrivals: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
        last, result = result, one_pass(waits, arrivals)
        if result == last:
            break
        waits = {key: wait for service, found in arrivals.items()
                 for key, wait in _queue_waits(found, workers[service]).items()}
    assert result is not None
    return result


def _charged_twice(order: Order, charges: dict[str, int]) -> bool:
    """Whether two charges of ``order`` go through in the replay (``charges``: of each trace made), across its traces
    as the orders count them (``orders.Order.mismatches``): a customer told it failed asks again, and both attempts
    may charge; refunds are as recorded. The replay knows calls only: where the rules count an order's charges from
    the provider's log lines (``[orders] charge_log``), it still counts the calls that charge."""
    return sum(charges.get(trace_id, 0) for trace_id in order.trace_ids) - order.refunds >= 2


def _walk(chain: list[Call], run_chain: Any, chains_by_parent: dict[tuple[str, str | None], list[list[Call]]],
          charging: set[tuple[str, str]]) -> tuple[bool, bool, int]:
    """Run a top-level chain and every chain below the attempts it made: (success, a late success happened, charges
    that went through)."""
    _, ok, late, through, made = run_chain(chain)
    charged = through if (chain[0].trace_id, chain[0].span_id) in charging else 0
    stack = chain[:made]
    while stack:
        call = stack.pop()
        for child in chains_by_parent.get((call.trace_id, call.span_id), []):
            _, _, child_late, child_through, child_made = run_chain(child)
            late |= child_late
            if (child[0].trace_id, child[0].span_id) in charging:
                charged += child_through
            stack.extend(child[:child_made])
    return ok, late, charged


def recorded(analysis: Analysis) -> ReplayResult:
    """What was recorded, counted as the replay counts."""
    outcomes = Counter(t.outcome for t in analysis.transactions.values())
    return ReplayResult(len(analysis.transactions),
                        sum(outcomes.get(k, 0) for k in ("failed", "timeout", "late_success", "declined")),
                        outcomes.get("late_success", 0), len(analysis.orders_charged_twice()))


def simulate(analysis: Analysis, recommendations: list[Recommendation]) -> dict[str, Any]:
    before = replay(analysis, {r.edge.key: r.current for r in recommendations})
    after = replay(analysis, {r.edge.key: r.recommended for r in recommendations})
    return {
        "recorded": recorded(analysis).to_json(),
        "before": before.to_json(), "after": after.to_json(),
        "counts": "transactions are traces; duplicate_charge counts orders charged twice, once per order",
        "model": "what each caller saw, replayed through each call tree under the current and recommended "
                 "settings, transactions in the order they began; a callee whose calls queued is replayed with its "
                 "workers; a customer told paid asks no more",
    }
