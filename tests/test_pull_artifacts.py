"""Host A converts and pushes EROFS artifacts; host B pulls them (real docker-registry, msb).

Every test builds its own registry (tampering changes it), pulls on a cache "A" that
converts from tars and pushes the artifact, then pulls on a fresh cache "B".
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cachefs.cache import GlobalCache
from cachefs.errors import RegistryError
from cachefs.oci.referrers import (
    ANN_DIGEST,
    ANN_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    index_with,
    referrer_entry,
    referrers_tag,
)
from cachefs.pipeline.early import EARLY_LAYERS
from cachefs.pipeline.pull import pull
from cachefs.share.provenance import layer_origin
from cachefs.share.push import push_erofs
from tests.fixtures.images import TestImage
from tests.fixtures.registry import (  # noqa: F401  (fixtures)
    LocalRegistry,
    flaky_proxy_factory,
    oci_layout,
    registry_factory,
)
from tests.fixtures.registry import test_client as client
from tests.fixtures.system import Msb, python
from tests.test_pull import IMAGE, artifacts
from tests.view.conftest import view_mount

SHARED = "cachefs.share.fetch"


@dataclass
class World:
    registry: LocalRegistry
    ref: str
    a: GlobalCache
    tmp: Path

    def fresh(self, name: str = "b") -> GlobalCache:
        return GlobalCache.new(self.tmp / name)

    def get(self, path: str, accept: str = OCI_MANIFEST) -> bytes:
        import urllib.request

        req = urllib.request.Request(f"http://{self.registry.host}/v2/app/img/{path}",
                                     headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()  # type: ignore[no-any-return]


async def pull_with(cache: GlobalCache, ref: str, **kw: Any):  # type: ignore[no-untyped-def]
    async with client() as c:
        return await pull(cache, ref, client=c, **kw)


async def make_world(tmp_path: Path, registry_factory: Any, image: TestImage = IMAGE,  # noqa: F811
                     push: bool = True) -> World:
    registry = registry_factory()
    layout = oci_layout(image, tmp_path / "layout")
    registry.push_oci_layout(layout.path, "app/img", "v1")
    world = World(registry, f"{registry.host}/app/img:v1", GlobalCache.new(tmp_path / "a"),
                  tmp_path)
    await pull_with(world.a, world.ref, erofs_artifacts="never")
    if push:
        async with client() as c:
            await push_erofs(world.a, world.ref, c)
    return world


def origins(cache: GlobalCache, ref: str) -> list[str]:
    meta = cache.read_image_metadata(ref)
    assert meta is not None
    return [layer_origin(cache, d)["origin"] for d in meta.diff_ids]


async def test_host_b_pulls_erofs_byte_identical_to_msb(
    tmp_path: Path, registry_factory: Any, msb: Msb, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    b = world.fresh()
    with caplog.at_level(logging.WARNING, logger=SHARED):
        result = await pull_with(b, world.ref)
    assert not [r for r in caplog.records if r.name == SHARED]
    assert origins(b, world.ref) == ["fetched-erofs"] * 3
    assert origins(world.a, world.ref) == ["converted"] * 3
    msb("pull", "--insecure", "--quiet", world.ref)
    ours, theirs = artifacts(b.root), artifacts(msb.cache)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key
    assert result.vmdk.exists() and result.fsmeta.exists()
    # where each layer came from: inspect (CLI) and the view's image.json (real FUSE mount)
    proc = subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(b.root), "inspect", "--json", world.ref],
        capture_output=True, text=True, timeout=120, check=True)
    details = json.loads(proc.stdout)["layer_details"]
    assert [d["origin"] for d in details] == ["fetched-erofs"] * 3
    assert {d["origin_source"] for d in details} == {world.ref}
    text = subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(world.a.root), "inspect", world.ref],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert text.count("converted from tar") == 3
    with view_mount(b.root, tmp_path / "mnt") as vm:
        doc = json.loads((vm.image_dir(world.ref) / "image.json").read_text())
    assert [layer["origin"] for layer in doc["layers"]] == ["fetched-erofs"] * 3
    # no layer tar was downloaded by B: nothing but locks in tmp/, no blob left anywhere
    assert [p.name for p in b.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []
    assert list((b.root / "cachefs" / "tmp").iterdir()) == []


async def test_policy_only_and_never(tmp_path: Path, registry_factory: Any) -> None:  # noqa: F811
    world = await make_world(tmp_path, registry_factory)
    b = world.fresh("only")
    await pull_with(b, world.ref, erofs_artifacts="only")
    assert origins(b, world.ref) == ["fetched-erofs"] * 3
    c = world.fresh("never")
    await pull_with(c, world.ref, erofs_artifacts="never")
    assert origins(c, world.ref) == ["converted"] * 3
    assert artifacts(b.root) == artifacts(c.root)


async def test_registry_without_artifact_behaves_as_today(
    tmp_path: Path, registry_factory: Any, flaky_proxy_factory: Any  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory, push=False)
    proxy = flaky_proxy_factory(world.registry)
    ref = f"{proxy.host}/app/img:v1"
    b = world.fresh()
    await pull_with(b, ref)
    assert origins(b, ref) == ["converted"] * 3
    lookups = [(m, p, s) for m, p, _, s in proxy.log
               if "/referrers/" in p or "/manifests/sha256-" in p]
    assert sorted(s for _, _, s in lookups) == [404, 404]  # one of each, both at once
    # lookup, manifest, config, 3 layer blobs; and the connections of the lookup and of the
    # early downloads opened beside the manifest (GET /v2/, tests/oci/test_warmup.py)
    assert len(proxy.log) == 2 + 1 + 1 + 3 + 2 + EARLY_LAYERS
    assert [p for _, p, _, _ in proxy.log].count("/v2/") == 2 + EARLY_LAYERS
    a_art = {k: v for k, v in artifacts(world.a.root).items() if not k.startswith("manifests")}
    b_art = {k: v for k, v in artifacts(b.root).items() if not k.startswith("manifests")}
    assert a_art == b_art
    with pytest.raises(RegistryError, match="not available as checked EROFS"):
        await pull_with(world.fresh("only"), ref, erofs_artifacts="only")


async def test_the_lookup_runs_beside_the_config_fetch(
    tmp_path: Path, registry_factory: Any, flaky_proxy_factory: Any  # noqa: F811
) -> None:
    """The lookup needs only the manifest digest: its round trip overlaps the config's.
    The proxy holds the config blob until the lookup's request has arrived (10 s at most);
    a lookup that waited for the config would only arrive after that deadline."""
    world = await make_world(tmp_path, registry_factory, push=False)
    meta = world.a.read_image_metadata(world.ref)
    assert meta is not None
    proxy = flaky_proxy_factory(world.registry,
                                hold=(f"/blobs/{meta.config_digest}", "/referrers/"))
    ref = f"{proxy.host}/app/img:v1"
    b = world.fresh()
    await pull_with(b, ref)
    assert proxy.held_released == [True]
    assert origins(b, ref) == ["converted"] * 3
    # the same requests, the same warm-ups
    assert len(proxy.log) == 2 + 1 + 1 + 3 + 2 + EARLY_LAYERS


# tampering ------------------------------------------------------------------------------


def artifact_of(world: World) -> tuple[bytes, dict[str, Any]]:
    meta = world.a.read_image_metadata(world.ref)
    assert meta is not None
    index = json.loads(world.get(f"manifests/{referrers_tag(meta.manifest)}", OCI_INDEX))
    digest = index["manifests"][-1]["digest"]
    body = world.get(f"manifests/{digest}")
    return body, json.loads(body)


def publish_tampered(world: World, doc: dict[str, Any]) -> None:
    """PUT a changed artifact manifest and list it last (newest) in the tag-schema index."""
    meta = world.a.read_image_metadata(world.ref)
    assert meta is not None
    body = json.dumps(doc).encode()
    world.registry.push_manifest("app/img", str(_sha(body)), body, OCI_MANIFEST)
    tag = referrers_tag(meta.manifest)
    index = index_with(world.get(f"manifests/{tag}", OCI_INDEX), referrer_entry(body))
    world.registry.push_manifest("app/img", tag, index, OCI_INDEX)


def _sha(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


async def pull_b_expecting_fallback(world: World, caplog: pytest.LogCaptureFixture,
                                    converted: list[int]) -> None:
    b = world.fresh()
    with caplog.at_level(logging.WARNING, logger=SHARED):
        await pull_with(b, world.ref)
    warnings = [r.getMessage() for r in caplog.records if r.name == SHARED]
    assert warnings, "no warning about the tampered artifact"
    got = origins(b, world.ref)
    assert [i for i, o in enumerate(got) if o == "converted"] == converted, (got, warnings)
    assert artifacts(b.root) == artifacts(world.a.root)


async def test_blob_with_wrong_digest_is_refused(
    tmp_path: Path, registry_factory: Any, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    _, doc = artifact_of(world)
    stored = world.registry.blob_path(doc["layers"][1]["digest"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    await pull_b_expecting_fallback(world, caplog, converted=[0, 1, 2])
    assert any("refused" in r.getMessage() and "expected" in r.getMessage()
               for r in caplog.records)


def truncated(erofs: bytes) -> bytes:
    return erofs[:-4096]  # the last block gone


def file_beyond_end(erofs: bytes) -> bytes:
    """A regular file's start block moved far past the end of the image."""
    import tempfile

    from cachefs.erofs.reader import ErofsImage
    from cachefs.erofs.tree import FileType

    with tempfile.NamedTemporaryFile() as f:
        f.write(erofs)
        f.flush()
        with ErofsImage.open(Path(f.name)) as image:
            offset = next(ino.offset for _, _, ino in image.walk()
                          if ino.type is FileType.REG and ino.size > 0)
    out = bytearray(erofs)
    out[offset + 16:offset + 20] = (0x00FFFFFF).to_bytes(4, "little")  # i_u: start block
    return bytes(out)


@pytest.mark.parametrize("corrupt", [truncated, file_beyond_end])
async def test_valid_digest_but_corrupt_erofs_is_refused(
    tmp_path: Path, registry_factory: Any, caplog: pytest.LogCaptureFixture,  # noqa: F811
    corrupt: Any,
) -> None:
    world = await make_world(tmp_path, registry_factory)
    _, doc = artifact_of(world)
    meta = world.a.read_image_metadata(world.ref)
    assert meta is not None
    broken = corrupt(world.a.layer_erofs_path(meta.diff_ids[0]).read_bytes())
    blob = zstandard.ZstdCompressor().compress(broken)
    digest = world.registry.push_blob("app/img", blob)
    layer = doc["layers"][0]
    layer.update(digest=digest, size=len(blob))
    layer["annotations"][ANN_DIGEST] = _sha(broken)
    layer["annotations"][ANN_SIZE] = str(len(broken))
    publish_tampered(world, doc)
    await pull_b_expecting_fallback(world, caplog, converted=[0, 1, 2])
    refusals = [r.getMessage() for r in caplog.records if "refused (" in r.getMessage()]
    assert len(refusals) == 1 and digest in refusals[0], refusals
    print(refusals[0])


async def test_erofs_of_another_layer_is_refused(
    tmp_path: Path, registry_factory: Any, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    _, doc = artifact_of(world)
    other = doc["layers"][2]  # a sound EROFS, of the top layer, claimed for the base layer
    doc["layers"][0] = {**other, "annotations": {**other["annotations"],
                                                 "io.cachefs.erofs.diff_id":
                                                 doc["layers"][0]["annotations"][
                                                     "io.cachefs.erofs.diff_id"]}}
    publish_tampered(world, doc)
    await pull_b_expecting_fallback(world, caplog, converted=[0, 1, 2])
    assert any("fsmeta merged from its layers" in r.getMessage() for r in caplog.records)


async def test_cli_pull_warns_in_one_line_and_falls_back(
    tmp_path: Path, registry_factory: Any  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    _, doc = artifact_of(world)
    stored = world.registry.blob_path(doc["layers"][0]["digest"])
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    b = tmp_path / "cli-b"
    proc = subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(b), "pull", "--insecure", world.ref],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "EROFS artifact" in line]
    assert len(lines) == 2, proc.stderr
    assert "blob" in lines[0] and "refused" in lines[0] and "expected" in lines[0]
    assert "not used" in lines[1] and "converting every layer from its tar" in lines[1]
    assert origins(GlobalCache(b), world.ref) == ["converted"] * 3


async def test_policy_from_environment(tmp_path: Path, registry_factory: Any,  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    world = await make_world(tmp_path, registry_factory)
    monkeypatch.setenv("CACHEFS_EROFS_ARTIFACTS", "never")
    b = world.fresh()
    await pull_with(b, world.ref)
    assert origins(b, world.ref) == ["converted"] * 3
    monkeypatch.setenv("CACHEFS_EROFS_ARTIFACTS", "sometimes")
    from cachefs.errors import UsageError

    with pytest.raises(UsageError, match="CACHEFS_EROFS_ARTIFACTS"):
        await pull_with(world.fresh("c"), world.ref)
    monkeypatch.delenv("CACHEFS_EROFS_ARTIFACTS")
    config = tmp_path / "config.toml"
    config.write_text('[pull]\nerofs-artifacts = "never"\n')
    monkeypatch.setenv("CACHEFS_CONFIG", str(config))
    d = world.fresh("d")
    await pull_with(d, world.ref)
    assert origins(d, world.ref) == ["converted"] * 3
    # the command-line option wins over the environment and the config file
    e = tmp_path / "e"
    proc = subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(e), "-q", "pull", "--insecure",
         "--erofs-artifacts", "only", world.ref], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOME": str(tmp_path), "CACHEFS_EROFS_ARTIFACTS": "never",
             "CACHEFS_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    assert origins(GlobalCache(e), world.ref) == ["fetched-erofs"] * 3



def deep_verify(cache: GlobalCache, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(cache.root), "verify", "--deep",
         "--insecure", "--json", ref], capture_output=True, text=True, timeout=300)


async def test_verify_deep_proves_fetched_layers_and_catches_altered_data(
    tmp_path: Path, registry_factory: Any  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    b = world.fresh()
    await pull_with(b, world.ref, erofs_artifacts="only")
    proc = deep_verify(b, world.ref)  # the layer blobs are downloaded again: none is cached
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["fsmeta_identical"]
    assert [(p["origin"], p["identical"]) for p in doc["layers"]] == \
        [("fetched-erofs", True)] * 3
    # a structurally sound layer whose file data says something else (what a malicious
    # pusher could hand out) passes every check a pull makes, but not --deep
    meta = b.read_image_metadata(world.ref)
    assert meta is not None
    layer = b.layer_erofs_path(meta.diff_ids[0])
    data = layer.read_bytes()
    assert data.count(b"ID=test\n") == 1
    layer.write_bytes(data.replace(b"ID=test\n", b"ID=evil\n"))
    proc = deep_verify(b, world.ref)
    assert proc.returncode == 10, proc.stderr
    doc = json.loads(proc.stdout)
    assert [p["identical"] for p in doc["layers"]] == [False, True, True]
    assert len(proc.stderr.strip().splitlines()) == 1 and "differ" in proc.stderr


async def test_artifact_download_resumes_a_partial_blob(
    tmp_path: Path, registry_factory: Any, flaky_proxy_factory: Any  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    _, doc = artifact_of(world)
    blob = doc["layers"][1]
    data = world.registry.blob_path(blob["digest"]).read_bytes()
    b = world.fresh()
    half = len(data) // 2
    b.tmp_dir().mkdir(parents=True, exist_ok=True)
    b.part_path(blob["digest"]).write_bytes(data[:half])  # an interrupted earlier download
    proxy = flaky_proxy_factory(world.registry)
    ref = f"{proxy.host}/app/img:v1"
    await pull_with(b, ref, erofs_artifacts="only")
    gets = [(p, rng) for m, p, rng, _ in proxy.log if m == "GET" and blob["digest"] in p]
    assert gets == [(f"/v2/app/img/blobs/{blob['digest']}", f"bytes={half}-")]
    assert origins(b, ref) == ["fetched-erofs"] * 3
    assert not b.part_path(blob["digest"]).exists()


class EndlessLookups:
    """A proxy in front of the registry that answers both referrer lookups with a 200 and a
    body that never ends (a hostile or broken registry); everything else is forwarded."""

    def __init__(self, upstream_port: int) -> None:
        import http.client
        import http.server
        import threading

        self.sent = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                if "/referrers/" in self.path or "/manifests/sha256-" in self.path:
                    self.send_response(200)
                    self.send_header("Content-Type", OCI_INDEX)
                    self.end_headers()  # no length: the body runs until we stop
                    chunk = b'{"manifests":[' + b" " * 65536
                    try:
                        while outer.sent < 1 << 30:  # bounded here too: 1 GiB at most
                            self.wfile.write(chunk)
                            outer.sent += len(chunk)
                    except OSError:
                        pass  # the client hung up, as it should
                    self.close_connection = True
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                up.request("GET", self.path, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                up.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_endless_referrer_answers_are_cut_off(tmp_path: Path, registry_factory: Any) -> None:  # noqa: F811
    import time

    import trio

    world = trio.run(make_world, tmp_path, registry_factory)
    proxy = EndlessLookups(world.registry.port)
    try:
        ref = f"{proxy.host}/app/img:v1"
        b = world.fresh()
        script = ("import sys, trio\n"
                  "from cachefs.cache import GlobalCache\n"
                  "from cachefs.pipeline.pull import pull\n"
                  "trio.run(lambda: pull(GlobalCache.new(sys.argv[1]), sys.argv[2], "
                  "insecure=True))\n"
                  # VmHWM, not ru_maxrss: that also counts the pytest process forked
                  "print(next(line.split()[1] for line in open('/proc/self/status')\n"
                  "           if line.startswith('VmHWM:')))\n")
        start = time.monotonic()
        proc = subprocess.run([python(), "-c", script, str(b.root), ref], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        elapsed = time.monotonic() - start
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert "larger than" in proc.stderr  # the warning says why the lookup was dropped
    assert origins(b, ref) == ["converted"] * 3
    assert proxy.sent < 64 << 20  # the client stopped reading early
    assert int(proc.stdout.split()[-1]) < 300 * 1024  # peak RSS (KiB): nothing buffered
    assert elapsed < 60


async def test_two_references_to_one_image_pulled_at_once(
    tmp_path: Path, registry_factory: Any  # noqa: F811
) -> None:
    import trio

    world = await make_world(tmp_path, registry_factory)
    layout = tmp_path / "layout"
    world.registry.push_oci_layout(layout, "app/twin", "v1")  # same image, second repository
    twin = f"{world.registry.host}/app/twin:v1"
    await pull_with(world.a, twin, erofs_artifacts="never")  # a cache hit: same layers
    async with client() as c:
        report = await push_erofs(world.a, twin, c)
    assert len(report.stats.mounted) == 4  # our blobs, mounted from app/img
    b = world.fresh()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(pull_with, b, world.ref, erofs_artifacts="only"))
        nursery.start_soon(functools.partial(pull_with, b, twin, erofs_artifacts="only"))
    assert origins(b, world.ref) == ["fetched-erofs"] * 3 == origins(b, twin)
    ours = {k: v for k, v in artifacts(b.root).items() if not k.startswith("manifests")}
    theirs = {k: v for k, v in artifacts(world.a.root).items() if not k.startswith("manifests")}
    assert ours == theirs
    assert [p.name for p in b.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []


async def test_gc_removes_dead_scratch_and_stale_provenance(
    tmp_path: Path, registry_factory: Any  # noqa: F811
) -> None:
    world = await make_world(tmp_path, registry_factory)
    b = world.fresh()
    await pull_with(b, world.ref, erofs_artifacts="only")
    meta = b.read_image_metadata(world.ref)
    assert meta is not None
    records = sorted((b.root / "cachefs" / "provenance").iterdir())
    assert len(records) == 3
    await pull_with(b, world.ref, force=True)  # converted again: the records are stale now
    assert origins(b, world.ref) == ["converted"] * 3
    dead = subprocess.Popen(["true"])  # a process id that no longer runs
    dead.wait()
    scratch = b.root / "cachefs" / "tmp"
    abandoned = scratch / f"{meta.diff_ids[0].path_safe()}.{dead.pid}.0123abcd.erofs"
    abandoned.write_bytes(b"half an EROFS")
    crashed_push = scratch / f"push-{dead.pid}-89abcdef"
    crashed_push.mkdir()
    (crashed_push / "0.zst").write_bytes(b"zstd")
    running = scratch / f"{meta.diff_ids[1].path_safe()}.{os.getpid()}.0123abcd.erofs"
    running.write_bytes(b"being written")
    proc = subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(b.root), "gc", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    removed = {r["path"] for r in json.loads(proc.stdout)["removed"]}
    assert {str(abandoned), str(crashed_push), *map(str, records)} <= removed
    assert running.exists() and not abandoned.exists() and not crashed_push.exists()
    assert all(b.is_layer_materialized(d) for d in meta.diff_ids)  # the image is untouched
