"""Where a hop's lost time went (`analyzers/gaps.py`), on calls built by hand so that which of them found the callee
full is known exactly. The rule for a queue is one function (`gaps.waited_for_workers`); the `network_latency`
finding's `callee_queue` and `compare`'s `[queue]` hops both ask it."""

from __future__ import annotations

from payscope.analyzers import recommend
from payscope.analyzers.calls import Call
from payscope.analyzers.diagnose import diagnose
from payscope.analyzers.engine import Analysis, Edge
from payscope.analyzers.findings import find
from payscope.analyzers.gaps import Occupancy, gap_cause, waited_for_workers
from payscope.collector.store import group_traces
from payscope.model import SpanRow

MS = 1_000_000
SERVER_MS = 20


def _call(i: int, sent_ms: int, gap_ms: float) -> Call:
    """checkout -> bank, sent at ``sent_ms``; the bank's own time SERVER_MS, half the gap on each way."""
    start = sent_ms * MS
    half = int(gap_ms * MS / 2)
    end = start + SERVER_MS * MS + 2 * half
    return Call(f"{i:032x}", f"{i:016x}", None, "checkout", "bank", "POST /charges", "POST", start, end, None,
                server_service="bank", server_start_ns=start + half, server_end_ns=end - half, server_ok=True)


def _hop(slow_gaps: list[tuple[bool, float]]) -> tuple[Analysis, Edge, list[Call], dict[str, Occupancy]]:
    """Twenty quiet calls (2 ms lost), then the slow stretch: one call a second, each (found the bank full, lost
    this much). The bank's profile: its two workers both busy around the moment each 'full' call was sent."""
    quiet = [_call(i, i * 1000, 2.0) for i in range(20)]
    slow = [_call(100 + i, 100_000 + i * 1000, gap) for i, (_, gap) in enumerate(slow_gaps)]
    held = [(c.start_ns - MS, c.start_ns + MS) for c, (full, _) in zip(slow, slow_gaps, strict=True) if full]
    busy = {"bank": Occupancy(held + held)}  # two workers, both held then and only then
    edge = Edge("checkout", "bank", "POST /charges", calls=quiet + slow)
    analysis = Analysis(traces={}, calls=edge.calls, edges={edge.key: edge}, offsets=[], transactions={})
    return analysis, edge, slow, busy


def test_a_link_slowed_at_the_peak_is_the_link_even_when_the_callee_was_often_full() -> None:
    """The sale peak: more requests (the bank is full for most of the slow calls) and a slower network (every
    slow call loses 150 ms, full or not). A share of full calls alone would call it a queue; that the calls which
    found a free worker lost as much says it is the wire."""
    analysis, edge, slow, busy = _hop([(i % 3 != 0, 150.0 + i % 4) for i in range(20)])
    assert sum(busy["bank"].full(c.start_ns) for c in slow) == 13  # most of the slow calls found it full
    assert waited_for_workers(busy["bank"], slow, 2.0) is None
    cause = gap_cause(analysis, edge, slow, grown=True, busy=busy)
    assert (cause.where, cause.service) == ("link", None), cause


def test_calls_that_found_every_worker_busy_and_alone_lost_the_time_queued() -> None:
    """The same stretch, but only the calls that found the bank full lost the time: they waited for a worker."""
    analysis, edge, slow, busy = _hop([(i % 3 != 0, 150.0 if i % 3 else 3.0) for i in range(20)])
    waited = waited_for_workers(busy["bank"], slow, 2.0)
    assert waited is not None and waited.calls == 13 and waited.full_ms == 150.0 and waited.free_ms == 3.0
    cause = gap_cause(analysis, edge, slow, grown=True, busy=busy)
    assert (cause.where, cause.service) == ("callee_queue", "bank"), cause
    assert "13 calls" in cause.because and "150 ms" in cause.because and "3 ms" in cause.because


def test_a_gap_large_all_along_is_judged_on_every_call_of_the_period() -> None:
    """No quiet stretch to grow from: the gap was large from the start. The calls that found the bank full lost
    30 ms and the others 18 ms: the wire costs every call most of it. Judged on the large gaps alone (those of
    20 ms or more: only the full calls), it would look like a queue; judged on every call of the period, it is
    not."""
    analysis, edge, slow, busy = _hop([(i % 3 != 0, 30.0 if i % 3 else 18.0) for i in range(20)])
    edge.calls = slow  # no quiet calls
    large = [c for c in slow if (c.gap_ms or 0.0) >= 20]
    assert all(busy["bank"].full(c.start_ns) for c in large)
    assert waited_for_workers(busy["bank"], large, 0.0) is not None  # what the large gaps alone would say
    cause = gap_cause(analysis, edge, large, grown=False, busy=busy)
    assert cause.where == "link", cause


def test_a_handful_of_full_calls_drawn_from_a_wide_spread_is_not_a_queue() -> None:
    """The wire's delay varies widely at the peak (10 to 187 ms), and four calls found the bank full, with gaps
    from that same spread. Their median (155 ms) is more than twice the lower quartile of the others, as a
    median of four draws often is; but they were fast (at most twice that quartile) about as often as the free
    calls were, so it is the link.
    (Seen in the demo: the delaying relay's spread, and a bank full for a few calls at the height of the peak.)"""
    full_at = {10: 150.0, 25: 160.0, 40: 170.0, 55: 60.0}
    spread = iter(10.0 + 3 * k for k in range(60))
    analysis, edge, slow, busy = _hop([(i in full_at, full_at[i] if i in full_at else next(spread))
                                       for i in range(64)])
    free = sorted(c.gap_ms or 0.0 for i, c in enumerate(slow) if i not in full_at)
    assert 155.0 >= 2 * free[len(free) // 4]  # the contrast alone would call it a queue
    assert waited_for_workers(busy["bank"], slow, 2.0) is None
    cause = gap_cause(analysis, edge, slow, grown=True, busy=busy)
    assert cause.where == "link", cause


def test_a_queue_is_found_though_some_free_calls_waited_as_it_drained() -> None:
    """The demo's order service at the peak: its 16 workers all held, 16 calls found it full and lost up to 705 ms.
    Of the 10 that found a worker free, four still waited 381-694 ms (sent as the queue drained, behind those
    before them). A rank test over all of them is not sure beyond chance; that the full calls were fast (at most
    twice the free calls' lower quartile) far less often than the free ones were is."""
    full = [2, 9, 63, 77, 193, 207, 237, 359, 429, 441, 483, 585, 637, 658, 692, 705]
    free = [2, 2, 3, 3, 6, 13, 381, 425, 688, 694]
    order = [(True, float(g)) for g in full] + [(False, float(g)) for g in free]
    order = [order[i] for i in sorted(range(len(order)), key=lambda i: (i * 7) % len(order))]  # interleaved
    analysis, edge, slow, busy = _hop(order)
    waited = waited_for_workers(busy["bank"], slow, 2.0)
    assert waited is not None and waited.calls == 16 and waited.full_ms == 394.0
    cause = gap_cause(analysis, edge, slow, grown=True, busy=busy)
    assert (cause.where, cause.service) == ("callee_queue", "bank"), cause


def _queued_past_the_timeout(i: int, queue_ms: float) -> list[SpanRow]:
    """gateway -> order at ``i`` seconds: order's request waits ``queue_ms`` for a worker and takes 50 ms; the
    gateway gives up after one second (its own timer: a timeout with no answer) when the wait is longer."""
    start = i * 1000 * MS
    given_up = queue_ms + 50 > 1000
    end = start + (1000 if given_up else queue_ms + 52) * MS
    trace = f"{i + 1:032x}"

    def row(span_id: str, parent: str | None, service: str, kind: str, begin: int, finish: int,
            error: str | None) -> SpanRow:
        return SpanRow(trace, span_id, parent, service, f"POST /{service}", kind, begin, finish,
                       2 if error else 0, "", error, "POST /orders", "order" if kind == "client" else None,
                       "POST" if kind == "client" else None, None if error else 200, 0, False)

    picked_up = start + int((queue_ms + 1) * MS)
    return [row("01" * 8, None, "gateway", "server", start, end + MS, "timeout" if given_up else None),
            row("02" * 8, "01" * 8, "gateway", "client", start, end, "timeout" if given_up else None),
            row("03" * 8, "02" * 8, "order", "server", picked_up, picked_up + 50 * MS, None)]


def test_calls_left_in_the_callees_queue_past_the_timeout_say_how_long_they_really_waited() -> None:
    """Twenty quiet calls, then twenty that waited three seconds in order's queue, past the gateway's one-second
    timeout. What the gateway lost on them stops at its timeout (the gap is a lower bound there), so the finding says
    "at least", and how long they waited before order picked them up: three seconds, not one."""
    rows = [r for i in range(20) for r in _queued_past_the_timeout(i, 1.0)]
    rows += [r for i in range(20, 40) for r in _queued_past_the_timeout(i, 3000.0)]
    analysis = diagnose(group_traces([sorted(rows, key=lambda r: r.trace_id)]))
    (finding,) = [f for f in find(analysis) if f.kind == "network_latency"]
    assert finding.metrics["picked_up_after_give_up"] == {"calls": 20, "of": 20, "wait_ms_p50": 3001.0}
    assert "loses at least 1.00s per call" in finding.summary, finding.summary
    assert "they waited 3.00s at the median before it did" in finding.explanation, finding.explanation
    # what the gateway's calls take until order answers counts the given-up ones as long as order took
    assert finding.metrics["client_ms"]["p99"] >= 3000
    assert "until order answers (counting those gateway gave up on)" in finding.explanation


def test_a_slow_answer_the_caller_waited_for_is_not_counted_as_left_waiting() -> None:
    """The same stretch, but order picks the calls up after 600 ms and the gateway waits: nothing is a lower bound."""
    rows = [r for i in range(20) for r in _queued_past_the_timeout(i, 1.0)]
    rows += [r for i in range(20, 40) for r in _queued_past_the_timeout(i, 600.0)]
    analysis = diagnose(group_traces([sorted(rows, key=lambda r: r.trace_id)]))
    (finding,) = [f for f in find(analysis) if f.kind == "network_latency"]
    assert finding.metrics["picked_up_after_give_up"] is None
    assert "at least" not in finding.summary and "loses 602ms per call" in finding.summary, finding.summary


def test_the_calls_a_recommended_timeout_still_fails_only_because_they_queued_are_told_apart() -> None:
    """Ten calls: five fast, one slow of its own (4 s), four that waited for a free worker (5 s, left out of the tail).
    Under a 3.5 s timeout half of them fail, and four tenths only because they queued."""
    edge = Edge("gateway", "order", "POST /orders")
    edge.observed_ms = sorted([100.0] * 5 + [4000.0] + [5000.0] * 4)
    edge.tail_ms = sorted([100.0] * 5 + [4000.0])
    assert recommend.timeout_rate(edge, 3500.0) == 0.5
    assert recommend.queued_timeout_rate(edge, 3500.0) == 0.4
    assert recommend.queued_timeout_rate(edge, 6000.0) == 0.0
    edge.tail_ms = None  # no queue found: nothing is the queue's
    assert recommend.queued_timeout_rate(edge, 3500.0) == 0.0


def test_a_replayed_queue_serves_its_calls_in_the_order_they_came_whatever_order_they_are_given_in() -> None:
    """Two workers, three calls of 100 ms 10 ms apart: the third waits for the first worker to be free (80 ms). The
    replay walks transactions one by one, so calls reach the queue out of time order: the waits must not depend on
    it."""
    arrivals = [(0.0, 100.0, 1), (10.0, 100.0, 2), (20.0, 100.0, 3), (500.0, 50.0, 4)]
    expected = {1: 0.0, 2: 0.0, 3: 80.0, 4: 0.0}
    assert recommend._queue_waits(arrivals, 2) == expected
    assert recommend._queue_waits(list(reversed(arrivals)), 2) == expected
    assert recommend._queue_waits(arrivals, 1) == {1: 0.0, 2: 90.0, 3: 180.0, 4: 0.0}
    # two calls at the same moment: the one the replay made first is served first, whatever their ids
    assert recommend._queue_waits([(0.0, 100.0, 8), (0.0, 100.0, 7)], 1) == {8: 0.0, 7: 100.0}
