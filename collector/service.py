"""``payscope collect``: the receivers, the writer and the store, started and stopped together."""

from __future__ import annotations

import ipaddress
import signal
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from payscope.errors import InputError

from .decoding import DecodePool
from .receivers import GRPCReceiver, HTTPReceiver, Receiver, protobuf_backend, warn_if_slow_protobuf
from .store import Store
from .writer import SETTLE_S, BatchWriter, Deriver


def parse_listen(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise InputError(f"{option} {value!r} is not HOST:PORT (for example 127.0.0.1:4318)")
    return (host or "127.0.0.1").strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: Path) -> str:
    """The bearer token in a file (its first line); never echoed, in errors either."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--token-file {path}: cannot read it ({type(exc).__name__})") from None
    token = text.splitlines()[0].strip() if text else ""
    if len(token) < 16:
        raise InputError(f"--token-file {path}: the token must be at least 16 characters")
    return token


@dataclass
class Access:
    """Who may send: anyone on this machine by default; from the network only with a token, and TLS if given."""

    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def check(self, host: str, option: str) -> None:
        if not is_loopback(host) and self.token is None:
            raise InputError(f"{option} {host} listens beyond this machine: give --token-file (a bearer token "
                             "clients must send), and --tls-cert/--tls-key to encrypt")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InputError("--tls-cert and --tls-key go together")

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"--tls-cert/--tls-key: cannot load them ({exc.__class__.__name__})") from None
        return context

    def grpc_pair(self) -> tuple[bytes, bytes] | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return self.tls_cert.read_bytes(), self.tls_key.read_bytes()


def raise_open_files_limit() -> None:
    """Allow as many open files as the system lets this process have: a connection is a file."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 65536), hard))
    except (ImportError, OSError, ValueError):
        pass


@dataclass
class Collector:
    store: Store
    http: str | None = "127.0.0.1:4318"
    grpc: str | None = "127.0.0.1:4317"
    access: Access = field(default_factory=Access)
    workers: int = 0  # decoding processes (collector/decoding.py); 0 decodes in the receiving threads
    deriver: Deriver | None = None  # derives settled traces for the analysis (writer.BatchWriter)
    settle_s: float = SETTLE_S
    writer: BatchWriter = field(init=False)
    decoder: DecodePool = field(init=False)
    receivers: list[HTTPReceiver | GRPCReceiver] = field(default_factory=list)

    def start(self) -> list[str]:
        """Start listening; return the addresses listened on."""
        addresses = {}
        for option, value in (("--http", self.http), ("--grpc", self.grpc)):
            if value:
                addresses[option] = parse_listen(value, option)
                self.access.check(addresses[option][0], option)
        tls = self.access.ssl_context()
        raise_open_files_limit()
        self.writer = BatchWriter(self.store, deriver=self.deriver, settle_s=self.settle_s)
        self.decoder = DecodePool(self.workers)
        receiver = Receiver(self.writer, self.access.token, self.decoder)
        listening = []
        scheme = "https" if tls else "http"
        try:
            if "--http" in addresses:
                host, port = addresses["--http"]
                http = HTTPReceiver(receiver, host, port, tls)
                http.start()
                self.receivers.append(http)
                listening.append(f"OTLP/HTTP {scheme}://{host}:{http.port}")
            if "--grpc" in addresses:
                host, port = addresses["--grpc"]
                grpc = GRPCReceiver(receiver, host, port, self.access.grpc_pair())
                grpc.start()
                self.receivers.append(grpc)
                listening.append(f"OTLP/gRPC {grpc.host}:{grpc.port}" + (" (TLS)" if tls else ""))
        except OSError as exc:
            self.stop()
            raise InputError(f"cannot listen: {exc}") from None
        return listening

    def stop(self) -> None:
        """Stop taking requests, then commit what was queued; nothing acknowledged is lost."""
        for receiver in self.receivers:
            receiver.stop()
        self.receivers.clear()
        if hasattr(self, "decoder"):
            self.decoder.close()
        if hasattr(self, "writer"):
            self.writer.close()


def run_collector(store: Store, http: str | None, grpc: str | None, access: Access | None = None,
                  workers: int = 0, deriver: Deriver | None = None, settle_s: float = SETTLE_S) -> None:
    """Serve until SIGINT or SIGTERM."""
    warn_if_slow_protobuf()
    collector = Collector(store, http, grpc, access or Access(), workers, deriver, settle_s)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # before the banner: whoever waits for it may stop us at once, and must get a clean stop
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    listening = collector.start()
    print(f"payscope collect: listening on {', '.join(listening)}; storing in {store.url} "
          f"(protobuf: {protobuf_backend()})", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    collector.stop()
    print(f"payscope collect: stopped; {collector.writer.committed_spans} spans and "
          f"{collector.writer.committed_logs} log records stored this run, {collector.writer.derived_traces} traces "
          "derived for the analysis", file=sys.stderr, flush=True)
