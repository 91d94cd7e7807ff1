"""Reading trace files: OTLP JSON (file exporter), Jaeger JSON and Zipkin v2 JSON."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from payscope.errors import InputError
from payscope.model import STATUS_ERROR, STATUS_OK, STATUS_UNSET, EncodedSpan, LogRecord, Span

from .files import check_gzip
from .otlp import logs_from_request, parse_json_message, spans_from_request
from .redaction import redact_span
from .store.codec import encode_span

FORMATS = ("otlp", "jaeger", "zipkin")


@dataclass
class ImportReport:
    """What one file gave: its format, what was read and what could not be."""

    path: str
    format: str = ""
    spans: int = 0
    logs: int = 0
    new_spans: int = 0
    rejected: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, where: str, reason: str) -> None:
        self.rejected += 1
        if len(self.problems) < 10:
            self.problems.append(f"{where}: {reason}")


@dataclass
class Batch:
    spans: list[EncodedSpan] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    bytes_read: int = 0


def open_text(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when it is gzip (by its magic number, not its name)."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        raw.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return raw


_HEX = frozenset("0123456789abcdefABCDEF")


def _hex_id(value: Any, widths: tuple[int, ...], what: str, where: str) -> str:
    """A trace or span id as the format writes it: a string of hex digits of one of ``widths``."""
    if not isinstance(value, str) or not value or not set(value) <= _HEX or len(value) not in widths:
        raise InputError(f"{where}: {what} {value!r} is not {' or '.join(map(str, widths))} hex digits")
    return value


def _integer(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: {what} {value!r} is not a whole number")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{where}: {what} {value!r} is not a whole number") from None


def detect_format(document: Any) -> str:
    if isinstance(document, dict):
        if "resourceSpans" in document or "resource_spans" in document or "resourceLogs" in document \
                or "resourceMetrics" in document:
            return "otlp"
        if isinstance(document.get("data"), list):
            return "jaeger"
        if "traceID" in document and "spans" in document:
            return "jaeger"
    if isinstance(document, list):
        if not document:
            return "zipkin"
        head = document[0]
        if isinstance(head, dict) and "traceId" in head and ("id" in head or "localEndpoint" in head):
            return "zipkin"
        if isinstance(head, list):
            return "zipkin"
    raise InputError("not a trace file payscope knows: expected OTLP JSON, Jaeger JSON or Zipkin v2 JSON")


# --- OTLP JSON --------------------------------------------------------------

def _otlp_document(doc: dict[str, Any], where: str, report: ImportReport) -> Batch:
    batch = Batch()
    if "resourceSpans" in doc or "resource_spans" in doc:
        spans_doc = {k: v for k, v in doc.items() if k in ("resourceSpans", "resource_spans")}
        decoded = spans_from_request(parse_json_message(spans_doc, ExportTraceServiceRequest))
        batch.spans = decoded.spans
        for reason in decoded.reasons:
            report.problem(where, reason)
        report.rejected += decoded.rejected - len(decoded.reasons)
    if "resourceLogs" in doc or "resource_logs" in doc:
        logs_doc = {k: v for k, v in doc.items() if k in ("resourceLogs", "resource_logs")}
        batch.logs = logs_from_request(parse_json_message(logs_doc, ExportLogsServiceRequest)).logs
    return batch


# --- Jaeger JSON ------------------------------------------------------------

def _tag_value(tag: dict[str, Any]) -> Any:
    value = tag.get("value")
    kind = str(tag.get("type", "")).lower()
    if kind in ("int64", "int") and value is not None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return value
    if kind in ("float64", "float") and value is not None:
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            return value
    if kind == "bool" and isinstance(value, str):
        return value.lower() == "true"
    return value


def _status_from_tags(tags: dict[str, Any]) -> tuple[int, str]:
    code = str(tags.pop("otel.status_code", "")).upper()
    message = str(tags.pop("otel.status_description", "") or "")
    error = tags.pop("error", None)
    if code == "ERROR" or error in (True, "true", "True", "1"):
        return STATUS_ERROR, message or (str(error) if error not in (True, "true", "True", "1") else "")
    if code == "OK":
        return STATUS_OK, message
    return STATUS_UNSET, message


def _norm_id(value: Any, width: int) -> str:
    text = str(value or "").lower().strip()
    return text.rjust(width, "0") if text else ""


def _jaeger_tags(value: Any, where: str) -> dict[str, Any]:
    """Jaeger's ``[{"key": ..., "type": ..., "value": ...}]`` as a dict."""
    if not value:
        return {}
    if not isinstance(value, list) or not all(isinstance(t, dict) and isinstance(t.get("key"), str) for t in value):
        raise InputError(f"{where}: tags are not a list of {{key, value}} objects")
    return {t["key"]: _tag_value(t) for t in value}


def _jaeger_trace(trace: Any, where: str, report: ImportReport) -> list[Span]:
    if not isinstance(trace, dict):
        raise InputError(f"{where}: a trace is {type(trace).__name__}, not an object")
    spans = trace.get("spans") or []
    if not isinstance(spans, list):
        raise InputError(f"{where}: spans is {type(spans).__name__}, not a list")
    processes = trace.get("processes") or {}
    if not isinstance(processes, dict):
        raise InputError(f"{where}: processes is {type(processes).__name__}, not an object")
    out = []
    for i, raw in enumerate(spans):
        at = f"{where} span {i}"
        try:
            out.append(_jaeger_span(raw, processes, at))
        except InputError as exc:
            report.problem(at, str(exc).removeprefix(f"{at}: "))
    return out


def _jaeger_span(raw: Any, processes: dict[Any, Any], at: str) -> Span:
    if not isinstance(raw, dict):
        raise InputError(f"{at}: {type(raw).__name__}, not an object")
    _hex_id(raw.get("traceID"), tuple(range(1, 33)), "traceID", at)
    _hex_id(raw.get("spanID"), tuple(range(1, 17)), "spanID", at)
    if "startTime" not in raw:
        raise InputError(f"{at}: no startTime")
    start_us = _integer(raw["startTime"], "startTime", at)
    duration_us = _integer(raw.get("duration", 0), "duration", at)
    proc = processes.get(raw.get("processID"), raw.get("process") or {})
    if not isinstance(proc, dict):
        raise InputError(f"{at}: its process is {type(proc).__name__}, not an object")
    resource = _jaeger_tags(proc.get("tags"), at)
    resource["service.name"] = str(proc.get("serviceName", "unknown_service"))
    tags = _jaeger_tags(raw.get("tags"), at)
    kind = str(tags.pop("span.kind", "internal")).lower()
    status, message = _status_from_tags(tags)
    parent = None
    for ref in raw.get("references") or []:
        if isinstance(ref, dict) and ref.get("refType", "CHILD_OF") == "CHILD_OF":
            parent = _norm_id(_hex_id(ref.get("spanID"), tuple(range(1, 17)), "reference spanID", at), 16)
            break
    start_ns = start_us * 1000
    logs = raw.get("logs") or []
    if not isinstance(logs, list) or not all(isinstance(lg, dict) for lg in logs):
        raise InputError(f"{at}: logs are not a list of objects")
    events = []
    for lg in logs:
        fields = _jaeger_tags(lg.get("fields"), at)
        events.append({"name": str(fields.get("event", "log")),
                       "time_ns": _integer(lg.get("timestamp", 0), "log timestamp", at) * 1000,
                       "attributes": fields})
    return _checked(Span(
        _norm_id(raw.get("traceID"), 32), _norm_id(raw.get("spanID"), 16), parent,
        resource["service.name"], str(raw.get("operationName", "")),
        kind if kind in ("server", "client", "producer", "consumer", "internal") else "internal",
        start_ns, start_ns + duration_us * 1000, status, message, tags, events, resource), at)


# --- Zipkin v2 --------------------------------------------------------------

def _zipkin_span(raw: dict[str, Any], where: str) -> Span:
    _hex_id(raw.get("traceId"), (16, 32), "traceId", where)
    _hex_id(raw.get("id"), (16,), "id", where)
    if raw.get("parentId") is not None:
        _hex_id(raw.get("parentId"), (16,), "parentId", where)
    if "timestamp" not in raw:
        raise InputError(f"{where}: no timestamp")
    timestamp = _integer(raw["timestamp"], "timestamp", where)
    duration = _integer(raw.get("duration") or 0, "duration", where)
    if not isinstance(raw.get("tags") or {}, dict):
        raise InputError(f"{where}: tags is not an object")
    tags = dict(raw.get("tags") or {})
    local = raw.get("localEndpoint") or {}
    remote = raw.get("remoteEndpoint") or {}
    annotations = raw.get("annotations") or []
    if not isinstance(local, dict) or not isinstance(remote, dict):
        raise InputError(f"{where}: localEndpoint and remoteEndpoint must be objects")
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise InputError(f"{where}: annotations are not a list of objects")
    service = local.get("serviceName") or "unknown_service"
    if remote.get("serviceName"):
        tags.setdefault("peer.service", remote["serviceName"])
    if remote.get("ipv4") or remote.get("ipv6"):
        tags.setdefault("server.address", remote.get("ipv4") or remote.get("ipv6"))
    if remote.get("port"):
        tags.setdefault("server.port", remote["port"])
    if "http.status_code" in tags:
        try:
            tags["http.status_code"] = int(tags["http.status_code"])
        except (TypeError, ValueError):
            pass
    status, message = _status_from_tags(tags)
    if status == STATUS_ERROR and not message:
        message = str(raw.get("tags", {}).get("error", ""))
    start_ns = timestamp * 1000
    kind = str(raw.get("kind", "")).lower() or "internal"
    events = [{"name": str(a.get("value", "")), "time_ns": _integer(a.get("timestamp", 0), "annotation timestamp",
                                                                    where) * 1000, "attributes": {}}
              for a in annotations]
    return _checked(Span(_norm_id(raw.get("traceId"), 32), _norm_id(raw.get("id"), 16),
                         _norm_id(raw.get("parentId"), 16) or None, str(service), str(raw.get("name", "") or ""),
                         kind, start_ns, start_ns + duration * 1000, status, message, tags, events,
                         {"service.name": str(service)}), where)


_MAX_NS = 2**63 - 1  # what a signed 64-bit store column holds: the year 2262


def _checked(span: Span, where: str) -> Span:
    """A span whose times fit the store, masked; InputError naming what is wrong otherwise."""
    if span.start_ns < 0 or span.end_ns > _MAX_NS:
        raise InputError(f"{where}: its time is before 1970 or past the year 2262")
    if span.end_ns < span.start_ns:
        raise InputError(f"{where}: it ends before it starts")
    for event in span.events:
        if not 0 <= event["time_ns"] <= _MAX_NS:
            raise InputError(f"{where}: an event's time is before 1970 or past the year 2262")
    return redact_span(span)


def _zipkin_document(doc: list[Any], where: str, report: ImportReport) -> list[Span]:
    items: list[Any] = []
    for entry in doc:
        items.extend(entry if isinstance(entry, list) else [entry])
    out = []
    for i, raw in enumerate(items):
        at = f"{where} span {i}"
        try:
            if not isinstance(raw, dict):
                raise InputError(f"{at}: {type(raw).__name__}, not an object")
            out.append(_zipkin_span(raw, at))
        except InputError as exc:
            report.problem(at, str(exc).removeprefix(f"{at}: "))
    return out


def _shared_span_merge(spans: list[Span]) -> list[Span]:
    """Zipkin may log a client and server half under one span id: keep both as parent and child."""
    seen: dict[tuple[str, str], Span] = {}
    out = []
    for span in spans:
        key = (span.trace_id, span.span_id)
        other = seen.get(key)
        if other is None:
            seen[key] = span
            out.append(span)
            continue
        # Same id twice: the server half becomes a child of the client half.
        if span.kind == "server":
            span.parent_id = other.span_id
            span.span_id = format((int(span.span_id, 16) ^ 0x5A5A5A5A5A5A5A5A) or 1, "016x")
            out.append(span)
        elif other.kind == "server":
            other.parent_id = span.span_id
            other.span_id = format((int(other.span_id, 16) ^ 0x5A5A5A5A5A5A5A5A) or 1, "016x")
            out.append(span)
    return out


def _document_batch(doc: Any, fmt: str, where: str, report: ImportReport) -> Batch:
    if fmt == "otlp":
        return _otlp_document(doc, where, report)
    # A document whose shape is wrong is refused whole; a bad span in a good document is skipped and reported.
    if fmt == "jaeger":
        traces = doc.get("data") if isinstance(doc.get("data"), list) else [doc]
        spans = [s for i, t in enumerate(traces) for s in _jaeger_trace(t, f"{where} trace {i}", report)]
    else:
        spans = _shared_span_merge(_zipkin_document(doc, where, report))
    batch = Batch()
    for span in spans:
        try:
            batch.spans.append(encode_span(span))
        except (ValueError, TypeError, OverflowError) as exc:  # a value protobuf cannot hold
            report.problem(f"{where} span {span.span_id}", f"a value cannot be stored ({exc})")
    return batch


def read_trace_file(path: Path, report: ImportReport,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[Batch]:
    """Batches of spans (and logs) from one file. A bad line of OTLP JSON lines is reported and the rest read;
    a bad Jaeger or Zipkin document, or a corrupt gzip, is refused whole (InputError) before anything is read."""
    check_gzip(path)
    stream = open_text(path)
    try:
        first = stream.readline()
        while first and not first.strip():
            first = stream.readline()
        if not first:
            raise InputError(f"{path} is empty")
        try:
            head = json.loads(first)
        except ValueError:
            head = None
        if isinstance(head, dict) and detect_format(head) == "otlp":
            report.format = "otlp"
            lineno = 1
            line: bytes | None = first
            while line:
                if line.strip():
                    try:
                        batch = _otlp_document(json.loads(line), f"{path}:{lineno}", report)
                    except (ValueError, InputError) as exc:
                        report.problem(f"{path}:{lineno}", str(exc).splitlines()[0][:200])
                    else:
                        batch.bytes_read = len(line)
                        yield batch
                if on_progress:
                    on_progress(len(line))
                line = stream.readline()
                lineno += 1
            return
        rest = stream.read()
        text = first + rest
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path} is not JSON: {exc}") from None
        try:
            report.format = detect_format(document)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        batch = _document_batch(document, report.format, str(path), report)
        batch.bytes_read = len(text)
        if on_progress:
            on_progress(len(text))
        yield batch
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        report.problem(str(path), f"file is truncated or corrupt ({exc}); what came before was kept")
    finally:
        stream.close()


def file_size(path: Path) -> int:
    """Bytes of the file as read (uncompressed size for gzip when it is cheap to know)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    with path.open("rb") as f:
        if f.read(2) == b"\x1f\x8b":
            f.seek(-4, io.SEEK_END)
            return int.from_bytes(f.read(4), "little") or size
    return size
