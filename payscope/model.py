"""The data payscope stores and reasons about: spans, log records, trace summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Attributes = dict[str, Any]

SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass(slots=True)
class Span:
    """One operation of one service, as OpenTelemetry defines it (times in ns since epoch)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status_code: int = STATUS_UNSET
    status_message: str = ""
    attributes: Attributes = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    resource: Attributes = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def is_error(self) -> bool:
        return self.status_code == STATUS_ERROR


@dataclass(slots=True)
class LogRecord:
    """One log line, with where it came from and how it was tied to a trace."""

    time_ns: int
    service: str
    message: str
    severity: str = ""
    host: str = ""
    attributes: Attributes = field(default_factory=dict)
    source: str = ""
    trace_id: str | None = None
    span_id: str | None = None
    link_method: str = "none"
    link_confidence: float = 0.0


@dataclass(slots=True)
class TraceSummary:
    """What the store keeps per trace so that failures are listed without reading spans."""

    trace_id: str
    start_ns: int
    end_ns: int
    root_service: str
    root_name: str
    span_count: int
    error_count: int
    services: list[str]
    error_class: str | None = None
    error_service: str | None = None

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns
