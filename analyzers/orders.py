"""Orders across their traces: the charges that really happened, the state the customer was left in, and the
orders where the two disagree (what finance asks about the next morning).

An order is a business key (order id, payment id) shared by the traces that make up its life: the first
attempt, the customer's retry, a callback consumed from a queue (a trace with no key is an order of its own).
Its **charges** are the charge-like calls made for it that the charging service answered well, whether or not
the caller was still waiting (a late success charged the card all the same). Its **final state** is what the customer
was told last, by its latest transaction that answered a request (a consumed message answers nobody): paid,
declined or failed. The mismatches:

* ``charged_but_failed``: the customer was told it failed (or it timed out), and a charge went through;
* ``charged_twice``: more charges went through than the one the order needs;
* ``paid_without_charge``: the customer was told it was paid, charges were attempted, and none went through.

A refund-like call for the order after its charges (refund, reverse, void, cancel) reconciles them.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from payscope.errors import InputError

from .calls import Call
from .engine import Analysis, order_of

# "authorize" names a card authorization only beside a word of money (an OAuth authorization is no charge)
CHARGE = re.compile(r"charge|capture|payment|\bpay\b|"
                    r"^(?=.*(?:pay|card|bank|psp|acquir|issuer|checkout|billing|wallet|merchant)).*authori[sz]",
                    re.IGNORECASE)
REFUND = re.compile(r"refund|revers|void|cancel", re.IGNORECASE)
MISMATCHES = ("charged_but_failed", "charged_twice", "paid_without_charge")


@dataclass(frozen=True)
class Rules:
    """What counts as a charge, a refund and the answer a customer got. The defaults fit common REST and gRPC
    names; the ``[orders]`` table of ``payscope.toml`` changes them (:func:`configured_rules`)."""

    charge: re.Pattern[str] = CHARGE            # on "callee operation" of a POST or PUT (or RPC) call
    refund: re.Pattern[str] = REFUND
    answer: re.Pattern[str] | None = None       # on "service operation" of an entry request: what customers see
    charge_log: str | None = None               # a log line with this text is one charge (a bank without spans)
    failed_log: str | None = None               # ... is the customer told "failed", whatever the status said
    paid_status: tuple[int, ...] = ()           # the answer's HTTP statuses that mean paid (default: a success)
    tcc_try: re.Pattern[str] | None = None      # on an operation: the part that names its TCC phase, for names
    tcc_confirm: re.Pattern[str] | None = None  # the common words (try/prepare, confirm/commit, cancel/rollback)
    tcc_cancel: re.Pattern[str] | None = None   # do not give (POST /stock/hold, /take, /release)


@dataclass
class LoggedFacts:
    """The log lines the rules name, as the store found them (``loader.load`` reads them)."""

    # traces (one when linked; the candidates when only its order id placed it), span, service, time
    charges: list[tuple[tuple[str, ...], str, str, int]] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)                           # traces


RULE_KEYS = ("charge", "refund", "answer", "charge_log", "failed_log", "paid_status", "tcc_try", "tcc_confirm",
             "tcc_cancel")
_PATTERNS = ("charge", "refund", "answer", "tcc_try", "tcc_confirm", "tcc_cancel")


def business_keys(keys: Any) -> set[str]:
    """The keys among ``keys`` that name an order or a payment, which several traces can share (a customer's retry,
    a refund); a captured request id (``rid:``) names one request only."""
    return {k for k in keys if not k.startswith("rid:")}


def rules_from(table: dict[str, Any], where: str) -> Rules:
    """Rules from an ``[orders]`` table; InputError naming the setting that cannot be used."""
    unknown = sorted(set(table) - set(RULE_KEYS))
    if unknown:
        raise InputError(f"{where}: [orders] {unknown[0]} is not a setting (known: {', '.join(RULE_KEYS)})")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key.endswith("_status"):
            if not isinstance(value, list) or not value or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value):
                raise InputError(f"{where}: [orders] {key} must be a list of HTTP statuses, such as [200, 201]")
            values[key] = tuple(value)
            continue
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: [orders] {key} must be a non-empty string")
        if key in _PATTERNS:
            try:
                values[key] = re.compile(value, re.IGNORECASE)
            except re.error as exc:
                raise InputError(f"{where}: [orders] {key} is not a regular expression: {exc}") from None
        else:
            values[key] = value
    return Rules(**values)


def configured_rules() -> Rules:
    """The rules of ``./payscope.toml`` (or the file ``PAYSCOPE_CONFIG`` names), the defaults without one."""
    from payscope.instrumentation.config import ConfigError, config_path, read_config

    path = config_path(os.environ)
    if path is None:
        return Rules()
    try:
        table = read_config(path).get("orders", {})
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: [orders] must be a table")
    return rules_from(table, str(path))


_CHARGE, _REFUND = 1, 2


def _role_of(rules: Rules, method: str | None, callee: str, operation: str) -> int:
    """What a call is to an order: a refund (``_REFUND``), else a charge (``_CHARGE``), else nothing (0), by its
    method and the rules' names for its callee and operation."""
    if method not in (None, "POST", "PUT"):
        return 0
    said = f"{callee} {operation}"
    return _REFUND if rules.refund.search(said) else _CHARGE if rules.charge.search(said) else 0


class _Roles(dict[tuple[str | None, str, str], int]):
    """``_role_of`` for one set of rules, asked once per method, callee and operation rather than per call (a
    compiled pattern hashes its whole program, so the patterns themselves make a slow cache key)."""

    def __init__(self, rules: Rules) -> None:
        super().__init__()
        self.rules = rules

    def of(self, call: Call) -> int:
        key = (call.method, call.callee, call.operation)
        role = self.get(key)
        if role is None:
            role = self[key] = _role_of(self.rules, *key)
        return role


def charge_calls(calls: list[Call], roles: _Roles) -> list[Call]:
    """The charge-like calls of one trace that charge themselves: those with no charge-like call made under
    them (order -> payment -> bank charges once, at the bank). Every attempt counts: a retried charge the
    charging service answered twice charged twice. ``roles``: what each kind of call is, by the run's rules."""
    named = [c for c in calls if roles.of(c) == _CHARGE]
    if len(named) < 2:
        return named
    under = {c.upstream for c in named if c.upstream}
    return [c for c in named if c.span_id not in under]


def charged(call: Call) -> bool:
    """Whether the charge went through: the charging service answered it well (the caller may have given up
    before that), or, with no span of the callee, the caller saw it succeed."""
    return call.server_ok if call.server_ok is not None else call.ok


@dataclass(slots=True)
class Charge:
    trace_id: str
    span_id: str
    caller: str
    callee: str
    operation: str
    time_ns: int
    amount: float | None
    caller_saw: str  # ok | late_success | failed: what the caller made of it

    def to_json(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "span_id": self.span_id, "caller": self.caller, "callee": self.callee,
                "operation": self.operation, "time_ns": self.time_ns, "amount": self.amount,
                "caller_saw": self.caller_saw}


@dataclass(slots=True)
class Order:
    key: str
    trace_ids: list[str]                     # by start time
    final: str                               # paid | declined | failed: what the customer was told last
    charges: list[Charge] = field(default_factory=list)
    attempted: int = 0                       # charge-like calls made, through or not
    refunds: int = 0
    amount: float | None = None              # the order's amount, when a span carried one

    @property
    def paid(self) -> bool:
        return self.final == "paid"

    @property
    def is_order(self) -> bool:
        """Whether this is an order at all: one a business key names, or a trace without one that attempted a
        charge or a refund (a route lookup or a login is a trace, not an order)."""
        return self.key not in self.trace_ids or bool(self.attempted or self.refunds)

    @property
    def mismatches(self) -> list[str]:
        through = len(self.charges) - self.refunds
        out = []
        if not self.paid and through >= 1:
            out.append("charged_but_failed")
        if through >= 2:
            out.append("charged_twice")
        if self.paid and self.attempted and through <= 0:
            out.append("paid_without_charge")
        return out

    @property
    def at_risk(self) -> float | None:
        """The money charged that the order does not account for: every charge of a failed order, every charge
        past the first of a paid one (less refunds)."""
        amounts = [c.amount if c.amount is not None else self.amount for c in self.charges]
        extra = amounts[self.refunds:] if not self.paid else amounts[1 + self.refunds:]
        known = [a for a in extra if a is not None]
        return round(sum(known), 2) if known else None

    def to_json(self) -> dict[str, Any]:
        return {"order": self.key, "final": self.final, "mismatches": self.mismatches,
                "charges": [c.to_json() for c in self.charges], "charge_attempts": self.attempted,
                "refunds": self.refunds, "amount": self.amount, "amount_at_risk": self.at_risk,
                "trace_ids": self.trace_ids}


def orders(analysis: Analysis) -> dict[str, Order]:
    """Every order across its traces (use ``Analysis.orders``, which keeps the answer), by ``analysis.order_rules``
    and the log lines they name (``analysis.order_logs``)."""
    rules: Rules = analysis.order_rules or Rules()
    logged: LoggedFacts = analysis.order_logs or LoggedFacts()
    traces_of: dict[str, list[str]] = defaultdict(list)
    for trace_id, tx in analysis.transactions.items():
        traces_of[order_of(tx.facts)].append(trace_id)  # a trace with no business key is an order of its own
    charge_lines: dict[str, list[tuple[str, str, str, int]]] = defaultdict(list)
    for traces, span_id, service, time_ns in logged.charges:
        # a charge logged after its caller gave up sits between the order's traces: any of them is its order
        owners = {order_of(analysis.transactions[t].facts) for t in traces if t in analysis.transactions}
        if len(owners) == 1:
            charge_lines[owners.pop()].append((traces[0], span_id, service, time_ns))
    out: dict[str, Order] = {}
    roles = _Roles(rules)
    named, refunded = _named(analysis, roles)
    transactions = analysis.transactions
    for key, trace_ids in traces_of.items():
        if len(trace_ids) > 1:
            trace_ids.sort(key=lambda t: transactions[t].facts.start_ns)
            amount = next((a for a in (transactions[t].facts.amount for t in trace_ids) if a is not None), None)
        else:  # most orders: one trace, whose amount is the order's
            amount = transactions[trace_ids[0]].facts.amount
        order = Order(key, trace_ids, _told(analysis, trace_ids, rules, logged), amount=amount)
        for trace_id in trace_ids:
            if trace_id in named:
                for c in charge_calls(named[trace_id], roles):
                    order.attempted += 1
                    if charged(c) and rules.charge_log is None:
                        order.charges.append(Charge(c.trace_id, c.span_id, c.caller, c.callee, c.operation,
                                                    c.server_end_ns or c.end_ns, c.amount, "late_success"
                                                    if c.late_success else "ok" if c.ok else "failed"))
            if trace_id in refunded:
                order.refunds += refunded[trace_id]
        for trace_id, span_id, service, time_ns in charge_lines.get(key, ()):  # the charging service's own word
            order.charges.append(Charge(trace_id, span_id, "", service, f"log: {rules.charge_log}", time_ns, None,
                                        "logged"))
        if len(order.charges) > 1:
            order.charges.sort(key=lambda c: c.time_ns)
        out[key] = order
    return out


def _named(analysis: Analysis, roles: _Roles) -> tuple[dict[str, list[Call]], dict[str, int]]:
    """Each trace's charge-like calls, in its calls' order, and how many refunds went through in it: each call's
    role asked once, in one pass (most traces hold no charge and no refund)."""
    named: dict[str, list[Call]] = defaultdict(list)
    refunded: dict[str, int] = defaultdict(int)
    for c in analysis.calls:
        role = roles.of(c)
        if role == _CHARGE:
            named[c.trace_id].append(c)
        elif role == _REFUND and charged(c):
            refunded[c.trace_id] += 1
    return named, refunded


def charging_calls(analysis: Analysis) -> set[tuple[str, str]]:
    """(trace id, span id) of every call that charges (``charge_calls``, by ``analysis.order_rules``), through or
    not: the calls an order's charges are counted from, in the orders and in the replay of
    ``recommend.replay``."""
    roles = _Roles(analysis.order_rules or Rules())
    named, _ = _named(analysis, roles)
    return {(c.trace_id, c.span_id) for calls in named.values() for c in charge_calls(calls, roles)}


def _told(analysis: Analysis, trace_ids: list[str], rules: Rules, logged: LoggedFacts) -> str:
    """What the customer was told last: by the last request someone waited for (a callback or event consumed
    from a queue joins the journey, and tells the customer nothing), of those the rules call an answer."""
    if len(trace_ids) == 1:  # most orders: their one trace is the last whatever it answered
        last = analysis.transactions[trace_ids[0]]
    else:
        facts = [analysis.transactions[t].facts for t in trace_ids]
        asked = [f for f in facts if f.asked and (rules.answer is None or
                                                  rules.answer.search(f"{f.root_service} {f.root_operation}"))]
        last = analysis.transactions[(asked or [f for f in facts if f.asked] or facts)[-1].trace_id]
    if last.trace_id in logged.failed:
        return "failed"
    paid = last.facts.root_status in rules.paid_status if rules.paid_status else last.facts.root_ok
    return "paid" if paid else "declined" if last.outcome == "declined" else "failed"


def problems(analysis: Analysis) -> dict[str, list[str]]:
    """Trace id -> what is inconsistent about its order: the order's mismatches, and the TCC and saga anomalies
    (``tcc_anomaly`` findings) its order is named in; only traces of such orders. Use ``Analysis.problems``,
    which keeps the answer: the one filter of `payscope failures --problem` and the TUI."""
    out: dict[str, list[str]] = defaultdict(list)
    known = analysis.orders()
    for order in analysis.mismatched():
        for trace_id in order.trace_ids:
            out[trace_id].extend(order.mismatches)
    for finding in analysis.findings:
        if finding.kind != "tcc_anomaly":
            continue
        for name, keys in finding.metrics.get("orders", {}).items():
            for key in keys:
                for trace_id in known[key].trace_ids if key in known else [key]:
                    if name not in out[trace_id]:
                        out[trace_id].append(name)
    return {trace_id: found for trace_id, found in out.items() if found}


def mismatched(analysis: Analysis) -> list[Order]:
    """The orders finance should look at, the most money first (use ``Analysis.mismatched``, which keeps the
    answer)."""
    found = [o for o in analysis.orders().values() if o.mismatches]
    return sorted(found, key=lambda o: (-(o.at_risk or 0.0), o.key))
