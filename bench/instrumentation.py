"""Overhead of instrumentation on a two-service Flask chain (gunicorn, one sync worker each, requests between).

Interleaves four variants, several repetitions each, at concurrency 1 and 8 with `hey`:
uninstrumented, `opentelemetry-instrument` (the stock distro, OTLP/HTTP export), `payscope run` with
the export inside the service (``PAYSCOPE_EXPORT=inprocess``), and `payscope run` with its relay
process doing the export; all export to a running `payscope collect`. Reports throughput, p50/p99
latency and CPU time per request read from the worker processes, as medians and as ratios against the
uninstrumented run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from tests.helpers import CollectorProcess, free_port, wait_port

APP = textwrap.dedent("""
    import os
    import requests
    from flask import Flask, jsonify

    app = Flask(__name__)
    session = requests.Session()
    BACK = os.environ.get("BACK_URL")


    @app.get("/pay")
    def pay():
        if BACK:
            r = session.post(f"{BACK}/charge", json={"amount": 10}, timeout=(0.5, 2.0))
            return jsonify({"front": True, "back": r.json()})
        return jsonify({"charged": True})


    @app.post("/charge")
    def charge():
        return jsonify({"charged": True})
""")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _start(variant: str, directory: Path, collector: str, port: int, back: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(directory), PAYSCOPE_QUIET="1", OTEL_METRICS_EXPORTER="none",
               OTEL_LOGS_EXPORTER="none")
    if back:
        env["BACK_URL"] = back
    name = "front" if back else "back"
    gunicorn = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                "app:app"]
    if variant == "plain":
        cmd = gunicorn
    elif variant == "opentelemetry-instrument":
        env.update(OTEL_PYTHON_DISTRO="distro", OTEL_PYTHON_CONFIGURATOR="configurator", OTEL_SERVICE_NAME=name,
                   OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_EXPORTER_OTLP_ENDPOINT=collector)
        cmd = [str(Path(sys.executable).parent / "opentelemetry-instrument"), *gunicorn]
    else:
        if variant == "payscope run, in-process":
            env["PAYSCOPE_EXPORT"] = "inprocess"
        cmd = [sys.executable, "-m", "payscope", "run", "--service", name, "--collector", collector, "--", *gunicorn]
    return subprocess.Popen(cmd, cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _hey(url: str, n: int, c: int) -> tuple[float, float, float]:
    out = subprocess.run(["hey", "-n", str(n), "-c", str(c), url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = float(re.search(r"50% in ([\d.]+) secs", out).group(1))  # type: ignore[union-attr]
    p99 = float(re.search(r"99% in ([\d.]+) secs", out).group(1))  # type: ignore[union-attr]
    return rps, p50 * 1000, p99 * 1000


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench instrumentation")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args(argv)
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: apt-get install hey")
    variants = ["plain", "opentelemetry-instrument", "payscope run, in-process", "payscope run"]
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "app.py").write_text(APP)
        collector = CollectorProcess(directory / "bench.db", grpc=False)
        try:
            for _ in range(args.repetitions):
                for variant in variants:  # interleaved, so drift in the machine hits every variant alike
                    back_port, front_port = free_port(), free_port()
                    back = _start(variant, directory, collector.http_url, back_port, None)
                    front = _start(variant, directory, collector.http_url, front_port,
                                   f"http://127.0.0.1:{back_port}")
                    try:
                        wait_port(back_port)
                        wait_port(front_port)
                        url = f"http://127.0.0.1:{front_port}/pay"
                        _hey(url, 300, 4)  # warm up
                        for c in (1, 8):
                            workers = _workers(front.pid) + _workers(back.pid)
                            cpu0 = sum(_cpu_seconds(p) for p in workers)
                            rps, p50, p99 = _hey(url, args.requests, c)
                            cpu = (sum(_cpu_seconds(p) for p in workers) - cpu0) / args.requests * 1000
                            results.setdefault((variant, c), []).append((rps, p50, p99, cpu))
                    finally:
                        for proc in (front, back):
                            os.killpg(proc.pid, signal.SIGTERM)
                            proc.wait(timeout=20)
        finally:
            collector.stop()
    print(f"instrumentation overhead, two Flask services on gunicorn (1 sync worker each), requests between, "
          f"{args.requests} requests x {args.repetitions} repetitions, medians")
    for c in (1, 8):
        base = [statistics.median(v) for v in zip(*results[("plain", c)], strict=True)]
        for variant in variants:
            med = [statistics.median(v) for v in zip(*results[(variant, c)], strict=True)]
            print(f"  c={c} {variant:<26} {med[0]:8.0f} req/s (x{med[0] / base[0]:.2f})  p50 {med[1]:6.2f} ms "
                  f"(x{med[1] / base[1]:.2f})  p99 {med[2]:6.2f} ms (x{med[2] / base[2]:.2f})  "
                  f"cpu {med[3]:.2f} ms/request (x{med[3] / base[3]:.2f})")
