"""The messages TUI workers post when their data is ready, or when reading it failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class FailuresLoaded(Message):
    page: Any  # data.FailurePage


@dataclass
class TransactionLoaded(Message):
    view: dict[str, Any]


@dataclass
class EdgesLoaded(Message):
    document: dict[str, Any]
    latencies: dict[tuple[str, str, str], list[float]]


@dataclass
class CompareLoaded(Message):
    document: dict[str, Any]


def error_line(error: BaseException | None) -> str:
    """One line for a failed read: our own errors say what was wrong; anything else only names its kind,
    since its text or its traceback could carry payment data."""
    from payscope.errors import PayscopeError

    if isinstance(error, PayscopeError):
        return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return f"could not read the store ({type(error).__name__})"
