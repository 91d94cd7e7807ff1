"""The sidecar's own cost: the same keep-alive load (wrk) sent straight to a Node.js upstream, then through
`payscope sidecar` (spans exported to a real `payscope collect`), in the same run.

Reports requests/s and p50/p99 latency of both, the sidecar's throughput as a share of the direct one and
the latency it adds at p50. Needs node and wrk (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import CollectorProcess, free_port, node_server, stop_all, wait_port

UPSTREAM_JS = """
require("http").createServer((req, res) => {
  req.resume();
  req.on("end", () => { res.writeHead(200, {"Content-Type": "application/json"}); res.end('{"status":"approved"}'); });
}).listen(Number(process.argv[2]), "127.0.0.1");
"""


def wrk(url: str, seconds: int, connections: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of wrk's keep-alive load."""
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                          capture_output=True, text=True, check=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", done.stdout).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return rate, pct("50"), pct("99")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench sidecar")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    if not shutil.which("wrk") or not shutil.which("node"):
        sys.exit("bench sidecar needs wrk and node on PATH")
    with tempfile.TemporaryDirectory() as tmp, node_server(UPSTREAM_JS, Path(tmp)) as upstream_port:
        sidecar_port = free_port()
        collector = CollectorProcess(Path(tmp) / "bench.db", grpc=False)
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "payscope", "sidecar", "--listen", f"127.0.0.1:{sidecar_port}",
             "--upstream", f"127.0.0.1:{upstream_port}", "--service", "bank", "--collector", collector.http_url],
            stderr=subprocess.DEVNULL, env=dict(os.environ))
        try:
            wait_port(sidecar_port)
            wrk(f"http://127.0.0.1:{sidecar_port}/", 2, args.connections)  # warm-up
            direct = wrk(f"http://127.0.0.1:{upstream_port}/pay", args.seconds, args.connections)
            proxied = wrk(f"http://127.0.0.1:{sidecar_port}/pay", args.seconds, args.connections)
        finally:
            stop_all([sidecar])
            collector.stop()
    print(f"sidecar, wrk keep-alive, {args.connections} connections x {args.seconds}s, Node.js upstream, "
          "spans exported to payscope collect, all on this machine")
    print(f"  direct:        {direct[0]:9,.0f} req/s   p50 {direct[1]:.2f} ms   p99 {direct[2]:.2f} ms")
    print(f"  via sidecar:   {proxied[0]:9,.0f} req/s   p50 {proxied[1]:.2f} ms   p99 {proxied[2]:.2f} ms")
    print(f"  sidecar throughput {proxied[0] / direct[0]:.2f} of direct; adds {proxied[1] - direct[1]:.2f} ms at p50")
