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
PEAK_START = float(setting("BANK_PEAK_START", "0"))
PEAK_END = float(setting("BANK_PEAK_END", "0"))
DECLINE_RATE = float(setting("BANK_DECLINE_RATE", "0.03"))
_charges: dict[str, str] = {}
_lock = threading.Lock()
_rng = random.Random(int(setting("DEMO_SEED", "1")))


def _latency_s() -> float:
    median = MEDIAN_MS * (2.5 if PEAK_START <= time.time() < PEAK_END else 1.0)
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
