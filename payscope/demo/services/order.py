"""Order service: Flask under gunicorn (2 workers), JSON logs; holds stock (TCC try), takes payment, then
confirms or cancels the stock."""

from __future__ import annotations

import json
import logging
import time

import httpx
from flask import Flask, jsonify, request

from payscope.demo.services.common import log_path, seconds, url


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                           + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                           "service": "order", "msg": record.getMessage(), **getattr(record, "fields", {})})


handler = logging.FileHandler(log_path("order"))
handler.setFormatter(JsonFormatter())
log = logging.getLogger("order")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False

app = Flask(__name__)
INVENTORY = url("INVENTORY_URL")
PAYMENT = url("PAYMENT_URL")
# No timeout at all on inventory (httpx's timeout=None), and a generous one on payment.
inventory = httpx.Client(timeout=httpx.Timeout(seconds("ORDER_INVENTORY_TIMEOUT", None)))
payments = httpx.Client(timeout=httpx.Timeout(seconds("ORDER_PAYMENT_TIMEOUT", 2.5), connect=0.5))


@app.post("/orders/<order_id>")
def create(order_id: str):  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True) or {}
    amount = body.get("amount", 0)
    log.info("order received", extra={"fields": {"order_id": order_id, "amount": amount}})
    stock = f"{INVENTORY}/reserve/{order_id}"  # TCC on the stock: try, then confirm or cancel
    try:
        inventory.post(f"{stock}/try").raise_for_status()
    except httpx.HTTPError as exc:
        log.error("order failed", extra={"fields": {"order_id": order_id, "error": type(exc).__name__}})
        return jsonify({"order_id": order_id, "status": "failed"}), 502
    try:
        resp = payments.post(f"{PAYMENT}/payments", json={"order_id": order_id, "amount": amount})
        if resp.status_code == 402:
            inventory.post(f"{stock}/cancel")
            log.warning("order declined", extra={"fields": {"order_id": order_id}})
            return jsonify({"order_id": order_id, "status": "declined"}), 402
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        inventory.post(f"{stock}/cancel")
        log.error("order failed", extra={"fields": {"order_id": order_id, "error": type(exc).__name__}})
        return jsonify({"order_id": order_id, "status": "failed"}), 502
    inventory.post(f"{stock}/confirm")  # no idempotency key: the customer's retry of a paid order confirms again
    log.info("order confirmed", extra={"fields": {"order_id": order_id}})
    return jsonify({"order_id": order_id, "status": "confirmed"})


@app.get("/health")
def health():  # type: ignore[no-untyped-def]
    return jsonify({"ok": True})
