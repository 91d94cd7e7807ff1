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
    text_may_need_redaction,
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


def redact_log(record: LogRecord, line_clean: bool = False) -> LogRecord:
    """``record`` with its message, service, host, source and attributes masked. With ``line_clean``, the line
    its host and attributes were cut from needs no masking (``text_may_need_redaction``), and its service and
    source were masked already: only its message (which a parser may have put together), secret keys and
    numbers are looked at."""
    record.message = redact_text(record.message)
    if not line_clean:
        record.service = redact_text(record.service)
        record.host = redact_text(record.host)
        record.source = redact_text(record.source)
    record.attributes = redact_attributes(record.attributes, line_clean)
    return record


__all__ = ["REDACTED", "is_card_number", "is_secret_key", "luhn_valid", "may_need_redaction", "redact_any",
           "redact_attributes", "redact_log", "redact_span", "redact_text", "text_may_need_redaction"]
