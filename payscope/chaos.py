"""`payscope chaos SCENARIO.toml`: a short fault-injection experiment, and how the system's timeouts,
retries and compensations behaved under it.

A scenario puts a sidecar with faults in front of one service (the callers must already call the
sidecar's address), drives traffic (a URL or a command), stops, and reads what the services recorded
in the experiment's window: the calls that timed out and were retried, the late successes and
duplicate charges, the findings, and whether the recommended timeouts would have held. It exits 1
when the scenario's expectations fail, so that it can run in a team's CI.

```toml
name = "the bank slows down"

[proxy]                                 # the sidecar that injects the faults
listen = "127.0.0.1:18081"              # where the callers call
upstream = "127.0.0.1:18080"            # the service behind it
service = "bank"

[[fault]]                               # one or more; each draws on its own
delay = "300ms"                         # or abort = 503, or reset = true
share = "50%"
route = "POST /v1/charges"              # optional: a glob over the path, or METHOD glob

[traffic]                               # url (with {n} for the request's number), or command = [...]
url = "http://127.0.0.1:8000/orders/chaos-{n}"
method = "POST"
body = '{"amount": 25}'
headers = { "Content-Type" = "application/json" }
requests = 60
concurrency = 4

[expect]                                # what must hold; exit 1 when it does not
absent = ["late_success", "duplicate_charge", "non_idempotent_retry"]
max_failed = "10%"                      # of the requests driven (url traffic)
```
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from payscope.errors import InputError
from payscope.timeparse import parse_duration_s

_TOP = {"name", "settle", "timeout", "proxy", "fault", "traffic", "expect"}
_PROXY = {"listen", "upstream", "service", "timeout"}
_FAULT = {"delay", "abort", "reset", "share", "route"}
_TRAFFIC = {"url", "method", "body", "headers", "requests", "concurrency", "command", "timeout"}
_EXPECT = {"absent", "max_failed"}
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256


@dataclass
class Traffic:
    url: str | None = None
    method: str = "GET"
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    requests: int = 100
    concurrency: int = 4
    command: list[str] | None = None
    timeout_s: float = 30.0


@dataclass
class Scenario:
    name: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    service: str
    faults: list[Any]              # instrumentation.faults.Fault
    traffic: Traffic
    absent: list[str] = field(default_factory=list)
    max_failed: float | None = None  # a share, 0..1
    proxy_timeout_s: float = 60.0
    settle_s: float = 2.0            # after the traffic, for the services' last spans to arrive
    timeout_s: float = 600.0         # the whole experiment


def _table(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a table")
    unknown = sorted(set(value) - known)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return value


def _share(text: Any, where: str) -> float:
    match = _SHARE.match(str(text))
    if not match or not 0 <= float(match.group(1)) <= 100:
        raise InputError(f"{where}: {text!r} is not a percentage from 0% to 100%")
    return float(match.group(1)) / 100


def _duration(value: Any, where: str) -> float:
    seconds = parse_duration_s(str(value), where)
    if seconds <= 0:
        raise InputError(f"{where}: {value!r} must be a positive duration")
    return seconds


def _address(value: Any, where: str) -> tuple[str, int]:
    from payscope.collector.service import parse_listen

    if not isinstance(value, str):
        raise InputError(f"{where} must be HOST:PORT")
    return parse_listen(value, where)


def _fault(table: dict[str, Any], where: str) -> Any:
    from payscope.instrumentation.faults import FaultError, parse

    kinds = [k for k in ("delay", "abort", "reset") if k in table]
    if len(kinds) != 1:
        raise InputError(f"{where}: give one of delay, abort or reset")
    kind = kinds[0]
    if "share" not in table:
        raise InputError(f"{where}: share is missing (such as \"10%\")")
    value = "" if kind == "reset" else str(table[kind])
    if kind == "reset" and table[kind] is not True:
        raise InputError(f"{where}: reset must be true")
    spec = f"{value}@{table['share']}" + (f"@{table['route']}" if table.get("route") else "")
    try:
        return parse(kind, spec)
    except FaultError as exc:
        raise InputError(f"{where}: {exc}") from None


def load_scenario(path: Path) -> Scenario:
    """The scenario in ``path``, or InputError naming the first thing wrong with it."""
    import tomllib

    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    top = _table(document, str(path), _TOP)
    proxy = _table(top.get("proxy"), f"{path}: [proxy]", _PROXY) if "proxy" in top else None
    if proxy is None or not all(k in proxy for k in ("listen", "upstream", "service")):
        raise InputError(f"{path}: [proxy] needs listen, upstream and service")
    faults_table = top.get("fault", [])
    if not isinstance(faults_table, list) or not faults_table:
        raise InputError(f"{path}: at least one [[fault]] is needed")
    faults = [_fault(_table(f, f"{path}: [[fault]] {i + 1}", _FAULT), f"{path}: [[fault]] {i + 1}")
              for i, f in enumerate(faults_table)]
    t = _table(top.get("traffic"), f"{path}: [traffic]", _TRAFFIC) if "traffic" in top else None
    if t is None or ("url" in t) == ("command" in t):
        raise InputError(f"{path}: [traffic] needs url or command, one of the two")
    traffic = Traffic()
    if "url" in t:
        if not isinstance(t["url"], str) or not t["url"].startswith(("http://", "https://")):
            raise InputError(f"{path}: [traffic] url must be an http:// or https:// URL")
        traffic.url = t["url"]
        traffic.method = str(t.get("method", "GET")).upper()
        traffic.body = None if t.get("body") is None else str(t["body"])
        headers = t.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise InputError(f"{path}: [traffic] headers must be a table of strings")
        traffic.headers = dict(headers)
        for key, limit in (("requests", MAX_REQUESTS), ("concurrency", MAX_CONCURRENCY)):
            value = t.get(key, getattr(traffic, key))
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise InputError(f"{path}: [traffic] {key} must be a whole number from 1 to {limit}")
            setattr(traffic, key, value)
    else:
        command = t["command"]
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise InputError(f"{path}: [traffic] command must be a list of strings, such as [\"python3\", \"load.py\"]")
        traffic.command = command
    if "timeout" in t:
        traffic.timeout_s = _duration(t["timeout"], f"{path}: [traffic] timeout")
    expect = _table(top.get("expect", {}), f"{path}: [expect]", _EXPECT)
    absent = expect.get("absent", [])
    if not isinstance(absent, list) or not all(isinstance(a, str) for a in absent):
        raise InputError(f"{path}: [expect] absent must be a list of finding names")
    known = _expectable()
    unknown_findings = [a for a in absent if a not in known]
    if unknown_findings:
        raise InputError(f"{path}: [expect] absent: {unknown_findings[0]!r} is not a finding "
                         f"(known: {', '.join(known)})")
    scenario = Scenario(
        name=str(top.get("name") or path.stem), listen=_address(proxy["listen"], f"{path}: [proxy] listen"),
        upstream=_address(proxy["upstream"], f"{path}: [proxy] upstream"), service=str(proxy["service"]),
        faults=faults, traffic=traffic, absent=absent,
        max_failed=_share(expect["max_failed"], f"{path}: [expect] max_failed") if "max_failed" in expect else None)
    if "timeout" in proxy:
        scenario.proxy_timeout_s = _duration(proxy["timeout"], f"{path}: [proxy] timeout")
    if "settle" in top:
        scenario.settle_s = parse_duration_s(str(top["settle"]), f"{path}: settle")
    if "timeout" in top:
        scenario.timeout_s = _duration(top["timeout"], f"{path}: timeout")
    return scenario


def _expectable() -> tuple[str, ...]:
    """What ``[expect] absent`` may name: the findings, and duplicate_charge (orders charged twice)."""
    from payscope.analyzers.findings import KINDS

    return (*KINDS, DUPLICATE_CHARGE)


DUPLICATE_CHARGE = "duplicate_charge"


# --- running it --------------------------------------------------------------------------

class _SidecarThread:
    """The fault-injecting sidecar on an event loop of its own, beside the traffic."""

    def __init__(self, scenario: Scenario, collector: str) -> None:
        from payscope.instrumentation.faults import Faults
        from payscope.instrumentation.sidecar import Sidecar

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="payscope-chaos-sidecar", daemon=True)
        self.sidecar = Sidecar(scenario.listen, scenario.upstream, scenario.service, collector,
                               scenario.proxy_timeout_s, faults=Faults(scenario.faults))

    def start(self) -> None:
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.sidecar.start(), self.loop).result(30)
        except OSError as exc:
            self.stop()
            raise InputError(f"cannot listen on {self.sidecar.listen[0]}:{self.sidecar.listen[1]} "
                             f"({exc.strerror or exc})") from None

    def stop(self) -> None:
        """Close it; its last spans are exported before this returns."""
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.sidecar.close(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


@dataclass
class Driven:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    command_exit: int | None = None
    proxied: int | None = None  # requests the fault-injecting proxy took in (None: not known)

    @property
    def answered(self) -> int:
        """The requests that got an HTTP answer (each one a trace, where the entry is traced)."""
        return sum(n for status, n in self.statuses.items() if status.isdigit())


def _drive_urls(traffic: Traffic, deadline: float) -> Driven:
    assert traffic.url is not None
    driven = Driven()
    lock = threading.Lock()
    numbers = iter(range(1, traffic.requests + 1))

    def one(n: int) -> str:
        url = traffic.url.replace("{n}", str(n))  # type: ignore[union-attr]
        data = traffic.body.replace("{n}", str(n)).encode() if traffic.body is not None else None
        request = urllib.request.Request(url, data=data, headers=traffic.headers, method=traffic.method)
        try:
            with urllib.request.urlopen(request, timeout=traffic.timeout_s) as answer:
                answer.read()
                return str(answer.status)
        except urllib.error.HTTPError as exc:
            return str(exc.code)
        except (OSError, ValueError) as exc:
            return type(exc).__name__

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(numbers, None)
            if n is None:
                return
            status = one(n)
            with lock:
                driven.sent += 1
                driven.statuses[status] += 1
                if status.isdigit() and int(status) < 400:
                    driven.ok += 1
                else:
                    driven.failed += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(traffic.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return driven


def _drive_command(traffic: Traffic, deadline: float) -> Driven:
    assert traffic.command is not None
    try:
        done = subprocess.run(traffic.command, timeout=max(1.0, deadline - time.monotonic()))
    except FileNotFoundError:
        raise InputError(f"[traffic] command: {traffic.command[0]!r} not found") from None
    except subprocess.TimeoutExpired:
        return Driven(command_exit=-1)
    return Driven(command_exit=done.returncode)


def _reachable(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as sock:
        sock.settimeout(2)
        return sock.connect_ex(address) == 0


SETTLE_LIMIT_S = 60.0  # the longest a report waits past the settle time for the services' last spans
EXPECT_LIMIT_S = 15.0  # ... and, once quiet, for a trace of every request it answered (an entry without spans has none)


def _settle(store_url: str, settle_s: float, since_ns: int = 0, expected: int = 0) -> None:
    """Wait the settle time, then until the store has taken no new span for as long again (at least a second, at
    most SETTLE_LIMIT_S): on a loaded machine the exporters' last batches come late, and a report read before they
    arrive judges an experiment on calls it has not seen. A collector that stalls looks quiet too: so, once quiet,
    until ``expected`` traces (one a request the traffic got an answer to) started since ``since_ns``, for at most
    EXPECT_LIMIT_S more."""
    from payscope.collector.store import open_store

    time.sleep(settle_s)
    quiet_s = max(1.0, settle_s)
    started = time.monotonic()
    give_up = started + SETTLE_LIMIT_S
    with open_store(store_url, readonly=True) as opened:

        def traced() -> int:
            return opened.sample_traces(since_ns, 2**63 - 1, 1).in_window if expected else 0

        seen, since = opened.counts()["spans"], time.monotonic()
        while time.monotonic() < give_up:
            quiet = time.monotonic() - since >= quiet_s
            if quiet and (traced() >= expected or time.monotonic() - started >= quiet_s + EXPECT_LIMIT_S):
                return
            time.sleep(0.5)
            now = opened.counts()["spans"]
            if now != seen:
                seen, since = now, time.monotonic()


def run(scenario: Scenario, store_url: str, collector: str, say: Any = print) -> dict[str, Any]:
    """Start the faults, drive the traffic, stop, and report; the report's ``passed`` says whether the
    expectations held."""
    if not _reachable(scenario.upstream):
        raise InputError(f"[proxy] upstream {scenario.upstream[0]}:{scenario.upstream[1]} refuses connections: "
                         "start the service first")
    from payscope.collector.store import open_store

    with open_store(store_url, readonly=True):  # a store that is not there is said before the traffic, not after
        pass
    sidecar = _SidecarThread(scenario, collector)
    sidecar.start()
    for line in sidecar.sidecar.faults.describe():
        say(f"FAULT INJECTION ON: {line} in front of {scenario.service}")
    since_ns = time.time_ns()
    deadline = time.monotonic() + scenario.timeout_s
    try:
        driven = (_drive_urls if scenario.traffic.url else _drive_command)(scenario.traffic, deadline)
    finally:
        sidecar.stop()
        say("faults off")
    driven.proxied = sidecar.sidecar.handled
    _settle(store_url, scenario.settle_s, since_ns, driven.answered)
    until_ns = time.time_ns()
    return report(scenario, store_url, (since_ns, until_ns), driven)


def report(scenario: Scenario, store_url: str, window: tuple[int, int], driven: Driven) -> dict[str, Any]:
    from payscope.analyzers import recommend
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import analysis_document
    from payscope.collector.store import open_store

    with open_store(store_url, readonly=True) as opened:
        analysis = load(opened, window=window)
    document = analysis_document(analysis)
    edges = []
    for key, edge in sorted(analysis.edges.items()):
        rec = analysis.recommendations.get(key)
        edges.append({
            "caller": edge.caller, "callee": edge.callee, "operation": edge.operation, "calls": len(edge.calls),
            "timed_out": sum(c.error_class == "timeout" for c in edge.calls),
            "retried": sum(c.attempt > 0 for c in edge.calls),
            "late_success": sum(c.late_success for c in edge.calls),
            "injected": sum(edge.injected.values()),
            "timeout_ms": edge.timeout.value_ms, "recommended_timeout_ms": analysis.recommended_ms(key),
            "expected_timeout_rate": None if rec is None else {"now": round(rec.timeout_rate_before, 4),
                                                               "recommended": round(rec.timeout_rate_after, 4)},
        })
    found = Counter(f["kind"] for f in document["findings"])
    found[DUPLICATE_CHARGE] = document["stats"]["orders_charged_twice"]
    failures = [f"{name}: {found[name]} orders charged twice" if name == DUPLICATE_CHARGE else
                f"{name}: found on {found[name]} edge{'s' if found[name] > 1 else ''}"
                for name in scenario.absent if found[name]]
    # no expectation can hold on calls that were never seen: passing would say the faults were survived
    if driven.proxied == 0:
        failures.append(f"no request went through the proxy in front of {scenario.service}: the faults were not "
                        "exercised")
    elif not any(edge.callee == scenario.service and edge.calls for edge in analysis.edges.values()) and not any(
            facts.root_service == scenario.service for facts in analysis.traces.values()):
        failures.append(f"the proxy took {driven.proxied} requests in front of {scenario.service}, and the store "
                        "holds none of them in the window: their spans did not arrive")
    failed_share = driven.failed / driven.sent if driven.sent else None
    if scenario.max_failed is not None and failed_share is not None and failed_share > scenario.max_failed:
        failures.append(f"{failed_share:.1%} of the requests failed, more than {scenario.max_failed:.0%}")
    if driven.command_exit not in (None, 0):
        failures.append(f"the traffic command exited {driven.command_exit}")
    simulation = recommend.simulate(analysis, list(analysis.recommendations.values()))
    return {
        "scenario": scenario.name, "window": {"from_ns": window[0], "to_ns": window[1]},
        "faults": [f.describe() for f in scenario.faults], "target": scenario.service,
        "traffic": {"sent": driven.sent, "ok": driven.ok, "failed": driven.failed,
                    "statuses": dict(driven.statuses), "command_exit": driven.command_exit,
                    "proxied": driven.proxied},
        "transactions": document["stats"]["transactions"], "outcomes": document["stats"]["outcomes"],
        "orders_charged_twice": document["stats"]["orders_charged_twice"],
        "injected_faults": document["injected_faults"], "edges": edges, "findings": document["findings"],
        "with_recommended_timeouts": {"recorded": simulation["recorded"], "replayed": simulation["after"]},
        "expectations": {"absent": scenario.absent, "max_failed": scenario.max_failed},
        "failures": failures, "passed": not failures,
    }


__all__ = ["Scenario", "load_scenario", "report", "run"]
