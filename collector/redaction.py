"""Redaction in storage: the rules the instrumentation applies in the service, applied to every span and
log record that reaches the collector, from any SDK, importer or log file."""

from __future__ import annotations

from payscope.instrumentation.redaction import (
    REDACTED,
    is_card_number,
    is_secret_key,
    luhn_valid,
    may_need_redaction,
    redact_any,
    redact_attributes,
    redact_text,
)
from payscope.model import LogRecord, Span


def redact_span(span: Span) -> Span:
    """``span`` with every string it carries masked: names, status, attributes, events and resource."""
    span.service = redact_text(span.service)
    span.name = redact_text(span.name)
    span.status_message = redact_text(span.status_message)
    span.attributes = redact_attributes(span.attributes)
    for event in span.events:
        event["name"] = redact_text(str(event.get("name", "")))
        event["attributes"] = redact_attributes(event.get("attributes") or {})
    span.resource = redact_attributes(span.resource)
    return span


def redact_log(record: LogRecord) -> LogRecord:
    """``record`` with its message, service, host, source and attributes masked."""
    record.message = redact_text(record.message)
    record.service = redact_text(record.service)
    record.host = redact_text(record.host)
    record.source = redact_text(record.source)
    record.attributes = redact_attributes(record.attributes)
    return record


__all__ = ["REDACTED", "is_card_number", "is_secret_key", "luhn_valid", "may_need_redaction", "redact_any",
           "redact_attributes", "redact_log", "redact_span", "redact_text"]
