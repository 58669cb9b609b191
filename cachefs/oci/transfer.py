"""Bounds on every HTTP exchange with a registry: time, bytes, redirects, and where
credentials may go.

A registry is an outsider: it decides how fast bytes come, how many, and where a request
is sent next. Each request therefore runs under a :class:`Deadline` (response headers
within ``header_timeout_s``; then at least ``min_rate × rate_window_s`` bytes in every
``rate_window_s`` window, so one byte every few seconds cannot keep a request alive, and
a transfer's total time is bounded by its size), its body is read against a size cap, and
redirects are followed by hand (:func:`send_following`) so that ``Authorization`` is sent
only to the origin it was configured for: a redirect target, whatever it answers, never
sees the registry's credentials or tokens.

Every bound is a field of :class:`NetLimits`, read from ``CACHEFS_*`` environment
variables by :meth:`NetLimits.from_env` (README "Limits").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

import trio

from ..errors import RegistryError, TransferTooSlow, UsageError
from ._httpx import httpx

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class NetLimits:
    """What one registry may cost us; each field has an environment variable (``ENV``)."""

    header_timeout_s: float = 60.0  # connect + request + response headers, per hop
    min_rate: int = 1024  # bytes/s a body must average over each window
    rate_window_s: float = 60.0
    max_redirects: int = 5
    attempts: int = 5  # per document and per blob, progress or not
    retry_window_s: float = 300.0  # no retry starts later than this after the first attempt
    max_blob_bytes: int = 64 << 30  # the largest layer size a descriptor may declare
    max_token_bytes: int = 1 << 20  # a token service's answer

    ENV: ClassVar[dict[str, str]] = {
        "header_timeout_s": "CACHEFS_HTTP_HEADER_TIMEOUT",
        "min_rate": "CACHEFS_HTTP_MIN_RATE",
        "rate_window_s": "CACHEFS_HTTP_RATE_WINDOW",
        "max_redirects": "CACHEFS_HTTP_MAX_REDIRECTS",
        "attempts": "CACHEFS_HTTP_ATTEMPTS",
        "retry_window_s": "CACHEFS_HTTP_RETRY_WINDOW",
        "max_blob_bytes": "CACHEFS_MAX_BLOB_BYTES",
        "max_token_bytes": "CACHEFS_MAX_TOKEN_BYTES",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NetLimits:
        """Defaults overridden by ``CACHEFS_*`` variables; a malformed value is a UsageError."""
        env = os.environ if environ is None else environ
        values: dict[str, float | int] = {}
        for f in fields(cls):
            name = cls.ENV.get(f.name)
            raw = env.get(name, "").strip() if name else ""
            if not raw:
                continue
            kind = float if f.type in ("float", float) else int
            try:
                value = kind(raw)
            except ValueError:
                value = -1
            if not value > 0:
                raise UsageError(f"{name}={raw!r}: expected a positive {kind.__name__}")
            values[f.name] = value
        # each value has its field's type (``kind`` above); mypy cannot follow fields() here
        return cls(**values)  # type: ignore[arg-type]

    def env_name(self, field_name: str) -> str:
        return self.ENV[field_name]


Origin = tuple[str, str, int]


def origin(url: httpx.URL) -> Origin:
    """(scheme, host, port): what credentials are scoped to (RFC 6454's origin)."""
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    return url.scheme, url.host, port


class Deadline:
    """The clock of one request: see the module docstring. ``host`` names whoever is
    being waited for, so the error points at a redirect target when it is the slow one."""

    def __init__(self, limits: NetLimits, what: str) -> None:
        self.limits = limits
        self.what = what
        self.host = ""
        self.scope = trio.CancelScope()
        self._waiting_headers = True
        self._window_bytes = 0
        self._quota = max(1, int(limits.min_rate * limits.rate_window_s))

    def request_sent(self, url: httpx.URL) -> None:
        self.host = _netloc(url)
        self._waiting_headers = True
        self.scope.deadline = trio.current_time() + self.limits.header_timeout_s

    def headers_received(self) -> None:
        self._waiting_headers = False
        self._restart_window()

    def received(self, n: int) -> None:
        self._window_bytes += n
        if self._window_bytes >= self._quota:
            self._restart_window()

    def _restart_window(self) -> None:
        self._window_bytes = 0
        self.scope.deadline = trio.current_time() + self.limits.rate_window_s

    def error(self) -> TransferTooSlow:
        lim = self.limits
        if self._waiting_headers:
            return TransferTooSlow(
                f"{self.host}: {self.what}: no response within {lim.header_timeout_s:g} s",
                hint=f"{lim.env_name('header_timeout_s')} sets the limit",
            )
        return TransferTooSlow(
            f"{self.host}: {self.what}: too slow, less than {self._quota} bytes in "
            f"{lim.rate_window_s:g} s (minimum {lim.min_rate} bytes/s)",
            hint=f"{lim.env_name('min_rate')} and {lim.env_name('rate_window_s')} set the limit",
        )


@contextlib.asynccontextmanager
async def deadline(limits: NetLimits, what: str) -> AsyncIterator[Deadline]:
    """Run a request (send and body) under a :class:`Deadline`; expiry → TransferTooSlow."""
    clock = Deadline(limits, what)
    with clock.scope:
        yield clock
    if clock.scope.cancelled_caught:
        raise clock.error()


async def read_body(resp: httpx.Response, clock: Deadline, limit: int, what: str) -> bytes:
    """The raw (not decoded) body, refusing more than ``limit`` bytes."""
    body = bytearray()
    async for chunk in resp.aiter_raw():
        clock.received(len(chunk))
        body += chunk
        if len(body) > limit:
            raise RegistryError(f"{clock.host}: {what} is larger than {limit} bytes; refusing it")
    return bytes(body)


def _netloc(url: httpx.URL) -> str:
    return url.netloc.decode("ascii", "replace")


def _without_authorization(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != "authorization"}


async def send_following(
    http: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    headers: Mapping[str, str],
    clock: Deadline,
    *,
    home: Origin,
) -> httpx.Response:
    """Send (streaming) and follow redirects by hand, at most ``max_redirects``.

    ``Authorization`` goes only to ``home``; once a redirect has left it, no later hop gets
    it back. A redirect from https to plain http is refused. The caller closes the answer;
    ``resp.url`` says who gave it.
    """
    target = httpx.URL(url)
    first = target
    left_home = False
    for _ in range(clock.limits.max_redirects + 1):
        left_home = left_home or origin(target) != home
        hdrs = _without_authorization(headers) if left_home else dict(headers)
        clock.request_sent(target)
        resp = await http.send(http.build_request(method, target, headers=hdrs), stream=True)
        location = resp.headers.get("Location")
        if resp.status_code not in REDIRECT_STATUSES or not location:
            clock.headers_received()
            return resp
        await resp.aclose()
        try:
            nxt = target.join(location)
        except httpx.InvalidURL:
            raise RegistryError(f"{clock.host}: {clock.what}: redirect to an invalid URL "
                                f"{location[:200]!r}") from None
        if nxt.scheme not in _DEFAULT_PORTS:
            raise RegistryError(f"{clock.host}: {clock.what}: redirect to unsupported URL "
                                f"scheme {nxt.scheme!r}")
        if target.scheme == "https" and nxt.scheme == "http":
            raise RegistryError(f"{clock.host}: {clock.what}: refusing a redirect from https "
                                f"to plain http ({nxt.host})")
        if resp.status_code == 303 and method != "HEAD":
            method = "GET"
        target = nxt
    raise RegistryError(
        f"{_netloc(first)}: {clock.what}: more than {clock.limits.max_redirects} redirects "
        f"(the last to {_netloc(target)})",
        hint=f"{clock.limits.env_name('max_redirects')} sets the limit",
    )


__all__ = [
    "Deadline",
    "NetLimits",
    "Origin",
    "deadline",
    "origin",
    "read_body",
    "send_following",
]
