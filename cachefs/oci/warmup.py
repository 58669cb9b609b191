"""Keep-alive connections to a registry, opened while the manifest request is in flight.

Why: after the manifest, a pull sends the config request, the EROFS-artifact lookup (two
requests at once) and then one blob request per layer in flight, all to the same origin.
Each request that finds no idle connection in httpx's pool opens one: a TCP handshake
(one round trip), on a real registry a TLS handshake too (one or two more), before its
request can even be sent. Opened beside the manifest request (beside the ``/v2/`` ping
over https), those handshakes overlap its round trips instead of following them: over a
20 ms link the first blob byte came ~20 ms sooner, ~70 ms over https
(docs/pull-profile.md, "Sixth round (latency)").

A warm-up is ``GET /v2/``, the version check docker and podman send anyway. It carries no
``Authorization`` (the client's default headers have none, and none is added here), its
answer (200 or 401, whatever it says) is read and dropped, and the connection goes back
to the pool. Whatever goes wrong (refused, reset, a slow or huge answer) only loses the
optimisation: it is logged at debug level and the pull goes on; the requests that needed
a connection open their own, as before. Everything is bounded: ``count`` connections, one
request each, :data:`BODY_LIMIT` bytes of answer, :data:`TIMEOUT_S` seconds.
"""

from __future__ import annotations

import logging

import trio

from ._httpx import httpx

log = logging.getLogger(__name__)

BODY_LIMIT = 64 << 10  # a /v2/ answer is "{}" or an error document
TIMEOUT_S = 10.0  # a warm-up is worth nothing once the requests it prepares have gone out


class Warming:
    """The warm-ups of one location, for the requests that are to take their connections.

    Warm-ups sent beside the manifest request are answered about when the manifest is;
    a request sent just before their answers are read would open a connection of its own
    (another handshake, and the warmed one idles). :meth:`wait` lets it wait for them
    instead, but only as long again as they have been under way: a location that answers
    them slowly, or not at all, costs the waiting request at most what its own handshake
    would have cost, more or less, and never the warm-ups' whole :data:`TIMEOUT_S`.
    """

    def __init__(self) -> None:
        self.started = trio.current_time()
        self.settled = trio.Event()  # every warm-up ended, whatever its outcome

    async def wait(self) -> None:
        now = trio.current_time()
        with trio.move_on_at(now + (now - self.started)):
            await self.settled.wait()


async def warm_connections(http: httpx.AsyncClient, url: str, count: int) -> int:
    """Send ``count`` warm-up requests to ``url`` at once; how many left an idle
    connection in the pool (each answer read to its end)."""
    warmed = 0

    async def one() -> None:
        nonlocal warmed
        if await _warm_one(http, url):
            warmed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    log.debug("%s: %d of %d connections warmed", url, warmed, count)
    return warmed


async def _warm_one(http: httpx.AsyncClient, url: str) -> bool:
    with trio.move_on_after(TIMEOUT_S):
        try:
            resp = await http.send(http.build_request("GET", url), stream=True)
            try:
                received = 0
                async for chunk in resp.aiter_raw():
                    received += len(chunk)
                    if received > BODY_LIMIT:
                        return False  # closing mid-body drops the connection
                return True
            finally:
                await resp.aclose()
        except (httpx.HTTPError, OSError) as err:
            log.debug("%s: warm-up request failed (%s: %s)", url, type(err).__name__, err)
            return False
    log.debug("%s: warm-up request gave up after %g s", url, TIMEOUT_S)
    return False


__all__ = ["Warming", "warm_connections"]
