"""Trace and span ids in the log lines a service already writes (stdlib logging, loguru, structlog)."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

_patched = False


def _ids() -> tuple[str, str] | None:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _with_ids(text: str, ids: tuple[str, str]) -> str:
    trace_id, span_id = ids
    stripped = text.rstrip()
    if stripped.startswith("{") and stripped.endswith("}") and '"trace_id"' not in stripped:
        # a JSON line stays a JSON line
        body = stripped[:-1].rstrip()
        sep = "" if body.endswith("{") else ","
        return f'{body}{sep}"trace_id":"{trace_id}","span_id":"{span_id}"}}' + text[len(stripped):]
    if "trace_id=" in text:
        return text
    first, nl, rest = text.partition("\n")  # keep tracebacks below the line that names the trace
    return f"{first} trace_id={trace_id} span_id={span_id}{nl}{rest}"


def install() -> None:
    """Append ``trace_id=... span_id=...`` to every formatted record written inside a span."""
    global _patched
    if _patched:
        return
    _patched = True
    # At the handler, not the formatter: services subclass Formatter and override format().
    original = logging.Handler.format

    def format_with_ids(self: logging.Handler, record: logging.LogRecord) -> str:
        text = original(self, record)
        try:
            ids = _ids()
            return _with_ids(text, ids) if ids else text
        except Exception:
            return text

    logging.Handler.format = format_with_ids  # type: ignore[method-assign]
    _install_loguru()
    _install_structlog()


def _install_loguru() -> None:
    try:
        from loguru import logger
    except ImportError:
        return

    def patch(record: Any) -> None:
        ids = _ids()
        if ids:
            record["extra"].setdefault("trace_id", ids[0])
            record["extra"].setdefault("span_id", ids[1])
            record["message"] = _with_ids(record["message"], ids)

    logger.configure(patcher=patch)


def _install_structlog() -> None:
    try:
        import structlog
    except ImportError:
        return

    def add_ids(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        ids = _ids()
        if ids:
            event_dict.setdefault("trace_id", ids[0])
            event_dict.setdefault("span_id", ids[1])
        return event_dict

    config = structlog.get_config()
    processors = list(config.get("processors", []))
    if add_ids not in processors:
        structlog.configure(processors=[add_ids, *processors])
