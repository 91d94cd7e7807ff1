"""Payment service: FastAPI under uvicorn; calls the bank with aiohttp (session timeout 1 s)."""

import logging
import os

import aiohttp
from fastapi import FastAPI, Request

logging.basicConfig(filename=os.environ["PAYMENT_LOG"], level=logging.INFO,
                    format="%(asctime)s %(levelname)s payment %(message)s")
log = logging.getLogger("payment")
app = FastAPI()
BANK = os.environ["BANK_URL"]


@app.post("/pay/{order_id}")
async def pay(order_id: str, request: Request) -> dict[str, str]:
    delay = request.query_params.get("delay_ms", "0")
    log.info("paying order %s", order_id)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0, sock_connect=0.2)) as session:
        async with session.post(f"{BANK}/charge?order_id={order_id}&delay_ms={delay}",
                                json={"order_id": order_id}) as resp:
            await resp.read()
    return {"order_id": order_id, "status": "paid"}
