"""The `payscope run` relay: the export happens in a separate process, loses nothing a short-lived
program produced, masks secrets before they leave the program, and goes away with the program."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from payscope.collector.store import open_store
from tests.helpers import CapturingHandler, CollectorProcess

SCRIPT = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from opentelemetry import trace
tracer = trace.get_tracer("relay-test")
for i in range(int(sys.argv[1])):
    with tracer.start_as_current_span("charge", kind=trace.SpanKind.SERVER,
                                      attributes={"url.query": f"order_id=o-{i}", "card": "4111 1111 1111 1111",
                                                  "http.request.header.authorization": ("Bearer s3cr3t-t0ken",)}):
        logging.getLogger("pay").info("charging o-%d with card 4111111111111111 cvv=123", i)
exported_here = "opentelemetry.exporter.otlp.proto.http.trace_exporter" in sys.modules
sys.stderr.write("relay socket: %s\\n" % os.environ.get("PAYSCOPE_RELAY"))
print("relay" if os.environ.get("PAYSCOPE_RELAY") else "no relay", "in-process exporter" if exported_here else "")
"""


def _run(tmp_path: Path, collector_url: str, count: int, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "short.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "short", "--collector",
                           collector_url, "--", sys.executable, str(script), str(count)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, **env), cwd=tmp_path)


def _relays(tmp: Path) -> list[str]:
    """Directories of relays still running under `tmp` (each removes its own when it stops). The program
    runs with TMPDIR=tmp, so relays that other tests start at the same time are not counted."""
    return [p.name for p in tmp.glob("payscope-relay-*")]


def _wait_for(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_a_short_program_loses_nothing_and_the_relay_goes_away(tmp_path: Path, collector: CollectorProcess,
                                                               store_path: Path) -> None:
    # a short directory of its own: a unix socket's path holds at most 107 bytes, and pytest's are long
    tmp = Path(tempfile.mkdtemp(prefix="relay-test-"))
    try:
        _short_program_loses_nothing(tmp, tmp_path, collector, store_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _short_program_loses_nothing(tmp: Path, tmp_path: Path, collector: CollectorProcess, store_path: Path) -> None:
    done = _run(tmp_path, collector.http_url, 300, TMPDIR=str(tmp))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["relay"]  # exported through the relay; no OTLP exporter in the program
    assert "exporting to " + collector.http_url + " through the payscope run relay" in done.stderr
    assert f"relay socket: {tmp}/payscope-relay-" in done.stderr  # the relay counted below is this one

    def all_there() -> bool:
        with open_store(str(store_path), readonly=True) as store:
            return len(store.traces(limit=None)) == 300 and len(store.logs_of_trace(
                store.traces_by_key("o-299")[0] if store.traces_by_key("o-299") else "0" * 32)) == 1

    assert _wait_for(all_there), "spans or log records of a program that already exited were lost"
    assert _wait_for(lambda: not _relays(tmp)), "the relay outlived its program"


def test_in_process_export_still_works_when_asked_for(tmp_path: Path, collector: CollectorProcess,
                                                      store_path: Path) -> None:
    done = _run(tmp_path, collector.http_url, 5, PAYSCOPE_EXPORT="inprocess")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["no", "relay", "in-process", "exporter"]
    assert "exporting to " + collector.http_url + " from this process" in done.stderr

    def there() -> bool:
        with open_store(str(store_path), readonly=True) as store:
            return len(store.traces(limit=None)) == 5

    assert _wait_for(there)


@pytest.mark.parametrize("mode", ["relay", "inprocess"])
def test_card_numbers_cvvs_and_credentials_never_leave_the_program(tmp_path: Path, capture: str, mode: str) -> None:
    done = _run(tmp_path, capture, 3, PAYSCOPE_EXPORT=mode)
    assert done.returncode == 0, done.stderr
    assert _wait_for(lambda: len(CapturingHandler.bodies) >= 2)  # spans and log records
    sent = b"".join(CapturingHandler.bodies)
    assert b"charging o-2" in sent and b"order_id" in sent  # what was sent is readable ...
    for secret in (b"4111111111111111", b"4111 1111 1111 1111", b"s3cr3t-t0ken", b"cvv=123"):
        assert secret not in sent, secret  # ... and the secrets are not in it


def test_a_lost_relay_costs_telemetry_not_the_program_and_says_how_much(tmp_path: Path,
                                                                        collector: CollectorProcess) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(
        "import os\n"
        "from opentelemetry import trace\n"
        "os.unlink(os.environ['PAYSCOPE_RELAY'])  # the relay can no longer be reached\n"
        "for i in range(50):\n"
        "    with trace.get_tracer('t').start_as_current_span('step'):\n"
        "        pass\n"
        "print('finished')\n")
    done = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "orphan", "--collector",
                           collector.http_url, "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "finished\n")
    assert "the export relay is not reachable" in done.stderr
    assert "50 spans and log records of pid" in done.stderr and "were dropped" in done.stderr


def test_the_sender_thread_and_an_at_exit_close_never_interleave_or_lose_frames(tmp_path: Path) -> None:
    """A program's sender thread and its at-exit close can flush at the same moment; every record still arrives
    once, in whole frames (a real Unix socket, read as the relay reads it)."""
    import marshal
    import socket
    import threading

    from payscope.instrumentation.relay import BUFFER_LIMIT, HEADER, Channel

    path = str(tmp_path / "relay.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    received: list[int] = []
    problems: list[str] = []

    def relay() -> None:
        conn, _ = listener.accept()
        data = b""
        with conn:
            while chunk := conn.recv(1 << 16):
                data += chunk
        offset = 0
        while offset < len(data):
            (length,) = HEADER.unpack_from(data, offset)
            try:
                kind, payload = marshal.loads(data[offset + HEADER.size:offset + HEADER.size + length])
            except (EOFError, ValueError, TypeError):
                problems.append(f"a garbled frame at byte {offset}")
                return
            if kind == "S":
                received.extend(item[0] for item in payload)
            offset += HEADER.size + length

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    channel = Channel(path, {"service.name": "race"}, problems.append)
    sent = 0
    for round_ in range(150):  # each round: a burst, then the sender thread and a close race to flush it
        for _ in range(BUFFER_LIMIT // 64):
            channel.put("S", (sent,))
            sent += 1
        flusher = threading.Thread(target=channel.flush)
        flusher.start()
        if round_ == 149:
            channel.close()
        else:
            channel.flush()
        flusher.join()
    reader.join(timeout=10)
    listener.close()
    assert problems == [] and sorted(received) == list(range(sent))
