"""Order service: Flask under gunicorn; calls payment with httpx (timeout 0.5 s read, 0.2 s connect)."""

import logging
import os

import httpx
from flask import Flask, jsonify, request

logging.basicConfig(filename=os.environ["ORDER_LOG"], level=logging.INFO,
                    format="%(asctime)s %(levelname)s order %(message)s")
log = logging.getLogger("order")
app = Flask(__name__)
client = httpx.Client(timeout=httpx.Timeout(0.5, connect=0.2))
PAYMENT = os.environ["PAYMENT_URL"]


@app.post("/sleep/<int:seconds>")
def sleep(seconds: int):  # type: ignore[no-untyped-def]
    import time

    time.sleep(seconds)  # longer than gunicorn's --timeout: the worker is killed
    return jsonify({"slept": seconds})


@app.post("/orders/<order_id>")
def create(order_id: str):  # type: ignore[no-untyped-def]
    delay = request.args.get("delay_ms", "0")
    log.info("order %s received", order_id)
    try:
        resp = client.post(f"{PAYMENT}/pay/{order_id}?delay_ms={delay}", json={"order_id": order_id})
        resp.raise_for_status()
    except httpx.TimeoutException:
        log.error("payment for order %s timed out", order_id)
        return jsonify({"order_id": order_id, "status": "failed"}), 504
    return jsonify({"order_id": order_id, "status": "ok"})
