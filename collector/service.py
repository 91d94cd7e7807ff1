"""``payscope collect``: the receivers, the writer and the store, started and stopped together."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, field

from payscope.errors import InputError

from .receivers import GRPCReceiver, HTTPReceiver, Receiver, protobuf_backend, warn_if_slow_protobuf
from .store import Store
from .writer import BatchWriter


def parse_listen(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise InputError(f"{option} {value!r} is not HOST:PORT (for example 127.0.0.1:4318)")
    return host or "127.0.0.1", int(port)


@dataclass
class Collector:
    store: Store
    http: str | None = "127.0.0.1:4318"
    grpc: str | None = "127.0.0.1:4317"
    writer: BatchWriter = field(init=False)
    receivers: list[HTTPReceiver | GRPCReceiver] = field(default_factory=list)

    def start(self) -> list[str]:
        """Start listening; return the addresses listened on."""
        self.writer = BatchWriter(self.store)
        receiver = Receiver(self.writer)
        listening = []
        try:
            if self.http:
                host, port = parse_listen(self.http, "--http")
                http = HTTPReceiver(receiver, host, port)
                http.start()
                self.receivers.append(http)
                listening.append(f"OTLP/HTTP http://{host}:{http.port}")
            if self.grpc:
                host, port = parse_listen(self.grpc, "--grpc")
                grpc = GRPCReceiver(receiver, host, port)
                grpc.start()
                self.receivers.append(grpc)
                listening.append(f"OTLP/gRPC {grpc.host}:{grpc.port}")
        except OSError as exc:
            self.stop()
            raise InputError(f"cannot listen: {exc}") from None
        return listening

    def stop(self) -> None:
        """Stop taking requests, then commit what was queued; nothing acknowledged is lost."""
        for receiver in self.receivers:
            receiver.stop()
        self.receivers.clear()
        if hasattr(self, "writer"):
            self.writer.close()


def run_collector(store: Store, http: str | None, grpc: str | None) -> None:
    """Serve until SIGINT or SIGTERM."""
    warn_if_slow_protobuf()
    collector = Collector(store, http, grpc)
    listening = collector.start()
    print(f"payscope collect: listening on {', '.join(listening)}; storing in {store.url} "
          f"(protobuf: {protobuf_backend()})", file=sys.stderr, flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(0.5):
        pass
    collector.stop()
    print(f"payscope collect: stopped; {collector.writer.committed_spans} spans and "
          f"{collector.writer.committed_logs} log records stored this run", file=sys.stderr, flush=True)
