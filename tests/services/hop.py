"""One hop of a chain (Flask's own server): GET /work does its own work, then calls NEXT_URL (if set) with
requests. ``spin_ms`` in the query is CPU burnt here when this is the last hop (a service slow in its own code),
``sleep_ms`` time it waits; the query is passed on down the chain. ``HOP_THREADED=0`` serves one request at a
time (a pool of one worker); ``NEXT_TIMEOUT`` is how many seconds it waits for the next hop (5). The answer says
which trace headers arrived, and what the next hop answered."""

import os
import sys
import time

import requests
from flask import Flask, jsonify, request

NEXT = os.environ.get("NEXT_URL")
NEXT_TIMEOUT = float(os.environ.get("NEXT_TIMEOUT", "5"))
session = requests.Session()
app = Flask(__name__)


@app.get("/work")
def work():  # type: ignore[no-untyped-def]
    time.sleep(0.005)
    received = {name: request.headers.get(name) for name in ("traceparent", "sw8")}
    if NEXT:
        try:
            answer = session.get(f"{NEXT}/work", params=request.args, timeout=NEXT_TIMEOUT)
        except requests.Timeout:  # gave up on the next hop: a gateway's 504 (no traceback on a pipe nobody reads)
            return jsonify({"ok": False, "received": received, "error": "the next hop timed out"}), 504
        answer.raise_for_status()
        return jsonify({"ok": True, "received": received, "next": answer.json()})
    time.sleep(int(request.args.get("sleep_ms", "0")) / 1000)
    until = time.perf_counter() + int(request.args.get("spin_ms", "0")) / 1000
    while time.perf_counter() < until:
        pass
    return jsonify({"ok": True, "received": received})


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=os.environ.get("HOP_THREADED", "1") != "0")
