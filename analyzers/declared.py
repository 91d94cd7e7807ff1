"""Timeouts declared in ingested configs, as the store keeps them."""

from __future__ import annotations

import json

from payscope.collector.store import Store

from .engine import EdgeKey, TimeoutValue

META_KEY = "declared_timeouts"


def declared_timeouts(store: Store) -> dict[EdgeKey, TimeoutValue]:
    """Per (caller, callee, operation) the timeout a config declares; operation ``*`` matches any."""
    raw = store.get_meta(META_KEY)
    if not raw:
        return {}
    out: dict[EdgeKey, TimeoutValue] = {}
    for item in json.loads(raw):
        if item["caller"] == "*" or item.get("timeout_ms") is None:
            continue  # a server's own worker timeout is not a caller's timeout
        key = (item["caller"], item["callee"], item.get("operation") or "*")
        out[key] = TimeoutValue(item["timeout_ms"], "declared", {
            "file": item.get("file", ""), "where": item.get("where", ""),
            "connect_ms": item.get("connect_ms"), "retries": item.get("retries")})
    return out
