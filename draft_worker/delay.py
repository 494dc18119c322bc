"""A userspace WAN emulator: a TCP proxy on 127.0.0.1 that delays every byte by rtt/2 in each direction.

The kernel here has no netem, so the draft worker can route its channel through this proxy to see what a
link with a given round-trip time does to speculative decoding before renting one. It adds latency only
(no bandwidth cap, no loss); bytes keep their order. Knows nothing about gRPC.

`DelayProxy` runs on the caller's event loop; `DelayProxyProcess` runs it in a process of its own (`python -m
draft_worker.delay UPSTREAM RTT_MS`), so its deliveries do not wait on the caller's work. On the loop that drafts, a
chunk due at its time waits for whatever holds the loop (an LM's draft, an n-gram lookup, the other sessions'
messages), so the emulated link slows with the drafting, which a network does not, while `Generate`'s client does
nothing and pays none of it. The benches use the process. (Measured on the fast regime at 25 ms, where drafting arms
read 0.86-1.07x `Generate`: no change beyond that regime's pass-to-pass spread of 0.7-1.4; docs/results.md, run ES.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
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


class DelayProxyProcess:
    """`async with DelayProxyProcess(upstream, rtt_ms) as proxy:` then connect to `proxy.address`: a `DelayProxy` in
    a child process (the module docstring), stopped on exit."""

    def __init__(self, upstream: str, rtt_ms: float):
        DelayProxy(upstream, rtt_ms)  # the same checks, here
        self.upstream, self.rtt_ms = upstream, rtt_ms
        self.address = ""
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> DelayProxyProcess:
        self._process = await asyncio.create_subprocess_exec(  # stdin: its end closes with this process, and so do they
            sys.executable, "-m", "draft_worker.delay", self.upstream, repr(self.rtt_ms),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        line = await self._process.stdout.readline()  # its address, once it listens
        if not line:
            raise RuntimeError(f"the delay proxy to {self.upstream} exited with {await self._process.wait()}")
        self.address = line.decode().strip()
        return self

    async def close(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()

    async def __aenter__(self) -> DelayProxyProcess:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _serve(upstream: str, rtt_ms: float) -> None:
    """The child of `DelayProxyProcess`: says its address, then serves until terminated or its parent is gone (its
    stdin ends), so a killed bench leaves no proxy behind."""
    proxy = await DelayProxy(upstream, rtt_ms).start()
    print(proxy.address, flush=True)
    await asyncio.to_thread(sys.stdin.buffer.read)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], float(sys.argv[2])))
