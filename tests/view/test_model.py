"""The pure view model: snapshots built by hand, no FUSE, no files."""

from __future__ import annotations

import json
from pathlib import Path

from cachefs.cache.index import IndexedImage
from cachefs.models import CachedImageMetadata, ImageConfig, LayerMetadata
from cachefs.reference import Reference
from cachefs.view.model import (
    Artifact,
    BytesNode,
    CacheSnapshot,
    ConcatNode,
    DirNode,
    DocNode,
    LiveNode,
    build_tree,
    layer_link_name,
    resolve,
)
from cachefs.view.status import render_metrics, status_document
from cachefs.vmdk import parse_descriptor

CACHE = Path("/cache")
M = "sha256:" + "1" * 64
M2 = "sha256:" + "2" * 64
DIFFS = ["sha256:" + c * 64 for c in "abc"]


def _meta(manifest: str, diffs: list[str]) -> CachedImageMetadata:
    return CachedImageMetadata(
        manifest_digest=manifest,
        config_digest="sha256:" + "f" * 64,
        raw_manifest_json='{"schemaVersion":2}',
        raw_config_json='{"architecture":"amd64","config":{"Cmd":["sh"]}}',
        config=ImageConfig(env=[], exposed_ports=[], volumes=[], labels={}),
        layers=[LayerMetadata(digest=d, diff_id=d, size_bytes=10) for d in diffs],
    )


def _image(ref: str, manifest: str = M, diffs: list[str] = DIFFS, *, meta: bool = True
           ) -> IndexedImage:
    r = Reference.parse(ref)
    return IndexedImage(
        reference=r, typed=ref, manifest_digest=manifest,
        metadata=_meta(manifest, diffs) if meta else None, layers=list(diffs),
        sources=frozenset({"msb-db"}), metadata_path=CACHE / "manifests" / f"{r.cache_key}.json",
    )


def _layer(diff: str, blocks: int, problem: str | None = None, exists: bool = True) -> Artifact:
    safe = diff.replace(":", "_")
    return Artifact(CACHE / "layers" / f"{safe}.erofs", exists, blocks * 4096 if exists else 0,
                    1000 + blocks, problem)


def _fsmeta(blocks: int, problem: str | None = None) -> Artifact:
    return Artifact(CACHE / "fsmeta" / f"{M.replace(':', '_')}.erofs", True, blocks * 4096, 500,
                    problem)


def _snap(images: list[IndexedImage], layers: dict[str, Artifact], fsmeta: Artifact | None,
          metadata_refs: list[str] | None = None,
          derived: dict[str, tuple[tuple[str, str], ...]] | None = None) -> CacheSnapshot:
    """``derived``: what ``cache.health`` said about each manifest's fsmeta and VMDK (the
    scan asks it; tests with files check that it is asked, see test_one_truth.py)."""
    refs = [str(i.reference) for i in images] if metadata_refs is None else metadata_refs
    return CacheSnapshot(
        cache_root=CACHE, images=images, layers=layers,
        fsmeta={M: fsmeta} if fsmeta is not None else {},
        metadata_mtime_ns={r: 42 for r in refs},
        bytes_by_kind={"layers": 123, "fsmeta": 4096},
        taken_at_ns=99,
        derived=derived or {},
    )


def _good(images: list[IndexedImage] | None = None) -> CacheSnapshot:
    layers = {d: _layer(d, b) for d, b in zip(DIFFS, [3, 2, 5], strict=True)}
    return _snap(images or [_image("alpine:3.20")], layers, _fsmeta(4))


def _dir(root: DirNode, path: str) -> DirNode:
    node = resolve(root, tuple(path.split("/")))
    assert isinstance(node, DirNode), path
    return node


def _text(root: DirNode, path: str) -> str:
    node = resolve(root, tuple(path.split("/")))
    if isinstance(node, DocNode):
        return node.render().decode()
    assert isinstance(node, BytesNode), path
    return node.content.decode()


def test_ready_image_layout() -> None:
    root = build_tree(_good())
    assert set(root.children) == {"README", "status.json", "metrics", "images", "by-digest",
                                  "layers"}
    assert isinstance(root.children["status.json"], LiveNode)
    d = _dir(root, "images/docker.io/library/alpine:3.20")
    assert set(d.children) == {"disk.vmdk", "fsmeta.erofs", "layers", "rootfs.img",
                               "manifest.json", "config.json", "image.json", "status"}
    assert _text(root, "images/docker.io/library/alpine:3.20/status") == "ready\n"
    fm = d.children["fsmeta.erofs"]
    assert isinstance(fm, ConcatNode)
    assert fm.parts == ((CACHE / "fsmeta" / f"sha256_{'1' * 64}.erofs", 4 * 4096),)
    layers = _dir(root, "images/docker.io/library/alpine:3.20/layers")
    assert list(layers.children) == [f"{i:02d}-sha256_{c * 64}.erofs"
                                     for i, c in enumerate("abc")]
    rootfs = d.children["rootfs.img"]
    assert isinstance(rootfs, ConcatNode)
    assert [size for _, size in rootfs.parts] == [4 * 4096, 3 * 4096, 2 * 4096, 5 * 4096]
    assert rootfs.parts[1][0] == CACHE / "layers" / f"sha256_{'a' * 64}.erofs"
    extents = parse_descriptor(_text(root, "images/docker.io/library/alpine:3.20/disk.vmdk"))
    assert [(e.path, e.sectors) for e in extents] == [
        ("fsmeta.erofs", 32),
        *((f"layers/{i:02d}-sha256_{c * 64}.erofs", b * 8)
          for i, (c, b) in enumerate(zip("abc", [3, 2, 5], strict=True))),
    ]
    doc = json.loads(_text(root, "images/docker.io/library/alpine:3.20/image.json"))
    assert doc["ready"] and doc["disk_size"] == 14 * 4096
    assert doc["config"]["config"]["Cmd"] == ["sh"]
    assert [la["state"] for la in doc["layers"]] == ["ok"] * 3
    assert set(_dir(root, "layers").children) == {f"sha256_{c * 64}.erofs" for c in "abc"}
    assert set(_dir(root, "by-digest").children) == {f"sha256_{'1' * 64}", f"sha256:{'1' * 64}"}
    assert _dir(root, "by-digest").children[f"sha256:{'1' * 64}"].target == f"sha256_{'1' * 64}"


def test_reference_paths() -> None:
    digest_ref = "127.0.0.1:5000/team/app@sha256:" + "e" * 64
    images = [_image("alpine:3.20"), _image(digest_ref), _image("localhost:5000/a/b/c:1")]
    root = build_tree(_good(images))
    assert _dir(root, f"images/127.0.0.1:5000/team/app@sha256:{'e' * 64}")
    assert _dir(root, "images/localhost:5000/a/b/c:1")
    assert set(_dir(root, "images").children) == {"docker.io", "127.0.0.1:5000",
                                                  "localhost:5000"}
    # Three references, one manifest: by-digest holds it once, image.json names all three.
    assert len(_dir(root, "by-digest").children) == 2  # sha256_<hex> and its sha256:<hex> link
    doc = json.loads(_text(root, "images/localhost:5000/a/b/c:1/image.json"))
    assert len(doc["references"]) == 3
    # Documents are rendered on read; their size is known without rendering, exactly.
    for name in ("image.json", "manifest.json", "config.json"):
        node = resolve(root, ("images", "localhost:5000", "a", "b", "c:1", name))
        assert isinstance(node, DocNode) and node.size == len(node.render()), name


def test_layer_link_names_widen_past_99() -> None:
    assert layer_link_name(7, 3, DIFFS[0]) == f"07-sha256_{'a' * 64}.erofs"
    assert layer_link_name(7, 100, DIFFS[0]) == f"07-sha256_{'a' * 64}.erofs"
    assert layer_link_name(7, 101, DIFFS[0]) == f"007-sha256_{'a' * 64}.erofs"


def _status(snap: CacheSnapshot, ref: str = "docker.io/library/alpine:3.20") -> str:
    return _text(build_tree(snap), f"images/{ref}/status")


def _not_usable(snap: CacheSnapshot) -> DirNode:
    d = _dir(build_tree(snap), "images/docker.io/library/alpine:3.20")
    assert "disk.vmdk" not in d.children and "rootfs.img" not in d.children
    return d


def test_missing_layer_says_pull() -> None:
    snap = _good()
    layers = dict(snap.layers)
    layers[DIFFS[1]] = _layer(DIFFS[1], 0, "missing", exists=False)
    snap = _snap(snap.images, layers, _fsmeta(4))
    text = _status(snap)
    assert text.startswith("not ready: docker.io/library/alpine:3.20\n")
    assert f"layer 1 {DIFFS[1]} missing: layers/sha256_{'b' * 64}.erofs" in text
    assert "fix: cachefs pull docker.io/library/alpine:3.20\n" in text
    d = _not_usable(snap)
    assert len(_dir(d, "layers").children) == 2  # the present ones stay visible
    assert f"sha256_{'b' * 64}.erofs" not in _dir(build_tree(snap), "layers").children


def test_corrupt_layer_says_pull_and_corrupt_fsmeta_says_repair() -> None:
    """A layer is rebuilt only from its blob (pull/load again); verify --repair rebuilds
    fsmeta and VMDK from the layers but cannot rebuild a layer, so it is not the hint."""
    snap = _good()
    layers = dict(snap.layers)
    layers[DIFFS[0]] = _layer(DIFFS[0], 3, "corrupt (not a valid EROFS image)")
    text = _status(_snap(snap.images, layers, _fsmeta(4)))
    assert "layer 0" in text and "corrupt (not a valid EROFS image)" in text
    assert text.count("fix: ") == 1
    assert ("fix: cachefs pull docker.io/library/alpine:3.20 (or cachefs load <archive> "
            "again, for a loaded image)\n") in text
    assert "verify --repair" not in text
    _not_usable(_snap(snap.images, layers, _fsmeta(4)))

    broken = _snap(snap.images, snap.layers, _fsmeta(4, "corrupt (not a valid EROFS image)"))
    text = _status(broken)
    assert "fsmeta corrupt (not a valid EROFS image)" in text
    assert text.count("fix: ") == 1
    assert "fix: cachefs verify --repair docker.io/library/alpine:3.20\n" in text
    _not_usable(broken)


def test_derived_check_problems_make_an_image_not_ready() -> None:
    snap = _good()
    crc = ("fsmeta", "fsmeta superblock checksum mismatch (the kernel refuses to mount it): "
                     f"fsmeta/sha256_{'1' * 64}.erofs")
    vmdk = ("vmdk", f"vmdk missing: vmdk/sha256_{'1' * 64}.vmdk")
    bad = _snap(snap.images, snap.layers, _fsmeta(4), derived={M: (crc, vmdk)})
    text = _status(bad)
    assert text.startswith("not ready: ") and crc[1] in text and vmdk[1] in text
    assert "fix: cachefs verify --repair docker.io/library/alpine:3.20\n" in text
    _not_usable(bad)
    # msb's VMDK is not part of the view's disks: without it the image is not ready (msb
    # cannot use it), but the view's own disk.vmdk and rootfs.img stay correct and served.
    no_vmdk = _snap(snap.images, snap.layers, _fsmeta(4), derived={M: (vmdk,)})
    assert _status(no_vmdk).startswith("not ready: ")
    d = _dir(build_tree(no_vmdk), "images/docker.io/library/alpine:3.20")
    assert "disk.vmdk" in d.children and "rootfs.img" in d.children
    assert _status(_snap(snap.images, snap.layers, _fsmeta(4), derived={M: ()})) == "ready\n"


def test_missing_fsmeta_and_metadata() -> None:
    snap = _good()
    no_fsmeta = _snap(snap.images, snap.layers, None)
    text = _status(no_fsmeta)
    assert f"fsmeta missing: fsmeta/sha256_{'1' * 64}.erofs" in text
    assert "cachefs verify --repair" in text
    d = _not_usable(no_fsmeta)
    assert "fsmeta.erofs" not in d.children

    no_meta = _snap([_image("alpine:3.20", meta=False)], snap.layers, _fsmeta(4),
                    metadata_refs=[])
    text = _status(no_meta)
    assert "image metadata missing: manifests/" in text and "cachefs pull" in text
    d = _not_usable(no_meta)
    assert "manifest.json" not in d.children and "config.json" not in d.children
    corrupt_meta = _snap([_image("alpine:3.20", meta=False)], snap.layers,
                         _fsmeta(4))
    assert "image metadata corrupt" in _status(corrupt_meta)


def test_status_json_and_metrics() -> None:
    good = _good([_image("alpine:3.20"), _image("busy:1", manifest=M2, diffs=DIFFS[:1])])
    snap = CacheSnapshot(
        cache_root=CACHE, images=good.images, layers=good.layers,
        fsmeta={**good.fsmeta, M2: _fsmeta(2)}, metadata_mtime_ns=good.metadata_mtime_ns,
        bytes_by_kind=good.bytes_by_kind, taken_at_ns=99,
        derived={M2: (("fsmeta", "fsmeta device table has 3 slots, expected 1"),)})
    doc = status_document(snap)
    assert doc["images"]["total"] == 2 and doc["images"]["ready"] == 1
    problems = doc["problems"]
    assert isinstance(problems, list) and problems
    assert problems[0]["scope"] == "docker.io/library/busy:1"
    assert problems[0]["fix"] == "cachefs verify --repair docker.io/library/busy:1"
    text = render_metrics(snap).decode()
    assert 'cachefs_image_ready{reference="docker.io/library/alpine:3.20"} 1\n' in text
    assert 'cachefs_image_ready{reference="docker.io/library/busy:1"} 0\n' in text
    assert "cachefs_images 2\n" in text and "cachefs_layers 3\n" in text
    assert 'cachefs_bytes{kind="layers"} 123\n' in text
    assert 'cachefs_bytes{kind="tmp"} 0\n' in text


def test_model_is_pure() -> None:
    assert build_tree(_good()) == build_tree(_good())


def test_rootfs_img_unchanged_by_retag_and_rescan() -> None:
    """Same artifacts, same rootfs.img node: a refresh must not drop its cached pages.

    A retag rewrites the metadata file (a new mtime) and a rescan has a new ``taken_at``;
    neither changes the disk's bytes, so its node (mtime included: the kernel drops pages
    when it sees a new mtime) stays equal and the view does not invalidate it.
    """
    before = _good()
    after = CacheSnapshot(
        cache_root=CACHE, images=before.images, layers=before.layers, fsmeta=before.fsmeta,
        metadata_mtime_ns={r: 10**12 for r in before.metadata_mtime_ns}, taken_at_ns=10**13,
    )
    path = "images/docker.io/library/alpine:3.20/rootfs.img"
    a = resolve(build_tree(before), tuple(path.split("/")))
    b = resolve(build_tree(after), tuple(path.split("/")))
    assert isinstance(a, ConcatNode) and a == b
    assert a.mtime_ns == max(art.mtime_ns for art in (*before.layers.values(),
                                                      *before.fsmeta.values()))
