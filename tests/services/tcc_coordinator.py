"""A payment coordinator running TCC against the account service: try (200 ms), then confirm (200 ms a try,
retried once) or, when the try failed, cancel. The query string plants faults for one order: ``hold_try_ms``
and ``hold_confirm_ms`` slow the account's phase, ``lose_try=1`` sends the try where nothing listens (it
never arrives), ``decline=1`` cancels after a good try (another participant refused)."""

import os
import sys

import requests
from flask import Flask, jsonify, request

ACCOUNT = os.environ["ACCOUNT_URL"]
NOWHERE = os.environ["NOWHERE_URL"]
session = requests.Session()
app = Flask(__name__)


def _call(base: str, phase: str, order: str, amount: float, hold_ms: str | None, timeout: float) -> bool:
    body = {"order_id": order, "amount": amount, "hold_ms": float(hold_ms or 0)}
    try:
        session.post(f"{base}/tcc/{phase}", json=body, timeout=timeout).raise_for_status()
        return True
    except requests.RequestException:
        return False


@app.post("/pay/<order>")
def pay(order: str):  # type: ignore[no-untyped-def]
    args = request.args
    amount = float(args.get("amount", "25"))
    tried = _call(NOWHERE if args.get("lose_try") else ACCOUNT, "try", order, amount, args.get("hold_try_ms"), 0.2)
    if not tried or args.get("decline"):  # the try failed, or another participant said no (decline=1)
        _call(ACCOUNT, "cancel", order, amount, None, 2.0)
        return jsonify({"order_id": order, "paid": False}), 502
    for _ in range(2):  # a confirm that times out is sent again: the account must make it idempotent
        if _call(ACCOUNT, "confirm", order, amount, args.get("hold_confirm_ms"), 0.2):
            break
    return jsonify({"order_id": order, "paid": True})


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
