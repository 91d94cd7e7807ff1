"""An account service with hand-written TCC endpoints (try, confirm, cancel), as many payment teams write
them: without the guards TCC needs. A cancel with nothing frozen is accepted (an empty rollback), a try that
finishes after its order's cancel freezes the funds anyway (a suspension), and a confirm runs as often as it
is called. It logs each of those as it sees them: the test's ground truth.

``hold_ms`` in a request's JSON body makes that phase that slow (a lock wait, a slow disk): the planted fault.
"""

import logging
import sys
import threading
import time

from flask import Flask, jsonify, request

logging.basicConfig(filename=sys.argv[2], level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
logging.getLogger("werkzeug").setLevel(logging.WARNING)
log = logging.getLogger("account")
app = Flask(__name__)
lock = threading.Lock()
frozen: dict[str, float] = {}
cancelled: set[str] = set()
confirmed: set[str] = set()


def _body() -> tuple[str, float]:
    body = request.get_json(silent=True) or {}
    time.sleep(float(body.get("hold_ms", 0)) / 1000)
    return str(body["order_id"]), float(body.get("amount", 0))


@app.post("/tcc/try")
def tcc_try():  # type: ignore[no-untyped-def]
    order, amount = _body()
    with lock:
        frozen[order] = amount
        if order in cancelled:
            log.warning("froze %.2f for order %s after its cancel", amount, order)
        else:
            log.info("froze %.2f for order %s", amount, order)
    return jsonify({"order_id": order, "frozen": amount})


@app.post("/tcc/confirm")
def tcc_confirm():  # type: ignore[no-untyped-def]
    order, _ = _body()
    with lock:
        if order in confirmed:
            log.warning("confirmed order %s again", order)
        else:
            log.info("confirmed order %s", order)
        confirmed.add(order)
    return jsonify({"order_id": order, "confirmed": True})


@app.post("/tcc/cancel")
def tcc_cancel():  # type: ignore[no-untyped-def]
    order, _ = _body()
    with lock:
        if order not in frozen:
            log.warning("cancelled order %s with nothing frozen", order)
        else:
            log.info("cancelled order %s", order)
            frozen.pop(order)
        cancelled.add(order)
    return jsonify({"order_id": order, "cancelled": True})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
