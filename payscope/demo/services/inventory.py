"""Inventory service: FastAPI under uvicorn, plain-text logging; a TCC participant for the stock of an order."""

from __future__ import annotations

import asyncio
import logging
import random

from fastapi import FastAPI

from payscope.demo.services.common import log_path

logging.basicConfig(filename=log_path("inventory"), level=logging.INFO,
                    format="%(asctime)s %(levelname)s [inventory] %(message)s")
log = logging.getLogger("inventory")
app = FastAPI()
_rng = random.Random(5)


# The stock of an order is held in TCC phases: try holds it, confirm takes it, cancel gives it back. Confirm keeps
# no record of what it already did (no idempotency): a second confirm of one order takes its stock twice.
confirmed: set[str] = set()


@app.post("/reserve/{order_id}/try")
async def reserve(order_id: str) -> dict[str, str]:
    await asyncio.sleep(_rng.lognormvariate(0, 0.3) * 0.015)
    log.info("reserved items for order %s", order_id)
    return {"order_id": order_id, "status": "reserved"}


@app.post("/reserve/{order_id}/confirm")
async def confirm(order_id: str) -> dict[str, str]:
    log.info("confirmed items for order %s%s", order_id, " again" if order_id in confirmed else "")
    confirmed.add(order_id)
    return {"order_id": order_id, "status": "confirmed"}


@app.post("/reserve/{order_id}/cancel")
async def cancel(order_id: str) -> dict[str, str]:
    log.info("released items for order %s", order_id)
    return {"order_id": order_id, "status": "released"}


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}
