"""`payscope demo`: a real payment system with bad timeouts, run under payscope and investigated.

gateway (proxy, 1 s upstream timeout, nginx-style access log)
  -> order (Flask on gunicorn, 2 workers, JSON logs; no timeout on inventory, 2.5 s on payment)
       -> inventory (FastAPI on uvicorn, text logs; TCC on the stock: try, then confirm or cancel, confirm not
                     idempotent: a customer's retry of a paid order confirms its stock twice)
       -> payment (retries the bank twice without an idempotency key, 0.4 s per try; loguru)
            -> bank (heavy-tailed latency, worse in the sale peak; idempotency-aware; declines some cards)
               over a link that loses a few hundred ms during the peak (a delaying TCP relay: no netem here)

Every process runs under `payscope run`, beside a `payscope collect`. A traffic generator places
orders (customers retry once when the gateway gives up), then the logs are ingested and the whole
thing analysed. `--fixed` runs it again with payscope's own recommendations and measures the change.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payscope.demo.netdelay import DelayingRelay
from payscope.errors import PayscopeError

if TYPE_CHECKING:
    from payscope.analyzers.engine import Analysis
    from payscope.analyzers.recommend import Setting

    Clients = dict[tuple[str, str], Setting]

NEEDS = ("flask", "gunicorn", "uvicorn", "fastapi", "httpx", "requests", "loguru", "opentelemetry.sdk")
FAULTY = {"GATEWAY_TIMEOUT": "1.0", "ORDER_PAYMENT_TIMEOUT": "2.5", "ORDER_INVENTORY_TIMEOUT": "none",
          "PAYMENT_BANK_TIMEOUT": "0.4", "PAYMENT_BANK_RETRIES": "2", "PAYMENT_IDEMPOTENCY": "off"}
SERVICES = ("bank", "payment", "inventory", "order", "gateway")
BANK_LINK_DELAY_MS = 200.0  # added on the wire between payment and the bank during the sale peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_installed() -> None:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise PayscopeError(f"the demo needs {', '.join(missing)}: pip install 'payscope[all]'")


@dataclass
class System:
    """The running processes of one demo run."""

    store: Path
    log_dir: Path
    settings: dict[str, str]
    seed: int
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    bank_link: DelayingRelay | None = None
    bank_url: str | None = None  # where payment calls the bank, when not the delaying link (a chaos sidecar)
    peak: tuple[float, float] = (0.0, 0.0)  # the sale peak, seconds since the epoch: see set_peak

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def peak_file(self) -> Path:
        return self.log_dir / "bank-peak.txt"

    def set_peak(self, peak: tuple[float, float]) -> None:
        """When the sale peak is: the bank slows and its link loses BANK_LINK_DELAY_MS between these times. Set
        once the traffic starts, so that the two peaks are one however long the services took to start."""
        self.peak = peak
        written = self.peak_file.with_suffix(".tmp")
        written.write_text(f"{peak[0]} {peak[1]}")
        written.replace(self.peak_file)  # the bank reads it whole or not at all

    def start(self) -> None:
        """Start every service, with no sale peak until :meth:`set_peak` sets one."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):
            old.unlink()
        self.set_peak((0.0, 0.0))
        self.ports = {name: _free_port() for name in ("collector", "bank-link", *SERVICES)}
        py = sys.executable
        self.procs["collector"] = subprocess.Popen(
            [py, "-m", "payscope", "collect", "--store", str(self.store), "--http",
             f"127.0.0.1:{self.ports['collector']}", "--grpc", "off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.ports["collector"], "the collector")
        env = dict(os.environ, **self.settings, DEMO_LOG_DIR=str(self.log_dir), DEMO_SEED=str(self.seed),
                   PAYSCOPE_QUIET="1", OTEL_BSP_SCHEDULE_DELAY="200", OTEL_BLRP_SCHEDULE_DELAY="200",
                   BANK_URL=self.bank_url or f"http://127.0.0.1:{self.ports['bank-link']}",
                   PAYMENT_URL=f"http://127.0.0.1:{self.ports['payment']}",
                   INVENTORY_URL=f"http://127.0.0.1:{self.ports['inventory']}",
                   ORDER_URL=f"http://127.0.0.1:{self.ports['order']}",
                   BANK_PEAK_FILE=str(self.peak_file))
        commands = {
            "bank": [py, "-m", "payscope.demo.services.bank", str(self.ports["bank"])],
            "payment": [py, "-m", "payscope.demo.services.payment", str(self.ports["payment"])],
            "inventory": [py, "-m", "uvicorn", "payscope.demo.services.inventory:app", "--host", "127.0.0.1",
                          "--port", str(self.ports["inventory"]), "--log-level", "warning"],
            "order": [py, "-m", "gunicorn", "-w", "2", "--threads", "8", "-b", f"127.0.0.1:{self.ports['order']}",
                      "--error-logfile", str(self.log_dir / "gunicorn.log"), "payscope.demo.services.order:app"],
            "gateway": [py, "-m", "payscope.demo.services.gateway", str(self.ports["gateway"])],
        }
        for name in SERVICES:
            with (self.log_dir / f"{name}.stderr").open("wb") as stderr:  # the service keeps its own copy
                self.procs[name] = subprocess.Popen(
                    [py, "-m", "payscope", "run", "--service", name, "--collector",
                     f"http://127.0.0.1:{self.ports['collector']}", "--", *commands[name]],
                    env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        for name in SERVICES:
            _wait_port(self.ports[name], name, self.procs[name])

        def link_delay_ms() -> float:
            return BANK_LINK_DELAY_MS if self.peak[0] <= time.time() < self.peak[1] else 0.0

        self.bank_link = DelayingRelay(self.ports["bank-link"], self.ports["bank"], link_delay_ms).start()

    def stop(self) -> None:
        """SIGTERM everything (services first, the collector last, so it stores what they flushed)."""
        for name in SERVICES:
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in SERVICES:
            proc = self.procs.get(name)
            if proc:
                _reap(proc)
        if self.bank_link is not None:
            self.bank_link.stop()
            self.bank_link = None
        collector = self.procs.get("collector")
        if collector:
            collector.send_signal(signal.SIGTERM)
            _reap(collector)
        self.procs.clear()


def _wait_port(port: int, what: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PayscopeError(f"the demo's {what} exited while starting (code {proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise PayscopeError(f"the demo's {what} did not start listening on 127.0.0.1:{port}")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


# --- traffic ----------------------------------------------------------------------

@dataclass
class Traffic:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _post(url: str, body: dict[str, Any], timeout: float = 10.0) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def drive(gateway: str, duration: float, seed: int, on_tick: Any = None) -> Traffic:
    """Orders for ``duration`` seconds: a steady rate, then a sale peak in the middle at three times it."""
    rng = random.Random(seed)
    traffic = Traffic()
    start = time.monotonic()
    threads: list[threading.Thread] = []
    n = 0

    def customer(order_id: str, amount: float) -> None:
        status = _post(f"{gateway}/orders/{order_id}", {"amount": amount})
        retried = False
        if status in (502, 504, 0):  # the customer presses "pay" again: a new trace, the same order
            retried = True
            time.sleep(0.3)
            status = _post(f"{gateway}/orders/{order_id}", {"amount": amount})
        with traffic.lock:
            traffic.sent += 1
            traffic.retried += retried
            if status == 200:
                traffic.ok += 1
            else:
                traffic.failed += 1

    while (elapsed := time.monotonic() - start) < duration:
        peak = 0.4 * duration <= elapsed < 0.7 * duration
        rate = 18.0 if peak else 6.0
        n += 1
        order_id = f"ord-{seed % 100:02d}{n:05d}"
        t = threading.Thread(target=customer, args=(order_id, round(rng.uniform(5, 300), 2)), daemon=True)
        t.start()
        threads.append(t)
        if on_tick:
            on_tick(traffic, peak, elapsed)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join(timeout=15)
    return traffic


# --- the whole run ---------------------------------------------------------------------

def run_once(store: Path, log_dir: Path, settings: dict[str, str], duration: float, seed: int,
             keep_running: bool, say: Any, progress: Any = None) -> dict[str, Any]:
    """Start the system, drive it, stop it (unless kept), ingest its logs; return what happened."""
    system = System(store, log_dir, settings, seed)
    try:
        system.start()  # a failed start stops what it started
        say(f"system up: gateway {system.gateway}, collector http://127.0.0.1:{system.ports['collector']}; "
            f"placing orders for {duration:.0f}s (sale peak in the middle)")
        now = time.time()  # the traffic's peak (drive) and the bank's are one, however long the start took
        peak = (now + 0.4 * duration, now + 0.7 * duration)
        system.set_peak(peak)
        traffic = drive(system.gateway, duration, seed, progress)
        time.sleep(1.5)  # let the batch exporters send the last spans
        if keep_running:
            say(f"kept running: gateway {system.gateway}; Ctrl-C to stop everything")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        system.stop()
    from payscope.analyzers.correlate import Linker
    from payscope.collector.logingest import ingest
    from payscope.collector.store import open_store

    with open_store(str(store)) as opened:
        linker = Linker(opened)
        sources = [("gateway", log_dir / "gateway-access.log"), ("order", log_dir / "order.log"),
                   ("inventory", log_dir / "inventory.log"), ("payment", log_dir / "payment.log"),
                   ("bank", log_dir / "bank.log"), ("order", log_dir / "gunicorn.log")]
        reports = [ingest(opened, [str(path)], service=service, linker=linker) for service, path in sources
                   if path.exists() and path.stat().st_size]
        opened.set_meta("demo_traffic", json.dumps({"sent": traffic.sent, "ok": traffic.ok, "failed": traffic.failed,
                                                    "retried": traffic.retried}))
        opened.set_meta("demo_peak", json.dumps({"start": peak[0], "end": peak[1], "traffic_start": now}))
    return {"traffic": traffic, "log_lines": sum(r.stored + sum(f.joined for f in r.files) for r in reports),
            "linked": dict(linker.stats.by_method)}


OUTCOME_ROWS = ("orders placed", "orders paid", "orders failed for the customer", "orders charged twice",
                "transactions (traces)", "transactions ok", "transactions failed", "transactions timed out",
                "transactions declined", "transactions late_success")


def outcomes(store: Path) -> Counter[str]:
    """What one run's store measured: orders as the customers saw them, transactions as the analysis judged."""
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import analysis_document
    from payscope.collector.store import open_store

    with open_store(str(store), readonly=True) as opened:
        stats = analysis_document(load(opened))["stats"]
        traffic = json.loads(opened.get_meta("demo_traffic") or "{}")
    by = stats["outcomes"]
    return Counter({
        "orders placed": int(traffic.get("sent", 0)), "orders paid": int(traffic.get("ok", 0)),
        "orders failed for the customer": int(traffic.get("failed", 0)),
        "orders charged twice": stats["orders_charged_twice"],
        "transactions (traces)": stats["transactions"], "transactions ok": by.get("ok", 0),
        "transactions failed": by.get("failed", 0), "transactions timed out": by.get("timeout", 0),
        "transactions declined": by.get("declined", 0), "transactions late_success": by.get("late_success", 0)})


def recommended_clients(store: Path) -> tuple[Analysis, Clients]:
    """The analysis of ``store`` and the one setting of each client it recommends (``recommend.per_client``): what
    ``--fixed`` applies."""
    from payscope.analyzers import recommend
    from payscope.analyzers.loader import load
    from payscope.collector.store import open_store

    with open_store(str(store), readonly=True) as opened:
        analysis = load(opened)
    return analysis, {pair: setting for pair, (_, setting) in
                      recommend.per_client(list(analysis.recommendations.values())).items()}


def replayed_fix(analysis: Analysis, clients: Clients, after: Path) -> tuple[dict[str, int], dict[str, int]]:
    """What the replay of the first run's recorded transactions (``analysis``) said the settings ``--fixed`` applies
    (``clients``) would do, and what the run under them recorded (``after``), counted alike (``recommend.replay``,
    ``recommend.recorded``)."""
    from payscope.analyzers import recommend
    from payscope.analyzers.loader import load
    from payscope.collector.store import open_store

    settings = {key: clients[key[:2]] for key in analysis.edges if key[:2] in clients}
    predicted = recommend.replay(analysis, settings).to_json()
    with open_store(str(after), readonly=True) as opened:
        measured = recommend.recorded(load(opened)).to_json()
    return predicted, measured


def fixed_settings(store: Path, clients: Clients | None = None) -> dict[str, str]:
    """The demo's settings as payscope recommends them, from what the store recorded (``clients``: its
    :func:`recommended_clients`, when already made)."""
    if clients is None:
        _, clients = recommended_clients(store)
    settings = dict(FAULTY)

    def put(name: str, edge: tuple[str, str]) -> None:
        # one client in each service serves every operation on its callee (order's inventory client makes the TCC
        # try, confirm and cancel calls): the client's one value (recommend.per_client)
        setting = clients.get(edge)
        if setting is not None and setting.per_try_ms is not None:
            settings[name] = f"{setting.per_try_ms / 1000:g}"

    put("GATEWAY_TIMEOUT", ("gateway", "order"))
    put("ORDER_PAYMENT_TIMEOUT", ("order", "payment"))
    put("ORDER_INVENTORY_TIMEOUT", ("order", "inventory"))
    put("PAYMENT_BANK_TIMEOUT", ("payment", "bank"))
    bank = clients.get(("payment", "bank"))
    settings["PAYMENT_BANK_RETRIES"] = str(max(0, (bank.attempts if bank else 1) - 1))
    return settings
