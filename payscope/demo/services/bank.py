"""A bank / PSP simulator: heavy-tailed latency that worsens during the sale peak; idempotent charges.

Run as a plain script (Flask's threaded server). A charge sent twice with the same Idempotency-Key
is charged once; without a key, every request is a new charge.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
import zlib

from flask import Flask, jsonify, request

from payscope.demo.services.common import log_path, setting

logging.basicConfig(filename=log_path("bank"), level=logging.INFO,
                    format="%(asctime)s %(levelname)s [bank] %(message)s")
logging.getLogger("werkzeug").setLevel(logging.WARNING)
log = logging.getLogger("bank")
app = Flask(__name__)

MEDIAN_MS = float(setting("BANK_MEDIAN_MS", "120"))
PEAK_FILE = setting("BANK_PEAK_FILE", "")  # "START END" (seconds since the epoch), written when the traffic starts
DECLINE_RATE = float(setting("BANK_DECLINE_RATE", "0.03"))
_charges: dict[str, str] = {}
_lock = threading.Lock()
_rng = random.Random(int(setting("DEMO_SEED", "1")))


def peak() -> tuple[float, float]:
    """The sale peak as the peak file says it now (a few bytes read a request), none before it is written."""
    try:
        with open(PEAK_FILE) as f:
            start, end = (float(v) for v in f.read().split())
    except (OSError, ValueError):
        return (0.0, 0.0)
    return (start, end)


def _latency_s() -> float:
    start, end = peak()
    median = MEDIAN_MS * (2.5 if start <= time.time() < end else 1.0)
    with _lock:
        value = _rng.lognormvariate(0, 0.55) * median
        if _rng.random() < 0.03:  # the slow path every PSP has: a fraud check, a card network retry
            value += _rng.uniform(400, 900)
    return value / 1000


@app.post("/v1/charges")
def charge():  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True) or {}
    order_id = str(body.get("order_id", "?"))
    key = request.headers.get("Idempotency-Key")
    time.sleep(_latency_s())
    # the same cards are declined in every run: a property of the order, not of chance
    declined = zlib.crc32(order_id.encode()) % 1000 < DECLINE_RATE * 1000
    if declined:
        log.warning("card declined for order %s", order_id)
        return jsonify({"order_id": order_id, "error": "card_declined"}), 402
    with _lock:
        if key and key in _charges:
            log.info("charge for order %s replayed from idempotency key", order_id)
            return jsonify({"charge_id": _charges[key], "order_id": order_id, "replayed": True})
        charge_id = f"ch_{len(_charges) + 1:06d}"
        if key:
            _charges[key] = charge_id
        _charges[f"n{charge_id}"] = charge_id
    log.info("charged order %s amount %s as %s", order_id, body.get("amount"), charge_id)
    return jsonify({"charge_id": charge_id, "order_id": order_id})


@app.get("/health")
def health():  # type: ignore[no-untyped-def]
    return jsonify({"ok": True})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
