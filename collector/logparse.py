"""Log files in the formats services and proxies really write, parsed into log records.

Each parser takes one line and returns the fields it found, or None. A file's format is detected
from its first lines (and can be forced); lines that do not start a record (tracebacks, Java stack
traces) are joined to the record before them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

from payscope.errors import InputError

from .files import fix_surrogates, may_hold_surrogates

Fields = dict[str, Any]

_LEVELS = {"trace": "TRACE", "debug": "DEBUG", "info": "INFO", "information": "INFO", "notice": "INFO",
           "warn": "WARN", "warning": "WARN", "error": "ERROR", "err": "ERROR", "crit": "FATAL",
           "critical": "FATAL", "fatal": "FATAL", "alert": "FATAL", "emerg": "FATAL", "panic": "FATAL"}
_HEX_ID = re.compile(r"(?i)\b(?:trace[_.-]?id|traceid|dd\.trace_id|x-b3-traceid)[\"']?\s*[=:]\s*[\"']?"
                     r"([0-9a-f-]{16,36})\b")
_SPAN_ID = re.compile(r"(?i)\b(?:span[_.-]?id|spanid)[\"']?\s*[=:]\s*[\"']?([0-9a-f]{16})\b")
_REQUEST_ID = re.compile(r"(?i)\b(?:x[_-])?request[_-]?id[\"']?\s*[=:]\s*[\"']?([A-Za-z0-9-]{6,64})")
_CONTINUATION = re.compile(r"^(?:\s|Traceback \(|Caused by:|During handling|The above exception|\.\.\. \d+ more|"
                           r"[\w.$]*(?:Exception|Error|Timeout|Interrupt)\b|[\w$]+(?:\.[\w$]+)+:\s)")


def level_of(text: Any) -> str:
    return _LEVELS.get(str(text).strip().lower(), str(text).upper()) if text else ""


# an access log's time (nginx, Apache: 19/Nov/2026:10:00:00 +0000), read without strptime: ten times cheaper
_CLF_TIME = re.compile(r"(\d\d)/([A-Za-z]{3})/(\d{4}):(\d\d):(\d\d):(\d\d)(?: ?([+-]\d\d):?(\d\d))?")
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                       "dec"), 1)}
_OFFSETS: dict[tuple[str, str], timezone] = {}


def _clf_time(found: re.Match[str], tz: tzinfo) -> datetime | None:
    month = _MONTHS.get(found[2].lower())
    if month is None:
        return None
    try:
        zone = _offset(found[7], found[8]) if found[7] else tz
        return datetime(int(found[3]), month, int(found[1]), int(found[4]), int(found[5]), int(found[6]),
                        tzinfo=zone)
    except ValueError:  # 31/Feb, 25:00, +9900
        return None


def _offset(hours: str, minutes: str) -> timezone:
    """The zone of a ``+hh`` ``mm`` offset, made once each (ValueError past a day)."""
    zone = _OFFSETS.get((hours, minutes))
    if zone is None:
        sign = -1 if hours[0] == "-" else 1
        zone = _OFFSETS[(hours, minutes)] = timezone(sign * timedelta(hours=int(hours[1:]), minutes=int(minutes)))
    return zone


def parse_time(text: str, tz: tzinfo) -> datetime | None:
    """Most timestamp spellings logs use; a time without a zone is taken in ``tz``."""
    text = text.strip().strip("[]")
    if text[2:3] == "/" and (clf := _CLF_TIME.fullmatch(text)) is not None:  # an access log's: no ISO try first
        return _clf_time(clf, tz)
    try:  # the common spellings, without the regular expressions below
        quick = datetime.fromisoformat(text)
        return quick if quick.tzinfo else quick.replace(tzinfo=tz)
    except ValueError:
        pass
    if (clf := _CLF_TIME.fullmatch(text)) is not None:
        return _clf_time(clf, tz)
    try:
        if re.fullmatch(r"\d{10}(?:\.\d+)?", text):
            return datetime.fromtimestamp(float(text), tz=timezone.utc)
        if re.fullmatch(r"\d{13}", text):
            return datetime.fromtimestamp(int(text) / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    candidate = text.replace(",", ".").replace("Z", "+00:00")
    candidate = re.sub(r"^(\d{4})/(\d\d)/(\d\d)", r"\1-\2-\3", candidate)
    candidate = re.sub(r" ([+-]\d\d):?(\d\d)$", r"\1:\2", candidate)
    moment: datetime | None
    try:
        moment = datetime.fromisoformat(candidate)
    except ValueError:
        moment = None
        for fmt in ("%d/%b/%Y:%H:%M:%S %z", "%d/%b/%Y:%H:%M:%S"):
            try:
                moment = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        if moment is None:
            return None
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


# --- the formats ------------------------------------------------------------------

_JSON_TIME = ("@timestamp", "timestamp", "time", "ts", "t", "date", "asctime")
_JSON_LEVEL = ("level", "severity", "levelname", "lvl", "log.level")
_JSON_MSG = ("message", "msg", "event", "log")
_JSON_TRACE = ("trace_id", "traceId", "trace.id", "dd.trace_id", "traceid", "otelTraceID", "trace")
_JSON_SPAN = ("span_id", "spanId", "span.id", "dd.span_id", "otelSpanID")
_JSON_REQ = ("request_id", "x_request_id", "requestId", "req_id", "x-request-id")
_JSON_USED = frozenset(_JSON_TIME + _JSON_LEVEL + _JSON_MSG + _JSON_TRACE + _JSON_SPAN + _JSON_REQ)


_PARTS: dict[str, list[str]] = {}  # a dotted name's parts, split once


def _get(doc: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in doc:
            return doc[key]
        if "." in key:  # nested spelling of a dotted name
            parts = _PARTS.get(key) or _PARTS.setdefault(key, key.split("."))
            if parts[0] not in doc:  # nothing to walk
                continue
            node: Any = doc
            for part in parts:
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
    return None


def parse_json(line: str) -> Fields | None:
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    if not isinstance(doc, dict):
        return None
    if may_hold_surrogates(line):
        doc = fix_surrogates(doc)
    out: Fields = {"time": _get(doc, _JSON_TIME), "level": level_of(_get(doc, _JSON_LEVEL)),
                   "message": _get(doc, _JSON_MSG), "trace_id": _get(doc, _JSON_TRACE),
                   "span_id": _get(doc, _JSON_SPAN), "request_id": _get(doc, _JSON_REQ)}
    if out["time"] is None:
        return None
    out["attributes"] = {k: v for k, v in doc.items() if k not in _JSON_USED}
    if out["message"] is None:
        out["message"] = json.dumps(out["attributes"], default=str)
    return out


# A key starts where a word starts (the look-behind): without it a long run of word characters with no
# "=" is scanned again from each of its characters, in quadratic time.
_LOGFMT_PAIR = re.compile(r'(?<![\w.@-])([\w.@-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> Fields | None:
    pairs = {k: v[1:-1].replace('\\"', '"') if v.startswith('"') else v for k, v in _LOGFMT_PAIR.findall(line)}
    if len(pairs) < 2:
        return None
    time_value = _get(pairs, ("ts", "time", "timestamp", "t", "@timestamp"))
    if time_value is None:
        return None
    return {"time": time_value, "level": level_of(_get(pairs, ("level", "lvl", "severity"))),
            "message": _get(pairs, ("msg", "message", "event")) or line, "trace_id": _get(pairs, _JSON_TRACE),
            "span_id": _get(pairs, _JSON_SPAN), "request_id": _get(pairs, _JSON_REQ),
            "attributes": {k: v for k, v in pairs.items() if k not in ("ts", "time", "level", "msg")}}


_TS = r"\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|\s?[+-]\d\d:?\d\d)?"
_LEVEL_WORD = r"TRACE|DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|CRITICAL|FATAL"
_PYLOG = re.compile(rf"^(?P<time>{_TS})\s*[-|]?\s*\[?(?P<level>{_LEVEL_WORD})\]?\s*[-:|]?\s*(?P<message>.*)$")
_PYLOG_DEFAULT = re.compile(rf"^(?P<level>{_LEVEL_WORD}):(?P<logger>[\w.]+):(?P<message>.*)$")


def parse_text(line: str) -> Fields | None:
    """``<timestamp> <LEVEL> message``: Python logging's common formats, and many others."""
    match = _PYLOG.match(line)
    if match:
        return {"time": match["time"], "level": level_of(match["level"]), "message": match["message"]}
    return None


_JAVA = re.compile(rf"^(?P<time>{_TS}|\d\d:\d\d:\d\d[.,]\d+)\s+\[(?P<thread>[^\]]*)\]\s+(?P<level>{_LEVEL_WORD})\s+"
                   r"(?P<logger>\S+)\s+-\s+(?P<message>.*)$")
_JAVA_MDC = re.compile(r"\[(?:[\w-]+,)?(?P<trace>[0-9a-f]{16,32}),(?P<span>[0-9a-f]{16})(?:,\w+)?\]")


def parse_java(line: str) -> Fields | None:
    """logback / log4j2 default patterns (``%d [%thread] %-5level %logger - %msg``), MDC ids."""
    match = _JAVA.match(line)
    if not match:
        return None
    out: Fields = {"time": match["time"], "level": level_of(match["level"]), "message": match["message"],
                   "attributes": {"thread": match["thread"], "logger": match["logger"]}}
    mdc = _JAVA_MDC.search(line)
    if mdc:
        out["trace_id"], out["span_id"] = mdc["trace"], mdc["span"]
    return out


_NGINX_ERROR = re.compile(r"^(?P<time>\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[(?P<level>\w+)\] \d+#\d+: (?:\*\d+ )?"
                          r"(?P<message>.*)$")


def parse_nginx_error(line: str) -> Fields | None:
    match = _NGINX_ERROR.match(line)
    if not match:
        return None
    message = match["message"]
    attrs: Fields = {}
    for key in ("client", "server", "request", "upstream", "host"):
        found = re.search(rf'\b{key}: "?([^",]*)"?', message)
        if found:
            attrs[key] = found.group(1)
    if "upstream timed out" in message:
        attrs["event"] = "upstream_timeout"
        action = re.search(r"while ([a-z ]+?)(?:,|$)", message)
        if action:
            attrs["timeout_phase"] = action.group(1)
    if attrs.get("request"):
        method, _, rest = attrs["request"].partition(" ")
        attrs["method"], attrs["path"] = method, rest.rsplit(" ", 1)[0]
    if attrs.get("upstream"):
        attrs["callee"] = re.sub(r"^\w+://", "", attrs["upstream"]).split("/")[0].split(":")[0]
    return {"time": match["time"], "level": level_of(match["level"]), "message": message, "attributes": attrs}


_COMBINED = re.compile(r'^(?P<remote_addr>\S+) \S+ (?P<remote_user>\S+) \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" '
                       r'(?P<status>\d{3}) (?P<bytes>\S+)(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?(?P<rest>.*)$')
_KV = re.compile(r'(\w+)=("[^"]*"|\S+)')


def _access_fields(attrs: Fields) -> None:
    request = str(attrs.pop("request", "") or "")
    if request:
        parts = request.split(" ")
        attrs["method"] = parts[0]
        attrs["path"] = parts[1] if len(parts) > 1 else ""
    for key, aliases in (("request_time", ("rt", "request_time")),
                         ("upstream_response_time", ("urt", "upstream_response_time")),
                         ("upstream_status", ("us", "upstream_status")),
                         ("request_id", ("rid", "request_id", "req_id")),
                         ("upstream_addr", ("ua", "upstream_addr", "upstream"))):
        for alias in aliases:
            if alias in attrs and attrs[alias] not in ("-", ""):
                attrs[key] = attrs.pop(alias) if alias != key else attrs[alias]
                break
    status = int(attrs.get("status") or 0)
    upstream_status = str(attrs.get("upstream_status", ""))
    if status == 504 or upstream_status.startswith("504"):
        attrs["event"] = "upstream_timeout"


def parse_nginx_access(line: str) -> Fields | None:
    """nginx ``combined``, optionally followed by ``key=value`` fields (``rt= urt= rid= us=``)."""
    match = _COMBINED.match(line)
    if not match:
        return None
    attrs: Fields = {k: v for k, v in match.groupdict().items() if k not in ("time", "rest") and v is not None}
    for key, value in _KV.findall(match["rest"] or ""):
        attrs[key] = value.strip('"')
    _access_fields(attrs)
    status = int(attrs["status"])
    # $time_local has whole seconds; $msec (logged as msec= or ts=) has milliseconds
    precise = attrs.pop("msec", None) or attrs.pop("ts", None)
    return {"time": precise or match["time"], "level": "ERROR" if status >= 500 else "INFO",
            "message": f'{attrs.get("method", "")} {attrs.get("path", "")} {status}'.strip(),
            "request_id": attrs.get("request_id"), "attributes": attrs}


def nginx_log_format(fmt: str) -> Callable[[str], Fields | None]:
    """A parser for a custom nginx ``log_format`` (its quoted format string, variables as ``$name``)."""
    pattern = ""
    pos = 0
    for var in re.finditer(r"\$(\w+)", fmt):
        pattern += re.escape(fmt[pos:var.start()])
        name = var.group(1)
        following = fmt[var.end():var.end() + 1]
        if name == "time_local":
            pattern += r"(?P<time_local>[^\]]+)"
        elif following == '"':
            pattern += rf'(?P<{name}>[^"]*)'
        else:
            pattern += rf"(?P<{name}>\S*)"
        pos = var.end()
    regex = re.compile("^" + pattern + re.escape(fmt[pos:]) + "$")

    def parse(line: str) -> Fields | None:
        match = regex.match(line)
        if not match:
            return None
        attrs: Fields = {k: v for k, v in match.groupdict().items() if v not in (None, "-")}
        time_text = attrs.pop("time_local", None) or attrs.pop("time_iso8601", None)
        if time_text is None:
            return None
        _access_fields(attrs)
        status = int(attrs.get("status") or 0)
        return {"time": time_text, "level": "ERROR" if status >= 500 else "INFO",
                "message": f'{attrs.get("method", "")} {attrs.get("path", "")} {status}'.strip(),
                "request_id": attrs.get("request_id"), "attributes": attrs}

    return parse


_ENVOY = re.compile(
    r'^\[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<flags>\S+) '
    # Istio adds details, connection termination and a quoted failure reason
    r'(?:(?P<details>\S+) (?:(?P<termination>\S+) "(?P<failure>[^"]*)" )?)?'
    r'(?P<rx>\d+) (?P<tx>\d+) (?P<duration>\d+) (?P<upstream_time>\S+) '
    r'"(?P<xff>[^"]*)" "(?P<agent>[^"]*)" "(?P<request_id>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream_host>[^"]*)"')


def parse_envoy(line: str) -> Fields | None:
    match = _ENVOY.match(line)
    if not match:
        return None
    attrs: Fields = {k: v for k, v in match.groupdict().items() if k != "time" and v not in (None, "-")}
    _access_fields(attrs)
    flags = str(attrs.get("flags", ""))
    if "UT" in flags.split(",") or int(attrs["status"]) == 504:
        attrs["event"] = "upstream_timeout"
    attrs["callee"] = str(attrs.get("authority", "")).split(":")[0] or None
    status = int(attrs["status"])
    return {"time": match["time"], "level": "ERROR" if status >= 500 else "INFO",
            "message": f'{attrs.get("method", "")} {attrs.get("path", "")} {status} {flags}'.strip(),
            "request_id": attrs.get("request_id"), "attributes": attrs}


_GUNICORN = re.compile(r"^\[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4})\] \[(?P<pid>\d+)\] "
                       r"\[(?P<level>\w+)\] (?P<message>.*)$")


def parse_gunicorn(line: str) -> Fields | None:
    match = _GUNICORN.match(line)
    if not match:
        return None
    attrs: Fields = {"pid": int(match["pid"])}
    if "WORKER TIMEOUT" in match["message"]:
        attrs["event"] = "worker_timeout"
    return {"time": match["time"], "level": level_of(match["level"]), "message": match["message"],
            "attributes": attrs}


FORMATS: dict[str, Callable[[str], Fields | None]] = {
    "json": parse_json, "nginx-access": parse_nginx_access, "nginx-error": parse_nginx_error,
    "envoy": parse_envoy, "gunicorn": parse_gunicorn, "java": parse_java, "logfmt": parse_logfmt,
    "text": parse_text,
}


def detect(lines: list[str]) -> str | None:
    """The format most of the sample lines parse as."""
    best, best_count = None, 0
    for name, parser in FORMATS.items():
        count = sum(1 for line in lines if line.strip() and parser(line.rstrip("\n")) is not None)
        if count > best_count:
            best, best_count = name, count
    return best


@dataclass
class Parsed:
    lineno: int
    fields: Fields
    extra_lines: list[str] = field(default_factory=list)


def records(lines: Iterator[tuple[int, str]], parser: Callable[[str], Fields | None],
            on_bad: Callable[[int, str, str], None]) -> Iterator[Parsed]:
    """Parsed records, continuation lines joined; ``on_bad(lineno, reason, line)`` for the rest."""
    current: Parsed | None = None
    for lineno, raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        fields = parser(line)
        if fields is not None:
            if current is not None:
                yield current
            current = Parsed(lineno, fields)
        elif current is not None and _CONTINUATION.match(line):
            current.extra_lines.append(line)
        else:
            reason = "binary or undecodable bytes" if "\ufffd" in line or "\x00" in line else "unrecognised line"
            on_bad(lineno, reason, line)
    if current is not None:
        yield current


def parse_tz(text: str | None) -> tzinfo:
    if not text or text.upper() in ("UTC", "Z"):
        return timezone.utc
    match = re.fullmatch(r"([+-])(\d\d):?(\d\d)", text)
    if match:
        delta = timedelta(hours=int(match[2]), minutes=int(match[3]))
        return timezone(delta if match[1] == "+" else -delta)
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(text)
    except Exception:
        raise InputError(f"--tz {text!r} is not a zone such as UTC, +02:00 or Europe/Paris") from None


_TRACEPARENT = re.compile(r"\b00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}\b")


def find_ids(text: str, request: bool = True) -> tuple[str | None, str | None, str | None]:
    """Trace id, span id and request id written inside a message (or a W3C traceparent); ``request=False``:
    the request id is known already, and not looked for."""
    # Each pattern needs its word (trace, span, request; 00- for a traceparent): most lines hold none, and a
    # substring test of the lowered line costs far less than a case-insensitive search. Outside ASCII a
    # letter may match case-insensitively without lowering to it (the long s, the Kelvin sign): search then.
    if text.isascii():
        lower = text.lower()
        parent_word, trace_word, span_word, request_word = \
            "00-" in text, "trace" in lower, "span" in lower, request and "request" in lower
    else:
        parent_word = trace_word = span_word = True
        request_word = request
    req = _REQUEST_ID.search(text) if request_word else None
    parent = _TRACEPARENT.search(text) if parent_word else None
    if parent:
        return parent.group(1), parent.group(2), req.group(1) if req else None
    trace = _HEX_ID.search(text) if trace_word else None
    span = _SPAN_ID.search(text) if span_word else None
    return (trace.group(1) if trace else None, span.group(1) if span else None, req.group(1) if req else None)
