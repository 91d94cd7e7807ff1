"""Payment service: charges the bank with retries (loguru logs). Run as a plain script."""

from __future__ import annotations

import sys
import uuid

import requests
from flask import Flask, jsonify, request
from loguru import logger
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from payscope.demo.services.common import log_path, seconds, setting, url

logger.remove()
logger.add(log_path("payment"), format="{time:YYYY-MM-DD HH:mm:ss.SSSZ} {level} [payment] {message}", level="INFO")
app = Flask(__name__)

BANK = url("BANK_URL")
TIMEOUT = seconds("PAYMENT_BANK_TIMEOUT", 0.4)
RETRIES = int(setting("PAYMENT_BANK_RETRIES", "2"))
USE_KEY = setting("PAYMENT_IDEMPOTENCY", "off") == "on"

session = requests.Session()
# Retries on read timeouts for POST too (allowed_methods=None): the classic way to charge twice.
session.mount("http://", HTTPAdapter(max_retries=Retry(total=RETRIES, read=RETRIES, connect=RETRIES,
                                                       backoff_factor=0.05, allowed_methods=None,
                                                       raise_on_status=False)))


@app.post("/payments")
def pay():  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True) or {}
    order_id = body.get("order_id")
    headers = {"Idempotency-Key": f"{order_id}-{uuid.uuid5(uuid.NAMESPACE_URL, str(order_id))}"} if USE_KEY else {}
    logger.info("charging order {} amount {}", order_id, body.get("amount"))
    try:
        resp = session.post(f"{BANK}/v1/charges", json=body, headers=headers, timeout=TIMEOUT)
        if resp.status_code == 402:  # the bank said no: the answer goes back as it came
            logger.warning("card declined for order {}", order_id)
            return jsonify({"order_id": order_id, "status": "declined"}), 402
        resp.raise_for_status()
    except requests.RequestException as exc:
        logger.error("charge for order {} failed: {}", order_id, type(exc).__name__)
        return jsonify({"order_id": order_id, "status": "failed"}), 502
    logger.info("order {} paid with {}", order_id, resp.json().get("charge_id"))
    return jsonify({"order_id": order_id, "status": "paid", **resp.json()})


@app.get("/health")
def health():  # type: ignore[no-untyped-def]
    return jsonify({"ok": True})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
