"""Archive sources compared with what the real ``msb load`` writes, plus validation."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard

from cachefs.errors import ArchiveError, DigestMismatch
from cachefs.models import OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, Platform
from cachefs.oci.archive import ArchiveImage, open_archive
from cachefs.reference import Reference
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.registry import oci_layout
from tests.fixtures.system import Msb

AMD = TestImage(
    [layer_tar([reg("etc/a", b"amd\n")]), layer_tar([reg("etc/b", b"x" * 9000)])],
    config={"Env": ["A=1"], "Entrypoint": ["/bin/true"], "Labels": {"k": "v"}},
)
ARM = TestImage([layer_tar([reg("etc/a", b"arm\n")])], architecture="arm64")


def tar_dir(src: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return out


def write_tar(out: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(out, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return out


def zstd_docker_archive(image: TestImage, tag: str, out: Path) -> Path:
    cfg = image.config_json()
    files = {"cfg.json": cfg}
    for i, t in enumerate(image.layers):
        files[f"{i}/layer.tar"] = zstandard.ZstdCompressor().compress(t)
    files["manifest.json"] = json.dumps([{"Config": "cfg.json", "RepoTags": [tag],
                                          "Layers": [f"{i}/layer.tar"
                                                     for i in range(len(image.layers))]}]).encode()
    return write_tar(out, files)


def msb_json(msb: Msb, ref: str) -> dict:
    key = Reference.parse(ref).cache_key
    return json.loads((msb.cache / "manifests" / f"{key}.json").read_text())


def assert_same_as_msb(img: ArchiveImage, meta: dict) -> None:
    assert meta["manifest_digest"] == str(img.manifest_digest)
    assert meta["raw_manifest_json"] == img.raw_manifest_json
    assert meta["config_digest"] == str(img.config_digest)
    assert meta["raw_config_json"].encode() == img.config_bytes
    assert [(m["digest"], m["media_type"], m["size_bytes"], m["diff_id"])
            for m in meta["layers"]] == [
        (str(x.digest), x.media_type, x.size, str(x.diff_id)) for x in img.layers
    ]


def read_layer(img: ArchiveImage, i: int) -> bytes:
    with img.layers[i].open() as f:
        return f.read()


# msb parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_docker_archive_matches_msb_load(msb: Msb, tmp_path: Path, compress: bool) -> None:
    tags = ["example.com/dock/img:v1", "example.com/dock/img:v2"]
    tar = docker_archive(AMD, tags, tmp_path / "img.tar", compress=compress)
    src = open_archive(tar)
    assert src.kind == "docker-archive" and len(src.images) == 1
    img = src.images[0]
    assert img.repo_tags == tags
    assert img.layers[0].media_type == (OCI_LAYER_GZIP if compress else OCI_LAYER_TAR)
    assert img.manifest_digest.encoded == hashlib.sha256(img.manifest_bytes).hexdigest()
    msb.load(tar)
    for tag in tags:
        assert_same_as_msb(img, msb_json(msb, tag))
    raw = read_layer(img, 1)
    assert (gzip.decompress(raw) if compress else raw) == AMD.layers[1]


def test_zstd_docker_archive_media_type_from_magic(msb: Msb, tmp_path: Path) -> None:
    tar = zstd_docker_archive(AMD, "example.com/z/img:v1", tmp_path / "z.tar")
    img = open_archive(tar).images[0]
    assert [x.media_type for x in img.layers] == [OCI_LAYER_ZSTD, OCI_LAYER_ZSTD]
    msb.load(tar)
    assert_same_as_msb(img, msb_json(msb, "example.com/z/img:v1"))


def test_oci_layout_tar_and_dir_match_msb_load(msb: Msb, tmp_path: Path) -> None:
    ref = "example.com/oci/img:v1"
    layout = oci_layout(AMD, tmp_path / "layout", tag=ref, compression="zstd")
    tar = tar_dir(layout.path, tmp_path / "layout.tar")
    from_tar = open_archive(tar)
    from_dir = open_archive(layout.path)
    assert from_tar.kind == from_dir.kind == "oci-layout"
    img = from_tar.images[0]
    assert img.repo_tags == [ref]
    # msb keeps the layout's manifest bytes and digest, not a synthesized manifest.
    assert img.manifest_bytes == layout.images[0].manifest_bytes
    assert str(img.manifest_digest) == layout.images[0].manifest_digest
    assert from_dir.images[0].manifest_bytes == img.manifest_bytes
    blob = layout.images[0].layer_blobs[1]
    assert read_layer(from_dir.images[0], 1) == read_layer(img, 1) == blob
    msb.load(tar)
    assert_same_as_msb(img, msb_json(msb, ref))


def test_multi_platform_oci_layout_matches_msb_load(msb: Msb, tmp_path: Path) -> None:
    ref = "example.com/multi/img:v1"
    layout = oci_layout([AMD, ARM], tmp_path / "layout", tag=ref)
    tar = tar_dir(layout.path, tmp_path / "layout.tar")
    img = open_archive(tar).images[0]
    assert str(img.manifest_digest) == layout.images[0].manifest_digest  # linux/amd64
    assert img.platform is not None and img.platform.architecture == "amd64"
    msb.load(tar)
    assert_same_as_msb(img, msb_json(msb, ref))
    arm = open_archive(tar, Platform(os="linux", architecture="arm64")).images[0]
    assert str(arm.manifest_digest) == layout.images[1].manifest_digest
    with pytest.raises(ArchiveError) as exc:
        open_archive(tar, Platform(os="linux", architecture="riscv64"))
    assert "linux/amd64, linux/arm64" in exc.value.one_line()


def test_flat_index_skips_other_platforms_like_msb(msb: Msb, tmp_path: Path) -> None:
    layout = oci_layout([AMD, ARM], tmp_path / "layout", index_platforms=True)
    assert layout.index_bytes is not None
    index = json.loads(layout.index_bytes)
    for m in index["manifests"]:
        arch = m["platform"]["architecture"]
        m["annotations"] = {"org.opencontainers.image.ref.name": f"example.com/flat/img:{arch}"}
    (layout.path / "index.json").write_text(json.dumps(index))
    tar = tar_dir(layout.path, tmp_path / "flat.tar")
    src = open_archive(tar)
    assert [i.repo_tags for i in src.images] == [["example.com/flat/img:amd64"]]
    msb.load(tar)
    assert_same_as_msb(src.images[0], msb_json(msb, "example.com/flat/img:amd64"))
    key = Reference.parse("example.com/flat/img:arm64").cache_key
    assert not (msb.cache / "manifests" / f"{key}.json").exists()


def test_hybrid_archive_is_read_as_docker_archive_like_msb(msb: Msb, tmp_path: Path) -> None:
    """docker ≥ 25 writes manifest.json *and* an OCI layout; msb synthesizes, so do we."""
    ref = "example.com/hyb/img:v1"
    layout = oci_layout(AMD, tmp_path / "layout", tag=ref)
    m = json.loads(layout.images[0].manifest_bytes)
    (layout.path / "manifest.json").write_text(json.dumps([{
        "Config": "blobs/sha256/" + m["config"]["digest"][7:],
        "RepoTags": [ref],
        "Layers": ["blobs/sha256/" + x["digest"][7:] for x in m["layers"]],
    }]))
    tar = tar_dir(layout.path, tmp_path / "hyb.tar")
    src = open_archive(tar)
    assert src.kind == "docker-archive"
    assert str(src.images[0].manifest_digest) != layout.images[0].manifest_digest
    msb.load(tar)
    assert_same_as_msb(src.images[0], msb_json(msb, ref))


# other shapes -----------------------------------------------------------------------------------


def test_symlinked_layers_and_gzipped_archive(tmp_path: Path) -> None:
    cfg = AMD.config_json()
    files = {"c.json": cfg, "a/layer.tar": AMD.layers[0], "b/layer.tar": AMD.layers[1],
             "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": None,
                                           "Layers": ["a/layer.tar", "c/layer.tar"]}]).encode()}
    tar = write_tar(tmp_path / "l.tar", files, links={"c/layer.tar": "../b/layer.tar"})
    img = open_archive(tar).images[0]
    assert img.repo_tags == []
    assert read_layer(img, 1) == AMD.layers[1]
    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    again = open_archive(gz).images[0]
    assert again.manifest_digest == img.manifest_digest and read_layer(again, 1) == AMD.layers[1]


# validation -----------------------------------------------------------------------------------


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(ArchiveError, match="not a readable tar"):
        open_archive(tmp_path / "junk")
    with pytest.raises(ArchiveError, match="no such archive"):
        open_archive(tmp_path / "nope.tar")
    empty = write_tar(tmp_path / "e.tar", {"x": b""})
    with pytest.raises(ArchiveError, match=r"neither a docker archive .* nor an OCI layout"):
        open_archive(empty)


def test_docker_archive_validation(tmp_path: Path) -> None:
    cfg = AMD.config_json()
    good_name = hashlib.sha256(cfg).hexdigest() + ".json"

    def archive(files: dict[str, bytes], manifest: list[dict]) -> Path:
        return write_tar(tmp_path / "a.tar", {**files, "manifest.json": json.dumps(manifest)
                                              .encode()})

    layers = {"0/layer.tar": AMD.layers[0], "1/layer.tar": AMD.layers[1]}
    ok = {"Config": good_name, "RepoTags": ["a/b:c"], "Layers": list(layers)}
    with pytest.raises(ArchiveError, match=r"'1/layer\.tar'.*missing"):
        open_archive(archive({good_name: cfg, "0/layer.tar": AMD.layers[0]}, [ok]))
    with pytest.raises(ArchiveError, match=r"member 'cfg\.json' is missing"):
        open_archive(archive(layers, [dict(ok, Config="cfg.json")]))
    bad_name = "0" * 64 + ".json"
    with pytest.raises(DigestMismatch, match=bad_name):
        open_archive(archive({bad_name: cfg, **layers}, [dict(ok, Config=bad_name)]))
    with pytest.raises(ArchiveError, match="2 layers but its config has 1 diff_ids"):
        one = TestImage(AMD.layers[:1]).config_json()
        open_archive(archive({"c.json": one, **layers}, [dict(ok, Config="c.json")]))
    with pytest.raises(ArchiveError, match="not valid JSON"):
        open_archive(write_tar(tmp_path / "j.tar", {"manifest.json": b"[{"}))


def test_oci_layout_validation(tmp_path: Path) -> None:
    layout = oci_layout(AMD, tmp_path / "lay", tag="a/b:c")
    img = layout.images[0]
    blobs = layout.path / "blobs" / "sha256"
    layer_file = blobs / hashlib.sha256(img.layer_blobs[1]).hexdigest()
    cfg_file = blobs / img.config_digest[7:]
    # A corrupted layer is detected while it is read, naming the member.
    good = layer_file.read_bytes()
    layer_file.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    src = open_archive(layout.path)
    with pytest.raises(DigestMismatch, match=layer_file.name):
        read_layer(src.images[0], 1)
    layer_file.write_bytes(good)
    # A corrupted config fails at open.
    cfg = cfg_file.read_bytes()
    cfg_file.write_bytes(cfg.replace(b"amd64", b"AMD64"))
    with pytest.raises(DigestMismatch, match=cfg_file.name):
        open_archive(layout.path)
    cfg_file.write_bytes(cfg)
    # A missing layer blob.
    moved = tmp_path / "moved"
    shutil.move(layer_file, moved)
    with pytest.raises(ArchiveError, match=f"layer blob 'blobs/sha256/{layer_file.name}'"):
        open_archive(layout.path)
    shutil.move(moved, layer_file)
    assert open_archive(layout.path).images[0].manifest_digest == src.images[0].manifest_digest
