"""The analysis: calls grouped into edges and transactions, clocks aligned, timeouts inferred.

Pure: traces in, an :class:`Analysis` out (``analyzers.diagnose.diagnose`` adds the
recommendations and findings; ``analyzers.loader.load`` feeds it from a store).
Nothing here reads a store, prints or reads the clock.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from payscope.model import SpanRow

from .calls import Call, TraceFacts, is_charge_like, is_idempotent, resolve_aliases, trace_calls
from .derived import thaw
from .stats import median, ms, p50_p99, percentile

if TYPE_CHECKING:
    from payscope.collector.store import Sample

    from .findings import Finding
    from .recommend import Recommendation

EdgeKey = tuple[str, str, str]
Window = tuple[int | None, int | None]  # [from, to) in ns since the epoch; None: open on that side

# Two timed-out calls ending within this share of each other ran under the same timeout.
CLUSTER_TOLERANCE = 0.04
CLUSTER_MIN_MS = 3.0
SKEW_MIN_MS = 2.0
SKEW_MIN_PAIRS = 3
SKEW_MIN_VIOLATIONS = 0.1  # share of successful calls whose server span lies outside the client span


def call_budget_ms(per_try_ms: float, attempts: int, backoff_ms: float) -> float:
    """How long a caller may spend on one logical call: every attempt's timeout plus the waits between."""
    attempts = max(1, attempts)
    return per_try_ms * attempts + backoff_ms * (attempts - 1)


def is_business_failure(call: Call) -> bool:
    """The callee answered no (a decline, a 4xx, a business error): not evidence about any timeout."""
    return call.error_class == "business"


def is_duplicate_charge(chain: list[Call]) -> bool:
    """Attempts of one non-idempotent call, without an idempotency key, of which two or more succeeded."""
    if len(chain) < 2 or sum(1 for c in chain if c.server_ok) < 2 or any(c.idempotency_key for c in chain):
        return False
    return not is_idempotent(chain[0].method, False, chain[0].operation)


def is_late_success(call: Call) -> bool:
    """The caller gave up while the callee went on to succeed: it finished after the caller stopped waiting,
    or its answer was still on the wire when the caller did (the server span ended inside the client span)."""
    return bool(call.gave_up and call.server_ok and call.server_end_ns is not None)


def order_of(facts: TraceFacts) -> str:
    """What a duplicate charge is counted once per: the order (its first business key), else the trace."""
    return str(facts.keys[0]) if facts.keys else str(facts.trace_id)


@dataclass(slots=True)
class ClockOffset:
    """How far a service's clock runs ahead of the reference (the entry services)."""

    service: str
    offset_ms: float
    reference: str
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "offset_ms": round(self.offset_ms, 3), "reference": self.reference,
                "samples": self.samples, "corrected": True}


@dataclass(slots=True)
class TimeoutValue:
    """The timeout in force on an edge, where it comes from, and why we believe it."""

    value_ms: float | None
    source: str  # captured | declared | inferred | lower_bound | none
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.value_ms is not None and self.source in ("captured", "declared", "inferred")

    def to_json(self) -> dict[str, Any]:
        return {"value_ms": None if self.value_ms is None else round(self.value_ms, 1),
                "source": self.source, "evidence": self.evidence}


@dataclass
class Edge:
    """Caller -> callee + operation, with what was seen on it."""

    caller: str
    callee: str
    operation: str
    calls: list[Call] = field(default_factory=list)
    healthy_ms: list[float] = field(default_factory=list)     # what the caller saw of successful calls
    observed_ms: list[float] = field(default_factory=list)    # ... plus late successes, as long as they took
    tail_ms: list[float] | None = None                        # observed_ms without a queue (gaps.leave_out_queues)
    server_ms: list[float] = field(default_factory=list)      # the callee's own time on successful calls
    gap_ms: list[float] = field(default_factory=list)         # client minus server: network, queue, connect
    censored_ms: list[float] = field(default_factory=list)    # gave up with no answer: lasted at least this
    timed_out_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    max_attempts: int = 1
    backoff_ms: float = 0.0
    timeout: TimeoutValue = field(default_factory=lambda: TimeoutValue(None, "none"))
    connect_timeout_ms: float | None = None
    idempotent: bool = False
    charge_like: bool = False
    key_share: float = 0.0
    instrumented_callee: bool = False
    upstream: Counter[EdgeKey] = field(default_factory=Counter)
    downstream: Counter[EdgeKey] = field(default_factory=Counter)
    late_successes: list[Call] = field(default_factory=list)
    duplicate_chains: list[list[Call]] = field(default_factory=list)
    self_ms: list[float] = field(default_factory=list)        # callee time not spent in its own calls
    injected: Counter[str] = field(default_factory=Counter)   # calls the sidecar injected a fault into, by kind
    # gaps.stretched: (the number of calls it was made from, the stretches, their median gaps), made once
    stretched: tuple[int, list[list[Call]], list[float]] | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> EdgeKey:
        return (self.caller, self.callee, self.operation)

    def latency(self) -> list[float]:
        """What the caller sees of calls the callee answers well (sorted): the samples every latency judgement
        uses. Late successes count as long as they took; calls given up without an answer are in
        ``censored_ms``, never replaced by the callee's own time."""
        return self.observed_ms

    def tail(self) -> list[float]:
        """The samples a timeout is sized and judged on (sorted): :meth:`latency`, without the calls that waited for
        a free worker of a callee whose calls queued (``tail_ms``, :func:`gaps.leave_out_queues`): a timeout that
        covers a queue only lets it grow."""
        return self.observed_ms if self.tail_ms is None else self.tail_ms

    @property
    def queued(self) -> int:
        """How many of :meth:`latency`'s calls :meth:`tail` leaves out: they waited in the callee's queue."""
        return 0 if self.tail_ms is None else len(self.observed_ms) - len(self.tail_ms)

    def budget_ms(self) -> float | None:
        """The current worst case of one logical call on this edge (None when its timeout is not known)."""
        if not self.timeout.known or self.timeout.value_ms is None:
            return None
        return call_budget_ms(self.timeout.value_ms, self.max_attempts, self.backoff_ms)

    def percentiles(self) -> dict[str, float | None]:
        values = self.latency()
        return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
                "p99.9": percentile(values, 99.9), "max": values[-1] if values else None}

    def to_json(self) -> dict[str, Any]:
        pct = self.percentiles()
        return {
            "caller": self.caller, "callee": self.callee, "operation": self.operation,
            "calls": len(self.calls), "healthy_samples": len(self.latency()),
            "latency_ms": {k: None if v is None else round(v, 2) for k, v in pct.items()},
            "client_ms": p50_p99(self.observed_ms), "server_ms": p50_p99(self.server_ms),
            "gap_ms": p50_p99(self.gap_ms),
            "censored_calls": len(self.censored_ms),
            "errors": dict(self.errors), "retries": self.retries, "max_attempts": self.max_attempts,
            "timeout": self.timeout.to_json(),
            "timeout_rate": round(len(self.timed_out_ms) / len(self.calls), 4) if self.calls else 0.0,
            "idempotent": self.idempotent, "late_successes": len(self.late_successes),
            "injected_faults": dict(self.injected),
        }


@dataclass(slots=True)
class Transaction:
    """One trace (plus the traces sharing its business key) and how it ended."""

    trace_id: str
    facts: TraceFacts
    outcome: str
    failing_hop: EdgeKey | None
    error_class: str | None
    related: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    traces: dict[str, TraceFacts]
    calls: list[Call]
    edges: dict[EdgeKey, Edge]
    offsets: list[ClockOffset]
    transactions: dict[str, Transaction]
    declared: dict[EdgeKey, TimeoutValue] = field(default_factory=dict)
    recommendations: dict[EdgeKey, Recommendation] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    _by_trace: dict[str, list[Call]] | None = field(default=None, repr=False)
    _with_errors: set[str] | None = field(default=None, repr=False)
    _orders: dict[str, Any] | None = field(default=None, repr=False)
    _problems: dict[str, list[str]] | None = field(default=None, repr=False)
    _mismatched: list[Any] | None = field(default=None, repr=False)
    _busy: dict[str, Any] | None = field(default=None, repr=False)  # gaps.occupancies, made once
    order_rules: Any = None  # orders.Rules: what counts as a charge and an answer (payscope.toml [orders])
    order_logs: Any = None   # orders.LoggedFacts: the log lines those rules name
    window: Window | None = None  # read only the traces that started in it; None: every trace
    sample: Sample | None = None  # the store's sample of those traces that was read (None: no limit was set)

    def recommended_ms(self, key: EdgeKey) -> float | None:
        """The one recommended per-try timeout of an edge, that every finding and screen cites."""
        rec = self.recommendations.get(key)
        return rec.recommended.per_try_ms if rec is not None else None

    def calls_of(self, trace_id: str) -> list[Call]:
        """The calls of one trace."""
        if self._by_trace is None:
            self._by_trace = defaultdict(list)
            for c in self.calls:
                self._by_trace[c.trace_id].append(c)
        return self._by_trace.get(trace_id, [])

    def traces_with_errors(self) -> set[str]:
        """Traces with a failed call in them (made once: the TUI asks on every refresh)."""
        if self._with_errors is None:
            self._with_errors = {c.trace_id for c in self.calls if not c.ok}
        return self._with_errors

    def outcome_of(self, tx: Transaction) -> str:
        """The one outcome every command and screen shows for a transaction: the one :func:`classify` gave it,
        but ``recovered`` for one that went well with a failed call inside (a retry or a fallback saved it)."""
        return "recovered" if tx.outcome == "ok" and tx.trace_id in self.traces_with_errors() else tx.outcome

    def orders(self) -> dict[str, Any]:
        """Every order across its traces, with its charges and state (``orders.orders``), made once."""
        if self._orders is None:
            from .orders import orders

            self._orders = orders(self)
        return self._orders

    def problems(self) -> dict[str, list[str]]:
        """Trace id -> the consistency problems of its order (``orders.problems``), made once."""
        if self._problems is None:
            from .orders import problems

            self._problems = problems(self)
        return self._problems

    def mismatched(self) -> list[Any]:
        """The orders finance should look at, the most money first (``orders.mismatched``), made once: every
        count and list of mismatched orders is taken from it."""
        if self._mismatched is None:
            from .orders import mismatched

            self._mismatched = mismatched(self)
        return self._mismatched

    def orders_charged_twice(self) -> set[str]:
        """The orders (or traces, where no order is known) that more than one charge went through for, in one
        transaction or across several (the customer's retry): the one answer of ``orders.Order.mismatches``."""
        return {order.key for order in self.mismatched() if "charged_twice" in order.mismatches}

    def findings_of(self, trace_id: str) -> list[Finding]:
        """The whole-store findings this trace is evidence of."""
        return [f for f in self.findings if trace_id in f.trace_ids]


# --- reading -------------------------------------------------------------------

def collect_calls(traces: Iterable[list[SpanRow] | bytes]) -> tuple[dict[str, TraceFacts], list[Call]]:
    """The calls and facts of every trace, each given as its spans or as its stored derivation
    (``derived``), with calls to an address renamed after the service the votes of every trace put there.
    The traces may come in any order (a store gives them in the order it reads fastest): the facts and the
    calls come out by trace id, each trace's calls in the order its pass made them."""
    facts: dict[str, TraceFacts] = {}
    calls: list[Call] = []
    votes: dict[str, dict[str, int]] = {}
    last, in_order = "", True
    for item in traces:
        if isinstance(item, bytes):
            trace_facts, trace_calls_, trace_votes = thaw(item)
            for peer, counts in trace_votes.items():  # in trace order, as if its spans were read here
                into = votes.setdefault(peer, {})
                for callee, n in counts.items():
                    into[callee] = into.get(callee, 0) + n
        else:
            trace_facts, trace_calls_ = trace_calls(item, votes)
        trace_id = trace_facts.trace_id
        for c in trace_calls_:  # one string a trace id, and a call's entry span its parent's: the same ids,
            c.trace_id = trace_id  # read back as objects of their own (about 150 bytes a call)
            if c.entry_span_id == c.parent_id:
                c.entry_span_id = c.parent_id
        facts[trace_id] = trace_facts
        calls.extend(trace_calls_)
        in_order = in_order and trace_id > last
        last = trace_id
    if not in_order:
        facts = dict(sorted(facts.items()))
        calls.sort(key=attrgetter("trace_id"))  # stable: a trace's calls keep their order
    # of two services with as many votes at an address, the first by name, whatever order the traces came in
    resolve_aliases(calls, {peer: dict(sorted(counts.items())) for peer, counts in votes.items()})
    keys: dict[EdgeKey, EdgeKey] = {}  # one tuple an edge, shared by its calls (a million calls: 64 MB less)
    for c in calls:
        key = (c.caller, c.callee, c.operation)
        c.edge_key = keys.setdefault(key, key)
    return facts, calls


# --- clocks --------------------------------------------------------------------

def estimate_offsets(calls: list[Call], entry_services: set[str]) -> list[ClockOffset]:
    """Per-service clock offsets from client/server pairs (midpoint method, median over calls)."""
    deltas: dict[tuple[str, str], list[float]] = defaultdict(list)
    violations: Counter[tuple[str, str]] = Counter()
    for c in calls:
        if c.server_start_ns is None or c.server_end_ns is None or not c.ok or c.server_service == c.caller:
            continue
        server_mid = (c.server_start_ns + c.server_end_ns) / 2
        client_mid = (c.start_ns + c.end_ns) / 2
        pair = (c.caller, c.server_service or c.callee)
        deltas[pair].append(ms(server_mid - client_mid))
        if c.server_start_ns < c.start_ns or c.server_end_ns > c.end_ns:
            violations[pair] += 1
    graph: dict[str, list[tuple[str, float, int]]] = defaultdict(list)
    for (caller, callee), values in deltas.items():
        # Clocks that never put a server outside its client are consistent: leave them alone.
        consistent = len(values) < SKEW_MIN_PAIRS or violations[(caller, callee)] < SKEW_MIN_VIOLATIONS * len(values)
        delta = 0.0 if consistent else (median(values) or 0.0)
        graph[caller].append((callee, delta, len(values)))
        graph[callee].append((caller, -delta, len(values)))
    offsets: dict[str, tuple[float, str, int]] = {}
    order = sorted(entry_services) + sorted(graph)
    for start in order:
        if start in offsets:
            continue
        offsets[start] = (0.0, start, 0)
        queue = [start]
        while queue:
            node = queue.pop(0)
            base = offsets[node][0]
            for nxt, delta, n in sorted(graph[node], key=lambda t: -t[2]):
                if nxt not in offsets:
                    offsets[nxt] = (base + delta, offsets[start][1], n)
                    queue.append(nxt)
    return [ClockOffset(svc, off, ref, n) for svc, (off, ref, n) in sorted(offsets.items())
            if abs(off) >= SKEW_MIN_MS]


def clock_shift_ns(offsets: list[ClockOffset]) -> dict[str, int]:
    """Per service, the nanoseconds to subtract from its times to put them on the reference clock."""
    return {o.service: int(o.offset_ms * 1e6) for o in offsets}


def apply_offsets(calls: list[Call], offsets: list[ClockOffset]) -> None:
    shift = clock_shift_ns(offsets)
    if not shift:
        return
    for c in calls:
        d = shift.get(c.caller, 0)
        if d:
            c.start_ns -= d
            c.end_ns -= d
            if c.entry_start_ns is not None and c.entry_end_ns is not None:
                c.entry_start_ns -= d
                c.entry_end_ns -= d
        if c.server_start_ns is not None and c.server_end_ns is not None:
            s = shift.get(c.server_service or "", 0)
            c.server_start_ns -= s
            c.server_end_ns -= s


# --- retries -------------------------------------------------------------------

def retry_chains(calls: list[Call]) -> list[list[Call]]:
    """Attempts of one logical call: same parent span, callee and operation, each after a failure."""
    groups: dict[tuple[str, str | None, str, str], list[Call]] = defaultdict(list)
    for c in calls:
        groups[(c.trace_id, c.parent_id, c.callee, c.operation)].append(c)
    chains: list[list[Call]] = []
    for group in groups.values():
        if len(group) == 1:
            chains.append(group)
            continue
        group.sort(key=lambda c: c.start_ns)
        chain = [group[0]]
        for c in group[1:]:
            prev = chain[-1]
            follows_failure = not prev.ok and c.start_ns >= prev.end_ns - 1_000_000
            if follows_failure or c.attempt > 0:
                chain.append(c)
            else:
                chains.append(chain)
                chain = [c]
        chains.append(chain)
    for chain in chains:
        for i, c in enumerate(chain):
            c.attempt = max(c.attempt, i)
    return chains


# --- timeouts ------------------------------------------------------------------

def infer_timeout(timed_out_ms: list[float], healthy_ms: list[float]) -> TimeoutValue:
    """A timeout from where timed-out calls end; else the longest success as a lower bound."""
    if len(timed_out_ms) >= 2:
        values = sorted(timed_out_ms)
        # The densest cluster: for each value, how many lie within tolerance above it.
        best_start, best_count = 0, 0
        j = 0
        for i, v in enumerate(values):
            limit = v + max(CLUSTER_MIN_MS, v * CLUSTER_TOLERANCE)
            while j < len(values) and values[j] <= limit:
                j += 1
            if j - i > best_count:
                best_start, best_count = i, j - i
        cluster = values[best_start:best_start + best_count]
        if best_count >= 2 and best_count >= 0.5 * len(values):
            value = cluster[0]
            return TimeoutValue(value, "inferred", {
                "timed_out_calls": len(values), "in_cluster": best_count,
                "cluster_ms": [round(cluster[0], 1), round(cluster[-1], 1)],
                "rule": "timed-out calls end at a common duration"})
    if healthy_ms:
        return TimeoutValue(max(healthy_ms), "lower_bound", {
            "successful_calls": len(healthy_ms), "rule": "no timeout fired; the longest success is a lower bound"})
    return TimeoutValue(None, "none", {})


def _captured_timeout(edge: Edge) -> TimeoutValue | None:
    values = [c.captured for c in edge.calls if c.captured is not None]
    if not values:
        return None
    sources = Counter(v.source or "unknown" for v in values)
    source = sources.most_common(1)[0][0]
    if source == "none":
        return TimeoutValue(None, "captured", {"captured_source": "none", "calls": len(values),
                                               "rule": "the client waits forever"})
    per_try = [v.read_ms if v.read_ms is not None else v.total_ms for v in values]
    known = [p for p in per_try if p is not None]
    if not known:
        return None
    connects = [v.connect_ms for v in values if v.connect_ms is not None]
    if connects:
        edge.connect_timeout_ms = median(connects)
    retry_max = [v.retry_max for v in values if v.retry_max is not None]
    if retry_max:
        edge.max_attempts = max(edge.max_attempts, max(retry_max))
    return TimeoutValue(median(known), "captured", {"captured_source": source, "calls": len(values)})


# --- edges and transactions --------------------------------------------------

_METHOD = attrgetter("method")
_IDEMPOTENCY_KEY = attrgetter("idempotency_key")


def build_edges(calls: list[Call], chains: list[list[Call]],
                declared: dict[EdgeKey, TimeoutValue]) -> dict[EdgeKey, Edge]:
    edges: dict[EdgeKey, Edge] = {}
    by_span = {(c.trace_id, c.span_id): c for c in calls}
    children: dict[int, list[Call]] = defaultdict(list)  # by id() of the parent call: no key to build per call
    for c in calls:
        key = c.edge_key or c.edge
        edge = edges.get(key)
        if edge is None:
            edge = edges[key] = Edge(*key)
        edge.calls.append(c)
        client = (c.end_ns - c.start_ns) / 1e6
        answered = c.server_ok and c.server_start_ns is not None and c.server_end_ns is not None
        if c.fault is not None:
            # injected, not the system's own: its time and its error are no evidence about any timeout
            edge.injected[c.fault] += 1
            answered = False
        elif c.error_class is None:
            edge.healthy_ms.append(client)
        else:
            edge.errors[c.error_class] += 1
            if c.gave_up:
                edge.timed_out_ms.append(client)
                if not (c.late_success and c.server_end_ns is not None):
                    edge.censored_ms.append(client)
        if (seen := c.observed_ms) is not None:
            edge.observed_ms.append(seen)
        if answered and (server := c.server_ms) is not None:
            edge.server_ms.append(server)
            if (gap := c.gap_ms) is not None:
                edge.gap_ms.append(gap)
        if c.upstream is not None:
            parent = by_span.get((c.trace_id, c.upstream))
            if parent is not None:
                edge.upstream[parent.edge] += 1
                children[id(parent)].append(c)
    under_server: dict[tuple[str, str], list[Call]] = defaultdict(list)
    if any(c.span_id.startswith("log") for c in calls):  # only a proxy seen in its log asks what ran under it
        for c in calls:
            if c.entry_span_id is not None:
                under_server[(c.trace_id, c.entry_span_id)].append(c)
    for c in calls:
        edge = edges[c.edge_key or c.edge]
        if c.answered_by is not None and c.span_id.startswith("log"):
            # a proxy seen only in its access log: what its callee did under that request is its downstream
            for k in under_server.get((c.trace_id, c.answered_by), ()):
                edge.downstream[k.edge] += 1
        kids = children.get(id(c))
        if kids:
            for k in kids:
                edge.downstream[k.edge] += 1
        if c.server_ok and c.fault is None and c.server_start_ns is not None and c.server_end_ns is not None:
            busy = _busy_ms(kids) if kids else 0.0
            edge.self_ms.append(max(0.0, (c.server_end_ns - c.server_start_ns) / 1e6 - busy))
    for chain in chains:
        edge = edges[chain[0].edge]
        if len(chain) > 1:
            edge.retries += len(chain) - 1
            edge.max_attempts = max(edge.max_attempts, len(chain))
            gaps = [ms(b.start_ns - a.end_ns) for a, b in zip(chain, chain[1:], strict=False)]
            edge.backoff_ms = max(edge.backoff_ms, median(gaps) or 0.0)
            if is_duplicate_charge(chain):
                edge.duplicate_chains.append(chain)
    for edge in edges.values():
        for values in (edge.healthy_ms, edge.observed_ms, edge.server_ms, edge.gap_ms, edge.censored_ms):
            values.sort()
        edge.instrumented_callee = any(c.server_service is not None for c in edge.calls)
        method = Counter(map(_METHOD, edge.calls)).most_common(1)[0][0]
        edge.key_share = sum(map(_IDEMPOTENCY_KEY, edge.calls)) / len(edge.calls)
        edge.idempotent = is_idempotent(method, edge.key_share >= 0.99, edge.operation)
        edge.charge_like = is_charge_like(edge.operation, edge.callee) and method not in ("GET", "HEAD")
        edge.late_successes = [c for c in edge.calls if c.late_success]
        edge.timeout = (_captured_timeout(edge) or declared.get(edge.key)
                        or declared.get((edge.caller, edge.callee, "*"))
                        or infer_timeout(edge.timed_out_ms, edge.healthy_ms))
        if edge.timeout.source == "declared":
            evidence = edge.timeout.evidence
            if evidence.get("connect_ms") is not None:
                edge.connect_timeout_ms = evidence["connect_ms"]
            if evidence.get("retries"):
                edge.max_attempts = max(edge.max_attempts, int(evidence["retries"]) + 1)
    return edges


def _busy_ms(calls: list[Call]) -> float:
    """How long at least one of ``calls`` was under way: the union of their spans (most requests make one call)."""
    if len(calls) == 1:
        return ms(calls[0].end_ns - calls[0].start_ns)
    total = 0
    end = None
    for s, e in sorted((c.start_ns, c.end_ns) for c in calls):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return ms(total)


def mark_late_successes(calls: list[Call]) -> None:
    for c in calls:
        c.late_success = is_late_success(c)


def classify(facts: dict[str, TraceFacts], calls: list[Call], chains: list[list[Call]]) -> dict[str, Transaction]:
    by_trace: dict[str, list[Call]] = defaultdict(list)
    for c in calls:
        by_trace[c.trace_id].append(c)
    # the last attempts that failed: only a failed call is asked whether it was its chain's last
    final_attempt: set[tuple[str, str]] = {(ch[-1].trace_id, ch[-1].span_id) for ch in chains if not ch[-1].ok}
    duplicate = {chain[0].trace_id for chain in chains if is_duplicate_charge(chain)}
    depth_cache: dict[tuple[str, str], int] = {}
    by_span: dict[tuple[str, str], Call] = {}  # made when a failed call first asks its depth (many stores: never)

    def depth(c: Call) -> int:
        """How many calls lead to ``c`` (walked up, not recursed: a recursive closure would hold this
        function's tables in a reference cycle that only the cyclic collector frees)."""
        if not by_span:
            by_span.update(((k.trace_id, k.span_id), k) for k in calls)
        path: list[tuple[str, str]] = []
        cur: Call | None = c
        known = 0
        while cur is not None:
            key = (cur.trace_id, cur.span_id)
            if key in depth_cache:
                known = depth_cache[key] + 1
                break
            depth_cache[key] = 0  # a loop of upstream ids ends here
            path.append(key)
            cur = by_span.get((cur.trace_id, cur.upstream)) if cur.upstream else None
        for key in reversed(path):
            depth_cache[key] = known
            known += 1
        return depth_cache[(c.trace_id, c.span_id)]

    def answered_too_late(c: Call) -> bool:
        """An error answer (not a timeout) that came back after a call above it had given up: it did not make
        that call fail (a decline after the gateway's timeout is not why the customer saw a timeout)."""
        if c.error_class == "timeout" or not c.upstream:
            return False
        if not by_span:
            by_span.update(((k.trace_id, k.span_id), k) for k in calls)
        seen = set()
        above = by_span.get((c.trace_id, c.upstream))
        while above is not None and above.span_id not in seen:
            if above.gave_up and c.end_ns > above.end_ns:
                return True
            seen.add(above.span_id)
            above = by_span.get((above.trace_id, above.upstream)) if above.upstream else None
        return False

    out: dict[str, Transaction] = {}
    with_failed = {trace_id for trace_id, _ in final_attempt}
    with_late = {c.trace_id for c in calls if c.late_success}
    for trace_id, f in facts.items():
        trace_calls_ = by_trace.get(trace_id, [])
        failed = [c for c in trace_calls_ if not c.ok and (c.trace_id, c.span_id) in final_attempt
                  and not answered_too_late(c)] if trace_id in with_failed else []
        hop = (failed[0] if len(failed) == 1 else max(failed, key=lambda c: (depth(c), c.start_ns))) if failed else None
        if hop is None and f.failing_entry is not None:
            # The entry failed with no failed call under it (a proxy that gave up, say): blame the call
            # that used up its time.
            under = [c for c in trace_calls_ if c.entry_span_id == f.failing_entry]
            if under:
                hop = max(under, key=lambda c: c.duration_ns)
        late = [c for c in trace_calls_ if c.late_success] if trace_id in with_late else []
        if late and hop is None:
            hop = late[0]
        if late and not f.root_ok:
            outcome = "late_success"  # the order says failed, the money moved: the worst case first
        elif trace_id in duplicate:
            outcome = "duplicate_charge"
        elif not f.root_ok and hop is not None and hop.fault is not None:
            outcome = "injected"  # the sidecar's fault injection made it fail, not the system
        elif not f.root_ok:
            cls = hop.error_class if hop is not None else f.root_error_class
            if cls == "timeout" or f.root_error_class == "timeout":
                outcome = "timeout"
            elif cls == "business":
                outcome = "declined"  # the callee said no: a business answer, not a timeout problem
            else:
                outcome = "failed"
        else:
            outcome = "ok"
        out[trace_id] = Transaction(trace_id, f, outcome, hop.edge if hop else None,
                                    hop.error_class if hop else f.root_error_class)
    by_key: dict[str, list[str]] = defaultdict(list)
    for trace_id, f in facts.items():
        for key in f.keys:
            by_key[key].append(trace_id)
    for ids in by_key.values():
        if 1 < len(ids) <= 20:
            for tid in ids:
                out[tid].related = sorted(set(out[tid].related) | (set(ids) - {tid}))
    return out


def read(traces: Iterable[list[SpanRow] | bytes], *, extra_calls: Any = None) -> Analysis:
    """The calls of every trace on one clock, and nothing judged yet: no edges, no transactions (what
    `payscope compare` needs, and the first half of :func:`run`).

    ``extra_calls(facts, calls)`` may add calls seen elsewhere (proxy access logs) once the traces are read.
    """
    facts, calls = collect_calls(traces)
    if extra_calls is not None:
        for c in extra_calls(facts, calls):
            c.edge_key = (c.caller, c.callee, c.operation)
            calls.append(c)
    entries = {f.root_service for f in facts.values() if not f.root_missing}
    offsets = estimate_offsets(calls, entries)
    apply_offsets(calls, offsets)
    return Analysis(facts, calls, {}, offsets, {})


def run(traces: Iterable[list[SpanRow] | bytes], *, declared: dict[EdgeKey, TimeoutValue] | None = None,
        extra_calls: Any = None) -> Analysis:
    """Calls, clocks, edges and transactions over traces (each the spans of one trace, or its derivation)."""
    analysis = read(traces, extra_calls=extra_calls)
    calls = analysis.calls
    chains = retry_chains(calls)
    mark_late_successes(calls)
    analysis.declared = declared or {}
    analysis.edges = build_edges(calls, chains, analysis.declared)
    analysis.transactions = classify(analysis.traces, calls, chains)
    return analysis
