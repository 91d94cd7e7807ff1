"""A delaying TCP relay: a slow network link between two services, where the kernel offers no netem.

Every byte the upstream sends back is held for the delay in force when it arrived, then passed on in order, so
the caller sees the time on the wire while the upstream's own spans stay as fast as they were.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class DelayingRelay:
    """Listens on 127.0.0.1:``listen_port`` and relays to 127.0.0.1:``upstream_port``; ``delay_ms()`` is asked
    for each chunk of the answer."""

    def __init__(self, listen_port: int, upstream_port: int, delay_ms: Callable[[], float]) -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.delay_ms = delay_ms
        self.answered_bytes = 0  # what the upstream sent back, all connections together
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="payscope-netdelay", daemon=True)

    def start(self) -> DelayingRelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delaying relay did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def __enter__(self) -> DelayingRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._relay, "127.0.0.1", self.listen_port)
        self._ready.set()
        async with server:
            await self._stopped.wait()
            server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, up_w, delayed=False), self._pipe(up_r, client_w, delayed=True),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                release, data = await queue.get()
                if not data:
                    return
                await asyncio.sleep(max(0.0, release - loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        last_release = 0.0
        try:
            while data := await reader.read(65536):
                if delayed:
                    self.answered_bytes += len(data)
                # held from when it arrived, never passing an earlier chunk (the delay may shrink meanwhile)
                delay = self.delay_ms() / 1000 if delayed else 0.0
                last_release = max(last_release, loop.time() + delay)
                queue.put_nowait((last_release, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((last_release, b""))
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            writer.close()
