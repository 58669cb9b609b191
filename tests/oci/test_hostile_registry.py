"""A malicious registry on 127.0.0.1 against the client and the pull (issue 10).

Each test scripts a :class:`~tests.fixtures.hostile.HostileServer` to do one wrong thing
and asserts the bound that holds: which credentials reached which host, how long the pull
took (wall time, against the small limits the test configures), how many requests it made,
and that the error is one typed line naming the culprit.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from cachefs.cache import GlobalCache
from cachefs.errors import (
    AuthError,
    DigestMismatch,
    LayerFormatError,
    RegistryError,
    ResourceLimit,
    TransferTooSlow,
    UsageError,
)
from cachefs.oci import Authenticator
from cachefs.oci.auth import Credentials, docker_config_credentials
from cachefs.oci.transfer import NetLimits
from cachefs.pipeline.pull import PullResult, layers_in_flight, pull
from cachefs.reference import Reference
from tests.fixtures.hostile import (  # noqa: F401  (fixture)
    OCI_INDEX,
    OCI_MANIFEST,
    Exchange,
    HostileServer,
    ServedImage,
    hostile,
    sha256,
)
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import registry_factory  # noqa: F401  (fixture)
from tests.fixtures.registry import test_client as client

Hostile = Callable[[Callable[[Exchange], None]], HostileServer]

IMAGE = TestImage([layer_tar([reg("etc/hello", b"hello\n")]),
                   layer_tar([reg("data.bin", os.urandom(200_000))])])
# Small limits, so a bound is reached in about a second; each test asserts the wall time.
FAST = NetLimits(header_timeout_s=1.0, min_rate=4096, rate_window_s=1.0, attempts=3,
                 retry_window_s=5.0)
BOUND_S = 20.0  # what any of these pulls may take before the test calls it unbounded
USER, PASSWORD = "alice", "s3cret-pw"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def pull_from(server: HostileServer, tmp_path: Path, *, limits: NetLimits = FAST,
                    repo: str = "evil/app:v1", **client_kw: object) -> PullResult:
    cache = GlobalCache.new(tmp_path / "cache")
    with trio.fail_after(BOUND_S):
        async with client(limits=limits, **client_kw) as c:
            return await pull(cache, f"{server.host}/{repo}", client=c)


async def timed_failure(exc: type[BaseException] | tuple[type[BaseException], ...],
                        server: HostileServer, tmp_path: Path,
                        **kw: object) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(exc) as info:
        await pull_from(server, tmp_path, **kw)
    return info.value, time.monotonic() - start


def one_line(err: BaseException) -> str:
    text = err.one_line()  # type: ignore[attr-defined]
    assert "\n" not in text and "Traceback" not in text
    return text


# 1. credentials never leave their host ---------------------------------------------------


def _authenticator(source: str, registry: str, tmp_path: Path) -> Authenticator:
    if source == "explicit":  # --username/--password
        return Authenticator(Credentials(USER, PASSWORD), lookup=None)
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return Authenticator(lookup=functools.partial(docker_config_credentials, config_path=config))


@pytest.mark.parametrize("source", ["explicit", "docker-config"])
async def test_redirect_target_answering_401_gets_no_credentials(
    hostile: Hostile, tmp_path: Path, source: str  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    victim = image.layer_digests[1]

    def stranger(ex: Exchange) -> None:
        """The redirect target: asks for credentials at a token realm of its own."""
        if ex.path.startswith("/token"):
            ex.send(200, b'{"token": "stranger-token"}')
        else:
            ex.send(401, b"", {"WWW-Authenticate":
                               f'Bearer realm="{other.url}/token",service="evil"'})

    def registry(ex: Exchange) -> None:
        if ex.headers.get("Authorization") != basic(USER, PASSWORD):
            ex.send(401, b"", {"WWW-Authenticate": 'Basic realm="registry"'})
        elif victim in ex.path:
            ex.redirect(f"{other.url}/storage/{victim}")
        else:
            ex.serve_image(image)

    other = hostile(stranger)
    reg_server = hostile(registry)
    auth = _authenticator(source, reg_server.host, tmp_path)
    err, _ = await timed_failure(AuthError, reg_server, tmp_path, authenticator=auth)
    assert other.requests("/storage/"), "the blob was redirected to the other host"
    assert other.authorizations() == []  # no Basic, no registry token
    assert other.requests("/token") == []  # its realm was never asked
    assert set(reg_server.authorizations()) == {basic(USER, PASSWORD)}  # no stranger token
    text = one_line(err)
    assert f"redirected to {other.host}" in text and "401" in text


async def test_token_realm_named_by_the_registry_gets_credentials_redirect_target_none(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """A token service on another host is legitimate when the registry names it; the
    storage the registry redirects blobs to is not, and gets neither Basic nor token."""
    image = ServedImage.of(IMAGE)

    def token_service(ex: Exchange) -> None:
        if ex.headers.get("Authorization") == basic(USER, PASSWORD):
            ex.send(200, b'{"token": "registry-token", "expires_in": 300}')
        else:
            ex.send(401)

    def storage(ex: Exchange) -> None:
        blob = ex.path.rsplit("/", 1)[-1]
        ex.send(200, image.blobs[blob])

    def registry(ex: Exchange) -> None:
        if ex.headers.get("Authorization") != "Bearer registry-token":
            realm = f'{tokens.url}/token'
            ex.send(401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'})
        elif "/blobs/" in ex.path and "sha256:" in ex.path:
            digest = ex.path.rsplit("/", 1)[-1]
            if digest in image.layer_digests:
                ex.redirect(f"{store.url}/s3/{digest}")
                return
            ex.serve_image(image)
        else:
            ex.serve_image(image)

    tokens, store = hostile(token_service), hostile(storage)
    reg_server = hostile(registry)
    auth = Authenticator(Credentials(USER, PASSWORD), lookup=None)
    result = await pull_from(reg_server, tmp_path, authenticator=auth)
    assert not result.cached
    assert len(store.requests("/s3/")) == 2
    assert store.authorizations() == []
    assert set(tokens.authorizations()) == {basic(USER, PASSWORD)}


# 2a. a blob is never read past its descriptor's size -------------------------------------


def _endless(ex: Exchange, prefix: bytes) -> None:
    """A close-delimited body: ``prefix``, then zeros until the client goes away."""
    ex.send_response(200)
    ex.send_header("Connection", "close")
    ex.end_headers()
    ex.close_connection = True
    ex.raw(prefix)
    while ex.pause(0):
        ex.raw(b"\0" * 65536)


async def test_layer_without_size_is_refused_before_downloading(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    image.manifest_doc["layers"][1]["size"] = 0
    image.seal()
    victim = image.layer_digests[1]

    def registry(ex: Exchange) -> None:
        if victim in ex.path:
            _endless(ex, b"")
        else:
            ex.serve_image(image)

    server = hostile(registry)
    err, elapsed = await timed_failure(RegistryError, server, tmp_path)
    assert "has no size" in one_line(err) and victim in one_line(err)
    assert server.requests(victim) == []
    assert elapsed < 5


async def test_blob_is_read_up_to_its_size_and_no_further(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)

    def registry(ex: Exchange) -> None:
        blob = ex.path.rsplit("/", 1)[-1]
        if blob in image.layer_digests:
            _endless(ex, image.blobs[blob])
        else:
            ex.serve_image(image)

    server = hostile(registry)
    start = time.monotonic()
    result = await pull_from(server, tmp_path)
    assert time.monotonic() - start < 10
    assert not result.cached and result.fsmeta.exists()


async def test_failed_ingest_cancels_the_download(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    """A layer that is not gzip: ingest fails on its first bytes, and the pull does not
    wait for the other 50 MB the server promises (and never sends)."""
    image = ServedImage.of(IMAGE)
    bogus = os.urandom(4096)
    image.manifest_doc["layers"][0].update(digest=sha256(b"x"), size=50 << 20)
    image.seal()
    victim = image.layer_digests[0]

    def registry(ex: Exchange) -> None:
        if victim in ex.path:
            ex.send_response(200)
            ex.send_header("Content-Length", str(50 << 20))
            ex.end_headers()
            ex.raw(bogus)
            ex.pause(60)  # then nothing, for as long as the client stays
        else:
            ex.serve_image(image)

    server = hostile(registry)
    patient = NetLimits(header_timeout_s=30, min_rate=1, rate_window_s=30)
    err, elapsed = await timed_failure(LayerFormatError, server, tmp_path, limits=patient)
    assert victim in one_line(err)
    assert elapsed < 10
    cache = GlobalCache(tmp_path / "cache")
    assert not cache.part_path(victim).exists()  # its bytes are what failed: not kept


# 2b. retries bounded per blob in count and time, progress or not ----------------------------


def _few_bytes_then_close(image: ServedImage) -> Callable[[Exchange], None]:
    def registry(ex: Exchange) -> None:
        blob = ex.path.rsplit("/", 1)[-1]
        if blob in image.layer_digests[1:]:  # ignores Range: always from byte 0
            ex.send_response(200)
            ex.send_header("Content-Length", str(len(image.blobs[blob])))
            ex.end_headers()
            ex.raw(image.blobs[blob][:10])
            ex.hang_up()
        else:
            ex.serve_image(image)

    return registry


async def test_progress_does_not_reset_the_attempt_count(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    server = hostile(_few_bytes_then_close(image))
    limits = NetLimits(attempts=4, retry_window_s=60)
    # the default backoff: a cut after progress is resumed at once, not after a pause
    err, elapsed = await timed_failure(RegistryError, server, tmp_path, limits=limits,
                                       backoff_s=0.5)
    assert len(server.requests(image.layer_digests[1])) == 4
    assert "failed after 4 attempts" in one_line(err)
    assert elapsed < 2


async def test_retries_stop_after_the_retry_window(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    image = ServedImage.of(IMAGE)
    server = hostile(_few_bytes_then_close(image))
    limits = NetLimits(attempts=1_000_000, retry_window_s=0.5)
    err, elapsed = await timed_failure(RegistryError, server, tmp_path, limits=limits)
    assert elapsed < 5
    assert image.layer_digests[1] in one_line(err)
    assert len(server.requests(image.layer_digests[1])) < 1_000_000


# 4. an overall deadline per request --------------------------------------------------------


def _trickle(ex: Exchange, head: bytes, body: bytes) -> None:
    ex.raw(head)
    for i in range(len(body)):
        if not ex.pause(0.05):
            return
        ex.raw(body[i : i + 1])


@pytest.mark.parametrize("where", ["headers", "manifest", "blob"])
async def test_trickling_server_times_out_naming_the_host(
    hostile: Hostile, tmp_path: Path, where: str  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    victim = image.layer_digests[1]

    def registry(ex: Exchange) -> None:
        if where == "headers" and "/manifests/" in ex.path:
            _trickle(ex, b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 10_000)
        elif where == "manifest" and "/manifests/" in ex.path:
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: {OCI_MANIFEST}\r\n"
                    f"Content-Length: {len(image.manifest)}\r\n\r\n").encode()
            _trickle(ex, head, image.manifest)
        elif where == "blob" and victim in ex.path:
            blob = image.blobs[victim]
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(blob)}\r\n\r\n".encode()
            _trickle(ex, head, blob)
        else:
            ex.serve_image(image)

    server = hostile(registry)
    err, elapsed = await timed_failure(TransferTooSlow, server, tmp_path)
    text = one_line(err)
    assert server.host in text
    assert ("no response within 1 s" if where == "headers" else "too slow") in text
    # header timeout (1 s) + one rate window (1 s) at most, plus scheduling slack
    assert elapsed < 5


# 5. digests: verified when we know the algorithm, refused otherwise ------------------------


def _claiming(image: ServedImage, claim: str) -> Callable[[Exchange], None]:
    def registry(ex: Exchange) -> None:
        if "/manifests/" in ex.path:
            ex.send(200, image.manifest, {"Content-Type": OCI_MANIFEST,
                                          "Docker-Content-Digest": claim})
        else:
            ex.serve_image(image)

    return registry


async def test_sha512_content_digest_is_verified(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    """Two different images claiming one sha512 digest: the second is not served the
    first's artifacts, it is refused."""
    first, second = ServedImage.of(IMAGE), ServedImage.of(TestImage([IMAGE.layers[0]]))
    claim = "sha512:" + hashlib.sha512(first.manifest).hexdigest()
    result = await pull_from(hostile(_claiming(first, claim)), tmp_path)
    assert str(result.manifest_digest) == claim
    liar = hostile(_claiming(second, claim))
    err, _ = await timed_failure(DigestMismatch, liar, tmp_path, repo="evil/app:v2")
    assert claim in one_line(err)


@pytest.mark.parametrize("claim", ["foo:bar", "sha1:" + "0" * 40])
async def test_unverifiable_content_digest_is_refused(
    hostile: Hostile, tmp_path: Path, claim: str  # noqa: F811
) -> None:
    server = hostile(_claiming(ServedImage.of(IMAGE), claim))
    err, _ = await timed_failure(RegistryError, server, tmp_path)
    assert claim in one_line(err) and "cannot be verified" in one_line(err)
    assert not list((tmp_path / "cache" / "manifests").glob("*.json"))


@pytest.mark.parametrize("where", ["layer", "config", "index entry"])
async def test_unverifiable_descriptor_digest_is_refused_before_anything_is_keyed(
    hostile: Hostile, tmp_path: Path, where: str  # noqa: F811
) -> None:
    image = ServedImage.of(IMAGE)
    if where == "layer":
        image.manifest_doc["layers"][1]["digest"] = "foo:bar"
    elif where == "config":
        image.manifest_doc["config"]["digest"] = "foo:bar"
    image.seal()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "foo:bar", "size": len(image.manifest),
         "platform": {"os": "linux", "architecture": arch}}
        for arch in ("amd64", "arm64")]}).encode()

    def registry(ex: Exchange) -> None:
        if where == "index entry" and "/manifests/v1" in ex.path:
            ex.send(200, index, {"Content-Type": OCI_INDEX})
        else:
            ex.serve_image(image)

    server = hostile(registry)
    err, _ = await timed_failure(RegistryError, server, tmp_path)
    assert "foo:bar" in one_line(err) and "cannot be verified" in one_line(err)
    assert server.requests("foo") == []  # never asked for
    assert server.requests("/blobs/") == []  # not even the config: refused at the manifest
    assert not [p for p in (tmp_path / "cache").rglob("*") if "foo" in p.name]


# 8. Accept-Encoding: identity for digested content ----------------------------------------


async def test_server_that_gzips_when_allowed(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    image = ServedImage.of(IMAGE)

    def registry(ex: Exchange) -> None:
        if "gzip" in ex.headers.get("Accept-Encoding", "") and "/manifests/" in ex.path:
            ex.send(200, gzip.compress(image.manifest), {
                "Content-Type": OCI_MANIFEST, "Content-Encoding": "gzip",
                "Docker-Content-Digest": image.manifest_digest})
        else:
            ex.serve_image(image)

    server = hostile(registry)
    result = await pull_from(server, tmp_path)
    assert str(result.manifest_digest) == image.manifest_digest
    assert {s.headers.get("accept-encoding") for s in server.requests("/v2/evil")} == {"identity"}


# 9. open files bounded by layers in flight, not by the layer count ------------------------

# The child writes its own VmHWM at exit: wait4's ru_maxrss would also count the pytest
# process the child was forked from (its pages before exec), which grows over a session.
_PULL_UNDER_LIMIT = """
import atexit, pathlib, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))

def _peak() -> None:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            pathlib.Path(sys.argv[4]).write_text(line.split()[1])

atexit.register(_peak)
from cachefs.cli import main
main(["--cache", sys.argv[2], "pull", "--insecure", sys.argv[3]])
"""


@dataclass
class Pulled:
    returncode: int
    stderr: str
    peak_rss_mib: float


def _pull_process(tmp_path: Path, ref: str, nofile: int) -> Pulled:
    """``cachefs pull`` in a child with RLIMIT_NOFILE lowered; its own peak RSS (VmHWM)."""
    env = dict(os.environ, HOME=str(tmp_path), DOCKER_CONFIG=str(tmp_path / "nodocker"),
               CACHEFS_HTTP_ATTEMPTS="2")
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PULL_UNDER_LIMIT, str(nofile), str(tmp_path / "cache"), ref,
             str(tmp_path / "peak-kib")],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
        )
        proc.wait()
    peak = tmp_path / "peak-kib"
    peak_mib = int(peak.read_text()) / 1024 if peak.exists() else float("inf")
    return Pulled(proc.returncode, err.read_text(), peak_mib)


def _many_layers(n: int) -> TestImage:
    return TestImage([layer_tar([reg(f"f{i}", f"layer {i}\n".encode())]) for i in range(n)])


def test_450_layers_pull_under_1024_open_files(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    image = ServedImage.of(_many_layers(450))
    server = hostile(lambda ex: ex.serve_image(image))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= 1024
    proc = _pull_process(tmp_path, f"{server.host}/evil/app:v1", 1024)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = GlobalCache(tmp_path / "cache").read_image_metadata(
        Reference.parse(f"{server.host}/evil/app:v1"))
    assert meta is not None and len(meta.layers) == 450


def test_too_many_layers_for_the_open_file_limit_is_a_clear_error(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    image = ServedImage.of(_many_layers(450))
    server = hostile(lambda ex: ex.serve_image(image))
    proc = _pull_process(tmp_path, f"{server.host}/evil/app:v1", 300)
    assert proc.returncode == ResourceLimit.exit_code, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "open files" in lines[0] and "450 layers" in lines[0]
    layer_requests = [s for d in image.layer_digests for s in server.requests(d)]
    assert layer_requests == []  # refused before downloading anything


# 10. redirect loop: a typed error, not an internal one ------------------------------------


def test_redirect_loop_is_a_registry_error(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    server = hostile(lambda ex: ex.redirect(ex.path, 302))
    proc = _pull_process(tmp_path, f"{server.host}/evil/app:v1", 1024)
    assert proc.returncode == RegistryError.exit_code, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "more than 5 redirects" in lines[0] and server.host in lines[0]
    assert len(server.requests()) <= 6 * 2  # one resolve, at most two attempts


# should-fix: capped platform list, capped token answer -------------------------------------


async def test_index_with_10000_platforms_gives_a_short_error(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    entries = [{"mediaType": OCI_MANIFEST, "digest": sha256(str(i).encode()), "size": 1,
                "platform": {"os": "plan9", "architecture": f"arch{i:05d}"}}
               for i in range(10_000)]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": entries}).encode()
    server = hostile(lambda ex: ex.send(200, index, {"Content-Type": OCI_INDEX}))
    err, _ = await timed_failure(RegistryError, server, tmp_path)
    text = one_line(err)
    assert "… and 9,990 more" in text and "plan9/arch00000" in text
    assert len(text) < 1000


async def test_oversized_token_answer_is_refused(hostile: Hostile, tmp_path: Path) -> None:  # noqa: F811
    def token_service(ex: Exchange) -> None:
        ex.send(200, json.dumps({"token": "t" * (4 << 20)}).encode())

    def registry(ex: Exchange) -> None:
        ex.send(401, b"", {"WWW-Authenticate": f'Bearer realm="{tokens.url}/token"'})

    tokens = hostile(token_service)
    server = hostile(registry)
    limits = NetLimits(max_token_bytes=64 << 10)
    err, _ = await timed_failure(RegistryError, server, tmp_path, limits=limits)
    assert "larger than 65536 bytes" in one_line(err) and tokens.host in one_line(err)
    assert all(len(a) < 1000 for a in server.authorizations())


async def test_https_registry_credentials_never_go_to_a_plain_http_realm(
    registry_factory, tmp_path: Path  # noqa: F811
) -> None:
    r = registry_factory(auth="token", tls=True)  # its token service is plain http
    assert r.token_server is not None and r.token_server.realm.startswith("http://")
    auth = Authenticator(Credentials(r.username, r.password), lookup=None)
    async with client(insecure=False, ca_certs=r.ca_cert, authenticator=auth) as c:
        with pytest.raises(AuthError) as info:
            await c.resolve(Reference.parse(f"{r.host}/any/thing:v1"))
    assert "plain-http token service" in one_line(info.value)
    assert r.token_server.requests == []  # not even asked


def test_huge_token_answer_is_cut_off_in_bounded_memory(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """A token service answering 300 MiB: the pull fails fast, its memory stays flat."""
    sent = [0]

    def token_service(ex: Exchange) -> None:
        ex.send_response(200)
        ex.send_header("Content-Length", str(300 << 20))
        ex.end_headers()
        ex.raw(b'{"token": "')
        chunk = b"t" * (1 << 20)
        while sent[0] < 300 << 20 and ex.pause(0):
            ex.raw(chunk)
            sent[0] += len(chunk)

    def registry(ex: Exchange) -> None:
        ex.send(401, b"", {"WWW-Authenticate": f'Bearer realm="{tokens.url}/token"'})

    tokens = hostile(token_service)
    server = hostile(registry)
    start = time.monotonic()
    pulled = _pull_process(tmp_path, f"{server.host}/evil/app:v1", 1024)
    assert time.monotonic() - start < 30
    assert pulled.returncode == RegistryError.exit_code, pulled.stderr[-2000:]
    assert "larger than 1048576 bytes" in pulled.stderr and tokens.host in pulled.stderr
    assert pulled.peak_rss_mib < 120  # measured ~60; a 300 MiB answer read whole: over 600
    assert sent[0] < 100 << 20  # the rest was never asked for


def test_limits_from_the_environment() -> None:
    limits = NetLimits.from_env({"CACHEFS_HTTP_MIN_RATE": "10", "CACHEFS_HTTP_RATE_WINDOW": "0.5",
                                 "CACHEFS_MAX_BLOB_BYTES": str(1 << 20)})
    assert (limits.min_rate, limits.rate_window_s, limits.max_blob_bytes) == (10, 0.5, 1 << 20)
    assert limits.attempts == NetLimits().attempts
    for bad in ("0", "-3", "fast"):
        with pytest.raises(UsageError, match="CACHEFS_HTTP_ATTEMPTS"):
            NetLimits.from_env({"CACHEFS_HTTP_ATTEMPTS": bad})
    assert layers_in_flight({"CACHEFS_LAYERS_IN_FLIGHT": "2"}) == 2
    with pytest.raises(UsageError, match="CACHEFS_LAYERS_IN_FLIGHT"):
        layers_in_flight({"CACHEFS_LAYERS_IN_FLIGHT": "0"})
