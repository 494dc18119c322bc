"""A userspace WAN emulator: a TCP proxy on 127.0.0.1 that delays every byte by rtt/2 in each direction.

The kernel here has no netem, so the draft worker can route its channel through this proxy to see what a
link with a given round-trip time does to speculative decoding before renting one. It adds latency only
(no bandwidth cap, no loss); bytes keep their order. Knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

log = logging.getLogger(__name__)
_CHUNK = 1 << 16


class DelayProxy:
    """`async with DelayProxy(upstream, rtt_ms) as proxy:` then connect to `proxy.address`."""

    def __init__(self, upstream: str, rtt_ms: float):
        if rtt_ms < 0:
            raise ValueError(f"emulated RTT must be >= 0 ms, got {rtt_ms}")
        self.upstream_host, _, port = upstream.rpartition(":")
        self.upstream_port = int(port)
        self.one_way_s = rtt_ms / 2000.0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError as exc:
            log.warning("delay proxy cannot reach %s:%d: %s", self.upstream_host, self.upstream_port, exc)
            client_w.close()
            return
        for reader, writer in ((client_r, upstream_w), (upstream_r, client_w)):
            task = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy reader -> writer, each chunk delivered one_way_s after it was read (FIFO)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(_CHUNK):
                queue.put_nowait((time.monotonic() + self.one_way_s, data))
            queue.put_nowait(None)
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
