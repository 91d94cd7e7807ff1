"""Where the time a hop lost between caller and callee went: the link between the two, one side's host or
process, or a queue in front of a callee whose workers were all busy.

The gap of a call (client span minus server span) is everything that is neither the callee's code nor the
caller's wait for it: the wire, a proxy, a connection pool, the callee's accept queue, a caller too starved of
CPU to read its answer. Which of these it was shows in what else happened at the same time:

- ``callee_queue``: the slow calls that came while the callee had as many requests in flight as it ever had lost
  far more than the others (:func:`waited_for_workers`). A request that finds every worker busy
  waits before its server span starts; a delay on the wire slows every call alike.
- ``caller``: the caller's calls to its other callees lost time in the same stretch. What they share is the
  caller: its host's network, or a process too busy to send and read (a starved CPU, a held interpreter lock).
- ``callee``: the callee's other callers lost time too: the callee's host or its network.
- ``link``: nothing else slowed with it, or nothing else can be compared: the path between these two.
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass

from .calls import Call
from .engine import Analysis, Edge
from .stats import median, percentile

QUEUE_CONTRAST = 2.0       # a queue: the calls that found the callee full lost this many times the others
QUEUE_P = 0.01             # ... and were fast less often than the others, beyond this chance (one-sided)
SIBLING_SHARE = 0.25       # a neighbour edge grew too when its gap rose by this share of the hop's own growth
SIBLING_MIN_MS = 5.0       # ... and by at least this much: a busy host's jitter stays below
SIBLING_MIN_CALLS = 3      # a neighbour edge with fewer answered calls in the stretch says nothing
FLOOR_SHARE = 1 / 3        # the wire: the fastest tenth of calls lost at least this share of what grew
LATE_STRETCH_CALLS = 5     # ... judged on stretches of at least this many calls, and never on fewer


def _own_ms(calls: list[Call]) -> float:
    """The callee's own time on ``calls`` at the median (its server span)."""
    return median([(c.server_end_ns - c.server_start_ns) / 1e6 for c in calls
                   if c.server_start_ns is not None and c.server_end_ns is not None]) or 0.0


@dataclass(frozen=True, slots=True)
class LeftWaiting:
    """Calls their caller gave up on before the callee picked them up (``Call.left_waiting_ms``)."""

    calls: int
    wait_ms: float   # how long they waited before the callee picked them up, at the median
    most: bool       # they are at least half of the calls judged: a median gap of those is a lower bound


def left_waiting(calls: list[Call]) -> LeftWaiting | None:
    """The calls of ``calls`` that were still waiting for their callee when the caller gave up, or None when fewer
    than SIBLING_MIN_CALLS: what they lost runs past what the caller saw, so a gap counted on them is a lower
    bound, and their wait is what the callee's queue (or the wire) really held them."""
    waits = [w for c in calls if (w := c.left_waiting_ms) is not None]
    if len(waits) < SIBLING_MIN_CALLS:
        return None
    return LeftWaiting(len(waits), median(waits) or 0.0, 2 * len(waits) >= len(calls))


def _answered(calls: list[Call]) -> list[Call]:
    # a call given up on says nothing of the answer it did not wait for, which a slow link holds as long as every other
    return [c for c in calls if c.error_class is None and c.gap_ms is not None]


def picked_up_late(before: list[Call], after: list[Call]) -> bool:
    """Whether the gap of one edge's answered calls grew from ``before`` to ``after`` the way a starved callee makes it
    grow, not the way a slow wire does. A delay on the wire makes every call it acts on lose it, the fastest too, and
    the typical call at most two or three times it (round trips, a new connection). A starved service picks some
    calls up at once and others late: its fastest calls lose little of what the others lose.

    Judged stretch by stretch (tenths of ``after`` in time, LATE_STRETCH_CALLS calls at least), on the stretches whose
    median gap is above what nine calls in ten stayed under before (a delay that began or ended inside the window
    leaves the stretches outside it as they were): the callee picked its calls up late when, in most of those
    stretches, the fastest tenth of the calls (their 10th percentile) lost less than FLOOR_SHARE of what the stretch's
    median lost. Per stretch, so that waits in front of a slow link (a connection pool whose connections the link
    holds longer), which raise some stretches' medians far more than their floors, do not outvote the others."""
    gaps_before = sorted(c.gap_ms or 0.0 for c in _answered(before))
    calls = sorted(_answered(after), key=lambda c: c.start_ns)
    if len(gaps_before) < LATE_STRETCH_CALLS or len(calls) < LATE_STRETCH_CALLS:
        return False  # too few calls to tell their fastest from the others: the wire, as without this rule
    bar = percentile(gaps_before, 90) or 0.0
    usual_median, usual_floor = median(gaps_before) or 0.0, percentile(gaps_before, 10) or 0.0
    parts = max(1, min(10, len(calls) // LATE_STRETCH_CALLS))  # as even as they come: no stretch of one or two
    late = grown = 0
    for k in range(parts):
        gaps = sorted(c.gap_ms or 0.0 for c in calls[k * len(calls) // parts:(k + 1) * len(calls) // parts])
        typical = median(gaps) or 0.0
        if typical <= bar:
            continue
        grown += 1
        late += (percentile(gaps, 10) or 0.0) - usual_floor < FLOOR_SHARE * (typical - usual_median)
    return grown > 0 and late > grown / 2


@dataclass(frozen=True)
class GapCause:
    where: str                # link | caller | callee | callee_queue | callee_starved
    service: str | None       # the service it is on (None for the link)
    because: str              # one sentence of evidence


class Occupancy:
    """How many requests a service had in flight over time, from its server spans."""

    def __init__(self, intervals: list[tuple[int, int]]) -> None:
        self.starts = sorted(s for s, _ in intervals)
        self.ends = sorted(e for _, e in intervals)
        self.ceiling = max((self.at(s) for s in self.starts), default=0)
        # the stretches of time in which it was full, and how long it had been full before each: how long it
        # was full between two moments is then two searches
        self._full_from: list[int] = []
        self._full_to: list[int] = []
        self._full_before: list[int] = []
        self._bar = bar = self.ceiling - self.ceiling // 10
        level, i, j, total = 0, 0, 0, 0
        while self.ceiling and (i < len(self.starts) or j < len(self.ends)):
            t = min(self.starts[i] if i < len(self.starts) else self.ends[j],
                    self.ends[j] if j < len(self.ends) else self.starts[i])
            was = level >= bar
            while i < len(self.starts) and self.starts[i] == t:
                level, i = level + 1, i + 1
            while j < len(self.ends) and self.ends[j] == t:
                level, j = level - 1, j + 1
            if level >= bar and not was:
                self._full_from.append(t)
                self._full_before.append(total)
            elif was and level < bar:
                self._full_to.append(t)
                total += t - self._full_from[-1]

    def at(self, t: int) -> int:
        """Requests in flight at ``t`` (started at or before it, not yet ended)."""
        return bisect.bisect_right(self.starts, t) - bisect.bisect_right(self.ends, t)

    def full(self, t: int) -> bool:
        """Every worker busy at ``t``, as far as the spans show: as many requests in flight as ever (within a
        tenth, for a pool split over processes that fill unevenly)."""
        return self.ceiling > 0 and self.at(t) >= self._bar

    def _full_until(self, t: int) -> int:
        """Nanoseconds it was full before ``t``."""
        k = bisect.bisect_right(self._full_from, t) - 1
        if k < 0:
            return 0
        return self._full_before[k] + min(t, self._full_to[k]) - self._full_from[k]

    def found_full(self, c: Call) -> bool:
        """Whether call ``c`` came to the callee while every worker was busy: full when it was sent, or full for
        at least half of the time from then until its server span began. A call sent in the instant a single
        worker was between two requests still waits behind those that came before it."""
        if self.full(c.start_ns):
            return True
        begun = c.server_start_ns
        if begun is None or begun <= c.start_ns:
            return False
        return 2 * (self._full_until(begun) - self._full_until(c.start_ns)) >= begun - c.start_ns


@dataclass(frozen=True)
class Waited:
    """The evidence that calls queued for a free worker: the median gap of those that found the callee full,
    against what the others lost (``free_ms``), over ``calls`` that found it full."""

    full_ms: float
    free_ms: float
    calls: int


def waited_for_workers(callee: Occupancy, calls: list[Call], usual_ms: float) -> Waited | None:
    """Whether answered ``calls`` into one service, in one stretch of time, queued for a free worker: those
    sent while it was full lost, at the median, ``QUEUE_CONTRAST`` times what those sent while it was not
    lost (the lower quartile of theirs: a call sent as the queue drained can find it free and wait all the
    same; its ``usual_ms`` gap when too few found it free), and ``SIBLING_MIN_MS`` more. A delay on the wire
    slows a call whether or not the callee was full; a queue slows only those that found it full.

    And beyond chance (:func:`rarely_fast`): when the wire's delay varies widely, the few calls that found the
    callee full are a handful drawn from that spread, and the median of a handful can land above twice the
    others' lower quartile by luck alone. So the calls that found it full must also have been fast (no slower
    than that bar) less often than the free calls were, at ``QUEUE_P``. The free calls that waited as a queue
    drained do not weaken this: it asks only how often each side was fast. The one rule for a queue:
    ``compare`` and the ``network_latency`` finding both ask it."""
    full: list[float] = []
    free: list[float] = []
    for c in calls:
        if (gap := c.gap_ms) is not None:
            (full if callee.found_full(c) else free).append(gap)
    free.sort()
    if len(full) < SIBLING_MIN_CALLS:
        return None
    other = (percentile(free, 25) or 0.0) if len(free) >= SIBLING_MIN_CALLS else usual_ms
    waited = median(full) or 0.0
    if waited < QUEUE_CONTRAST * other or waited - other < SIBLING_MIN_MS:
        return None
    if len(free) >= SIBLING_MIN_CALLS:
        bar = max(QUEUE_CONTRAST * other, other + SIBLING_MIN_MS)
        share = bisect.bisect_right(free, bar) / len(free)
        if not rarely_fast(sum(g <= bar for g in full), len(full), share):
            return None
    return Waited(waited, other, len(full))


def rarely_fast(fast: int, calls: int, share: float) -> bool:
    """Whether ``fast`` of ``calls`` is fewer than a share ``share`` of them would be, beyond chance: the chance of
    so few or fewer (binomial, one-sided) is below ``QUEUE_P``."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return fast < calls
    log_q, log_r = math.log(share), math.log1p(-share)
    chance = sum(math.exp(math.lgamma(calls + 1) - math.lgamma(i + 1) - math.lgamma(calls - i + 1)
                          + i * log_q + (calls - i) * log_r) for i in range(fast + 1))
    return chance < QUEUE_P


def occupancies(analysis: Analysis) -> dict[str, Occupancy]:
    """Each service's in-flight profile, in one pass over the calls: the server spans that answered calls into
    it and those its own calls were made under, each once (made once an analysis)."""
    if analysis._busy is None:
        analysis._busy = _occupancies(analysis)
    return analysis._busy


def leave_out_queues(analysis: Analysis) -> None:
    """Each edge's tail without its queue (``Edge.tail``): when the calls that found the callee with every worker
    busy lost, beyond chance, more than the others (:func:`waited_for_workers`, over the whole period), what the
    caller saw of them is the callee's queue, not its work, and a timeout sized on it would only let the queue
    grow; a queue is what a timeout sheds. The recommendation and the below-tail finding read the rest, unless
    nothing is left."""
    for edge in analysis.edges.values():
        if not _may_queue(edge):
            continue
        callee = occupancies(analysis).get(edge.callee)
        if callee is None or waited_for_workers(callee, edge.calls, usual_gap_ms(edge)) is None:
            continue
        kept = [seen for c in edge.calls if (seen := c.observed_ms) is not None and not callee.found_full(c)]
        if kept and len(kept) < len(edge.observed_ms):
            edge.tail_ms = sorted(kept)


def _may_queue(edge: Edge) -> bool:
    """What :func:`waited_for_workers` needs before anything is worked out for it: the median of three or more
    calls that found the callee full lost ``SIBLING_MIN_MS`` more than the others, so two calls at least lost that
    much. Counted in the answered calls' sorted gaps (``Edge.gap_ms``), and only when that is not enough, in the
    calls that list leaves out (held by a fault, or not answered well: given up). Most edges of a healthy store
    stop at the first count."""
    wide = len(edge.gap_ms) - bisect.bisect_left(edge.gap_ms, SIBLING_MIN_MS)
    if wide < 2 and len(edge.gap_ms) < len(edge.calls):
        wide += sum(1 for c in edge.calls if (c.fault is not None or not c.server_ok)
                    and (g := c.gap_ms) is not None and g >= SIBLING_MIN_MS)
    return wide >= 2


def _occupancies(analysis: Analysis) -> dict[str, Occupancy]:
    spans: dict[str, dict[str, tuple[int, int]]] = {}
    for c in analysis.calls:
        if c.server_start_ns is not None and c.server_end_ns is not None:
            spans.setdefault(c.callee, {})[c.answered_by or f"answer:{c.span_id}"] = (c.server_start_ns,
                                                                                       c.server_end_ns)
        if c.entry_span_id and c.entry_start_ns is not None and c.entry_end_ns is not None:
            spans.setdefault(c.caller, {})[c.entry_span_id] = (c.entry_start_ns, c.entry_end_ns)
    return {service: Occupancy(list(found.values())) for service, found in spans.items()}


def _excess_ms(edge: Edge, window: tuple[int, int], usual_ms: float) -> float | None:
    """How much more the median call of ``edge`` sent in ``window`` lost than ``usual_ms``; None when too few."""
    gaps = [g for c in edge.calls if window[0] <= c.start_ns <= window[1] and (g := c.gap_ms) is not None]
    if len(gaps) < SIBLING_MIN_CALLS:
        return None
    return (median(gaps) or 0.0) - usual_ms


def stretched(edge: Edge) -> tuple[list[list[Call]], list[float]]:
    """The edge's answered calls in time order, cut into stretches of a tenth of them (three at least), and the
    median gap of each; made once for an edge's calls (every edge's usual gap is asked for each edge whose gap
    grew), and not to be changed by the caller."""
    kept = edge.stretched
    if kept is not None and kept[0] == len(edge.calls):
        return kept[1], kept[2]
    answered = sorted(((c.start_ns, gap, c) for c in edge.calls if (gap := c.gap_ms) is not None),
                      key=operator.itemgetter(0))
    calls = [c for _, _, c in answered]
    gaps = [gap for _, gap, _ in answered]
    size = max(SIBLING_MIN_CALLS, len(answered) // 10)
    cuts = range(0, len(answered) - size + 1, size)
    parts = [calls[i:i + size] for i in cuts]
    medians = [percentile(sorted(gaps[i:i + size]), 50) or 0.0 for i in cuts]
    edge.stretched = (len(edge.calls), parts, medians)
    return parts, medians


def usual_gap_ms(edge: Edge) -> float:
    """The gap of the edge's quietest stretch of calls."""
    return min(stretched(edge)[1], default=0.0)


def _starved(edge: Edge, slow: list[Call], grew_ms: float) -> str | None:
    """Why the gap that grew on ``slow`` calls (by ``grew_ms`` at the median) is the callee's own slowness, or None:
    the callee picked them up late (:func:`picked_up_late`, against the edge's other calls) and its own time on them
    grew too."""
    chosen = {id(c) for c in slow}
    rest = [c for c in edge.calls if id(c) not in chosen]
    if not picked_up_late(rest, slow):
        return None
    before, after = _own_ms(_answered(rest)), _own_ms(_answered(slow))
    if after - before < max(SIBLING_MIN_MS, SIBLING_SHARE * grew_ms):
        return None
    return (f"the fastest calls lost little while the others waited, and {edge.callee}'s own time grew from "
            f"{before:.0f} to {after:.0f} ms at the median: {edge.callee} picked its calls up and answered them "
            "late (a starved CPU or runtime), where a slow wire would have slowed every call")


def gap_cause(analysis: Analysis, edge: Edge, slow: list[Call], *, grown: bool,
              busy: dict[str, Occupancy]) -> GapCause:
    """The one answer to where ``edge``'s lost time went, judged on its ``slow`` calls: those of the stretch in
    which its gap ``grown`` above its usual, or those with a large gap when it was large all along (and then
    the neighbours' gaps count from zero as well). ``busy``: :func:`occupancies`, made once for every edge."""
    usual_ms = usual_gap_ms(edge) if grown else 0.0
    callee = busy.get(edge.callee) or Occupancy([])
    # the calls of the stretch it grew in, or, when it was large all along, every call of the period
    stretch = slow if grown else [c for c in edge.calls if c.gap_ms is not None]
    if (waited := waited_for_workers(callee, stretch, usual_ms)) is not None:
        return GapCause("callee_queue", edge.callee,
                        f"the {waited.calls} calls that reached {edge.callee} while it had {callee.ceiling} "
                        f"requests in flight, its most, lost {waited.full_ms:.0f} ms at the median, against "
                        f"{waited.free_ms:.0f} ms for the others: they waited for a free worker")
    window = (min(c.start_ns for c in slow), max(c.start_ns for c in slow)) if slow else (0, 0)
    own = (median([c.gap_ms or 0.0 for c in slow]) or 0.0) - usual_ms
    if grown and (starved := _starved(edge, slow, own)) is not None:
        return GapCause("callee_starved", edge.callee, starved)
    bar = max(SIBLING_MIN_MS, SIBLING_SHARE * own)

    def grew(side: str) -> list[str] | None:
        """The other services on ``side`` whose hops with this one's caller/callee lost time as well, or None
        when some did not (or none can be compared)."""
        others = [e for e in analysis.edges.values() if e is not edge and (
            (side == "caller" and e.caller == edge.caller and e.callee != edge.callee)
            or (side == "callee" and e.callee == edge.callee and e.caller != edge.caller))]
        judged = [(e, x) for e in others
                  if (x := _excess_ms(e, window, usual_gap_ms(e) if grown else 0.0)) is not None]
        if not judged or any(x < bar for _, x in judged):
            return None
        return sorted({e.callee if side == "caller" else e.caller for e, _ in judged})

    callee_side, caller_side = grew("callee"), grew("caller")
    if callee_side:
        return GapCause("callee", edge.callee, f"the calls into {edge.callee} from {', '.join(callee_side)} lost "
                                               "time in the same stretch")
    if caller_side:
        return GapCause("caller", edge.caller, f"{edge.caller}'s calls to {', '.join(caller_side)} lost time in "
                                               "the same stretch")
    return GapCause("link", None, f"no other hop of {edge.caller} or {edge.callee} lost time with it")
