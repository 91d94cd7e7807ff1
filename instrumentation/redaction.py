"""Keep card numbers, CVVs and credentials out of telemetry: in the service and again in storage."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"

# Attribute keys whose values are secrets whatever they hold.
_SECRET_KEY = re.compile(
    r"(authorization|cookie|set-cookie|proxy-authorization|x-api-key|api[_-]?key|password|passwd|secret|"
    r"\bcvv|\bcvc|cvv2|cvc2|card[_.-]?verification|security[_.-]?code|\bpan\b|card[_.-]?number|"
    r"idempotency[_-]key$)",
    re.IGNORECASE,
)
# A run of 13-19 digits, optionally split by single spaces or dashes, as card numbers are written.
_DIGIT_RUN = re.compile(r"(?<![\d])(?:\d[ -]?){12,18}\d(?![\d])")
# "cvv": "123", cvc=123, "card_cvv":"1234" inside free text (JSON bodies, query strings, log lines).
_CVV_TEXT = re.compile(
    r"""(?i)(["']?\b(?:card[_.-]?)?(?:cvv2?|cvc2?|security[_.-]?code)["']?\s*[:=]\s*["']?)(\d{3,4})""")
_AUTH_TEXT = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer |basic )?[^\s\"',;]+")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_pan(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return REDACTED
    return match.group(0)


_MAYBE_PAN = re.compile(r"\d[\d -]{11,}\d")


def redact_text(text: str) -> str:
    """``text`` with Luhn-valid card numbers, CVV values and Authorization values masked."""
    if not text:
        return text
    if _MAYBE_PAN.search(text):
        text = _DIGIT_RUN.sub(_mask_pan, text)
    lowered = text.lower()
    if ("cv" in lowered or "security" in lowered) and _CVV_TEXT.search(text):
        text = _CVV_TEXT.sub(lambda m: m.group(1) + REDACTED, text)
    if "authorization" in lowered:
        text = _AUTH_TEXT.sub(lambda m: m.group(1) + REDACTED, text)
    return text


# Anything in a raw request that could need masking; a request without any is stored as it came.
_SUSPECT_DIGITS = re.compile(rb"[0-9][0-9 -]{11,}[0-9]")
_SUSPECT_WORDS = (b"authorization", b"cookie", b"cvv", b"cvc", b"security", b"password", b"passwd", b"secret",
                  b"api_key", b"api-key", b"apikey", b"card", b"idempotency")
_secret_keys: dict[str, bool] = {}


def is_secret_key(key: str) -> bool:
    """Whether an attribute key names a secret (cached: the same few hundred keys come back all day)."""
    known = _secret_keys.get(key)
    if known is None:
        known = bool(_SECRET_KEY.search(key))
        if len(_secret_keys) < 100_000:
            _secret_keys[key] = known
    return known


def may_need_redaction(raw: bytes) -> bool:
    """False when a serialized request holds nothing redaction could act on (one scan of its bytes)."""
    if _SUSPECT_DIGITS.search(raw) is not None:
        return True
    lowered = raw.lower()
    return any(word in lowered for word in _SUSPECT_WORDS)


def redact_value(key: str, value: Any) -> Any:
    if is_secret_key(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10**12:
        return REDACTED if redact_text(str(value)) == REDACTED else value
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    if isinstance(value, dict):
        return redact_attributes(value)
    return value


def redact_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``attrs`` that is safe to store (keys kept, secret values masked)."""
    return {k: redact_value(k, v) for k, v in attrs.items()}
