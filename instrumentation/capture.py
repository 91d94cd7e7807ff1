"""Record on each client span the timeout and retry policy the call ran under, and its idempotency key.

The wrappers sit one layer below where OpenTelemetry's own instrumentors create client spans (the
requests adapter, httpcore's connection pool, urllib3's connection pool), so the current span is the
call's span. A failure in here is logged once and swallowed: the call goes on untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from collections.abc import Collection, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.sdk.trace import SpanProcessor

CONNECT = "payscope.timeout.connect_ms"
READ = "payscope.timeout.read_ms"
TOTAL = "payscope.timeout.total_ms"
SOURCE = "payscope.timeout.source"
RETRY_MAX = "payscope.retry.max_attempts"
RETRY_LIBRARY = "payscope.retry.library"
RESEND_COUNT = "http.request.resend_count"
IDEMPOTENCY_HASH = "payscope.idempotency_key.hash"

HTTPX_DEFAULT_S = 5.0
_log = logging.getLogger("payscope.instrumentation")
_warned: set[str] = set()


def _ms(value: Any) -> float | None:
    return None if value is None else float(value) * 1000.0


def _once(where: str, exc: BaseException) -> None:
    if where not in _warned:
        _warned.add(where)
        _log.warning("payscope: could not record timeouts in %s (%s); the call is not affected", where, exc)


def _headers_facts(span: Any, headers: Any) -> None:
    if headers is None:
        return
    for name in ("Idempotency-Key", "X-Idempotency-Key"):
        value = headers.get(name)
        if value:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            span.set_attribute(IDEMPOTENCY_HASH, hashlib.sha256(str(value).encode()).hexdigest()[:16])
            break


def record(span: Any, connect: float | None, read: float | None, total: float | None, source: str,
           retry_max: int | None = None) -> None:
    if not span.is_recording():
        return
    if connect is not None:
        span.set_attribute(CONNECT, connect)
    if read is not None:
        span.set_attribute(READ, read)
    if total is not None:
        span.set_attribute(TOTAL, total)
    span.set_attribute(SOURCE, source)
    if retry_max is not None and RETRY_MAX not in (span.attributes or {}):  # an outer policy (tenacity) wins
        span.set_attribute(RETRY_MAX, retry_max)


def _retry_attempts(retries: Any) -> int | None:
    total = getattr(retries, "total", None)
    if isinstance(total, int) and not isinstance(total, bool):
        return total + 1
    return None


def _requests_send(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        span = trace.get_current_span()
        timeout = kwargs.get("timeout", args[2] if len(args) > 2 else None)
        attempts = _retry_attempts(getattr(instance, "max_retries", None))
        if timeout is None:
            record(span, None, None, None, "none", attempts)
        elif isinstance(timeout, tuple):
            record(span, _ms(timeout[0]), _ms(timeout[1]), None, "argument", attempts)
        elif hasattr(timeout, "connect_timeout"):  # urllib3 Timeout
            record(span, _ms(timeout.connect_timeout), _ms(timeout.read_timeout), _ms(timeout.total), "argument",
                   attempts)
        else:
            record(span, _ms(timeout), _ms(timeout), None, "argument", attempts)
        request = args[0] if args else kwargs.get("request")
        _headers_facts(span, getattr(request, "headers", None))
    except Exception as exc:  # never break the call
        _once("requests", exc)
    return wrapped(*args, **kwargs)


def _httpcore_facts(request: Any) -> None:
    try:
        span = trace.get_current_span()
        timeouts = (getattr(request, "extensions", None) or {}).get("timeout") or {}
        values = [timeouts.get(k) for k in ("connect", "read", "write", "pool")]
        if not timeouts or all(v is None for v in values):
            source = "none"
        elif all(v == HTTPX_DEFAULT_S for v in values):
            source = "library default"
        else:
            source = "client"
        record(span, _ms(timeouts.get("connect")), _ms(timeouts.get("read")), None, source)
        headers = {k.decode("latin-1").title(): v for k, v in getattr(request, "headers", [])}
        _headers_facts(span, headers)
    except Exception as exc:
        _once("httpx", exc)


def _httpcore_sync(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    _httpcore_facts(args[0] if args else kwargs.get("request"))
    return wrapped(*args, **kwargs)


async def _httpcore_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    _httpcore_facts(args[0] if args else kwargs.get("request"))
    return await wrapped(*args, **kwargs)


def _urllib3_urlopen(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    try:
        span = trace.get_current_span()
        # requests records the same call one layer up, with more to say: leave its attributes alone
        if span.is_recording() and SOURCE not in getattr(span, "attributes", {}):
            timeout = kwargs.get("timeout", getattr(instance, "timeout", None))
            connect = getattr(timeout, "connect_timeout", None)
            read = getattr(timeout, "read_timeout", None)
            explicit = "timeout" in kwargs
            if isinstance(timeout, (int, float)):
                connect = read = timeout
            source = "argument" if explicit else ("none" if connect is None and read is None else "session")
            record(span, _ms(connect) if isinstance(connect, (int, float)) else None,
                   _ms(read) if isinstance(read, (int, float)) else None, None, source,
                   _retry_attempts(kwargs.get("retries", getattr(instance, "retries", None))))
            _headers_facts(span, kwargs.get("headers"))
    except Exception as exc:
        _once("urllib3", exc)
    return wrapped(*args, **kwargs)


def _grpc_call(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """The deadline a gRPC call runs under, unary or streaming (called inside the gRPC instrumentor's
    interceptor; ``timeout`` follows the request or request iterator in every call signature)."""
    try:
        span = trace.get_current_span()
        timeout = kwargs.get("timeout", args[1] if len(args) > 1 else None)
        record(span, None, None, _ms(timeout), "argument" if timeout is not None else "none")
    except Exception as exc:
        _once("grpc", exc)
    return wrapped(*args, **kwargs)


def _aiohttp_trace_config() -> Any:
    import aiohttp

    async def on_request_start(session: Any, ctx: Any, params: Any) -> None:
        try:
            span = trace.get_current_span()  # the aiohttp instrumentor's span, started just before
            timeout = getattr(session, "timeout", None)
            total, connect = getattr(timeout, "total", None), getattr(timeout, "sock_connect", None)
            read = getattr(timeout, "sock_read", None)
            source = "none" if total is None and connect is None and read is None else "session"
            if total == 300 and connect is None and read is None:
                source = "library default"
            record(span, _ms(connect), _ms(read), _ms(total), source)
            _headers_facts(span, params.headers)
        except Exception as exc:
            _once("aiohttp", exc)

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    return config


def _aiohttp_session_init(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        config = _aiohttp_trace_config()
        config.freeze()
        instance._trace_configs.append(config)  # last, so the instrumentor's span already exists
    except Exception as exc:
        _once("aiohttp", exc)
    return result


# (attempt number, attempts the policy allows) of the tenacity attempt running in this context
_tenacity_attempt: contextvars.ContextVar[tuple[int, int | None] | None] = contextvars.ContextVar(
    "payscope_tenacity_attempt", default=None)


def _tenacity_max(stop: Any) -> int | None:
    """Attempts a tenacity stop condition allows: ``stop_after_attempt(n)``, also inside ``a | b`` / ``a & b``."""
    found = getattr(stop, "max_attempt_number", None)
    if isinstance(found, int):
        return found
    inner = [n for n in (_tenacity_max(s) for s in getattr(stop, "stops", ())) if n is not None]
    if not inner:
        return None
    return min(inner) if type(stop).__name__ == "stop_any" else max(inner)


class _Attempts:
    """Numbers the calls of a function a tenacity policy retries: each call runs as the next attempt."""

    def __init__(self, stop: Any) -> None:
        self.limit = _tenacity_max(stop)
        self.count = 0

    @contextlib.contextmanager
    def next(self) -> Iterator[None]:
        self.count += 1
        token = _tenacity_attempt.set((self.count, self.limit))
        try:
            yield
        finally:
            _tenacity_attempt.reset(token)


def _tenacity_call(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``@retry`` and ``Retrying()(fn)``: each call of ``fn`` is an attempt; its client spans say which."""
    try:
        fn, attempts = args[0], _Attempts(instance.stop)

        def attempt(*a: Any, **kw: Any) -> Any:
            with attempts.next():
                return fn(*a, **kw)

        args = (attempt, *args[1:])
    except Exception as exc:
        _once("tenacity", exc)
    return wrapped(*args, **kwargs)


def _tenacity_call_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``AsyncRetrying`` and ``@retry`` on a coroutine function."""
    try:
        fn, attempts = args[0], _Attempts(instance.stop)

        async def attempt(*a: Any, **kw: Any) -> Any:
            with attempts.next():
                return await fn(*a, **kw)

        args = (attempt, *args[1:])
    except Exception as exc:
        _once("tenacity", exc)
    return wrapped(*args, **kwargs)


def _tenacity_enter(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    """``for attempt in Retrying(): with attempt: ...``"""
    try:
        state = instance.retry_state
        instance._payscope_token = _tenacity_attempt.set(
            (state.attempt_number, _tenacity_max(state.retry_object.stop)))
    except Exception as exc:
        _once("tenacity", exc)
    return wrapped(*args, **kwargs)


def _tenacity_exit(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    token = getattr(instance, "_payscope_token", None)
    if token is not None:
        try:
            _tenacity_attempt.reset(token)
        except ValueError:  # exited in another context than it entered
            pass
    return wrapped(*args, **kwargs)


class RetryPolicyProcessor(SpanProcessor):
    """Client spans started inside a tenacity attempt: its number and the attempts the policy allows."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        attempt = _tenacity_attempt.get()
        if attempt is None or span.kind not in (trace.SpanKind.CLIENT, trace.SpanKind.PRODUCER):
            return
        try:
            number, limit = attempt
            if number > 1:
                span.set_attribute(RESEND_COUNT, number - 1)
            if limit is not None:
                span.set_attribute(RETRY_MAX, limit)
            span.set_attribute(RETRY_LIBRARY, "tenacity")
        except Exception as exc:
            _once("tenacity", exc)


_TARGETS = [
    ("aiohttp", "ClientSession.__init__", _aiohttp_session_init),
    ("grpc._channel", "_UnaryUnaryMultiCallable.__call__", _grpc_call),
    ("grpc._channel", "_UnaryUnaryMultiCallable.with_call", _grpc_call),
    ("grpc._channel", "_UnaryUnaryMultiCallable.future", _grpc_call),
    ("grpc._channel", "_UnaryStreamMultiCallable.__call__", _grpc_call),
    ("grpc._channel", "_StreamUnaryMultiCallable.__call__", _grpc_call),
    ("grpc._channel", "_StreamUnaryMultiCallable.with_call", _grpc_call),
    ("grpc._channel", "_StreamUnaryMultiCallable.future", _grpc_call),
    ("grpc._channel", "_StreamStreamMultiCallable.__call__", _grpc_call),
    ("requests.adapters", "HTTPAdapter.send", _requests_send),
    ("httpcore", "ConnectionPool.handle_request", _httpcore_sync),
    ("httpcore", "AsyncConnectionPool.handle_async_request", _httpcore_async),
    ("urllib3.connectionpool", "HTTPConnectionPool.urlopen", _urllib3_urlopen),
    ("tenacity", "Retrying.__call__", _tenacity_call),
    ("tenacity.asyncio", "AsyncRetrying.__call__", _tenacity_call_async),
    ("tenacity", "AttemptManager.__enter__", _tenacity_enter),
    ("tenacity", "AttemptManager.__exit__", _tenacity_exit),
]


class TimeoutCaptureInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Timeouts, retry policies and idempotency keys on client spans (requests, httpx, aiohttp, urllib3, gRPC;
    tenacity attempts around any of them)."""

    wrapped: list[tuple[Any, str]] = []

    def instrumentation_dependencies(self) -> Collection[str]:
        return []

    def _instrument(self, **kwargs: Any) -> None:
        import importlib

        from wrapt import wrap_function_wrapper

        for module_name, attr, wrapper in _TARGETS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue  # the library is not installed: nothing to record
            wrap_function_wrapper(module, attr, wrapper)
            owner, method = attr.split(".")
            self.wrapped.append((getattr(module, owner), method))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, method in self.wrapped:
            unwrap(owner, method)
        self.wrapped.clear()
