"""The pull pipeline against a real registry on 127.0.0.1, compared with msb's own pull."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachefs.cache import GlobalCache
from cachefs.errors import (
    AuthError,
    CachefsError,
    DigestMismatch,
    LayerFormatError,
    NotCachedError,
    RegistryError,
)
from cachefs.oci import Authenticator
from cachefs.oci.auth import Credentials
from cachefs.pipeline.progress import Event, Finished, LayerProgress, Resolved
from cachefs.pipeline.pull import PullPolicy, pull
from cachefs.reference import Reference
from tests.fixtures.hostile import ServedImage, hostile  # noqa: F401  (fixture)
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg, symlink
from tests.fixtures.registry import (  # noqa: F401  (fixtures)
    LocalRegistry,
    flaky_proxy_factory,
    oci_layout,
    registry_factory,
)
from tests.fixtures.registry import test_client as client
from tests.fixtures.stalling import StalledBlob
from tests.fixtures.system import Msb, system_fixture

BASE = layer_tar([dir_("etc"), reg("etc/os-release", b"ID=test\n"), reg("bin/sh", b"\x7fELF" * 100,
                 mode=0o755), symlink("bin/ash", "sh")])
MIDDLE = layer_tar([reg("etc/os-release", b"ID=test2\n"), reg(".wh.gone", b""),
                    reg("usr/share/big", os.urandom(200_000))])
TOP = layer_tar([dir_("app"), reg("app/.wh..wh..opq", b""), reg("app/main", b"print(1)\n")])
IMAGE = TestImage([BASE, MIDDLE, TOP], config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"],
                                              "WorkingDir": "/app", "Labels": {"x": "y"}})
OTHER = TestImage([BASE, layer_tar([reg("other", b"other image\n")])])
ARM = TestImage([layer_tar([reg("arch", b"arm64\n")])], architecture="arm64")
# Its own layers: skopeo would otherwise reuse a registry blob of the same diff_id pushed
# uncompressed by another test image, under the archive's gzip media type.
DOCK = TestImage([layer_tar([reg("etc/motd", b"from a docker archive\n")]),
                  layer_tar([reg("etc/motd", b"overridden\n"), reg("x", b"y")])])
BIG = TestImage([layer_tar([reg("big.bin", os.urandom(6 << 20))])])


@dataclass
class Pushed:
    registry: LocalRegistry

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


@pytest.fixture(scope="module")
@system_fixture
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    d = tmp_path_factory.mktemp("pullreg")
    with LocalRegistry(d / "registry") as r:
        for name, compression in (("gz", "gzip"), ("zst", "zstd"), ("plain", "none")):
            layout = oci_layout(IMAGE, d / name, compression=compression)  # type: ignore[arg-type]
            r.push_oci_layout(layout.path, f"app/{name}", "v1")
        multi = oci_layout([IMAGE, ARM], d / "multi", compression="gzip")
        r.push_oci_layout(multi.path, "app/multi", "v1")
        other = oci_layout(OTHER, d / "other", compression="gzip")
        r.push_oci_layout(other.path, "app/other", "v1")
        big = oci_layout(BIG, d / "big", compression="none")
        r.push_oci_layout(big.path, "app/big", "v1")
        docker_archive(DOCK, ["x/y:1"], d / "dock.tar", compress=True)
        r.push_docker_archive(d / "dock.tar", "app/dock", "v1")
        yield Pushed(r)


async def cachefs_pull(cache: GlobalCache, ref: str, **kw: Any):  # type: ignore[no-untyped-def]
    async with client(**kw.pop("client_kw", {})) as c:
        return await pull(cache, ref, client=c, **kw)


def artifacts(root: Path) -> dict[str, bytes]:
    out = {}
    for sub in ("layers", "fsmeta", "vmdk", "manifests"):
        for f in sorted((root / sub).glob("*")):
            if f.suffix in (".erofs", ".vmdk", ".json"):
                data = f.read_bytes()
                if f.suffix == ".vmdk":
                    data = data.replace(str(root.resolve()).encode(), b"<CACHE>")
                out[f"{sub}/{f.name}"] = data
    return out


@pytest.mark.parametrize("name", ["gz", "zst", "plain", "multi", "dock"])
async def test_pull_is_byte_identical_to_msb_pull(
    pushed: Pushed, msb: Msb, tmp_path: Path, name: str
) -> None:
    ref = pushed.ref(f"app/{name}:v1")
    cache = GlobalCache.new(tmp_path / "ours")
    events: list[Event] = []
    result = await cachefs_pull(cache, ref, progress=events.append)
    msb("pull", "--insecure", "--quiet", ref)
    ours, theirs = artifacts(cache.root), artifacts(msb.cache)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key
    assert not result.cached
    assert next(type(e) for e in events if not isinstance(e, LayerProgress)) is Resolved
    assert isinstance(events[-1], Finished)
    done = {e.index for e in events if isinstance(e, LayerProgress) and e.phase == "done"}
    assert done == set(range(len(result.metadata.layers)))
    # transient blobs are gone, nothing left in tmp/ but lock files
    assert not list(cache.layers_dir().glob("*.tar.gz"))
    assert [p.name for p in cache.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []
    assert [r.reference for r in cache.ref_records()] == [str(Reference.parse(ref))]


async def test_second_pull_is_a_cache_hit_and_msb_accepts_our_cache(
    pushed: Pushed, msb: Msb, tmp_path: Path
) -> None:
    """msb pulls from *our* cache with the registry unreachable: a hit, no network."""
    ref = pushed.ref("app/gz:v1")
    cache = GlobalCache.new(msb.cache)
    await cachefs_pull(cache, ref)
    before = artifacts(cache.root)
    again = await cachefs_pull(cache, ref, client_kw={"insecure": True})
    assert again.cached
    moved = ref.replace(pushed.registry.host, "127.0.0.1:9")  # nothing listens there
    await cachefs_pull(cache, ref)  # the same reference, and under a dead registry name:
    meta = cache.read_image_metadata(ref)
    assert meta is not None
    cache.write_image_metadata(moved, meta)
    proc = msb("pull", "--insecure", moved)
    assert "already cached" in proc.stdout + proc.stderr
    assert artifacts(cache.root).items() >= before.items()  # msb rewrote nothing


async def test_policy_never_and_always(pushed: Pushed, tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    ref = pushed.ref("app/plain:v1")
    with pytest.raises(NotCachedError, match="policy is 'never'"):
        await cachefs_pull(cache, ref, policy=PullPolicy.NEVER)
    await cachefs_pull(cache, ref)
    hit = await cachefs_pull(cache, ref, policy=PullPolicy.NEVER)
    assert hit.cached
    fresh = await cachefs_pull(cache, ref, policy=PullPolicy.ALWAYS)
    assert not fresh.cached  # resolved again (layers reused, still valid)


async def test_missing_fsmeta_and_vmdk_are_rebuilt_without_network(
    pushed: Pushed, tmp_path: Path
) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    ref = pushed.ref("app/zst:v1")
    first = await cachefs_pull(cache, ref)
    fsmeta = first.fsmeta.read_bytes()
    first.fsmeta.unlink()
    first.vmdk.unlink()
    # a client pointed at a dead port proves no request is needed
    again = await cachefs_pull(cache, ref, client_kw={"mirrors": {pushed.registry.host:
                                                                   "127.0.0.1:9"}})
    assert again.cached and again.fsmeta.read_bytes() == fsmeta and again.vmdk.exists()


async def test_platform_override(pushed: Pushed, tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    result = await cachefs_pull(cache, pushed.ref("app/multi:v1"), platform="linux/arm64")
    assert len(result.metadata.layers) == 1
    with pytest.raises(RegistryError, match=r"arm64|amd64"):
        await cachefs_pull(cache, pushed.ref("app/multi:v1"), platform="linux/s390x",
                           force=True)


# resume ------------------------------------------------------------------------------


class Forwarder:
    """A GET/HEAD proxy on 127.0.0.1 in front of the registry; ``deliver`` writes each
    answer's body, so subclasses can stall, count or replace it."""

    DROP = ("connection", "transfer-encoding", "content-length")

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                up = http.client.HTTPConnection("127.0.0.1", outer.upstream_port, timeout=30)
                up.request("GET", self.path, headers=headers)
                resp = up.getresponse()
                data = outer.body(self.path, resp.read())
                up.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in outer.DROP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                outer.deliver(self, data)

            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def body(self, path: str, data: bytes) -> bytes:
        return data

    def deliver(self, handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
        handler.wfile.write(data)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StallingProxy(Forwarder):
    """The first blob GET bigger than ``stall_after`` stalls after that many bytes until
    ``release`` is set. Counts body bytes sent for the big layer blob."""

    def __init__(self, upstream_port: int, stall_after: int) -> None:
        self.stall_after: int | None = stall_after
        self.release = threading.Event()
        self.stalled = threading.Event()
        self.blob_bytes = 0
        self.ranges: list[str | None] = []
        super().__init__(upstream_port)

    def deliver(self, handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
        if "/blobs/" not in handler.path:
            handler.wfile.write(data)
            return
        rng = handler.headers.get("Range")
        big = len(data) > 1 << 20 or rng is not None
        if big:
            self.ranges.append(rng)
        stall = self.stall_after
        if stall is not None and len(data) > stall:  # the layer, not the config
            self.stall_after = None
            handler.wfile.write(data[:stall])
            handler.wfile.flush()
            self.blob_bytes += stall
            self.stalled.set()
            self.release.wait(60)
            return
        handler.wfile.write(data)
        if big:
            self.blob_bytes += len(data)

    def close(self) -> None:
        self.release.set()
        super().close()


PULL_SCRIPT = r"""
import sys, trio
from cachefs.cache import GlobalCache
from cachefs.oci import Authenticator, RegistryClient
from cachefs.pipeline.pull import pull
async def main():
    async with RegistryClient(insecure=True, authenticator=Authenticator(lookup=None),
                              backoff_s=0.0) as c:
        r = await pull(GlobalCache.new(sys.argv[1]), sys.argv[2], client=c)
        print(r.manifest_digest, r.cached)
trio.run(main)
"""


def pull_process(cache: Path, ref: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, str(cache), ref],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)


def test_download_killed_mid_blob_resumes(pushed: Pushed, tmp_path: Path) -> None:
    proxy = StallingProxy(pushed.registry.port, stall_after=2 << 20)
    try:
        cache = GlobalCache.new(tmp_path / "c")
        ref = f"{proxy.host}/app/big:v1"
        proc = pull_process(cache.root, ref)
        assert proxy.stalled.wait(60)
        parts = list(cache.tmp_dir().glob("*.part"))
        assert len(parts) == 1
        # the puller writes what it received: wait (bounded) until the 2 MiB are on disk
        deadline = time.monotonic() + 30
        while parts[0].stat().st_size < 2 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(parts) == 1
        first_bytes = proxy.blob_bytes
        blob_size = len(BIG.layers[0])
        assert first_bytes < blob_size
        # the part holds what arrived before the kill (bounded by what the proxy sent)
        assert 0 < parts[0].stat().st_size <= first_bytes
        kept = parts[0].stat().st_size
        proxy.blob_bytes = 0
        second = pull_process(cache.root, ref)
        _out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert proxy.ranges[-1] == f"bytes={kept}-"
        assert proxy.blob_bytes == blob_size - kept  # only the missing tail was fetched
    finally:
        proxy.close()
    reference = GlobalCache.new(tmp_path / "ref")
    import trio

    trio.run(cachefs_pull, reference, pushed.ref("app/big:v1"))
    ours = artifacts(cache.root)
    want = artifacts(reference.root)
    assert {k: v for k, v in ours.items() if not k.startswith("manifests/")} == {
        k: v for k, v in want.items() if not k.startswith("manifests/")}


# concurrency ------------------------------------------------------------------------------


def test_four_processes_pull_one_reference(pushed: Pushed, tmp_path: Path,
                                           flaky_proxy_factory) -> None:  # noqa: F811
    proxy = flaky_proxy_factory(pushed.registry)  # counts requests, fails none
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{proxy.host}/app/gz:v1"
    procs = [pull_process(cache.root, ref) for _ in range(4)]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    blob_gets = [path for method, path, _, status in proxy.log
                 if method == "GET" and "/blobs/" in path and status == 200]
    layer_and_config = 3 + 1
    layer_gets = [p for p in blob_gets if blob_gets.count(p) > 1 and "sha256:" in p]
    assert len(set(blob_gets)) == layer_and_config
    # each layer blob once (the config is small and read by every resolver)
    meta = cache.read_image_metadata(ref)
    assert meta is not None
    for layer in meta.layers:
        assert sum(1 for p in blob_gets if p.endswith(layer.digest)) == 1, layer.digest
    assert set(layer_gets) <= {p for p in blob_gets if p.endswith(meta.config_digest)}
    assert len(list(cache.layers_dir().glob("*.erofs"))) == 3
    assert len(list(cache.fsmeta_dir().glob("*.erofs"))) == 1


def test_two_images_sharing_a_base_layer(pushed: Pushed, tmp_path: Path,
                                         flaky_proxy_factory) -> None:  # noqa: F811
    proxy = flaky_proxy_factory(pushed.registry)
    cache = GlobalCache.new(tmp_path / "c")
    procs = [pull_process(cache.root, f"{proxy.host}/app/gz:v1"),
             pull_process(cache.root, f"{proxy.host}/app/other:v1")]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    base_diff = IMAGE.diff_ids()[0]
    meta = cache.read_image_metadata(f"{proxy.host}/app/gz:v1")
    assert meta is not None and str(meta.layers[0].diff_id) == base_diff
    base_blob = meta.layers[0].digest
    gets = [path for method, path, _, status in proxy.log
            if method == "GET" and path.endswith(base_blob) and status == 200]
    assert len(gets) == 1  # the shared blob was downloaded (and its layer written) once
    assert len(list(cache.layers_dir().glob("*.erofs"))) == 4


# bad input -------------------------------------------------------------------------------


def assert_nothing_published(cache: GlobalCache, ref: str) -> None:
    assert not cache.image_metadata_path(ref).exists()
    assert not list(cache.fsmeta_dir().glob("*.erofs"))
    assert not list(cache.vmdk_dir().glob("*.vmdk"))
    leftovers = [p.name for p in cache.tmp_dir().iterdir()
                 if not p.name.endswith((".lock", ".part"))]
    assert leftovers == []
    for layer in cache.layers_dir().glob("*.erofs"):
        from cachefs.erofs.reader import is_valid_erofs

        assert is_valid_erofs(layer)


def one_line(err: CachefsError) -> str:
    text = err.one_line()
    assert "\n" not in text and "Traceback" not in text
    return text


async def test_blob_bytes_not_matching_digest(tmp_path: Path, registry_factory) -> None:  # noqa: F811
    """Bytes that decompress to exactly the right layer but are not the blob the manifest
    names (the gzip header's OS byte differs): only the download's digest can tell."""
    r = registry_factory()
    layout = oci_layout(OTHER, tmp_path / "l", compression="gzip")
    r.push_oci_layout(layout.path, "bad/blob", "v1")
    victim = json.loads(layout.images[0].manifest_bytes)["layers"][1]["digest"]
    path = r.blob_path(victim)
    data = bytearray(path.read_bytes())
    assert data[:2] == b"\x1f\x8b"
    data[9] ^= 0xFF  # OS field: ignored by every gzip reader, so ingest and diff_id succeed
    path.write_bytes(bytes(data))
    served = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{r.host}/bad/blob:v1"
    with pytest.raises(DigestMismatch) as info:
        await cachefs_pull(cache, ref)
    assert info.value.exit_code == 7
    assert one_line(info.value).endswith(f"expected {victim}, got {served}")
    assert_nothing_published(cache, ref)
    assert not cache.part_path(victim).exists()  # a bad download is not kept
    assert not cache.tar_path(victim).exists()


async def test_blob_that_is_not_gzip_fails_while_it_downloads(
        tmp_path: Path, hostile) -> None:  # noqa: F811
    """A blob whose first bytes are not gzip: ingest says so while the registry still holds
    back the rest of it, so the download's digest cannot be what the user is told."""
    served = ServedImage.of(OTHER)
    victim = served.layer_digests[1]
    served.blobs[victim] = b"\x00\x00" + served.blobs[victim][2:]  # same size, not gzip
    stall = StalledBlob(served, victim, repo="bad/gzip")
    server = hostile(stall)
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{server.host}/bad/gzip:v1"
    with pytest.raises(LayerFormatError) as info:
        await cachefs_pull(cache, ref)
    assert stall.reached.is_set() and not stall.release.is_set()
    assert info.value.exit_code == 8
    assert one_line(info.value) == (f"layer {victim}: corrupt gzip stream: "
                                    "Error -4 Invalid gzip/zlib wrapper found")
    assert_nothing_published(cache, ref)


async def test_truncated_blob(tmp_path: Path, registry_factory) -> None:  # noqa: F811
    """The registry serves 20 bytes fewer than the manifest promises: the download resumes
    from what it got, the registry has nothing more (416), and the user is told which blob
    failed and why, once the attempts are spent."""
    r = registry_factory()
    layout = oci_layout(OTHER, tmp_path / "l", compression="gzip")
    r.push_oci_layout(layout.path, "bad/trunc", "v1")
    victim = json.loads(layout.images[0].manifest_bytes)["layers"][1]["digest"]
    path = r.blob_path(victim)
    short = path.read_bytes()[:-20]
    path.write_bytes(short)
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{r.host}/bad/trunc:v1"
    with pytest.raises(RegistryError) as info:
        await cachefs_pull(cache, ref, client_kw={"max_attempts": 2})
    assert type(info.value) is RegistryError and info.value.exit_code == 5
    msg = one_line(info.value)
    assert msg.startswith(f"{ref}: downloading blob {victim} failed after 2 attempts in ")
    assert "HTTP 416 to a resume request" in msg
    assert_nothing_published(cache, ref)
    assert not cache.layer_erofs_path(OTHER.diff_ids()[1]).exists()


async def test_wrong_diff_id(tmp_path: Path, registry_factory) -> None:  # noqa: F811
    r = registry_factory()
    wrong = TestImage(OTHER.layers)
    good = wrong.config_json()
    cfg = json.loads(good)
    cfg["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    wrong.config_json = lambda: json.dumps(cfg).encode()  # type: ignore[method-assign]
    layout = oci_layout(wrong, tmp_path / "l", compression="gzip")
    r.push_oci_layout(layout.path, "bad/diff", "v1")
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{r.host}/bad/diff:v1"
    with pytest.raises(DigestMismatch) as info:
        await cachefs_pull(cache, ref)
    assert "0" * 64 in one_line(info.value)
    assert_nothing_published(cache, ref)
    assert not cache.layer_erofs_path("sha256:" + "0" * 64).exists()


async def test_registry_500_then_recovers(pushed: Pushed, tmp_path: Path,
                                          flaky_proxy_factory) -> None:  # noqa: F811
    proxy = flaky_proxy_factory(pushed.registry, fail_first=3, status=503)
    cache = GlobalCache.new(tmp_path / "c")
    result = await cachefs_pull(cache, f"{proxy.host}/app/gz:v1")
    assert not result.cached
    assert [s for *_, s in proxy.log[:3]] == [503, 503, 503]


async def test_wrong_credentials(tmp_path: Path, registry_factory) -> None:  # noqa: F811
    r = registry_factory(auth="basic", anonymous_pull=False)
    layout = oci_layout(OTHER, tmp_path / "l", compression="gzip")
    r.push_oci_layout(layout.path, "priv/app", "v1")
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{r.host}/priv/app:v1"
    with pytest.raises(AuthError) as info:
        await cachefs_pull(cache, ref, client_kw={
            "authenticator": Authenticator(Credentials("alice", "wrong"), lookup=None)})
    assert "401" in one_line(info.value) or "unauthorized" in one_line(info.value).lower()
    assert_nothing_published(cache, ref)
    ok = await cachefs_pull(cache, ref, client_kw={
        "authenticator": Authenticator(Credentials(r.username, r.password), lookup=None)})
    assert not ok.cached


class ManifestGarbler(Forwarder):
    """Every manifest comes back as bytes that are not JSON (and without its digest)."""

    BODY = b"<html>this is not a manifest{"
    DROP = (*Forwarder.DROP, "docker-content-digest")

    def body(self, path: str, data: bytes) -> bytes:
        return self.BODY if "/manifests/" in path else data


async def test_manifest_that_is_not_json(pushed: Pushed, tmp_path: Path) -> None:
    proxy = ManifestGarbler(pushed.registry.port)
    try:
        cache = GlobalCache.new(tmp_path / "c")
        ref = f"{proxy.host}/app/gz:v1"
        with pytest.raises(RegistryError) as info:
            await cachefs_pull(cache, ref)
        text = one_line(info.value)
        assert "json" in text.lower() or "manifest" in text.lower()
        assert_nothing_published(cache, ref)
        assert not list(cache.layers_dir().glob("*.erofs"))
    finally:
        proxy.close()


async def test_force_rebuilds_every_artifact_in_place(pushed: Pushed, tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    ref = pushed.ref("app/plain:v1")
    first = await cachefs_pull(cache, ref)
    before = artifacts(cache.root)
    inodes = {p: p.stat().st_ino for p in (first.fsmeta, first.vmdk,
                                           *cache.layers_dir().glob("*.erofs"))}
    again = await cachefs_pull(cache, ref, force=True)
    assert not again.cached
    assert artifacts(cache.root) == before  # the same bytes, written anew
    assert all(p.stat().st_ino != ino for p, ino in inodes.items())
