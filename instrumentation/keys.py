"""Business keys (order id, payment id, amount) from what a request carries: query parameters, headers
and JSON body fields.

Names are matched loosely: ``order_id``, ``orderId``, ``order-id``, ``X-Order-Id`` and ``OrderID`` are
one name; a field inside a JSON object is named by its dotted path (``order.id``). More names come
from ``PAYSCOPE_KEY_FIELDS`` (``basket=order_id,txn.ref=payment_id``), which `payscope run` also
fills from the ``[keys]`` table of ``payscope.toml``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from typing import Any

CANONICAL = ("order_id", "payment_id", "amount")
_DEFAULTS = {
    "order_id": "order_id", "order.id": "order_id", "x-order-id": "order_id",
    "payment_id": "payment_id", "payment.id": "payment_id", "x-payment-id": "payment_id",
    "amount": "amount", "amount.value": "amount",
}
MAX_BODY = 64 * 1024
_SEPARATORS = re.compile(r"[_\-\s]")


@functools.lru_cache(maxsize=4096)
def normalise(name: str) -> str:
    """One spelling for a field name: lower case, no separators, no ``x-`` header prefix."""
    name = name.lower()
    if name.startswith("x-"):
        name = name[2:]
    return ".".join(_SEPARATORS.sub("", part) for part in name.split("."))


def key_names(spec: str | None = None) -> dict[str, str]:
    """Normalised field name -> canonical key, the defaults plus ``PAYSCOPE_KEY_FIELDS``."""
    names = {normalise(k): v for k, v in _DEFAULTS.items()}
    spec = os.environ.get("PAYSCOPE_KEY_FIELDS", "") if spec is None else spec
    for item in spec.split(","):
        name, _, canonical = item.strip().partition("=")
        if name.strip():
            names[normalise(name.strip())] = canonical.strip() or "order_id"
    return names


def from_pairs(pairs: Iterable[tuple[str, Any]], names: dict[str, str]) -> dict[str, str]:
    """Keys among name/value pairs (query parameters, headers); the first value of a key wins."""
    found: dict[str, str] = {}
    for name, value in pairs:
        canonical = names.get(normalise(name))
        if canonical and canonical not in found and value not in (None, ""):
            found[canonical] = str(value)
    return found


def from_json(body: bytes, names: dict[str, str]) -> dict[str, str]:
    """Keys among the scalar fields of a JSON object (nested objects by dotted path, three levels)."""
    if not body or len(body) > MAX_BODY or body.lstrip()[:1] != b"{":
        return {}
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return from_pairs(_flatten(document, "", 0), names)


def _flatten(value: Any, prefix: str, depth: int) -> Iterable[tuple[str, Any]]:
    if not isinstance(value, dict) or depth > 2:
        return
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, (str, int, float)) and not isinstance(item, bool):
            yield path, item
        elif isinstance(item, dict):
            yield from _flatten(item, f"{path}.", depth + 1)


def is_json(content_type: str | None) -> bool:
    return bool(content_type) and "json" in str(content_type).lower()
