"""A PSP simulator run as a plain script (Flask's own server). POST /charge sleeps `delay_ms`."""

import logging
import sys
import time

from flask import Flask, jsonify, request

logging.basicConfig(filename=sys.argv[2], level=logging.INFO, format="%(asctime)s %(levelname)s bank %(message)s")
logging.getLogger("werkzeug").setLevel(logging.WARNING)
log = logging.getLogger("bank")
app = Flask(__name__)


@app.post("/charge")
def charge():  # type: ignore[no-untyped-def]
    delay = int(request.args.get("delay_ms", "0"))
    time.sleep(delay / 1000)
    log.info("charged order %s after %d ms", request.args.get("order_id", "?"), delay)
    return jsonify({"status": "charged"})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
