"""The one analysis every command and screen reads: the engine's facts, then recommendations, then findings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from payscope.model import SpanRow

from . import engine, findings, gaps, recommend
from .engine import Analysis, EdgeKey, TimeoutValue


def diagnose(traces: Iterable[list[SpanRow] | bytes], *, declared: dict[EdgeKey, TimeoutValue] | None = None,
             extra_calls: Any = None, order_rules: Any = None, order_logs: Any = None) -> Analysis:
    """Everything payscope concludes from these traces, each conclusion decided once.

    Recommendations come before findings because every finding cites its edge's recommended value
    instead of working out one of its own.
    """
    analysis = engine.run(traces, declared=declared, extra_calls=extra_calls)
    analysis.order_rules, analysis.order_logs = order_rules, order_logs  # before anything asks for the orders
    gaps.leave_out_queues(analysis)  # the tails timeouts are sized and judged on
    analysis.recommendations = {r.edge.key: r for r in recommend.recommend(analysis)}
    analysis.findings = findings.find(analysis)
    return analysis
