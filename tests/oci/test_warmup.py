"""Connections opened beside the manifest request (issue 15, link row).

A :class:`~tests.fixtures.hostile.HostileServer` on 127.0.0.1 records, for every request,
the client port of the connection it came on: a new port is a new accepted connection.
The tests assert which connections the config, lookup and blob requests used, that the
warm-up requests carry no credentials, and that warm-ups a registry refuses, stalls or
floods only lose the gain: the pull succeeds.
"""

from __future__ import annotations

import base64
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from cachefs.cache import GlobalCache
from cachefs.oci import Authenticator
from cachefs.oci._httpx import httpx
from cachefs.oci.auth import Credentials
from cachefs.oci.registries_conf import load_registries_conf
from cachefs.oci.warmup import BODY_LIMIT, warm_connections
from cachefs.pipeline.early import EARLY_LAYERS
from cachefs.pipeline.pull import PullResult, pull
from tests.fixtures.hostile import (  # noqa: F401  (fixture)
    Exchange,
    HostileServer,
    ServedImage,
    _Server,
    hostile,
)
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import test_client as client
from tests.fixtures.system import require_tool, run

Hostile = Callable[[Callable[[Exchange], None]], HostileServer]

IMAGE = TestImage([layer_tar([reg("etc/hello", b"hello\n")]),
                   layer_tar([reg("data.bin", b"x" * 100_000)])])
# beside the config fetch: the artifact lookup's two requests, the early downloads
WARM_UPS = 2 + EARLY_LAYERS
BOUND_S = 20.0
USER, PASSWORD = "alice", "s3cret-pw"


@dataclass
class ConnectionLog:
    """Every request with its connection (the client's port), in arrival order, and the
    moment the manifest was answered."""

    events: list[tuple[str, int, str]] = field(default_factory=list)  # (kind, port, path)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def request(self, ex: Exchange) -> None:
        with self.cond:
            self.events.append(("request", ex.client_address[1], ex.path))
            self.cond.notify_all()

    def wait_requests(self, path: str, count: int, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: sum(1 for kind, _, p in self.events if kind == "request" and p == path)
                >= count, timeout_s)

    def answered(self, ex: Exchange, what: str) -> None:
        with self.cond:
            self.events.append((what, ex.client_address[1], ex.path))
            self.cond.notify_all()

    def wait_answered(self, what: str, count: int, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.count(what) >= count, timeout_s)

    def count(self, what: str) -> int:
        return sum(1 for kind, _, _ in self.events if kind == what)

    def split_at(self, what: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """Requests (port, path) before and after the first ``what`` event."""
        with self.cond:
            at = next(i for i, (kind, _, _) in enumerate(self.events) if kind == what)
            pick = [(p, path) for kind, p, path in self.events if kind == "request"]
            before = [(p, path) for kind, p, path in self.events[:at] if kind == "request"]
        return before, pick[len(before):]


def is_warm_up(path: str) -> bool:
    return path == "/v2/"


async def pull_from(server: HostileServer, tmp_path: Path, **client_kw: object) -> PullResult:
    cache = GlobalCache.new(tmp_path / "cache")
    with trio.fail_after(BOUND_S):
        async with client(**client_kw) as c:
            return await pull(cache, f"{server.host}/evil/app:v1", client=c,
                              erofs_artifacts="auto")


async def test_warmed_connections_are_the_ones_the_next_requests_use(
    hostile: Hostile,  # noqa: F811
) -> None:
    log = ConnectionLog()

    def registry(ex: Exchange) -> None:
        log.request(ex)
        ex.send(200, b"{}")

    server = hostile(registry)
    async with httpx.AsyncClient() as http:
        assert await warm_connections(http, f"{server.url}/v2/", 3) == 3
        warm_ports = {port for _, port, _ in log.events}
        assert len(warm_ports) == 3  # three connections, one warm-up each
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(http.get, f"{server.url}/after/{i}")
    after = {port for _, port, path in log.events if path.startswith("/after/")}
    assert after == warm_ports  # no new connection for them


async def test_config_lookup_and_blobs_use_connections_opened_beside_the_manifest(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    log = ConnectionLog()

    def registry(ex: Exchange) -> None:
        log.request(ex)
        if "/manifests/v1" in ex.path:
            # answered once the warm-ups sent beside it were: they must not wait for it
            log.wait_answered("warm-up answered", WARM_UPS, 10.0)
            ex.serve_image(image)
            log.answered(ex, "manifest answered")
            return
        ex.serve_image(image)
        if is_warm_up(ex.path):
            log.answered(ex, "warm-up answered")

    server = hostile(registry)
    await pull_from(server, tmp_path)
    before, after = log.split_at("manifest answered")
    warm_ports = {port for port, path in before if is_warm_up(path)}
    assert len(warm_ports) == WARM_UPS  # sent beside the manifest, each its own
    open_before = {port for port, _ in before}
    config = f"/blobs/{image.manifest_doc['config']['digest']}"
    blobs = [f"/blobs/{d}" for d in image.layer_digests]
    assert any(path.endswith(config) for _, path in after)
    assert sum(1 for _, path in after if path.endswith(tuple(blobs))) == len(blobs)
    # no connection accepted after the manifest's answer: the config, the lookup and the
    # blobs all found one open
    assert [(p, path) for p, path in after if p not in open_before] == []
    assert not any(is_warm_up(path) for _, path in after)  # one warm-up per connection


async def test_warm_ups_answered_after_the_manifest_still_serve_the_lookup(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """The lookup is sent beside the config request; warm-ups answered only after that
    are waited for (briefly) rather than raced with new connections."""
    image = ServedImage.of(IMAGE)
    log = ConnectionLog()
    config = f"/v2/evil/app/blobs/{image.manifest_doc['config']['digest']}"

    def registry(ex: Exchange) -> None:
        log.request(ex)
        if is_warm_up(ex.path):  # held until the config is asked for, after the manifest
            log.wait_requests(config, 1, 10.0)
        elif "/manifests/v1" in ex.path:  # answered once the warm-ups have arrived
            log.wait_requests("/v2/", WARM_UPS, 10.0)
        ex.serve_image(image)
        if "/manifests/v1" in ex.path:
            log.answered(ex, "manifest answered")

    server = hostile(registry)
    await pull_from(server, tmp_path)
    before, after = log.split_at("manifest answered")
    warm_ports = {port for port, path in before if is_warm_up(path)}
    assert len(warm_ports) == WARM_UPS
    lookup = [port for port, path in after if "/referrers/" in path or "sha256-" in path]
    assert len(lookup) == 2 and set(lookup) <= {port for port, _ in before}


def _tls_context(workdir: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for IP 127.0.0.1 and the CA that signed it (openssl CLI)."""
    openssl = require_tool("openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = workdir / "ca.pem", workdir / "ca.key"
    key, csr, crt = workdir / "server.key", workdir / "server.csr", workdir / "server.crt"
    run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
         "-out", str(ca), "-days", "2", "-subj", "/CN=cachefs-warmup-test-ca"])
    run([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
         str(csr), "-subj", "/CN=127.0.0.1"])
    ext = workdir / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext)])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(crt), str(key))
    return ctx, ca


@dataclass
class TlsServer(HostileServer):
    """The hostile server, speaking HTTPS."""

    context: ssl.SSLContext | None = None

    def start(self) -> TlsServer:
        assert self.context is not None
        self._server = _Server(("127.0.0.1", 0), Exchange)
        self._server.owner = self
        self._server.socket = self.context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self


@pytest.mark.system
async def test_https_warm_ups_go_out_beside_the_version_check(tmp_path: Path) -> None:
    """Only https may serve the registry: the warm-ups' handshakes overlap the /v2/ ping
    and the manifest's instead of following them. The server answers the first /v2/ only
    once every warm-up has arrived; a warm-up sent after the ping would not have."""
    image = ServedImage.of(IMAGE)
    log = ConnectionLog()

    def registry(ex: Exchange) -> None:
        log.request(ex)
        if is_warm_up(ex.path):
            log.wait_requests("/v2/", 1 + WARM_UPS, 10.0)
        ex.serve_image(image)
        if "/manifests/v1" in ex.path:
            log.answered(ex, "manifest answered")

    ctx, ca = _tls_context(tmp_path / "tls")
    server = TlsServer(registry, context=ctx).start()
    try:
        conf_file = tmp_path / "registries.conf"
        conf_file.write_text(f'[[registry]]\nlocation = "{server.host}"\ninsecure = false\n')
        conf = load_registries_conf({"HOME": str(tmp_path),
                                     "CONTAINERS_REGISTRIES_CONF": str(conf_file)})
        cache = GlobalCache.new(tmp_path / "cache")
        start = trio.current_time()
        with trio.fail_after(BOUND_S):
            async with client(registries=conf, insecure=False, ca_certs=ca) as c:
                result = await pull(cache, f"{server.host}/evil/app:v1", client=c,
                                    erofs_artifacts="auto")
        assert not result.cached
        assert trio.current_time() - start < 5.0  # no wait ran out
    finally:
        server.stop()
    before, after = log.split_at("manifest answered")
    paths = [path for _, path in before]
    first_manifest = next(i for i, p in enumerate(paths) if "/manifests/" in p)
    assert paths[:first_manifest].count("/v2/") == 1 + WARM_UPS
    open_before = {port for port, _ in before}
    assert [(p, path) for p, path in after if p not in open_before] == []


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_warm_ups_carry_no_credentials(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    image = ServedImage.of(IMAGE)

    def registry(ex: Exchange) -> None:
        if ex.headers.get("Authorization") != basic(USER, PASSWORD):
            ex.send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                    {"WWW-Authenticate": 'Basic realm="registry"'})
        else:
            ex.serve_image(image)

    server = hostile(registry)
    auth = Authenticator(Credentials(USER, PASSWORD), lookup=None)
    result = await pull_from(server, tmp_path, authenticator=auth)
    assert not result.cached
    warm_ups = server.requests("/v2/")
    warm_ups = [s for s in warm_ups if s.path == "/v2/"]
    assert len(warm_ups) == WARM_UPS
    assert all(s.authorization is None for s in warm_ups)  # answered 401, never retried
    # the credentials were configured and used where they belong
    assert basic(USER, PASSWORD) in server.authorizations()


def _hang_up(ex: Exchange) -> None:
    ex.hang_up()


def _stall(ex: Exchange) -> None:
    ex.pause(60)  # ends when the server stops; the pull must not wait for it


def _flood(ex: Exchange) -> None:
    ex.send(200, b"{" + b" " * (4 * BODY_LIMIT) + b"}")


@pytest.mark.parametrize("warm_up_answer", [_hang_up, _stall, _flood],
                         ids=["dropped", "stalled", "oversized"])
async def test_a_registry_breaking_the_warm_ups_still_serves_the_pull(
    hostile: Hostile, tmp_path: Path, warm_up_answer: Callable[[Exchange], None],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = ServedImage.of(IMAGE)

    def registry(ex: Exchange) -> None:
        if is_warm_up(ex.path):
            warm_up_answer(ex)
        else:
            ex.serve_image(image)

    server = hostile(registry)
    start = trio.current_time()
    with caplog.at_level(logging.DEBUG, logger="cachefs.oci.warmup"):
        result = await pull_from(server, tmp_path)
    assert not result.cached and result.fsmeta.is_file()
    assert trio.current_time() - start < 10.0  # the warm-ups' own bound was not waited out
    assert len([s for s in server.requests() if s.path == "/v2/"]) == WARM_UPS
    if warm_up_answer is not _stall:  # a stalled one is cancelled with the resolve
        assert any("warm" in r.getMessage() and r.levelno == logging.DEBUG
                   for r in caplog.records)
        assert all(r.levelno < logging.WARNING for r in caplog.records
                   if r.name == "cachefs.oci.warmup")


async def test_warm_ups_go_to_the_location_registries_conf_routes_to(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    server = hostile(lambda ex: ex.serve_image(image))
    conf_file = tmp_path / "registries.conf"
    conf_file.write_text(f'[[registry]]\nprefix = "example.com/hub"\n'
                         f'location = "{server.host}/evil"\n')
    conf = load_registries_conf({"HOME": str(tmp_path),
                                 "CONTAINERS_REGISTRIES_CONF": str(conf_file)})
    cache = GlobalCache.new(tmp_path / "cache")
    with trio.fail_after(BOUND_S):
        async with client(registries=conf) as c:
            result = await pull(cache, "example.com/hub/app:v1", client=c,
                                erofs_artifacts="auto")
    assert not result.cached
    assert len([s for s in server.requests() if s.path == "/v2/"]) == WARM_UPS
