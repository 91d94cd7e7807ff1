"""Shared helpers for the tests: free ports, a real `payscope collect` process, CLI runs."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
SCENARIOS = DATA / "scenarios"
REALDATA = DATA / "realdata"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server with ``handler`` on 127.0.0.1 for as long as the block runs; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class CapturingHandler(http.server.BaseHTTPRequestHandler):
    """Stands in for the collector: answers 200 and keeps the exact bytes it is sent (gunzipped)."""

    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        CapturingHandler.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def payscope(*args: str, env: dict[str, str] | None = None, check: bool = False,
             timeout: float = 120, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process."""
    full_env = dict(os.environ)
    full_env.pop("PAYSCOPE_STORE", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "payscope", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"payscope {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def payscope_json(*args: str) -> Any:
    proc = payscope(*args, "--format", "json", check=True)
    return json.loads(proc.stdout)


class CollectorProcess:
    """`payscope collect` in a child process on free ports; always stopped by the test."""

    def __init__(self, store: Path | str, *, grpc: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.store = store
        self.http_port = free_port()
        self.grpc_port = free_port() if grpc else None
        args = [sys.executable, "-m", "payscope", "collect", "--store", str(store),
                "--http", f"127.0.0.1:{self.http_port}",
                "--grpc", f"127.0.0.1:{self.grpc_port}" if grpc else "off", *extra]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.banner = self._wait_ready()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"collector exited early: {''.join(lines)}")
            lines.append(line)
            if "listening on" in line:
                return "".join(lines)
        raise AssertionError("collector did not start listening in time")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        rest = ""
        if self.proc.stderr and not self.proc.stderr.closed:  # stopped once already: nothing more to read
            rest = self.proc.stderr.read()
            self.proc.stderr.close()
        return rest

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM every process, then wait for each (killing one that will not go)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


@contextmanager
def node_server(script: str, directory: Path) -> Iterator[int]:
    """A plain Node.js HTTP server running ``script`` (which listens on the port given as its argument), on a
    free port of 127.0.0.1 until the block ends."""
    port = free_port()
    path = directory / f"server-{port}.js"
    path.write_text(script)
    proc = subprocess.Popen(["node", str(path), str(port)])
    try:
        wait_port(port)
        yield port
    finally:
        stop_all([proc])


def demo_bank_link_leads(hops: list[dict[str, Any]]) -> bool:
    """Whether `compare` on the demo's sale peak names the bank's slowed link first: as the first hop, or, when
    the entry requests gave up waiting in order's queue and never reached the bank, as what held order's workers
    under that queue, which then leads."""
    first = hops[0]
    if (first["component"], first["service"]) == ("queue", "order"):
        return bool(first["consequence"]) and any(
            (h["component"], h["service"], (h["edge"] or {}).get("caller")) == ("network", "bank", "payment")
            for h in first.get("held_by") or ())
    return (first["component"], first["service"], (first["edge"] or {}).get("caller")) == ("network", "bank",
                                                                                          "payment")
