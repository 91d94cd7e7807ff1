"""One hop of a chain (Flask's own server): GET /work does its own work, then calls NEXT_URL (if set) with
requests. ``spin_ms`` in the query is CPU burnt here when this is the last hop (a service slow in its own code);
the query is passed on down the chain."""

import os
import sys
import time

import requests
from flask import Flask, jsonify, request

NEXT = os.environ.get("NEXT_URL")
session = requests.Session()
app = Flask(__name__)


@app.get("/work")
def work():  # type: ignore[no-untyped-def]
    time.sleep(0.005)
    if NEXT:
        session.get(f"{NEXT}/work", params=request.args, timeout=5).raise_for_status()
    else:
        until = time.perf_counter() + int(request.args.get("spin_ms", "0")) / 1000
        while time.perf_counter() < until:
            pass
    return jsonify({"ok": True})


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
