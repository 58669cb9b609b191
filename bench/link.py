"""A modelled network link on 127.0.0.1: a TCP proxy with a bandwidth cap and a round trip.

Loopback hides what a real pull pays: every request's round trip, and bytes that arrive at
link speed instead of memory speed. :class:`Link` relays TCP connections to an upstream
port, delaying every chunk by half the round-trip time in each direction (pipelined: a
delay is latency, not a throughput limit) and pacing each direction to ``bandwidth``
bytes/s shared by all connections, as one link would. It runs an asyncio loop in a thread
of the benchmark harness, so the measured tools see nothing but a slower registry::

    with Link(registry.port, bandwidth=40e6, rtt=0.020) as link:
        pull(f"{link.host}/repo:tag")
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType

CHUNK = 64 << 10


class _Pacer:
    """One direction of the link: the time its wire is free again."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self.free_at = 0.0

    def reserve(self, n: int) -> float:
        """When ``n`` bytes finish crossing the wire if sent now."""
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + n / self.bandwidth
        return self.free_at


class Link:
    def __init__(self, upstream_port: int, *, bandwidth: float = 40e6, rtt: float = 0.020,
                 upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.bandwidth = bandwidth
        self.rtt = rtt
        self.port = 0
        self.bytes_relayed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        return f"{self.bandwidth / 1e6:.0f} MB/s, {self.rtt * 1000:.0f} ms RTT"

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-link", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link proxy did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> Link:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        up, down = _Pacer(self.bandwidth), _Pacer(self.bandwidth)

        async def serve() -> None:
            self._server = await asyncio.start_server(
                lambda r, w: self._spawn(self._connection(r, w, up, down)), "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        loop.run_until_complete(serve())
        try:
            loop.run_forever()
        finally:
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            if self._server is not None:
                self._server.close()
            loop.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # relaying --------------------------------------------------------------------------------

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                          up: _Pacer, down: _Pacer) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.sleep(self.rtt)  # the TCP handshake's round trip
        try:
            await asyncio.gather(self._pump(client_r, server_w, up),
                                 self._pump(server_r, client_w, down))
        except (ConnectionError, OSError):
            pass  # one side hung up: close both
        finally:
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pacer: _Pacer) -> None:
        """Read as it comes; deliver each chunk half an RTT later, paced to the bandwidth."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=16)  # back-pressure
        half = self.rtt / 2

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
                self.bytes_relayed += len(data)

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                arrive = (pacer.reserve(len(data)) if data else time.monotonic()) + half
                await queue.put((arrive, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
