"""From spans to calls: each client span with what answered it, where it sits, and what it ran under.

This is the one pass over the spans; everything else works on the compact
:class:`Call` and :class:`TraceFacts` records it produces, so that a million
spans fit in memory as a few hundred thousand small objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from payscope.model import STATUS_ERROR, SpanRow

_IDEMPOTENT_METHODS = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"}
_CHARGE_WORDS = re.compile(r"charge|pay|debit|capture|refund|transfer|authori[sz]e|settle|withdraw|purchase|"
                           r"order|checkout|renew|entries|ledger|wallet|billing", re.IGNORECASE)


def is_charge_like(operation: str, callee: str) -> bool:
    return bool(_CHARGE_WORDS.search(operation) or _CHARGE_WORDS.search(callee))


_READ_RPC = re.compile(r"(?:^|[/.])(?:Get|List|Find|Read|Query|Search|Check|Lookup|Fetch|Describe)[A-Z_]?")


def is_idempotent(method: str | None, key: bool, operation: str = "") -> bool:
    """Safe to retry: an idempotent HTTP method, an idempotency key, or a read-only RPC by its name."""
    if key:
        return True
    if method is not None:
        return method in _IDEMPOTENT_METHODS
    return bool(_READ_RPC.search(operation))


@dataclass(slots=True)
class Captured:
    """Timeouts recorded on the span by `payscope run` (milliseconds; None = not known)."""

    connect_ms: float | None = None
    read_ms: float | None = None
    total_ms: float | None = None
    source: str | None = None
    retry_max: int | None = None


@dataclass(slots=True)
class Call:
    """One client span (an attempt of a call) and the server span that answered it, if any."""

    trace_id: str
    span_id: str
    parent_id: str | None
    caller: str
    callee: str
    operation: str
    method: str | None
    start_ns: int
    end_ns: int
    error_class: str | None
    attempt: int = 0
    idempotency_key: bool = False
    captured: Captured | None = None
    server_service: str | None = None
    server_start_ns: int | None = None
    server_end_ns: int | None = None
    server_ok: bool | None = None
    upstream: str | None = None        # span id of the client call that led into the caller
    entry_start_ns: int | None = None  # the caller's server span that this call is made under
    entry_end_ns: int | None = None
    entry_span_id: str | None = None
    answered_by: str | None = None     # span id of the server span that answered, when it is known
    amount: float | None = None
    http_status: int | None = None
    fault: str | None = None           # a fault the sidecar injected into this call (delay, abort, reset)
    late_success: bool = False         # set after clock correction
    edge_key: tuple[str, str, str] | None = None  # set once callee names are final

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def ok(self) -> bool:
        return self.error_class is None

    @property
    def server_ms(self) -> float | None:
        """The callee's own time on this call (None when its server span is not known)."""
        if self.server_start_ns is None or self.server_end_ns is None:
            return None
        return (self.server_end_ns - self.server_start_ns) / 1e6

    @property
    def observed_ms(self) -> float | None:
        """What the caller saw of a call its callee answered well: its length, or for a late success as long as it
        would have lasted (until the callee finished). None for an injected fault, a failure, and a call given up
        with no answer (its length was never seen). The samples of every latency judgement (``Edge.latency``)."""
        if self.fault is not None:
            return None
        client = (self.end_ns - self.start_ns) / 1e6
        if self.error_class is None:
            return client
        if self.gave_up and self.late_success and self.server_end_ns is not None:
            return max(client, (self.server_end_ns - self.start_ns) / 1e6)
        return None

    @property
    def gap_ms(self) -> float | None:
        """What the caller waited beyond the callee's own time: the network, a queue, connection set-up. Known
        for a successful call. For one the caller gave up on, a lower bound: the whole gap when the callee's
        answer was already on its way (its server span ended inside the client span), else the wait before the
        callee's span began, or the whole call when it began only after the caller had given up (a request
        left in the callee's queue past the caller's timeout). None for other failures."""
        server_end, server_start = self.server_end_ns, self.server_start_ns  # read on every call of every edge
        if server_end is None or server_start is None:
            return None
        if self.error_class is None or (self.gave_up and self.server_ok and server_end <= self.end_ns):
            return max(0.0, (self.end_ns - self.start_ns) / 1e6 - (server_end - server_start) / 1e6)
        if self.gave_up:
            return max(0.0, (min(server_start, self.end_ns) - self.start_ns) / 1e6)
        return None  # failed, and not given up

    @property
    def left_waiting_ms(self) -> float | None:
        """For a call its caller gave up on before the callee's span began (a request left in the callee's queue,
        or on the wire, past the caller's timeout): how long it waited before the callee picked it up, of which
        ``gap_ms`` counts only what the caller waited. None for any other call."""
        if self.gave_up and self.server_start_ns is not None and self.server_start_ns >= self.end_ns:
            return (self.server_start_ns - self.start_ns) / 1e6
        return None

    @property
    def timed_out(self) -> bool:
        return self.error_class == "timeout"

    @property
    def gave_up(self) -> bool:
        """The caller's own timer fired (not a 504 or deadline error relayed by the callee)."""
        if not self.timed_out or self.http_status is not None:
            return False
        if self.server_end_ns is not None and not self.server_ok:
            margin = max(2_000_000, self.duration_ns // 50)
            return self.server_end_ns >= self.end_ns - margin
        return True

    @property
    def edge(self) -> tuple[str, str, str]:
        return self.edge_key or (self.caller, self.callee, self.operation)


@dataclass(slots=True)
class TraceFacts:
    """What the analysis keeps of one trace beyond its calls."""

    trace_id: str
    start_ns: int
    end_ns: int
    root_service: str
    root_operation: str
    root_ok: bool
    root_error_class: str | None
    root_missing: bool
    failing_entry: str | None  # span id of the first entry request that failed, when one did
    span_count: int
    services: list[str]
    keys: list[str] = field(default_factory=list)
    amount: float | None = None
    asked: bool = True  # entered by a request someone waited for (a server span), not by a consumed message
    root_status: int | None = None  # the HTTP status the entry request answered with


def answered_well(server: SpanRow) -> bool:
    """A server span that did what was asked: no error, and no 4xx (a decline is an answer, not a success)."""
    return server.status_code != STATUS_ERROR and server.error_class is None and (server.http_status or 0) < 400


def _captured(row: SpanRow) -> Captured | None:
    if row.timeout_source is None and row.timeout_read_ms is None and row.timeout_total_ms is None \
            and row.retry_max is None:
        return None
    return Captured(row.timeout_connect_ms, row.timeout_read_ms, row.timeout_total_ms, row.timeout_source,
                    row.retry_max)


def _redirect(server: SpanRow) -> bool:
    return server.http_status is not None and 300 <= server.http_status < 400


def _doubled(senders: list[SpanRow], by_id: dict[str, SpanRow],
             servers_by_parent: dict[str, list[SpanRow]]) -> dict[str, SpanRow]:
    """Client or producer spans (``senders``) recorded twice for one call: a span whose only child has its
    service, kind and name (an instrumented library wrapping another, pika's blocking channel around its
    channel, say). Outer span id -> the inner span, which is not a call of its own."""
    inner: dict[str, list[SpanRow]] = {}
    for s in senders:
        if s.parent_id:
            inner.setdefault(s.parent_id, []).append(s)
    found: dict[str, SpanRow] = {}
    for parent_id, kids in inner.items():
        outer = by_id.get(parent_id)
        if outer is not None and len(kids) == 1 and outer.kind == kids[0].kind and outer.name == kids[0].name \
                and outer.service == kids[0].service and parent_id not in servers_by_parent:
            found[parent_id] = kids[0]
    return found


def trace_calls(spans: list[SpanRow], alias_votes: dict[str, dict[str, int]]) -> tuple[TraceFacts, list[Call]]:
    """The calls and facts of one trace (all spans of the trace, any order).

    A call whose callee has no span is named by the address the caller used;
    ``alias_votes`` collects which service answers at which address, so that
    :func:`resolve_aliases` can rename those calls once every trace is read.
    """
    by_id: dict[str, SpanRow] = {}
    servers_by_parent: dict[str, list[SpanRow]] = {}
    senders: list[SpanRow] = []  # client and producer spans, in the trace's order
    for s in spans:
        by_id[s.span_id] = s
        if s.kind in ("client", "producer"):
            senders.append(s)
        elif s.parent_id and s.kind in ("server", "consumer"):
            servers_by_parent.setdefault(s.parent_id, []).append(s)
    roots = [s for s in spans if not s.parent_id or s.parent_id not in by_id]
    roots.sort(key=lambda s: (s.parent_id is not None, s.start_ns))
    root = roots[0]
    inner_of = _doubled(senders, by_id, servers_by_parent)
    doubles = {inner.span_id for inner in inner_of.values()}

    def entry_of(span: SpanRow) -> SpanRow | None:
        cur = by_id.get(span.parent_id) if span.parent_id else None
        hops = 0
        while cur is not None and hops < 256:
            if cur.kind in ("server", "consumer") or cur.service != span.service:
                return cur
            cur = by_id.get(cur.parent_id) if cur.parent_id else None
            hops += 1
        return None

    calls: list[Call] = []
    keys: list[str] = []
    amount = None
    for s in spans:
        if s.keys:
            keys.extend(k for k in s.keys if not k.startswith("rid:"))
        if amount is None:
            amount = s.amount
    for s in senders:
        if s.span_id in doubles:
            continue
        inner = inner_of.get(s.span_id)
        answered = servers_by_parent.get(s.span_id) or (servers_by_parent.get(inner.span_id, []) if inner else [])
        if len(answered) > 1:  # a redirect the client followed is a hop of the same call, not an attempt
            ordered = sorted(answered, key=lambda a: a.start_ns)
            answered = [a for a in ordered[:-1] if not _redirect(a)] + ordered[-1:]
        entry = entry_of(s)
        upstream = entry.parent_id if entry is not None and entry.kind in ("server", "consumer") else None
        common: dict[str, Any] = {
                  "trace_id": s.trace_id, "parent_id": s.parent_id, "caller": s.service, "method": s.method,
                  "idempotency_key": s.idempotency_key or bool(inner and inner.idempotency_key),
                  "captured": _captured(s) or (_captured(inner) if inner else None), "upstream": upstream,
                  "entry_start_ns": entry.start_ns if entry else None,
                  "entry_end_ns": entry.end_ns if entry else None,
                  "entry_span_id": entry.span_id if entry else None, "amount": s.amount}
        if len(answered) > 1 and len({(a.service, a.operation) for a in answered}) == 1:
            # One client span answered several times by the same service: the library retried inside
            # the call (urllib3's Retry under requests, say). Each answer is an attempt.
            calls.extend(_attempts(s, sorted(answered, key=lambda a: a.start_ns), common, alias_votes))
            continue
        # One client span answered by different services or operations is a logical step (a load
        # generator's journey), not a call.
        server = answered[0] if len(answered) == 1 else None
        peer = s.peer
        if server is not None:
            callee = server.service
            operation = server.operation
            if peer:
                votes = alias_votes.setdefault(peer, {})
                votes[callee] = votes.get(callee, 0) + 1
        else:
            callee = peer or "(unknown)"
            operation = s.operation
        if server is not None and server.caller_budget_ms is not None and common["captured"] is None:
            # the callee was told how long its caller would wait (Envoy's header, grpc-timeout)
            common["captured"] = Captured(None, None, server.caller_budget_ms, "header")
        calls.append(Call(
            span_id=s.span_id, callee=callee, operation=operation, start_ns=s.start_ns, end_ns=s.end_ns,
            error_class=s.error_class, attempt=s.attempt,
            server_service=server.service if server else None,
            server_start_ns=server.start_ns if server else None,
            server_end_ns=server.end_ns if server else None,
            server_ok=answered_well(server) if server else None,
            answered_by=server.span_id if server else None, http_status=s.http_status,
            fault=(server.fault if server else None) or s.fault, **common))
    # Entry requests: server spans with no server span above them (under a load generator, say).
    entries = [s for s in spans if s.kind in ("server", "consumer") and not _has_server_ancestor(s, by_id)]
    if not entries:
        entries = [root]
    failing = [s for s in entries if not answered_well(s)]
    failing.sort(key=lambda s: s.start_ns)
    if failing:
        root_error = failing[0].error_class or "business"
    else:
        root_error = None
    facts = TraceFacts(
        trace_id=root.trace_id, start_ns=min(s.start_ns for s in spans), end_ns=max(s.end_ns for s in spans),
        root_service=root.service, root_operation=root.operation,
        root_ok=not failing, root_error_class=root_error,
        root_missing=root.parent_id is not None, failing_entry=failing[0].span_id if failing else None,
        span_count=len(spans),
        services=sorted({s.service for s in spans}), keys=sorted(set(keys)), amount=amount,
        asked=any(s.kind == "server" for s in entries) or not any(s.kind == "consumer" for s in entries),
        root_status=root.http_status)
    return facts, calls


def _attempts(client: SpanRow, answers: list[SpanRow], common: dict[str, Any],
              alias_votes: dict[str, dict[str, int]]) -> list[Call]:
    """The attempts hidden in one client span, one per server span that answered it."""
    out = []
    per_try_ns = None
    captured = common["captured"]
    if captured is not None and (captured.read_ms or captured.total_ms):
        per_try_ns = int((captured.read_ms or captured.total_ms) * 1e6)
    if client.peer:
        votes = alias_votes.setdefault(client.peer, {})
        votes[answers[0].service] = votes.get(answers[0].service, 0) + 1
    for i, server in enumerate(answers):
        last = i == len(answers) - 1
        server_ok = answered_well(server)
        start = client.start_ns if i == 0 else max(client.start_ns, server.start_ns - 1_000_000)
        if last:
            end, error, status = client.end_ns, client.error_class, client.http_status
        else:
            # retried: the server failed, or the client stopped waiting for it
            end = answers[i + 1].start_ns - 1_000_000
            if per_try_ns is not None:
                end = min(end, start + per_try_ns)
            error, status = ("timeout", None) if server_ok else ("http_5xx", server.http_status)
        out.append(Call(
            span_id=f"{client.span_id}#{i}", callee=server.service, operation=server.operation, start_ns=start,
            end_ns=max(start, end), error_class=error, attempt=i, server_service=server.service,
            server_start_ns=server.start_ns, server_end_ns=server.end_ns, server_ok=server_ok,
            answered_by=server.span_id, http_status=status, fault=server.fault, **common))
    return out


def _has_server_ancestor(span: SpanRow, by_id: dict[str, SpanRow]) -> bool:
    cur = by_id.get(span.parent_id) if span.parent_id else None
    hops = 0
    while cur is not None and hops < 256:
        if cur.kind in ("server", "consumer"):
            return True
        cur = by_id.get(cur.parent_id) if cur.parent_id else None
        hops += 1
    return False


def resolve_aliases(calls: list[Call], alias_votes: dict[str, dict[str, int]]) -> None:
    """Rename calls to uninstrumented addresses after the service seen answering there."""
    aliases = {peer: max(v, key=v.__getitem__) for peer, v in alias_votes.items()}
    for call in calls:
        if call.server_service is None and call.callee in aliases:
            call.callee = aliases[call.callee]
