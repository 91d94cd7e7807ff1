"""Which hop lost the time: the critical path of every entry request, split into each service's own time, the
network gap of each call, and dependencies without spans, compared between a baseline and an incident window.

An entry request's duration is cut, along its critical path, into pieces that add up to it exactly: a service's
own time (``service``), the gap of a call between the caller's client span and the callee's server span
(``network``: the wire, a proxy, a connection pool), the gap of a call that waited for a free worker of its
callee (``queue``, :func:`gaps.waited_for_workers`) and the whole of a call whose callee has no spans
(``dependency``). Parallel calls that finish before the one the request waited on are off the path, so nothing
is counted twice. A piece's growth, averaged over the incident's entry requests of each kind, is how many
milliseconds of their added time it explains.

A queue in front of a service whose own requests took longer is a consequence: its workers were held by
whatever made them slower. It is ranked after the hops that are not, whatever its size.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from payscope.collector.store import Sample
from payscope.timeparse import format_ms

from .calls import Call
from .engine import Analysis, Edge
from .gaps import Occupancy, left_waiting, occupancies, picked_up_late, usual_gap_ms, waited_for_workers
from .stats import p50_p99 as _pct
from .stats import percentile

Window = tuple[int, int]  # [from, to) in nanoseconds
HopKey = tuple[str, str, tuple[str, str, str] | None]  # service, component, edge
Kind = tuple[str, frozenset[tuple[str, str, str]]]  # entry service, and the edges its requests cross

# A hop explains less than this is noise: run-to-run variation of a healthy system's entry requests.
NOISE_MIN_MS = 5.0
NOISE_SHARE = 0.1      # ... or less than this share of the baseline's median entry request
SLACK_NS = 1_000_000   # a child may end this much after its parent on unaligned clocks
MIN_REQUESTS = 5       # fewer requests of a kind than this in a window say nothing of its time
# Traces read from each window: p50s and means of a few thousand requests move by a few percent at most, and
# a large store is never read whole (the store chooses them: Store.sample_traces).
SAMPLE = 5_000
HELD_BY = 3            # the hops named as what held a queued service's workers


@dataclass
class Piece:
    """The per-request contributions of one hop in one window, and the per-call samples behind its p50/p99."""

    per_group: dict[Kind, float] = field(default_factory=lambda: defaultdict(float))
    squares: dict[Kind, float] = field(default_factory=lambda: defaultdict(float))
    crossing: dict[Kind, int] = field(default_factory=lambda: defaultdict(int))  # requests that cross the hop
    samples: list[float] = field(default_factory=list)


@dataclass
class WindowStats:
    window: Window
    requests: dict[Kind, int] = field(default_factory=lambda: defaultdict(int))
    durations: dict[Kind, list[float]] = field(default_factory=lambda: defaultdict(list))
    pieces: dict[HopKey, Piece] = field(default_factory=lambda: defaultdict(Piece))

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def all_durations(self) -> list[float]:
        return sorted(v for values in self.durations.values() for v in values)


@dataclass
class Queues:
    """What tells a queue from the wire, made once for both windows: each service's in-flight profile, and each
    edge's calls with its usual gap (compare reads calls only, ``loader.read``: no edges are built)."""

    busy: dict[str, Occupancy]
    edges: list[tuple[Edge, float]]

    @classmethod
    def of(cls, analysis: Analysis) -> Queues:
        by_edge: dict[tuple[str, str, str], list[Call]] = defaultdict(list)
        for c in analysis.calls:
            by_edge[c.edge].append(c)
        edges = [Edge(*key, calls=calls) for key, calls in by_edge.items()]
        return cls(occupancies(analysis), [(e, usual_gap_ms(e)) for e in edges])

    def queued(self, window: Window) -> set[int]:
        """The calls sent in ``window`` that waited for a free worker of their callee (ids): on each edge whose
        calls of the window queued (:func:`gaps.waited_for_workers`), those that found the callee full."""
        out: set[int] = set()
        for edge, usual_ms in self.edges:
            callee = self.busy.get(edge.callee)
            if callee is None:
                continue
            calls = [c for c in edge.calls if window[0] <= c.start_ns < window[1]]
            if waited_for_workers(callee, calls, usual_ms) is not None:
                out.update(id(c) for c in calls if callee.found_full(c))
        return out


def _critical_path(analysis: Analysis, trace_id: str, queued: set[int],
                   root: tuple[str | None, str, int, int] | None = None) -> Iterator[tuple[HopKey, float]]:
    """(hop, milliseconds) pieces of one trace's entry request along its critical path, or of the request
    ``root`` (server span id, service, start, end) in it; ``queued``: the calls whose gap was a wait for a worker
    (:meth:`Queues.queued`)."""
    calls = analysis.calls_of(trace_id)
    under: dict[str | None, list[Call]] = defaultdict(list)
    for c in calls:
        under[c.entry_span_id].append(c)
    if root is None:
        roots = [c for c in calls if c.upstream is None and c.entry_span_id is not None
                 and c.entry_start_ns is not None and c.entry_end_ns is not None]
        if not roots:
            return
        first = min(roots, key=lambda c: c.entry_start_ns or 0)
        assert first.entry_start_ns is not None and first.entry_end_ns is not None
        root = (first.entry_span_id, first.caller, first.entry_start_ns, first.entry_end_ns)
    stack: list[tuple[str | None, str, int, int]] = [root]
    seen: set[str | None] = set()
    while stack:
        span_id, service, start, end = stack.pop()
        if span_id in seen:
            continue
        seen.add(span_id)
        kids = sorted(under.get(span_id, ()), key=lambda c: c.end_ns, reverse=True)
        cursor = end
        own = 0
        for c in kids:
            if c.end_ns > cursor + SLACK_NS or c.start_ns < start - SLACK_NS:
                continue  # parallel to the call the request was waiting on, or outside this span
            c_end = min(c.end_ns, cursor)
            c_start = max(c.start_ns, start)
            if c_end <= c_start:
                continue
            own += cursor - c_end
            client = c_end - c_start
            edge = (c.caller, c.callee, c.operation)
            if c.fault is not None:  # a request the sidecar's fault injection held up: injected, not the system
                yield (c.callee, "injected", edge), client / 1e6
            elif c.server_start_ns is None or c.server_end_ns is None or c.answered_by is None:
                yield (c.callee, "dependency", edge), client / 1e6
            else:
                s_start = max(c.server_start_ns, c_start)
                s_end = min(c.server_end_ns, c_end)
                server = max(0, s_end - s_start)
                if id(c) in queued:
                    yield (c.callee, "queue", edge), (client - server) / 1e6
                else:
                    yield (c.callee, "network", edge), (client - server) / 1e6
                if server:
                    stack.append((c.answered_by, c.server_service or c.callee, s_start, s_end))
            cursor = c_start
        own += max(0, cursor - start)
        yield (service, "service", None), own / 1e6


def _requests(analysis: Analysis, window: Window, queued: set[int]) -> list[tuple[Kind, dict[HopKey, float]]]:
    """Each entry request in the window: its kind and its pieces along the critical path; ``queued``: the calls
    of the window that waited for a worker (:meth:`Queues.queued`)."""
    out = []
    for trace_id, facts in analysis.traces.items():
        if not window[0] <= facts.start_ns < window[1]:
            continue
        pieces: dict[HopKey, float] = defaultdict(float)
        for key, value in _critical_path(analysis, trace_id, queued):
            pieces[key] += value
        if pieces:
            # requests of one kind take one path through the system: compared with themselves, a change of
            # traffic mix is not taken for a slowdown, and a hop only some requests cross is not diluted
            out.append(((facts.root_service, frozenset(k[2] for k in pieces if k[2] is not None)), pieces))
    return out


def _requests_into(analysis: Analysis, service: str, window: Window, queued: set[int]
                   ) -> list[tuple[Kind, dict[HopKey, float]]]:
    """Each request ``service`` answered in the window (by when it was sent): its kind and its pieces along its
    critical path, from the moment its server span began."""
    out = []
    for c in analysis.calls:
        if c.callee != service or not window[0] <= c.start_ns < window[1] or c.answered_by is None \
                or c.server_start_ns is None or c.server_end_ns is None:
            continue
        pieces: dict[HopKey, float] = defaultdict(float)
        root = (c.answered_by, c.server_service or c.callee, c.server_start_ns, c.server_end_ns)
        for key, value in _critical_path(analysis, c.trace_id, queued, root):
            pieces[key] += value
        if pieces:
            out.append(((service, frozenset(k[2] for k in pieces if k[2] is not None)), pieces))
    return out


def _window_stats(window: Window, requests: list[tuple[Kind, dict[HopKey, float]]], kept: set[Kind]) -> WindowStats:
    """Pieces summed per kind; requests of kinds too rare to compare are pooled by their entry service."""
    stats = WindowStats(window)
    for kind, pieces in requests:
        group = kind if kind in kept else (kind[0], frozenset())
        stats.requests[group] += 1
        stats.durations[group].append(sum(pieces.values()))
        for key, value in pieces.items():
            piece = stats.pieces[key]
            piece.per_group[group] += value
            piece.squares[group] += value * value
            piece.crossing[group] += 1
            piece.samples.append(value)
    for piece in stats.pieces.values():
        piece.samples.sort()
    return stats


def _summary(stats: WindowStats, sample: Sample | None) -> dict[str, Any]:
    durations = stats.all_durations()
    out = {"from_ns": stats.window[0], "to_ns": stats.window[1], "entry_requests": stats.total,
           "entry_ms": _pct(durations)}
    if sample is not None:
        out["sample"] = sample.to_json()
    return out


def _common_service(keys: list[HopKey], own_growth: dict[str, float], noise: float,
                    ends: dict[str, float], starved: AbstractSet[HopKey] = frozenset()) -> dict[HopKey, HopKey]:
    """Network hops renamed after the service they share: a delay on one service's network shows on every
    edge into and out of it, and the ranking must name that service, not the one beside it: of an edge's two
    ends, the one whose network hops grew the more over every kind of request (``ends``). Gaps that grow
    only on calls out of a service whose own time grew too are that service's own slowness (a starved CPU
    makes its client spans long), not the network; so are the gaps of ``starved`` hops, whose fastest calls lost
    little of what the others lost (:func:`gaps.picked_up_late`), when the end they share grew beyond the noise in
    its own time: a starved callee picks its calls up late, a starved caller sends and reads late, and which of the
    two is the end whose grown hops add up to more."""
    touching: dict[str, list[HopKey]] = defaultdict(list)
    for key in keys:
        edge = key[2]
        assert edge is not None
        touching[edge[0]].append(key)
        touching[edge[1]].append(key)
    renamed: dict[HopKey, HopKey] = {}
    for key in keys:
        edge = key[2]
        assert edge is not None
        caller, callee = edge[0], edge[1]
        # the end whose grown edges add up to more, over every kind of request: both ends share this edge's
        # growth, so what decides is the growth of their other edges (a few milliseconds of drift on a third
        # edge does not outweigh a second edge that carries the delay)
        common = max((callee, caller), key=lambda s: ends.get(s, 0.0))  # a tie goes to the callee
        if key in starved and own_growth.get(common, 0.0) > noise:
            renamed[key] = (common, "service", None)
            continue
        if common == caller:
            into = [k for k in touching[caller] if k[2] is not None and k[2][1] == caller]
            if not into and own_growth.get(caller, 0.0) > noise:
                renamed[key] = (caller, "service", None)
                continue
        renamed[key] = (common, "network", edge)
    return renamed


def _starved(analysis: Analysis, windows: tuple[Window, Window], keys: list[HopKey]) -> set[HopKey]:
    """The network hops among ``keys`` whose gap grew because their callee picked its calls up late
    (:func:`gaps.picked_up_late`, on the calls of the hop's edge in each window: what `network_latency` judges too)."""
    wanted = {k[2] for k in keys}
    calls: dict[tuple[str, str, str], tuple[list[Call], list[Call]]] = defaultdict(lambda: ([], []))
    for c in analysis.calls:
        edge = (c.caller, c.callee, c.operation)  # as the critical path names it
        if edge in wanted:
            for side, (lo, hi) in zip(calls[edge], windows, strict=True):
                if lo <= c.start_ns < hi:
                    side.append(c)
    return {k for k in keys if k[2] is not None and picked_up_late(*calls[k[2]])}


def _merged(explained: dict[HopKey, float], noise: float, ends: dict[str, float],
            starved: AbstractSet[HopKey] = frozenset()) -> tuple[dict[HopKey, float], dict[HopKey, list[HopKey]]]:
    """Hops of one kind of entry request after network gaps are put on the service they share (the end with the
    more ``ends`` growth; ``starved``: as :func:`_common_service`), and the queues in front of a service on
    each of its edges are one."""
    own_growth = {key[0]: value for key, value in explained.items() if key[1] == "service"}
    grown_network = [k for k, v in explained.items() if k[1] == "network" and v > noise]
    renamed = _common_service(grown_network, own_growth, noise, ends, starved)
    renamed.update({k: (k[0], "queue", None) for k in explained if k[1] == "queue"})  # one queue a service
    merged: dict[HopKey, float] = defaultdict(float)
    members: dict[HopKey, list[HopKey]] = defaultdict(list)
    for key, value in explained.items():
        target = renamed.get(key, key)
        merged[target] += value
        members[target].append(key)
    return merged, members


def _ranked(analysis: Analysis, windows: tuple[Window, Window],
            requests: tuple[list[tuple[Kind, dict[HopKey, float]]], list[tuple[Kind, dict[HopKey, float]]]],
            queued: tuple[set[int], set[int]] | None) -> tuple[WindowStats, WindowStats, list[dict[str, Any]]]:
    """Both windows' stats, and the hops ranked by what they add to the kind of request they slow most. With
    ``queued`` (each window's queued calls), a queue in front of a service whose own requests grew says what
    held its workers: the same ranking over the requests that service answered (``held_by``)."""
    baseline, incident = windows
    base_requests, inc_requests = requests
    base_kinds = defaultdict(int, Counter(k for k, _ in base_requests))
    inc_kinds = Counter(k for k, _ in inc_requests)
    kept = {k for k, n in inc_kinds.items() if n >= MIN_REQUESTS and base_kinds[k] >= MIN_REQUESTS}
    base = _window_stats(baseline, base_requests, kept)
    inc = _window_stats(incident, inc_requests, kept)
    groups = [g for g in inc.requests if base.requests.get(g, 0) >= MIN_REQUESTS and inc.requests[g] >= MIN_REQUESTS]

    def crossing(stats: WindowStats, key: HopKey, group: Kind) -> tuple[int, float, float]:
        """(requests of the kind that cross the hop, their mean time in it, its variance)."""
        piece = stats.pieces.get(key)
        n = piece.crossing.get(group, 0) if piece is not None else 0
        if piece is None or not n:
            return 0, 0.0, 0.0
        m = piece.per_group[group] / n
        return n, m, max(0.0, piece.squares[group] / n - m * m)

    def growth(key: HopKey, group: Kind) -> tuple[float, float]:
        """What the hop adds per request of the kind (its growth where it is crossed, times how often it is
        in the incident), and three standard errors of that: less is chance."""
        nb, mb, vb = crossing(base, key, group)
        ni, mi, vi = crossing(inc, key, group)
        if not ni:
            return -mb * nb / base.requests[group], 0.0
        share = ni / inc.requests[group]
        se = math.sqrt((vb / nb if nb else 0.0) + vi / ni)
        return share * (mi - mb), 3 * share * se

    best: dict[HopKey, tuple[float, Kind, list[HopKey]]] = {}
    added: dict[Kind, float] = {}
    noises: dict[Kind, float] = {}
    grown_in: dict[Kind, dict[HopKey, tuple[float, float]]] = {}
    for g in groups:
        base_median = percentile(sorted(base.durations[g]), 50) or 0.0
        noises[g] = max(NOISE_MIN_MS, NOISE_SHARE * base_median)
        added[g] = sum(inc.durations[g]) / inc.requests[g] - sum(base.durations[g]) / base.requests[g]
        keys = {k for k in set(base.pieces) | set(inc.pieces)
                if g in (base.pieces[k].per_group if k in base.pieces else {})
                or g in (inc.pieces[k].per_group if k in inc.pieces else {})}
        grown_in[g] = {k: growth(k, g) for k in keys}
    # each service: what the network hops it is an end of grew, over every kind of request (the evidence that
    # tells the end whose network is slow is its other edges, which other kinds of request may cross)
    ends: dict[str, float] = defaultdict(float)
    for g, grown in grown_in.items():
        for k, (v, _) in grown.items():
            if k[1] == "network" and k[2] is not None and v > noises[g]:
                ends[k[2][0]] += v
                ends[k[2][1]] += v
    starved = _starved(analysis, windows, [k for k in inc.pieces if k[1] == "network"])
    for g in groups:
        noise, grown = noises[g], grown_in[g]
        merged, members = _merged({k: v for k, (v, _) in grown.items()}, noise, ends, starved)
        for key, value in merged.items():
            chance = math.sqrt(sum(grown[k][1] ** 2 for k in members[key]))
            if value > max(noise, chance) and (key not in best or value > best[key][0]):
                best[key] = (value, g, members[key])
    hops = []
    held = {key[0]: _held_ms(analysis, key[0], baseline, incident) for key in best if key[1] == "queue"}

    def consequence(key: HopKey, g: Kind) -> bool:
        """A queue in front of a service whose own requests grew by more than noise: its workers were held."""
        return key[1] == "queue" and held[key[0]] > noises[g]

    for key, (value, g, members_of) in sorted(best.items(), key=lambda kv: (consequence(kv[0], kv[1][1]),
                                                                           -kv[1][0])):
        base_samples = sorted(v for k in members_of if k in base.pieces for v in base.pieces[k].samples)
        inc_samples = sorted(v for k in members_of if k in inc.pieces for v in inc.pieces[k].samples)
        service, component, edge = key
        held_ms = held[service] if component == "queue" else None
        hop: dict[str, Any] = {
            "service": service, "component": component,
            "edge": None if edge is None else {"caller": edge[0], "callee": edge[1], "operation": edge[2]},
            "baseline_ms": _pct(base_samples), "incident_ms": _pct(inc_samples),
            "explains_ms": round(value, 2), "entry": g[0], "entry_requests": inc.requests[g],
            "entry_added_ms": round(added[g], 2),
            "held_ms": None if held_ms is None else round(held_ms, 2),
            "consequence": consequence(key, g),
            "sentence": sentence(service, component, edge, value, added[g], g, _pct(base_samples),
                                 _pct(inc_samples), held_ms, consequence(key, g)),
        }
        if component == "queue":
            # what the entry requests lost stops where their callers gave up; how deep the queue was does not
            left = left_waiting([c for c in analysis.calls if c.callee == service
                                 and incident[0] <= c.start_ns < incident[1]])
            hop["left_waiting"] = None if left is None else {"calls": left.calls,
                                                             "wait_ms_p50": round(left.wait_ms, 2)}
            if left is not None:
                hop["sentence"] += (f"; {left.calls} calls into {service} were still in its queue when their "
                                    f"caller gave up, and waited {format_ms(left.wait_ms)} at the median before it "
                                    "picked them up")
        if queued is not None and hop["consequence"]:
            # what held the workers: the requests the service answered, ranked the same way (one level deep)
            into = (_requests_into(analysis, service, baseline, queued[0]),
                    _requests_into(analysis, service, incident, queued[1]))
            hop["held_by"] = [h for h in _ranked(analysis, windows, into, None)[2]
                              if (h["service"], h["component"]) != (service, "queue")][:HELD_BY]
        hops.append(hop)

    def named(hop: dict[str, Any]) -> tuple[str, str, Any]:
        return hop["service"], hop["component"], hop["edge"] and tuple(hop["edge"].values())

    def after(hop: dict[str, Any]) -> bool:
        """A consequence ranks after its causes when they are listed; when the entry requests never reached them
        (they gave up in the queue), the queue leads, and what held its workers is named under it."""
        return bool(hop["consequence"]) and (not hop.get("held_by")
                                             or any(named(h) in listed for h in hop["held_by"]))

    listed = {named(h) for h in hops if not h["consequence"]}
    hops.sort(key=lambda h: (after(h), -h["explains_ms"]))
    return base, inc, hops


def compare(analysis: Analysis, baseline: Window, incident: Window,
            samples: tuple[Sample, Sample] | None = None) -> dict[str, Any]:
    """The JSON contract of `payscope compare`: both windows, and the hops ranked by what they explain.

    Each kind of entry request (entry service and operation) is compared with itself, so that a change in the
    traffic mix is not taken for a slowdown; a hop is ranked by what it adds to the kind it slows most. A queue
    that is a consequence (its service's own requests took longer, holding its workers) says what held them
    (``held_by``): the entry requests that gave up waiting in it never reached what slowed the service.
    ``samples``: when the analysis holds only a sample of each window's traces (``loader.load_sampled``), what
    was read of each, which the document states.
    """
    queues = Queues.of(analysis)
    queued = queues.queued(baseline), queues.queued(incident)
    requests = _requests(analysis, baseline, queued[0]), _requests(analysis, incident, queued[1])
    base, inc, hops = _ranked(analysis, (baseline, incident), requests, queued)
    base_sample, inc_sample = samples if samples is not None else (None, None)
    return {"baseline": _summary(base, base_sample), "incident": _summary(inc, inc_sample),
            "noise": f"entry requests are compared kind by kind (entry service and the calls they make); a hop "
                     f"that adds {NOISE_MIN_MS:g} ms or less to a kind, less than {NOISE_SHARE:.0%} of that kind's "
                     "baseline median, or less than three standard errors of the difference, is noise and not "
                     f"listed; kinds with fewer than {MIN_REQUESTS} requests in either window are not compared",
            "hops": hops}


def _held_ms(analysis: Analysis, service: str, baseline: Window, incident: Window) -> float:
    """How much longer ``service`` took to answer the calls into it in the incident than in the baseline
    (means of its server spans): the time its workers were held the longer."""
    def mean(window: Window) -> float:
        held = [c.server_end_ns - c.server_start_ns for c in analysis.calls
                if c.callee == service and window[0] <= c.start_ns < window[1]
                and c.server_start_ns is not None and c.server_end_ns is not None]
        return sum(held) / len(held) / 1e6 if held else 0.0

    return mean(incident) - mean(baseline)


def default_windows(analysis: Analysis, parts: int = 4) -> tuple[Window, Window] | None:
    """When no one says when the incident was: the slowest of ``parts`` equal stretches of the data (by the
    median entry request), against the stretch just before it (after it, when it is the first)."""
    starts = sorted((f.start_ns, f.end_ns - f.start_ns) for f in analysis.traces.values())
    if len(starts) < 2 * parts:
        return None
    t0, t1 = starts[0][0], starts[-1][0] + 1
    step = (t1 - t0) // parts
    if step <= 0:
        return None
    medians = []
    for i in range(parts):
        lo, hi = t0 + i * step, t0 + (i + 1) * step if i < parts - 1 else t1
        medians.append(percentile(sorted(d for s, d in starts if lo <= s < hi), 50) or 0.0)
    slow = max(range(parts), key=lambda i: medians[i])
    other = slow - 1 if slow else 1

    def window(i: int) -> Window:
        return t0 + i * step, (t0 + (i + 1) * step if i < parts - 1 else t1)

    return window(other), window(slow)


def sentence(service: str, component: str, edge: tuple[str, str, str] | None, value: float, added: float,
             group: Kind, base: dict[str, float | None], inc: dict[str, float | None],
             held_ms: float | None = None, consequence: bool = False) -> str:
    """The hop as a line an on-call engineer can paste into an incident channel; ``held_ms``, for a queue: how
    much longer the service's own requests took (:func:`_held_ms`), ``consequence`` whether that is why."""
    share = f" ({min(1.0, value / added):.0%} of the {added:.0f} ms they gained)" if added > 0 else ""
    where = {"network": f"between {service} and its caller or callee (the network, a proxy, a queue or a "
                        "connection pool)",
             "service": f"inside {service}'s own code",
             "queue": f"waiting for a free worker of {service} (calls that found all its workers busy)",
             "dependency": f"in {service}, which has no spans",
             "injected": f"in faults the sidecar injected into {service}'s requests"}[component]
    call = f" on {edge[0]} -> {edge[1]} ({edge[2]})" if edge else ""
    why = ""
    if held_ms is not None:
        why = (f"; {service}'s own requests took {held_ms:.0f} ms longer, which held its workers: a consequence of "
               "what slowed them" if consequence else f"; {service}'s own requests took about as long as before "
               f"({held_ms:+.0f} ms): more came than its workers could take")
    def at(values: dict[str, float | None], q: str) -> str:
        return "none" if values[q] is None else f"{values[q]}"

    return (f"{value:.0f} ms per {group[0]} request that crosses it{share} is lost {where}{call}: "
            f"p50 {at(base, 'p50')} -> {at(inc, 'p50')} ms, p99 {at(base, 'p99')} -> {at(inc, 'p99')} ms{why}")
