"""Inventory service: FastAPI under uvicorn, plain-text logging."""

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


@app.post("/reserve/{order_id}")
async def reserve(order_id: str) -> dict[str, str]:
    await asyncio.sleep(_rng.lognormvariate(0, 0.3) * 0.015)
    log.info("reserved items for order %s", order_id)
    return {"order_id": order_id, "status": "reserved"}


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}
