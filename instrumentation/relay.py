"""Export out of the application's process: a relay started by `payscope run`.

In the application, each finished span or log record becomes a tuple of plain values (secrets already
masked) appended to a bounded buffer; a daemon thread sends the buffer every 100 ms (sooner when it
fills) as one ``marshal`` frame over a Unix socket. That is all the application pays: no protobuf, no HTTP, no
batch serialisation holding the interpreter lock while a request waits.

The relay is a separate process (forked by `payscope run` before it execs the command, detached from
the command's process group and not its child). It rebuilds SDK spans and log records from the frames
and exports them with OpenTelemetry's own OTLP/HTTP exporters. It stops when the command has exited
and every connection is drained. Pre-fork servers need nothing special: each process opens its own
connection the first time it has something to send.

Frames: 4-byte big-endian length, then ``marshal.dumps((kind, payload))``: ``("R", resource attributes)``
first on each connection, then ``("S", [span, ...])`` and ``("L", [log record, ...])``.
"""

from __future__ import annotations

import logging
import marshal
import os
import queue
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

HEADER = struct.Struct("!I")
SEND_INTERVAL_S = 0.1
SEND_BATCH = 128
BUFFER_LIMIT = 8192
EXPORT_BATCH = 512
MAX_FRAME = 64 * 1024 * 1024
DRAIN_GRACE_S = 3.0

_start_lock = threading.Lock()


def _new_start_lock() -> None:
    global _start_lock
    _start_lock = threading.Lock()  # a lock held by another thread at fork time would stay held in the child


os.register_at_fork(after_in_child=_new_start_lock)


# ---------------------------------------------------------------------------------------------------
# In the application


class Channel:
    """This process's connection to the relay: a bounded buffer and a sender thread, made anew after fork."""

    def __init__(self, path: str, resource: dict[str, Any], notice: Callable[[str], None]) -> None:
        self.path = path
        self.resource = resource
        self.notice = notice
        self.dropped = 0
        self._pid = -1

    def _start(self) -> None:
        self._lock = threading.Lock()       # the buffers
        self._send_lock = threading.Lock()  # the socket: one sender at a time, and no close mid-send
        self._wake = threading.Event()
        self._buffers: dict[str, list[Any]] = {"S": [], "L": []}
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._loop, name="OtelPayscopeRelay", daemon=True)
        self._thread.start()
        self._pid = os.getpid()  # last: other threads use the channel once this says it is ready

    def put(self, kind: str, item: tuple[Any, ...]) -> None:
        if self._pid != os.getpid():  # first use, or a forked worker: its own buffer, thread and socket
            with _start_lock:
                if self._pid != os.getpid():
                    self._start()
        with self._lock:
            buffer = self._buffers[kind]
            if len(buffer) >= BUFFER_LIMIT:
                self.dropped += 1
                if self.dropped == 1:
                    self.notice(f"the export buffer is full ({BUFFER_LIMIT} records): telemetry is dropped and "
                                "counted, the service is not affected")
                return
            buffer.append(item)
            full = len(buffer) >= SEND_BATCH
        if full:
            self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(SEND_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            taken = {kind: items for kind, items in self._buffers.items() if items}
            self._buffers = {"S": [], "L": []}
        with self._send_lock:  # the sender thread and an at-exit close may flush at once
            for kind, items in taken.items():
                self._send(kind, items)

    def close(self, end: bool = False) -> None:
        """Send what is buffered and hang up; say how much was dropped, if anything was. ``end``: tell the relay
        that the program is done (a sidecar, stopping), so that it exports everything and goes away now."""
        if self._pid == -1 and end:  # nothing was ever sent: the relay still waits to hear that the program is done
            with _start_lock:
                if self._pid == -1:
                    self._start()
        if self._pid != os.getpid():
            return
        self.flush()
        with self._send_lock:  # after a send the sender thread has under way
            if end:
                self._send_end()
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        if self.dropped:
            self.notice(f"{self.dropped} spans and log records of pid {self._pid} were dropped, not exported")

    def _connect(self) -> None:
        """A connection to the relay, opened and told this process's resource when there is none."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            sock.connect(self.path)
            self._sock = sock
            self._frame("R", self.resource)

    def _send(self, kind: str, items: list[Any]) -> None:
        try:
            self._connect()
            self._frame(kind, items)
        except (OSError, ValueError) as exc:
            self.dropped += len(items)
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self.notice(f"the export relay is not reachable ({exc.__class__.__name__}); telemetry is dropped, "
                        "the service is not affected")

    def _send_end(self) -> None:
        try:
            self._connect()
            self._frame("E", None)
        except OSError:
            pass  # the relay is gone: it ends on its own when this process exits

    def _frame(self, kind: str, payload: Any) -> None:
        try:
            body = marshal.dumps((kind, payload))
        except ValueError:  # a log record carrying an object marshal cannot write: send the others
            writable = [item for item in payload if _writable(item)]
            self.dropped += len(payload) - len(writable)
            body = marshal.dumps((kind, writable))
        assert self._sock is not None
        self._sock.sendall(HEADER.pack(len(body)) + body)


def _writable(item: Any) -> bool:
    try:
        marshal.dumps(item)
    except ValueError:
        return False
    return True


def span_tuple(span: Any, name: str, attributes: Any, events: Any, links: Any,
               description: str | None) -> tuple[Any, ...]:
    """A finished SDK span as plain values (name, attributes, events and links already masked by the caller)."""
    ctx = span.context
    parent = span.parent
    scope = span.instrumentation_scope
    return (
        name, ctx.trace_id, ctx.span_id, int(ctx.trace_flags),
        parent.span_id if parent is not None else 0, bool(parent.is_remote) if parent is not None else False,
        span.kind.value, span.start_time, span.end_time, dict(attributes or {}),
        [(n, t, dict(a)) for n, t, a in events],
        [(c.trace_id, c.span_id, dict(a)) for c, a in links],
        span.status.status_code.value, description,
        scope.name if scope else "", scope.version if scope else None,
    )


def log_tuple(record: Any) -> tuple[Any, ...]:
    """An SDK log record as plain values (already masked)."""
    return (
        record.timestamp, record.observed_timestamp, record.trace_id or 0, record.span_id or 0,
        int(record.trace_flags or 0), record.severity_text,
        record.severity_number.value if record.severity_number is not None else None,
        record.body, dict(record.attributes or {}),
    )


# ---------------------------------------------------------------------------------------------------
# In the relay process


class _Rebuilder:
    """SDK objects from the frames, with resources and scopes built once."""

    def __init__(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._resource_cls = Resource
        self._scope_cls = InstrumentationScope
        self._scopes: dict[tuple[str, str | None], Any] = {}
        self._log_scope = InstrumentationScope("payscope.logs")

    def resource(self, attributes: dict[str, Any]) -> Any:
        return self._resource_cls(attributes)

    def span(self, t: Sequence[Any], resource: Any) -> Any:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

        (name, trace_id, span_id, flags, parent_id, parent_remote, kind, start, end, attributes, events, links,
         status_code, description, scope_name, scope_version) = t
        scope = self._scopes.get((scope_name, scope_version))
        if scope is None:
            scope = self._scopes[(scope_name, scope_version)] = self._scope_cls(scope_name, scope_version)
        return ReadableSpan(
            name=name, context=SpanContext(trace_id, span_id, False, TraceFlags(flags)),
            parent=SpanContext(trace_id, parent_id, parent_remote) if parent_id else None,
            resource=resource, attributes=attributes,
            events=[Event(n, attrs, ts) for n, ts, attrs in events],
            links=[Link(SpanContext(tid, sid, True), attrs) for tid, sid, attrs in links],
            kind=SpanKind(kind), status=Status(StatusCode(status_code), description),
            start_time=start, end_time=end, instrumentation_scope=scope)

    def log(self, t: Sequence[Any], resource: Any) -> Any:
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.sdk._logs import ReadableLogRecord
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

        (timestamp, observed, trace_id, span_id, flags, severity_text, severity_number, body, attributes) = t
        context = set_span_in_context(NonRecordingSpan(SpanContext(trace_id, span_id, False, TraceFlags(flags))))
        record = LogRecord(timestamp=timestamp, observed_timestamp=observed, context=context,
                           severity_text=severity_text,
                           severity_number=SeverityNumber(severity_number) if severity_number is not None else None,
                           body=body, attributes=attributes)
        return ReadableLogRecord(log_record=record, resource=resource,
                                 instrumentation_scope=self._log_scope)


class _Exporter(threading.Thread):
    """Batches rebuilt spans and log records and sends them with the OTLP/HTTP exporters."""

    def __init__(self, endpoint: str, interval_s: float, notice: Callable[[str], None]) -> None:
        super().__init__(name="payscope-relay-export", daemon=True)
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self.endpoint = endpoint
        self.spans = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=2.0)
        self.logs = OTLPLogExporter(endpoint=f"{endpoint}/v1/logs", timeout=2.0)
        self.interval_s = interval_s
        self.notice = notice
        self.queue: queue.Queue[tuple[str, Any, list[Any]] | None] = queue.Queue(maxsize=1024)
        self.dropped = 0
        self.rebuild = _Rebuilder()

    def offer(self, kind: str, resource: Any, items: list[Any]) -> None:
        try:
            self.queue.put_nowait((kind, resource, items))
        except queue.Full:
            self.dropped += len(items)

    def run(self) -> None:
        pending: dict[str, list[Any]] = {"S": [], "L": []}
        last = time.monotonic()
        done = False
        while not done:
            try:
                got = self.queue.get(timeout=self.interval_s)
            except queue.Empty:
                got = ...  # type: ignore[assignment]
            if got is None:
                done = True
            elif got is not ...:
                kind, resource, items = got
                build = self.rebuild.span if kind == "S" else self.rebuild.log
                for item in items:
                    try:
                        pending[kind].append(build(item, resource))
                    except Exception:
                        self.dropped += 1
            due = time.monotonic() - last >= self.interval_s
            if done or due or len(pending["S"]) >= EXPORT_BATCH or len(pending["L"]) >= EXPORT_BATCH:
                self._export(pending)
                pending = {"S": [], "L": []}
                last = time.monotonic()

    def _export(self, pending: dict[str, list[Any]]) -> None:
        from opentelemetry.sdk._logs.export import LogRecordExportResult
        from opentelemetry.sdk.trace.export import SpanExportResult

        for items, exporter, success in ((pending["S"], self.spans, SpanExportResult.SUCCESS),
                                         (pending["L"], self.logs, LogRecordExportResult.SUCCESS)):
            for start in range(0, len(items), EXPORT_BATCH):
                try:
                    ok = exporter.export(items[start:start + EXPORT_BATCH]) is success  # type: ignore[arg-type]
                except Exception:
                    ok = False
                if not ok:
                    self._failed()

    def _failed(self) -> None:
        self.notice(f"the collector at {self.endpoint} did not take telemetry; it is dropped, the service is "
                    "not affected")


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()
        self.resource: Any = None


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def serve(listener: socket.socket, app_pid: int, endpoint: str, interval_s: float) -> None:
    """The relay's main loop: accept connections, read frames, export; return once the app is gone and
    every connection is closed (or after a grace period)."""
    noticed: set[str] = set()
    stderr_open = [True]

    def notice(message: str) -> None:
        if stderr_open[0] and message not in noticed and not os.environ.get("PAYSCOPE_QUIET"):
            noticed.add(message)
            try:
                print(f"payscope: {message}", file=sys.stderr, flush=True)
            except OSError:
                pass

    class _ToNotice(logging.Handler):
        # the SDK exporters log their retries; on the service's stderr they would change its output, so they
        # become one payscope notice, which PAYSCOPE_QUIET silences like every other
        def emit(self, record: logging.LogRecord) -> None:
            notice(f"the collector at {endpoint} is not answering; telemetry is retried, then dropped, the "
                   "service is not affected")

    otel_log = logging.getLogger("opentelemetry")
    otel_log.addHandler(_ToNotice(logging.WARNING))
    otel_log.propagate = False
    exporter = _Exporter(endpoint, interval_s, notice)
    exporter.start()
    selector = selectors.DefaultSelector()
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    pidfd = None
    try:
        pidfd = os.pidfd_open(app_pid)
        selector.register(pidfd, selectors.EVENT_READ, "app")
    except (AttributeError, OSError):
        pass
    rebuild = exporter.rebuild
    app_gone_at: float | None = None
    connections = 0
    while True:
        if app_gone_at is None and pidfd is None and _exited(app_pid):
            app_gone_at = time.monotonic()
        if app_gone_at is not None:
            if connections == 0 or time.monotonic() - app_gone_at > DRAIN_GRACE_S:
                break
        for key, _ in selector.select(timeout=0.5):
            if key.data == "app":
                selector.unregister(key.fileobj)
                app_gone_at = time.monotonic()
                # the command's output ends with the command: nobody waits on our copy of its stderr
                stderr_open[0] = False
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
            elif key.data is None:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    continue
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, _Connection(sock))
                connections += 1
            else:
                conn: _Connection = key.data
                try:
                    chunk = conn.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    selector.unregister(conn.sock)
                    conn.sock.close()
                    connections -= 1
                    continue
                conn.data += chunk
                if _frames(conn, rebuild, exporter) and app_gone_at is None:
                    app_gone_at = time.monotonic()  # the program said it is done: drain, export, go
    exporter.queue.put(None)
    exporter.join(timeout=10)


def _frames(conn: _Connection, rebuild: _Rebuilder, exporter: _Exporter) -> bool:
    """Read the whole frames received; True when one of them said the program is done."""
    data = conn.data
    offset = 0
    ended = False
    while len(data) - offset >= HEADER.size:
        (length,) = HEADER.unpack_from(data, offset)
        if length > MAX_FRAME:  # not our protocol: stop reading this connection's garbage
            offset = len(data)
            break
        end = offset + HEADER.size + length
        if end > len(data):
            break
        try:
            kind, payload = marshal.loads(bytes(data[offset + HEADER.size:end]))
        except (EOFError, ValueError, TypeError):
            kind, payload = "", None
        offset = end
        if kind == "R":
            conn.resource = rebuild.resource(payload)
        elif kind in ("S", "L") and conn.resource is not None:
            exporter.offer(kind, conn.resource, payload)
        elif kind == "E":
            ended = True
    del data[:offset]
    return ended


def start(endpoint: str) -> str | None:
    """Fork the relay for a command about to be exec'd by this process; the socket path, or None when
    it could not start (the command then exports in-process)."""
    import tempfile

    try:
        directory = tempfile.mkdtemp(prefix="payscope-relay-")
        path = os.path.join(directory, "relay.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
    except OSError:
        return None
    interval_s = max(0.05, float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500") or 500) / 1000)
    app_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked relay, measured by the instrumentation tests
        try:
            os.setsid()  # the terminal's Ctrl-C goes to the command; the relay drains after it exits
            if os.fork() != 0:
                os._exit(0)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            os.closerange(3, listener.fileno())
            os.closerange(listener.fileno() + 1, 1 << 16)
            serve(listener, app_pid, endpoint, interval_s)
        except BaseException:
            pass
        finally:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
            os._exit(0)
    os.waitpid(child, 0)
    listener.close()
    return path
