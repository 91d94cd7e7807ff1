"""Which log templates are request-scoped, and where in a request their lines fall.

A time window alone is weak evidence: a health check or a cache warm-up logged while one
request happened to be in flight would be tied to it. What makes a line without an id
belong to a request is that lines of its template *do* carry ids elsewhere: the same
service wrote that message with a trace id, a request id or a business key. Templates are
mined with Drain (the ``drain3`` package), per service, from the lines linked by an id;
a template never seen with an id is background.

Lines linked by an id also say where in their span the template is logged. A template
always written within a few milliseconds of its span's start (``order received``) or end
(``charge declined: bank timeout``) can pick one span among several that overlap.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from drain3 import TemplateMiner
from drain3.template_miner_config import TemplateMinerConfig

from payscope.model import SpanRow

MAX_TOKENS = 40
SAMPLES_PER_TEMPLATE = 24     # id-linked lines kept per template to learn its position
MIN_SAMPLES = 3               # fewer than this, a template has no position
ANCHORED_SHARE = 0.8          # of its samples within the anchor distance, for a template to be anchored
ANCHOR_NS = 5_000_000         # "right after the start" / "right before the end": within 5 ms ...
ANCHOR_SHARE_OF_SPAN = 0.05   # ... or 5% of the span, whichever is longer
MIN_TOLERANCE_NS = 2_000_000
LATE_NS = 2_000_000           # a line may be stamped this long after its span ended (clock rounding)

_DIGITS = re.compile(r"\S*\d\S*")


def shape(message: str) -> str:
    """A message's first line with every token that holds a digit masked: ids, amounts, durations, times."""
    first = message.split("\n", 1)[0]
    tokens = _DIGITS.sub("<*>", first).split()
    return " ".join(tokens[:MAX_TOKENS])


@dataclass(slots=True)
class Anchor:
    """Where a template's lines fall in their span: ``start`` or ``end``, and how far from it at most."""

    at: str
    tolerance_ns: int

    def fits(self, span: SpanRow, time_ns: int) -> bool:
        if self.at == "start":
            return -LATE_NS <= time_ns - span.start_ns <= self.tolerance_ns
        return -LATE_NS <= span.end_ns - time_ns <= self.tolerance_ns


@dataclass
class _Template:
    samples: list[tuple[str, int]] = field(default_factory=list)  # (trace id, line time) of id-linked lines
    anchor: Anchor | None = None
    placed: bool = False  # the samples were read against their spans


def anchor_of(offsets: list[tuple[int, int, int]]) -> Anchor | None:
    """The anchor of a template from its lines' (from start, to end, span length) in ns, or None."""
    if len(offsets) < MIN_SAMPLES:
        return None
    best: Anchor | None = None
    for at, index in (("start", 0), ("end", 1)):
        near = [o[index] for o in offsets if -LATE_NS <= o[index] <= max(ANCHOR_NS, o[2] * ANCHOR_SHARE_OF_SPAN)]
        if len(near) >= ANCHORED_SHARE * len(offsets):
            spread = statistics.quantiles(near, n=10, method="inclusive")[-1] if len(near) > 1 else near[0]
            tolerance = max(MIN_TOLERANCE_NS, 2 * int(spread))
            if best is None or tolerance < best.tolerance_ns:
                best = Anchor(at, tolerance)
    return best


class Lessons:
    """The id-linked lines a :class:`Templates` learns from, kept in order to be taught to one in another process:
    of each message shape, the first SAMPLES_PER_TEMPLATE, since a template keeps no more samples than that and
    its first line of a shape is all the miner sees of it."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str, int]] = []
        self._kept: dict[tuple[str, str], int] = {}

    def learn(self, service: str, message: str, trace_id: str, time_ns: int) -> None:
        key = (service, shape(message))
        kept = self._kept.get(key, 0)
        if kept < SAMPLES_PER_TEMPLATE:
            self._kept[key] = kept + 1
            self.lines.append((service, message, trace_id, time_ns))


class Templates:
    """Per service: the templates of id-linked lines, and their anchors."""

    def __init__(self) -> None:
        self._miners: dict[str, TemplateMiner] = {}
        self._shapes: dict[tuple[str, str], int] = {}   # (service, shape) -> cluster id, for id-linked lines
        self._scoped: dict[tuple[str, int], _Template] = {}

    def _miner(self, service: str) -> TemplateMiner:
        if service not in self._miners:
            config = TemplateMinerConfig()
            config.profiling_enabled = False
            config.parametrize_numeric_tokens = True
            self._miners[service] = TemplateMiner(config=config)
        return self._miners[service]

    def learn(self, service: str, message: str, trace_id: str, time_ns: int) -> None:
        """A line of ``service`` tied to ``trace_id`` by an id: its template is request-scoped."""
        text = shape(message)
        if not text:
            return
        cluster = self._shapes.get((service, text))
        if cluster is None:
            cluster = self._miner(service).add_log_message(text)["cluster_id"]
            self._shapes[(service, text)] = cluster
        template = self._scoped.setdefault((service, cluster), _Template())
        if len(template.samples) < SAMPLES_PER_TEMPLATE:
            template.samples.append((trace_id, time_ns))
            template.placed = False

    def scoped(self, service: str, message: str) -> _Template | None:
        """The request-scoped template the message is a line of, or None: a background line."""
        text = shape(message)
        cluster = self._shapes.get((service, text))
        if cluster is None:
            miner = self._miners.get(service)
            if miner is None or not text:
                return None
            match = miner.match(text, full_search_strategy="fallback")
            if match is None:
                return None
            cluster = match.cluster_id
        return self._scoped.get((service, cluster))

    def anchor(self, service: str, template: _Template,
               rows_of: Callable[[str], list[SpanRow]]) -> Anchor | None:
        """The template's anchor, reading its samples' spans with ``rows_of`` (trace id -> rows) once."""
        if not template.placed:
            offsets = []
            for trace_id, time_ns in template.samples:
                span = _innermost(rows_of(trace_id), service, time_ns)
                if span is not None:
                    offsets.append((time_ns - span.start_ns, span.end_ns - time_ns, span.end_ns - span.start_ns))
            template.anchor = anchor_of(offsets)
            template.placed = True
        return template.anchor


def _innermost(rows: list[SpanRow], service: str, time_ns: int) -> SpanRow | None:
    holding = [r for r in rows if r.service == service and r.kind in ("server", "consumer")
               and r.start_ns - LATE_NS <= time_ns <= r.end_ns + LATE_NS]
    return min(holding, key=lambda r: r.end_ns - r.start_ns, default=None)
