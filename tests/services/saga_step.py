"""One participant of a three-step saga (inventory reserve, payment charge, shipping ship): ``POST /ACTION``
does the step and ``POST /ACTION/cancel`` compensates it. It logs each, with the order: the test's ground truth.
``fail=ACTION`` in the JSON body makes that step fail (500), ``hold_ms`` makes it slow: the planted faults.

argv: port, action, log file."""

import logging
import sys
import time

from flask import Flask, jsonify, request

ACTION = sys.argv[2]
logging.basicConfig(filename=sys.argv[3], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
logging.getLogger("werkzeug").setLevel(logging.WARNING)
log = logging.getLogger(ACTION)
app = Flask(__name__)


@app.post(f"/{ACTION}")
def step():  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True) or {}
    order = str(body["order_id"])
    if body.get("fail") == ACTION:
        return jsonify({"order_id": order, "error": f"{ACTION} failed"}), 500
    time.sleep(float(body.get("hold_ms", 0)) / 1000)
    log.info("%s done for order %s", ACTION, order)
    return jsonify({"order_id": order, ACTION: True})


@app.post(f"/{ACTION}/cancel")
def compensate():  # type: ignore[no-untyped-def]
    order = str((request.get_json(silent=True) or {})["order_id"])
    log.info("%s compensated for order %s", ACTION, order)
    return jsonify({"order_id": order, "compensated": True})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
