"""Settings every demo service reads from its environment."""

from __future__ import annotations

import os


def setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def seconds(name: str, default: float | None) -> float | None:
    """A timeout in seconds from the environment; ``none`` means wait forever."""
    value = os.environ.get(name)
    if value is None:
        return default
    return None if value.lower() == "none" else float(value)


def url(name: str) -> str:
    return os.environ[name].rstrip("/")


def log_path(service: str) -> str:
    return os.path.join(os.environ.get("DEMO_LOG_DIR", "."), f"{service}.log")
