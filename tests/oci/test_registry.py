"""RegistryClient against a real distribution registry on 127.0.0.1 (images pushed by skopeo)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.digest import Digest
from cachefs.errors import AuthError, DigestMismatch, RegistryError, RegistryNotFound
from cachefs.models import (
    DOCKER_LAYER_FOREIGN,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    Descriptor,
    Platform,
)
from cachefs.reference import Reference
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.registry import (  # noqa: F401  (fixtures)
    Layout,
    LocalRegistry,
    flaky_proxy_factory,
    oci_layout,
    registry_factory,
)
from tests.fixtures.registry import test_client as client
from tests.fixtures.system import Msb, system_fixture

AMD = TestImage(
    [layer_tar([reg("etc/hello", b"hello amd64\n")]),
     layer_tar([reg("big.bin", os.urandom(300_000))])],
    config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "Labels": {"a": "b"}},
)
ARM = TestImage([layer_tar([reg("etc/hello", b"hello arm64\n")])], architecture="arm64")


@dataclass
class Pushed:
    registry: LocalRegistry
    multi: Layout  # amd64 + arm64 OCI index, gzip layers: repo "multi:v1"
    zstd: Layout  # single-platform OCI manifest, zstd layers: "zst:v1"
    plain: Layout  # uncompressed layers: "plain:v1"

    def ref(self, text: str) -> Reference:
        return Reference.parse(f"{self.registry.host}/{text}")


@pytest.fixture(scope="module")
@system_fixture
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    d = tmp_path_factory.mktemp("reg")
    with LocalRegistry(d / "registry") as r:
        multi = oci_layout([AMD, ARM], d / "multi", compression="gzip")
        r.push_oci_layout(multi.path, "multi", "v1")
        zst = oci_layout(AMD, d / "zst", compression="zstd")
        r.push_oci_layout(zst.path, "zst", "v1")
        plain = oci_layout(AMD, d / "plain", compression="none")
        r.push_oci_layout(plain.path, "plain", "v1")
        docker_archive(AMD, ["x/amd:1"], d / "amd.tar", compress=True)
        r.push_docker_archive(d / "amd.tar", "dock", "amd64")
        docker_archive(ARM, ["x/arm:1"], d / "arm.tar", compress=True)
        r.push_docker_archive(d / "arm.tar", "dock", "arm64")
        yield Pushed(r, multi, zst, plain)


# resolve ------------------------------------------------------------------------------------


async def test_resolve_index_picks_linux_host_arch(pushed: Pushed) -> None:
    async with client() as c:
        res = await c.resolve(pushed.ref("multi:v1"))
    amd = pushed.multi.images[0]
    assert str(res.manifest_digest) == amd.manifest_digest  # the platform manifest, not the index
    assert str(res.index_digest) == pushed.multi.index_digest
    assert res.manifest_bytes == amd.manifest_bytes
    assert res.config_bytes == amd.config_bytes == AMD.config_json()
    assert str(res.config_digest) == amd.config_digest
    assert res.config.diff_ids == [Digest.parse(d) for d in AMD.diff_ids()]
    assert res.platform is not None and res.platform.architecture == "amd64"
    assert res.media_type == OCI_MANIFEST


async def test_resolve_platform_override_and_no_match(pushed: Pushed) -> None:
    async with client() as c:
        res = await c.resolve(pushed.ref("multi:v1"), Platform(os="linux", architecture="arm64"))
        assert str(res.manifest_digest) == pushed.multi.images[1].manifest_digest
        assert res.config.architecture == "arm64"
        with pytest.raises(RegistryError) as exc:
            await c.resolve(pushed.ref("multi:v1"), Platform(os="linux", architecture="s390x"))
    msg = exc.value.one_line()
    assert "linux/s390x" in msg and "linux/amd64, linux/arm64" in msg and "multi:v1" in msg


async def test_resolve_by_digest_manifest_and_index(pushed: Pushed) -> None:
    amd = pushed.multi.images[0]
    async with client() as c:
        by_manifest = await c.resolve(pushed.ref(f"multi@{amd.manifest_digest}"))
        by_index = await c.resolve(pushed.ref(f"multi@{pushed.multi.index_digest}"))
    assert str(by_manifest.manifest_digest) == amd.manifest_digest
    assert by_manifest.index_digest is None
    assert str(by_index.manifest_digest) == amd.manifest_digest


async def test_resolve_docker_schema2_and_manifest_list(pushed: Pushed) -> None:
    r = pushed.registry
    async with client() as c:
        amd = await c.resolve(pushed.ref("dock:amd64"))
        arm = await c.resolve(pushed.ref("dock:arm64"))
        assert amd.media_type == DOCKER_MANIFEST
        mlist = json.dumps({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST, "digest": str(x.manifest_digest),
                 "size": len(x.manifest_bytes), "platform": {"architecture": a, "os": "linux"}}
                for x, a in ((arm, "arm64"), (amd, "amd64"))
            ],
        }).encode()
        r.push_manifest("dock", "list", mlist, DOCKER_MANIFEST_LIST)
        picked = await c.resolve(pushed.ref("dock:list"))
        assert picked.manifest_digest == amd.manifest_digest
        assert picked.index_digest == Digest.sha256_of(mlist)
        arm64 = Platform(os="linux", architecture="arm64")
        picked = await c.resolve(pushed.ref("dock:list"), arm64)
        assert picked.manifest_digest == arm.manifest_digest


async def test_resolve_matches_msb_pull(pushed: Pushed, msb: Msb) -> None:
    """manifest_digest, raw_manifest_json, config and layer descriptors equal msb's json."""
    r = pushed.registry
    # A manifest with annotations (manifest and layer level) to pin the re-serialisation.
    zst = pushed.zstd.images[0]
    doc = json.loads(zst.manifest_bytes)
    doc["annotations"] = {"org.example.k": "v", "a.b": "ü"}
    doc["layers"][0]["annotations"] = {"z": "1", "x": "y"}
    doc["layers"][1]["urls"] = ["http://127.0.0.1:9/mirror"]
    doc["artifactType"] = "application/vnd.example.thing"
    doc["subject"] = {"mediaType": OCI_MANIFEST, "digest": pushed.plain.images[0].manifest_digest,
                      "size": len(pushed.plain.images[0].manifest_bytes)}
    r.push_manifest("zst", "annotated", json.dumps(doc, indent=1).encode(), OCI_MANIFEST)
    async with client() as c:
        for text in ("multi:v1", "zst:v1", "plain:v1", "dock:amd64", "zst:annotated"):
            ref = pushed.ref(text)
            res = await c.resolve(ref)
            msb("pull", "--insecure", "--quiet", str(ref))
            meta = json.loads((msb.cache / "manifests" / f"{ref.cache_key}.json").read_text())
            assert meta["manifest_digest"] == str(res.manifest_digest), text
            assert meta["raw_manifest_json"] == res.raw_manifest_json, text
            assert meta["config_digest"] == str(res.config_digest), text
            assert meta["raw_config_json"].encode() == res.config_bytes, text
            assert [(m["digest"], m["media_type"], m["size_bytes"]) for m in meta["layers"]] == [
                (d.digest, d.media_type, d.size) for d in res.layers
            ], text


async def test_not_found_errors_name_reference_path_and_status(pushed: Pushed) -> None:
    async with client() as c:
        with pytest.raises(RegistryNotFound) as exc:
            await c.resolve(pushed.ref("multi:nope"))
        msg = exc.value.one_line()
        assert "multi:nope" in msg and "/v2/multi/manifests/nope" in msg and "404" in msg
        assert "MANIFEST_UNKNOWN" in msg
        with pytest.raises(RegistryNotFound) as exc:
            await c.resolve(pushed.ref("no/such/repo:v1"))
        assert "404" in exc.value.one_line()


async def test_foreign_and_unknown_layers_and_artifacts_refused(pushed: Pushed) -> None:
    r = pushed.registry
    amd = json.loads(pushed.zstd.images[0].manifest_bytes)
    foreign = {
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {**amd["config"], "mediaType": "application/vnd.docker.container.image.v1+json"},
        "layers": [{"mediaType": DOCKER_LAYER_FOREIGN, "digest": "sha256:" + "ab" * 32,
                    "size": 10, "urls": ["http://127.0.0.1:9/layer"]}, amd["layers"][1]],
    }
    r.push_manifest("zst", "foreign", json.dumps(foreign).encode(), DOCKER_MANIFEST)
    odd = dict(amd, layers=[dict(amd["layers"][0], mediaType="application/x-odd"),
                            amd["layers"][1]])
    r.push_manifest("zst", "odd", json.dumps(odd).encode(), OCI_MANIFEST)
    artifact = dict(amd, config=dict(amd["config"], mediaType="application/vnd.example+json"))
    r.push_manifest("zst", "artifact", json.dumps(artifact).encode(), OCI_MANIFEST)
    async with client() as c:
        with pytest.raises(RegistryError, match="foreign/non-distributable"):
            await c.resolve(pushed.ref("zst:foreign"))
        with pytest.raises(RegistryError, match="unsupported media type 'application/x-odd'"):
            await c.resolve(pushed.ref("zst:odd"))
        with pytest.raises(RegistryError, match="not a container image config"):
            await c.resolve(pushed.ref("zst:artifact"))


# blobs ----------------------------------------------------------------------------------------


def big_layer(layout: Layout) -> tuple[Descriptor, bytes]:
    doc = json.loads(layout.images[0].manifest_bytes)
    return Descriptor.model_validate(doc["layers"][1]), layout.images[0].layer_blobs[1]


async def test_fetch_blob_full_and_resume_from_partial(pushed: Pushed, tmp_path: Path) -> None:
    desc, blob = big_layer(pushed.plain)
    ref = pushed.ref("plain:v1")
    part = tmp_path / "blob.part"
    got: list[int] = []
    async with client() as c:
        await c.fetch_blob(ref, desc, part, progress=got.append)
        assert part.read_bytes() == blob and sum(got) == len(blob)
        # Resume: keep the first 200000 bytes; only the rest crosses the network.
        part.write_bytes(blob[:200_000])
        got.clear()
        await c.fetch_blob(ref, desc, part, progress=got.append)
        assert part.read_bytes() == blob
        assert sum(got) == len(blob) - 200_000
        # A complete, correct .part is accepted without any download.
        got.clear()
        await c.fetch_blob(ref, desc, part, progress=got.append)
        assert sum(got) == 0 and part.read_bytes() == blob
        # resume=False ignores the partial file.
        part.write_bytes(blob[:1000])
        got.clear()
        await c.fetch_blob(ref, desc, part, resume=False, progress=got.append)
        assert sum(got) == len(blob) and part.read_bytes() == blob


async def test_resume_with_wrong_prefix_is_a_mismatch_and_part_is_removed(
    pushed: Pushed, tmp_path: Path
) -> None:
    desc, _ = big_layer(pushed.plain)
    part = tmp_path / "blob.part"
    part.write_bytes(b"\0" * 1000)  # not a prefix of the blob
    async with client() as c:
        with pytest.raises(DigestMismatch) as exc:
            await c.fetch_blob(pushed.ref("plain:v1"), desc, part)
    assert desc.digest in str(exc.value)
    assert not part.exists()


async def test_full_body_answer_to_range_restarts(
    pushed: Pushed, tmp_path: Path, flaky_proxy_factory  # noqa: F811
) -> None:
    proxy = flaky_proxy_factory(pushed.registry, ignore_range=True)
    desc, blob = big_layer(pushed.plain)
    part = tmp_path / "blob.part"
    part.write_bytes(blob[:100_000])
    got: list[int] = []
    async with client() as c:
        await c.fetch_blob(Reference.parse(f"{proxy.host}/plain:v1"), desc, part,
                           progress=got.append)
    assert part.read_bytes() == blob and sum(got) == len(blob)
    assert any(rng == "bytes=100000-" for _, _, rng, _ in proxy.log)


async def test_corrupt_blob_in_registry_is_a_mismatch(
    registry_factory, tmp_path: Path  # noqa: F811
) -> None:
    r = registry_factory()
    layout = oci_layout(AMD, tmp_path / "lay", compression="none")
    r.push_oci_layout(layout.path, "img", "v1")
    desc, blob = big_layer(layout)
    data = r.blob_path(desc.digest)
    data.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    part = tmp_path / "x.part"
    async with client() as c:
        with pytest.raises(DigestMismatch) as exc:
            await c.fetch_blob(Reference.parse(f"{r.host}/img:v1"), desc, part)
    assert exc.value.expected == desc.digest
    assert exc.value.actual == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    assert not part.exists()
    # The config is verified too.
    cfg = r.blob_path(layout.images[0].config_digest)
    cfg.write_bytes(cfg.read_bytes().replace(b"amd64", b"AMD64"))
    async with client() as c:
        with pytest.raises(DigestMismatch, match="config blob"):
            await c.resolve(Reference.parse(f"{r.host}/img:v1"))


async def test_retries_on_500_then_recovers(
    pushed: Pushed, tmp_path: Path, flaky_proxy_factory  # noqa: F811
) -> None:
    proxy = flaky_proxy_factory(pushed.registry, fail_first=3, status=500)
    ref = Reference.parse(f"{proxy.host}/plain:v1")
    desc, blob = big_layer(pushed.plain)
    async with client(max_attempts=4) as c:
        res = await c.resolve(ref)
        await c.fetch_blob(ref, desc, tmp_path / "b.part")
    assert str(res.manifest_digest) == pushed.plain.images[0].manifest_digest
    assert (tmp_path / "b.part").read_bytes() == blob
    assert [s for *_, s in proxy.log].count(500) == 3


async def test_gives_up_after_bounded_attempts(
    pushed: Pushed, flaky_proxy_factory  # noqa: F811
) -> None:
    proxy = flaky_proxy_factory(pushed.registry, fail_first=100, status=503)
    async with client(max_attempts=3) as c:
        with pytest.raises(RegistryError, match="HTTP 503"):
            await c.resolve(Reference.parse(f"{proxy.host}/plain:v1"))
    assert len(proxy.log) == 3


async def test_connection_reset_mid_blob_resumes(
    pushed: Pushed, tmp_path: Path, flaky_proxy_factory  # noqa: F811
) -> None:
    proxy = flaky_proxy_factory(pushed.registry, cut_after=120_000)
    desc, blob = big_layer(pushed.plain)
    part = tmp_path / "b.part"
    got: list[int] = []
    async with client() as c:
        await c.fetch_blob(Reference.parse(f"{proxy.host}/plain:v1"), desc, part,
                           progress=got.append)
    assert part.read_bytes() == blob
    ranges = [rng for method, path, rng, _ in proxy.log if "/blobs/" in path]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    resumed_at = int(ranges[1][len("bytes="):-1])
    assert 0 < resumed_at <= 120_000
    assert sum(got) == len(blob)  # every byte was received exactly once


async def test_auth_error_for_unauthorized_blob(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r = registry_factory(auth="basic")
    async with client() as c:
        with pytest.raises(AuthError) as exc:
            await c.resolve(Reference.parse(f"{r.host}/img:v1"))
    assert "requires credentials" in exc.value.one_line()


async def test_https_with_extra_ca_bundle(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r = registry_factory(tls=True)
    layout = oci_layout(AMD, tmp_path / "lay")
    r.push_oci_layout(layout.path, "img", "v1")
    ref = Reference.parse(f"{r.host}/img:v1")
    async with client(insecure=False, ca_certs=r.ca_cert) as c:
        res = await c.resolve(ref)
        await c.fetch_blob(ref, res.layers[0], tmp_path / "l.part")
    assert str(res.manifest_digest) == layout.images[0].manifest_digest
    async with client(insecure=False, max_attempts=1) as c:  # the CA is not trusted
        with pytest.raises(RegistryError, match="certificate not trusted"):
            await c.resolve(ref)


async def test_oversized_part_is_downloaded_fresh(pushed: Pushed, tmp_path: Path) -> None:
    desc, blob = big_layer(pushed.plain)
    part = tmp_path / "b.part"
    part.write_bytes(blob + b"trailing junk")
    got: list[int] = []
    async with client() as c:
        await c.fetch_blob(pushed.ref("plain:v1"), desc, part, progress=got.append)
    assert part.read_bytes() == blob and sum(got) == len(blob)


def test_platform_parsing_and_variants() -> None:
    from cachefs.errors import UsageError
    from cachefs.oci import parse_platform, select_manifest

    assert parse_platform("linux/arm/v7") == Platform(os="linux", architecture="arm",
                                                      variant="v7")
    with pytest.raises(UsageError):
        parse_platform("linux")

    def d(n: int, arch: str, variant: str | None = None) -> Descriptor:
        return Descriptor(digest=f"sha256:{n:064x}",
                          platform=Platform(os="linux", architecture=arch, variant=variant))

    entries = [d(1, "arm", "v6"), d(2, "arm", "v7"), d(3, "arm64", "v8"), d(4, "amd64")]
    def pick(text: str) -> Descriptor:
        return select_manifest(entries, parse_platform(text), source="s", error=RegistryError)

    assert pick("linux/arm/v7") is entries[1]
    assert pick("linux/arm64") is entries[2]
    assert pick("linux/arm64/v8") is entries[2]
    with pytest.raises(RegistryError, match="linux/arm/v6, linux/arm/v7"):
        pick("linux/arm/v5")


# one source-image shape ---------------------------------------------------------------------


async def test_registry_and_archive_give_the_same_source_image(pushed: Pushed) -> None:
    """The image pushed from an OCI layout, resolved from the registry, is the image the
    layout itself gives: one SourceImage shape, equal but for what msb stores per source
    (the registry's manifest is re-serialised, the archive's kept as is)."""
    from dataclasses import replace

    from cachefs.oci.archive import open_archive

    async with client() as c:
        resolved = await c.resolve(pushed.ref("zst:v1"))
    from_registry = resolved.source_image()
    from_layout = open_archive(pushed.zstd.path, None).images[0].source_image()
    assert from_registry.manifest_digest == Digest.sha256_of(pushed.zstd.images[0].manifest_bytes)
    assert len(from_registry.layers) == 2
    assert all(layer.size and layer.media_type for layer in from_registry.layers)
    assert replace(from_registry, raw_manifest_json="") == replace(from_layout,
                                                                   raw_manifest_json="")
    assert json.loads(from_registry.raw_manifest_json)["layers"] == json.loads(
        from_layout.raw_manifest_json)["layers"]
