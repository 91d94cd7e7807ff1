"""Redaction, shared with the instrumentation that masks the same secrets before they leave a service."""

from payscope.instrumentation.redaction import (
    REDACTED,
    is_secret_key,
    luhn_valid,
    may_need_redaction,
    redact_attributes,
    redact_text,
    redact_value,
)

__all__ = ["REDACTED", "is_secret_key", "luhn_valid", "may_need_redaction", "redact_attributes", "redact_text",
           "redact_value"]
