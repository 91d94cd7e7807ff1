"""The data payscope stores and reasons about: spans, log records, trace summaries."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any

Attributes = dict[str, Any]

SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


class _Timed:
    """What a span's times and status say, for both forms of a span."""

    __slots__ = ()
    start_ns: int
    end_ns: int
    status_code: int

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def is_error(self) -> bool:
        return self.status_code == STATUS_ERROR


@dataclass(slots=True)
class Span(_Timed):
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
    uid: str = ""  # set when the record is read, before linking changes its trace id (see log_identity)

    def identity(self) -> str:
        """What makes this record one record: the same line ingested twice is one, and two that differ in
        time, service, host, source, the trace and span ids they carried, or text, are two."""
        if not self.uid:
            digest = hashlib.blake2b("\x1f".join((self.message, self.host, self.trace_id or "",
                                                  self.span_id or "")).encode("utf-8", "replace"),
                                     digest_size=12).hexdigest()
            self.uid = f"{self.time_ns}|{self.service}|{self.source}|{digest}"
        return self.uid

    def is_twin_of(self, sent: LogRecord) -> bool:
        """Whether this line of a log file and ``sent``, a record that came over OTLP, are one log event
        that arrived two ways: the same service, the sent body inside the line (a file adds a prefix and
        ids), the same trace and span ids when both carry them, and the same time to the file's
        precision (a second when the ids agree, else 2 ms)."""
        if self.service != sent.service or not sent.message or sent.message not in self.message:
            return False
        if self.trace_id and sent.trace_id:
            if self.trace_id != sent.trace_id or (self.span_id and sent.span_id and self.span_id != sent.span_id):
                return False
            return abs(self.time_ns - sent.time_ns) <= 1_000_000_000
        return abs(self.time_ns - sent.time_ns) <= 2_000_000


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


@dataclass(slots=True)
class SpanRow(_Timed):
    """What the analysis reads of a span: identity, timing, and the facts derived from its attributes.

    The store computes these once, when the span is written, so that an analysis over millions of
    spans never decodes raw attributes.
    """

    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    error_class: str | None       # timeout | connection | http_5xx | business | None
    operation: str                # route (server) or method + templated path / RPC (client)
    peer: str | None              # the callee a client span names (peer.service, server.address, url host)
    method: str | None
    http_status: int | None
    attempt: int                  # http.request.resend_count
    idempotency_key: bool
    timeout_connect_ms: float | None = None
    timeout_read_ms: float | None = None
    timeout_total_ms: float | None = None
    timeout_source: str | None = None
    retry_max: int | None = None
    amount: float | None = None
    keys: tuple[str, ...] = ()    # business keys: order, payment, charge ids
    caller_budget_ms: float | None = None  # server spans: how long the caller said it would wait
    fault: str | None = None      # a fault the sidecar injected into this request (delay, abort, reset)


row_fields = attrgetter(*(f.name for f in fields(SpanRow)))  # a row as a plain tuple: SpanRow(*row_fields(r))


@dataclass(slots=True)
class EncodedSpan:
    """A span ready to store: its derived facts, its OTLP protobuf body, and its resource."""

    row: SpanRow
    body: bytes
    resource: Attributes
