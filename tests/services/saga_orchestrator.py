"""A saga orchestrator: reserve (inventory), charge (payment), ship (shipping), each compensated in reverse
order when a later step fails. Its bug, as such bugs are: when shipping times out (rather than answering an
error), only the charge is compensated, and the reservation is left behind.

``fail=STEP`` makes that step fail, ``slow=STEP`` makes it slower than the orchestrator waits (0.3 s): the
planted faults."""

import os
import sys

import requests
from flask import Flask, jsonify, request

STEPS = [("reserve", os.environ["INVENTORY_URL"]), ("charge", os.environ["PAYMENT_URL"]),
         ("ship", os.environ["SHIPPING_URL"])]
session = requests.Session()
app = Flask(__name__)


@app.post("/orders/<order_id>")
def place(order_id: str):  # type: ignore[no-untyped-def]
    done = []
    for action, base in STEPS:
        body = {"order_id": order_id, "fail": request.args.get("fail"),
                "hold_ms": 450 if request.args.get("slow") == action else 0}
        try:
            session.post(f"{base}/{action}", json=body, timeout=0.3).raise_for_status()
            done.append((action, base))
        except requests.Timeout:
            for comp_action, comp_base in reversed(done[-1:]):  # the bug: only the last step done is undone
                session.post(f"{comp_base}/{comp_action}/cancel", json={"order_id": order_id}, timeout=2)
            return jsonify({"order_id": order_id, "placed": False}), 504
        except requests.RequestException:
            for comp_action, comp_base in reversed(done):
                session.post(f"{comp_base}/{comp_action}/cancel", json={"order_id": order_id}, timeout=2)
            return jsonify({"order_id": order_id, "placed": False}), 502
    return jsonify({"order_id": order_id, "placed": True})


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
