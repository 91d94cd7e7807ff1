"""The gateway: an HTTP proxy in front of the order service, with its own upstream timeout.

Writes an nginx-style access log (combined, plus rt= urt= rid= us= msec=) with a request id it
passes on as X-Request-ID. Run as a plain script.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid

import requests
from flask import Flask, Response, request

from payscope.demo.services.common import log_path, seconds, url

app = Flask(__name__)
ORDER = url("ORDER_URL")
TIMEOUT = seconds("GATEWAY_TIMEOUT", 1.0)
session = requests.Session()
_access = open(log_path("gateway-access"), "a", buffering=1)  # noqa: SIM115 - lives as long as the process
_lock = threading.Lock()


@app.route("/<path:path>", methods=["GET", "POST"])
def proxy(path: str) -> Response:
    rid = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    started = time.time()
    status: int = 502
    upstream_status: int | str = "-"
    body = b'{"status": "bad gateway"}'
    t0 = time.perf_counter()
    try:
        resp = session.request(request.method, f"{ORDER}/{path}", data=request.get_data(),
                               headers={"Content-Type": "application/json", "X-Request-ID": rid}, timeout=TIMEOUT)
        status = upstream_status = resp.status_code
        body = resp.content
    except requests.Timeout:
        status, upstream_status, body = 504, 504, b'{"status": "gateway timeout"}'
    except requests.RequestException:
        status = 502
    upstream_time = f"{time.perf_counter() - t0:.3f}"
    now = time.time()
    line = (f'127.0.0.1 - - [{time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))}] '
            f'"{request.method} /{path} HTTP/1.1" {status} {len(body)} "-" "{request.headers.get("User-Agent", "-")}" '
            f'rt={now - started:.3f} urt={upstream_time} rid={rid} us={upstream_status} msec={now:.3f}\n')
    with _lock:
        _access.write(line)
    return Response(body, status=status, content_type="application/json")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
