"""Durations and instants as the command line writes them (``90s``, ``15m``, ``1h``, ISO 8601)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from payscope.errors import InputError

_UNITS = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration_s(text: str, option: str = "duration") -> float:
    """Seconds in ``text`` such as ``1h`` or ``250ms``."""
    match = _DURATION.match(text)
    if not match:
        raise InputError(f"{option} {text!r} is not a duration such as 30s, 15m, 1h or 2d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_instant_ns(text: str, option: str = "time") -> int:
    """Nanoseconds since the epoch for an ISO 8601 time (UTC when it names no zone)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{option} {text!r} is not an ISO 8601 time such as 2026-11-25T10:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1e9)


def parse_window(text: str, option: str = "window") -> tuple[int, int]:
    """FROM..TO, each an RFC 3339 time or Unix seconds, as nanoseconds [from, to)."""
    if ".." not in text:
        raise InputError(f"{option} {text!r} is not FROM..TO (2022-08-22T05:53:00Z..2022-08-22T05:54:00Z)")
    ends = []
    for part in text.split("..", 1):
        part = part.strip()
        try:
            ends.append(int(float(part) * 1e9))
        except ValueError:
            ends.append(parse_instant_ns(part, option))
    if ends[1] <= ends[0]:
        raise InputError(f"{option} {text!r} ends before it starts")
    return ends[0], ends[1]


def parse_since_ns(text: str, now_ns: int, option: str = "--since") -> int:
    """A moment given as a duration back from ``now_ns`` (30m, 1h, 2d) or as an ISO 8601 time."""
    if _DURATION.match(text):
        return now_ns - int(parse_duration_s(text, option) * 1e9)
    try:
        return parse_instant_ns(text, option)
    except InputError:
        raise InputError(f"{option} {text!r} is neither a duration such as 30m, 1h or 2d nor an ISO 8601 time "
                         "such as 2026-11-25T10:00:00Z") from None


def start_window(since: str | None, until: str | None, now_ns: int) -> tuple[int | None, int | None] | None:
    """The window of trace start times ``--since`` and ``--until`` name at ``now_ns`` (None: every trace)."""
    if since is None and until is None:
        return None
    lo = parse_since_ns(since, now_ns, "--since") if since else None
    hi = parse_since_ns(until, now_ns, "--until") if until else None
    if lo is not None and hi is not None and lo >= hi:
        raise InputError(f"--since {since} is not before --until {until}: no trace can have started between")
    return lo, hi


def format_ns(ns: int) -> str:
    """An ISO 8601 UTC time with milliseconds."""
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")


def format_duration_ns(ns: int) -> str:
    return format_ms(ns / 1e6)


def format_ms(ms: float | None) -> str:
    """A duration in milliseconds as people read it: 4.5ms, 400ms, 1.25s, 12.0s; ``-`` when unknown."""
    if ms is None:
        return "-"
    if ms >= 10_000:
        return f"{ms / 1000:.1f}s"
    if ms >= 1000:
        return f"{ms / 1000:.2f}s"
    if ms >= 10:
        return f"{ms:.0f}ms"
    return f"{ms:.1f}ms"
