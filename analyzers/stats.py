"""Small statistics over latency samples (milliseconds, sorted ascending)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def p50_p99(sorted_values: Sequence[float]) -> dict[str, float | None]:
    """The median and the p99 of already sorted values, rounded to hundredths; None when empty."""
    return {q: None if (v := percentile(sorted_values, n)) is None else round(v, 2)
            for q, n in (("p50", 50), ("p99", 99))}


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fraction_above(sorted_values: Sequence[float], threshold: float) -> float:
    """Share of the values strictly above ``threshold``."""
    if not sorted_values:
        return 0.0
    import bisect

    return (len(sorted_values) - bisect.bisect_right(sorted_values, threshold)) / len(sorted_values)


def nice_ceil_ms(value: float) -> float:
    """Round a timeout up to a value people write in configs (10 ms, 50 ms, 100 ms steps)."""
    if value <= 100:
        step = 10.0
    elif value <= 1000:
        step = 50.0
    elif value <= 10_000:
        step = 100.0
    else:
        step = 1000.0
    return math.ceil(value / step) * step


def ms(ns: int | float) -> float:
    return ns / 1e6
