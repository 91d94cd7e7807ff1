"""TCC and saga anomalies (`tcc_anomaly`): try/confirm/cancel phases out of order, seen from the calls into a
participant, and saga steps left uncompensated.

A participant's TCC resource is recognised from its operations, whatever the framework (Seata-style or
hand-written): the same service and route with ``try`` (or ``prepare``), and ``confirm`` (``commit``) or
``cancel`` (``rollback``), in place of one path segment, such as ``POST /tcc/try`` beside ``POST /tcc/cancel``.
A route seen with one phase only is not taken for TCC. The phases of one order (its business key, else its
trace) are read on the participant's own clock, from the server spans that answered them; a try and a cancel are
judged together within one global transaction (a trace: the customer's retry of an order is another one):

* ``empty_rollback``: a cancel ran while no try of the order had finished (the try was lost, or is still on its
  way); a participant must accept it and remember it;
* ``suspension``: a try finished after the order's cancel had started: the funds it froze are never released,
  unless the participant refuses a try whose cancel it has seen;
* ``repeated_confirm``: the order was confirmed more than once, in any of its transactions, with no idempotency
  key (its effect done twice: stock taken, money captured); ``repeated_cancel``: one transaction's cancel ran
  more than once (its try undone twice).

A phase the participant never answered (lost on the way, refused by an injected fault) did not run.

A **saga step** is a call whose callee also serves its compensation: the same route with ``/cancel``,
``/compensate``, ``/undo`` or ``/revert`` after it (``POST /reserve`` and ``POST /reserve/cancel``). When a
later call of the same caller in the trace failed, every step done before it must be compensated after the
failure; ``compensation_missing`` names the orders where one was not.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from .calls import Call
from .engine import Analysis, order_of
from .findings import Finding
from .orders import Rules

_PHASE_WORDS = {"try": "try", "prepare": "try", "confirm": "confirm", "commit": "confirm", "cancel": "cancel",
                "rollback": "cancel"}
_SEGMENT = re.compile(r"(?<=[/\s:.])(try|prepare|confirm|commit|cancel|rollback)(?=$|[/?\s:.])", re.IGNORECASE)
ANOMALIES = ("suspension", "empty_rollback", "repeated_confirm", "repeated_cancel")
_UNDO = re.compile(r"^(?P<step>.+)/(?:cancel|compensate|undo|revert)$", re.IGNORECASE)


def phase_of(operation: str, rules: Rules | None = None) -> tuple[str, str] | None:
    """(phase, resource) of an operation naming a TCC phase, the resource being the operation with the phase
    word as ``{phase}``; None for any other operation. The rules' own phase patterns (``[orders] tcc_try``...)
    come first."""
    for phase, pattern in (("try", rules.tcc_try), ("confirm", rules.tcc_confirm),
                           ("cancel", rules.tcc_cancel)) if rules is not None else ():
        mapped = list(pattern.finditer(operation)) if pattern is not None else []
        if len(mapped) == 1:
            return phase, operation[:mapped[0].start()] + "{phase}" + operation[mapped[0].end():]
    found = list(_SEGMENT.finditer(operation))
    if len(found) != 1:
        return None
    match = found[0]
    return _PHASE_WORDS[match.group(1).lower()], operation[:match.start()] + "{phase}" + operation[match.end():]


@dataclass
class _Resource:
    callee: str
    resource: str
    callers: set[str] = field(default_factory=set)
    phases: set[str] = field(default_factory=set)
    by_order: dict[str, list[tuple[str, Call]]] = field(default_factory=lambda: defaultdict(list))


def _ran(call: Call) -> bool:
    return call.server_ok is True and call.fault not in ("abort", "reset")


def anomalies_of(phases: list[tuple[str, Call]]) -> list[str]:
    """The anomalies of one order's phases at one participant."""
    ran = [(p, c) for p, c in phases if _ran(c)]
    out = []
    # a try and a cancel belong together within one global transaction (one trace): the customer's retry of the
    # order is a transaction of its own, whose try may well follow the first one's cancel
    by_trace: dict[str, list[tuple[str, Call]]] = defaultdict(list)
    for p, c in ran:
        by_trace[c.trace_id].append((p, c))
    for steps in by_trace.values():
        tries = [c for p, c in steps if p == "try"]
        cancels = [c for p, c in steps if p == "cancel"]
        if "suspension" not in out and any(
                t.server_end_ns > cancel.server_start_ns for t in tries for cancel in cancels  # type: ignore[operator]
                if t.server_end_ns is not None and cancel.server_start_ns is not None):
            out.append("suspension")
        if "empty_rollback" not in out and any(
                not any(t.server_end_ns is not None and cancel.server_start_ns is not None
                        and t.server_end_ns <= cancel.server_start_ns for t in tries) for cancel in cancels):
            out.append("empty_rollback")
    # an order is confirmed once: a second confirm, in any of its transactions, does its effect twice; a cancel
    # undoes its own transaction's try, and only a second one there undoes twice
    confirms = [c for p, c in ran if p == "confirm"]
    if len(confirms) > 1 and not any(c.idempotency_key for c in confirms):
        out.append("repeated_confirm")
    for steps in by_trace.values():
        cancels = [c for p, c in steps if p == "cancel"]
        if len(cancels) > 1 and not any(c.idempotency_key for c in cancels):
            out.append("repeated_cancel")
            break
    return out


def tcc_anomalies(analysis: Analysis) -> list[Finding]:
    """One finding per TCC resource where some order's phases went wrong, with the orders of each anomaly."""
    resources: dict[tuple[str, str], _Resource] = {}
    phase_by_operation: dict[str, tuple[str, str] | None] = {}  # asked once each: a store has few, and many calls
    for call in analysis.calls:
        operation = call.operation
        found = phase_by_operation[operation] if operation in phase_by_operation else phase_by_operation.setdefault(
            operation, phase_of(operation, analysis.order_rules))
        if found is None or call.server_service is None:
            continue
        phase, resource = found
        entry = resources.setdefault((call.callee, resource), _Resource(call.callee, resource))
        entry.phases.add(phase)
        entry.callers.add(call.caller)
        facts = analysis.traces.get(call.trace_id)
        entry.by_order[order_of(facts) if facts is not None else call.trace_id].append((phase, call))
    out = []
    for entry in resources.values():
        if "try" not in entry.phases or not entry.phases & {"confirm", "cancel"}:
            continue  # one phase alone is no TCC
        orders: dict[str, list[str]] = {name: [] for name in ANOMALIES}
        traces: list[str] = []
        for order, phases in sorted(entry.by_order.items()):
            for name in anomalies_of(phases):
                orders[name].append(order)
                traces.extend(c.trace_id for _, c in phases)
        if not any(orders.values()):
            continue
        counts = {name: len(found) for name, found in orders.items() if found}
        said = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())
        caller = sorted(entry.callers)[0]
        out.append(Finding(
            "tcc_anomaly", "critical" if orders["suspension"] else "high", (caller, entry.callee, entry.resource),
            f"TCC on {entry.callee} ({entry.resource}) out of order: {said}",
            "The phases of an order reached the participant in an order TCC must survive: a cancel with no "
            "finished try (empty rollback), a try that finished after its cancel (suspension: the funds it froze "
            "stay frozen), a confirm or cancel run again without an idempotency key (its effect done twice). "
            "Timeouts and retries between coordinator and participant produce all three.",
            metrics={"orders": {k: v for k, v in orders.items() if v}, "counts": counts},
            trace_ids=list(dict.fromkeys(traces)),
            recommendation={"action": f"make {entry.callee}'s TCC phases guard themselves: record a cancel even "
                                      "when no try arrived, refuse a try whose cancel was recorded, and make "
                                      "confirm and cancel idempotent per order"}))
    return out


def saga_anomalies(analysis: Analysis) -> list[Finding]:
    """One finding per saga step that some failed order left uncompensated."""
    undo_of: dict[tuple[str, str], str] = {}  # (callee, step operation) -> its compensation's operation
    for call in analysis.calls:
        method, _, route = call.operation.partition(" ")
        match = _UNDO.match(route)
        if match and call.server_service is not None:
            undo_of[(call.callee, f"{method} {match.group('step')}")] = call.operation
    if not undo_of:
        return []
    undos = {(callee, undo) for (callee, _), undo in undo_of.items()}
    missing: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    traces: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for trace_id, facts in analysis.traces.items():
        calls = sorted(analysis.calls_of(trace_id), key=lambda c: c.start_ns)
        for i, failed in enumerate(calls):
            if failed.ok or (failed.callee, failed.operation) in undos:
                continue
            if any(c.ok and (c.caller, c.callee, c.operation) == (failed.caller, failed.callee, failed.operation)
                   for c in calls[i + 1:]):
                continue  # retried into a success: the saga went on
            for step in calls[:i]:
                undo = undo_of.get((step.callee, step.operation))
                if undo is None or step.caller != failed.caller or not step.ok:
                    continue
                if not any(c.callee == step.callee and c.operation == undo and _ran(c) and c.start_ns >= failed.start_ns
                           for c in calls):
                    key = (step.caller, step.callee, step.operation)
                    missing[key].append(order_of(facts))
                    traces[key].append(trace_id)
            break  # the first failure is where the saga turned back
    out = []
    for (caller, callee, operation), orders in sorted(missing.items()):
        orders = sorted(set(orders))
        out.append(Finding(
            "tcc_anomaly", "high", (caller, callee, operation),
            f"saga step {callee} ({operation}) left uncompensated in {len(orders)} failed orders",
            f"A later step of these orders failed, and {caller} never ran {undo_of[(callee, operation)]} on "
            f"{callee} afterwards: what the step did ({operation}) stays done for an order that failed.",
            metrics={"orders": {"compensation_missing": orders}, "counts": {"compensation_missing": len(orders)}},
            trace_ids=list(dict.fromkeys(traces[(caller, callee, operation)])),
            recommendation={"action": f"compensate every step done before a failure, whatever the failure (an "
                                      f"error, a timeout): call {undo_of[(callee, operation)]} on {callee}"}))
    return out
