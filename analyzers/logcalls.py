"""Proxy access-log lines as calls: a gateway with no spans (nginx, Envoy) still shows up as an edge."""

from __future__ import annotations

from typing import Any

from payscope.model import LogRecord
from payscope.semconv import template_path

from .calls import Call


def _seconds(value: Any) -> list[float]:
    """nginx writes one time per upstream try: ``0.300, 0.101``."""
    out = []
    for part in str(value).replace(":", ",").split(","):
        part = part.strip()
        try:
            out.append(float(part))
        except ValueError:
            continue
    return out


def log_calls(records: list[LogRecord], entry_of: Any) -> list[Call]:
    """One call per upstream try in each proxy access-log record.

    ``entry_of(trace_id)`` gives the (service, start_ns, end_ns, ok, span id) of the request the proxy
    passed on, when the line is linked to a trace.
    """
    calls = []
    for index, rec in enumerate(records):
        a = rec.attributes
        if "upstream_response_time" in a:
            tries = _seconds(a["upstream_response_time"])
        elif "upstream_time" in a or "duration" in a:  # Envoy writes milliseconds
            tries = [v / 1000 for v in _seconds(a.get("upstream_time") or a.get("duration"))]
        else:
            continue
        if not tries:
            continue
        status = int(a.get("status") or 0)
        timed_out = a.get("event") == "upstream_timeout"
        entry = entry_of(rec.trace_id) if rec.trace_id else None
        callee = entry[0] if entry else str(a.get("callee") or a.get("upstream_addr") or "(upstream)")
        operation = f"{a.get('method', '')} {template_path(str(a.get('path', '/')))}".strip()
        end_ns = rec.time_ns
        trace_id = rec.trace_id or f"log:{rec.source}"
        for attempt, seconds in enumerate(reversed(tries)):  # the last try ended when the line was written
            start_ns = end_ns - int(seconds * 1e9)
            last = attempt == 0
            error = None
            if timed_out and last:
                error = "timeout"
            elif not last or status >= 500:
                error = "http_5xx"
            calls.append(Call(
                trace_id=trace_id, span_id=f"log{index}.{attempt}", parent_id=f"log{index}", caller=rec.service,
                callee=callee, operation=operation, method=str(a.get("method") or "") or None,
                start_ns=start_ns, end_ns=end_ns, error_class=error,
                attempt=len(tries) - 1 - attempt, http_status=None if error == "timeout" else status or None,
                server_service=entry[0] if entry and last else None,
                server_start_ns=entry[1] if entry and last else None,
                server_end_ns=entry[2] if entry and last else None,
                server_ok=entry[3] if entry and last else None,
                answered_by=entry[4] if entry and last else None))
            end_ns = start_ns
    return calls
