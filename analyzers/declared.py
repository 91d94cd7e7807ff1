"""Timeouts declared in ingested configs, as the store keeps them."""

from __future__ import annotations

import json
from typing import Any

from .engine import EdgeKey, TimeoutValue

META_KEY = "declared_timeouts"


def declared_timeouts(store: Any) -> dict[EdgeKey, TimeoutValue]:
    raw = store.get_meta(META_KEY)
    if not raw:
        return {}
    out: dict[EdgeKey, TimeoutValue] = {}
    for item in json.loads(raw):
        key = (item["caller"], item["callee"], item.get("operation") or "*")
        out[key] = TimeoutValue(item["timeout_ms"], "declared", {"file": item.get("file", "")})
    return out
