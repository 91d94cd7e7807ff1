"""A customer script: places orders with requests (timeout 2 s), some of them slow at the bank."""

import logging
import sys

import requests

logging.basicConfig(filename=sys.argv[2], level=logging.INFO, format="%(asctime)s %(levelname)s shopper %(message)s")
log = logging.getLogger("shopper")
delays = [int(x) for x in sys.argv[3].split(",")]
for i, delay in enumerate(delays):
    order_id = f"ord-{1000 + i}"
    resp = requests.post(f"{sys.argv[1]}/orders/{order_id}?delay_ms={delay}&order_id={order_id}",
                         json={"order_id": order_id, "card": "4111 1111 1111 1111"},
                         headers={"Authorization": "Bearer top-secret-token"}, timeout=(0.5, 2.0))
    log.info("order %s -> %s", order_id, resp.status_code)
    print(order_id, resp.status_code)
