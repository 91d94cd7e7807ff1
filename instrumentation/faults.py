"""Faults the sidecar injects into a share of requests, off unless asked for, and marked on every span they touch.

A rule is ``VALUE@SHARE`` with an optional ``@ROUTE`` (a glob over the path, or ``METHOD PATH``)::

    --delay 300ms@10%            # 10% of requests wait 300 ms before they go on to the service
    --abort 503@5%@/charge*      # 5% of requests to /charge... are answered 503 by the sidecar
    --reset @1%                  # 1% of connections are reset before any answer

Each rule draws on its own, in the order given; the first that fires applies. The span of a request a fault
touched carries ``payscope.fault.kind`` (delay, abort, reset) and ``payscope.fault.delay_ms`` or
``payscope.fault.status``, so the analysis can tell an injected fault from the system's own.

The rules change at run time on an admin endpoint bound to 127.0.0.1: ``GET /faults`` lists them,
``PUT /faults`` with a JSON list (``[{"kind": "delay", "value": "300ms", "share": "10%", "route": "/pay*"}]``)
replaces them, ``DELETE /faults`` removes them all.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.trace import Status, StatusCode

KINDS = ("delay", "abort", "reset")


class FaultError(ValueError):
    """A fault rule that cannot be: says which and why, in one line."""

FAULT_KIND = "payscope.fault.kind"
FAULT_DELAY = "payscope.fault.delay_ms"
FAULT_STATUS = "payscope.fault.status"
FAULT_SHARE = "payscope.fault.share"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")
_SHARE = re.compile(r"^(\d+(?:\.\d+)?)%$")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    share: float        # 0 < share <= 1
    route: str | None   # a glob over the path, or "METHOD glob"
    delay_ms: float = 0.0
    status: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.route is None:
            return True
        want_method, _, glob = self.route.partition(" ") if " " in self.route else ("", "", self.route)
        return (not want_method or want_method.upper() == method.upper()) and fnmatch.fnmatchcase(path, glob)

    def to_json(self) -> dict[str, Any]:
        value = f"{self.delay_ms:g}ms" if self.kind == "delay" else str(self.status) if self.kind == "abort" else ""
        return {"kind": self.kind, "value": value, "share": f"{self.share * 100:g}%", "route": self.route}

    def describe(self) -> str:
        what = {"delay": f"delay {self.delay_ms:g} ms", "abort": f"answer {self.status}",
                "reset": "reset the connection"}[self.kind]
        return f"{what} on {self.share * 100:g}% of requests" + (f" to {self.route}" if self.route else "")

    async def apply(self, span: Any, request: web.BaseRequest) -> web.StreamResponse | None:
        """Mark the span and inject; a response when the request ends here, None when it goes on."""
        span.set_attribute(FAULT_KIND, self.kind)
        span.set_attribute(FAULT_SHARE, self.share)
        if self.kind == "delay":
            span.set_attribute(FAULT_DELAY, self.delay_ms)
            await asyncio.sleep(self.delay_ms / 1000)
            return None
        if self.kind == "abort":
            span.set_attribute(FAULT_STATUS, self.status)
            span.set_attribute("http.response.status_code", self.status)
            return web.Response(status=self.status, text="fault injected by payscope sidecar\n")
        span.set_attribute("error.type", "connection_reset")
        span.set_status(Status(StatusCode.ERROR, "connection reset: fault injected by payscope sidecar"))
        if request.transport is not None:
            request.transport.abort()  # an RST, not a clean close: as a crashed or cut-off service
        return web.Response(status=499)  # never sent: the connection is gone


def parse(kind: str, spec: str) -> Fault:
    """One ``--delay``/``--abort``/``--reset`` value, or FaultError naming what is wrong with it."""
    if kind not in KINDS:
        raise FaultError(f"unknown fault kind {kind!r}: use {', '.join(KINDS)}")
    parts = spec.split("@", 2)
    if len(parts) < 2:
        raise FaultError(f"--{kind} {spec!r}: write VALUE@SHARE, such as 300ms@10%")
    value, share_text = parts[0].strip(), parts[1].strip()
    route = parts[2].strip() if len(parts) == 3 and parts[2].strip() else None
    match = _SHARE.match(share_text)
    if not match or not 0 < float(match.group(1)) <= 100:
        raise FaultError(f"--{kind} {spec!r}: the share must be a percentage above 0% and at most 100%")
    share = float(match.group(1)) / 100
    if kind == "delay":
        duration = _DURATION.match(value)
        if not duration:
            raise FaultError(f"--delay {spec!r}: the delay must be a duration such as 300ms or 2s")
        ms = float(duration.group(1)) * (1000 if duration.group(2) == "s" else 1)
        if not 0 < ms <= 600_000:
            raise FaultError(f"--delay {spec!r}: the delay must be above 0 and at most 10 minutes")
        return Fault("delay", share, route, delay_ms=ms)
    if kind == "abort":
        if not value.isdigit() or not 400 <= int(value) <= 599:
            raise FaultError(f"--abort {spec!r}: the status must be an HTTP error status, 400 to 599")
        return Fault("abort", share, route, status=int(value))
    if value:
        raise FaultError(f"--reset {spec!r}: a reset takes no value: write @SHARE, such as @1%")
    return Fault("reset", share, route)


def from_json(document: Any) -> list[Fault]:
    if not isinstance(document, list):
        raise FaultError("the faults must be a JSON list of {kind, value, share, route}")
    out = []
    for item in document:
        if not isinstance(item, dict) or set(item) - {"kind", "value", "share", "route"}:
            raise FaultError(f"a fault is {{kind, value, share, route}}, not {json.dumps(item)[:80]}")
        route = item.get("route")
        out.append(parse(str(item.get("kind")), f"{item.get('value', '')}@{item.get('share', '')}"
                         + (f"@{route}" if route else "")))
    return out


class Faults:
    """The rules in force, and the admin endpoint that changes them."""

    def __init__(self, rules: list[Fault] | None = None, seed: int | None = None) -> None:
        self.rules = list(rules or [])
        self._random = random.Random(seed)
        self._admin: web.AppRunner | None = None

    def pick(self, method: str, path: str) -> Fault | None:
        for rule in self.rules:
            if rule.matches(method, path) and self._random.random() < rule.share:
                return rule
        return None

    def describe(self) -> list[str]:
        return [rule.describe() for rule in self.rules]

    async def serve_admin(self, address: tuple[str, int]) -> None:
        try:
            loopback = ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            loopback = address[0] == "localhost"
        if not loopback:
            raise FaultError(f"--admin {address[0]}:{address[1]}: the admin endpoint binds this machine only "
                             "(127.0.0.1)")
        app = web.Application()
        app.router.add_get("/faults", self._get)
        app.router.add_put("/faults", self._put)
        app.router.add_delete("/faults", self._delete)
        self._admin = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._admin.setup()
        await web.TCPSite(self._admin, address[0], address[1]).start()

    async def close_admin(self) -> None:
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response([rule.to_json() for rule in self.rules])

    async def _put(self, request: web.Request) -> web.Response:
        try:
            self.rules = from_json(json.loads(await request.read()))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response([rule.to_json() for rule in self.rules])

    async def _delete(self, request: web.Request) -> web.Response:
        self.rules = []
        return web.json_response([])
