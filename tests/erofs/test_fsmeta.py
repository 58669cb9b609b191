"""fsmeta writer: byte-identical to msb, and the flat fsmeta ‖ layers disk mounts as the merge."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.erofs import format as F
from cachefs.erofs import writer
from cachefs.erofs.fsmeta import (
    device_table,
    fsmeta_from_layer_images,
    fsmeta_meta_blkaddr,
    write_fsmeta,
)
from cachefs.erofs.merge import merge_layers
from cachefs.erofs.tree import FileType, LayerBlocks, Node, SpoolExtent
from cachefs.erofs.writer import write_layer_erofs
from cachefs.errors import ErofsFormatError
from cachefs.vmdk import render_descriptor
from tests.erofs.layer_cases import (
    flatten,
    many_layer_tars,
    overlay_tars,
    pattern,
    scan_mount,
    tar_to_tree,
    want_merged,
)
from tests.erofs.test_writer import layer_entries
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg, sha256
from tests.fixtures.system import Msb, loop_mount_erofs, require_tool, run

STACKS = {"overlay": overlay_tars, "25-layers": many_layer_tars}


def build_layers(tars: list[bytes], work: Path) -> tuple[list[Path], list[Node]]:
    """Our own layer images for ``tars`` (ingest + writer), and their trees."""
    paths, roots = [], []
    for i, tar in enumerate(tars):
        spool = io.BytesIO()
        root = tar_to_tree(tar, spool)
        path = work / f"layer{i:02d}.erofs"
        with path.open("wb") as out:
            write_layer_erofs(root, spool, out)
        paths.append(path)
        roots.append(root)
    return paths, roots


def concat(parts: list[Path], out: Path) -> Path:
    with out.open("wb") as dst:
        for p in parts:
            dst.write(p.read_bytes())
    return out


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_fsmeta_and_vmdk_byte_identical_to_msb(msb: Msb, tmp_path: Path, stack: str) -> None:
    tars = STACKS[stack]()
    archive = docker_archive(TestImage(tars), [f"example.com/t/{stack}:1"], tmp_path / "a.tar")
    msb.load(archive)
    want_fsmeta = next((msb.cache / "fsmeta").glob("*.erofs"))
    want_vmdk = next((msb.cache / "vmdk").glob("*.vmdk")).read_text()
    msb_layers = [msb.cache / "layers" / f"{sha256(t).replace(':', '_')}.erofs" for t in tars]

    # §4.7: from msb's layer images alone.
    rebuilt = io.BytesIO()
    blocks = fsmeta_from_layer_images(msb_layers, rebuilt, msb_quirks=True)
    assert rebuilt.getvalue() == want_fsmeta.read_bytes()
    assert blocks * F.BLOCK_SIZE == want_fsmeta.stat().st_size

    # From the tars: ingest → our layer writer → merge → fsmeta.
    _, roots = build_layers(tars, tmp_path)
    from_tars = io.BytesIO()
    write_fsmeta(merge_layers(roots, leak_nested_whiteouts=True),
                 [p.stat().st_size // F.BLOCK_SIZE for p in msb_layers], from_tars)
    assert from_tars.getvalue() == want_fsmeta.read_bytes()

    files = [(os.path.realpath(p), p.stat().st_size) for p in [want_fsmeta, *msb_layers]]
    assert render_descriptor(files) == want_vmdk


@pytest.mark.system
@pytest.mark.parametrize("msb_quirks", [False, True], ids=["oci", "msb-quirks"])
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_flat_disk_mounts_as_the_merged_tree(tmp_path: Path, stack: str, msb_quirks: bool) -> None:
    fsck = require_tool("fsck.erofs")
    tars = STACKS[stack]()
    layers, _ = build_layers(tars, tmp_path)
    fsmeta = tmp_path / "fsmeta.erofs"
    with fsmeta.open("wb") as out:
        fsmeta_from_layer_images(layers, out, msb_quirks=msb_quirks)
    proc = run([fsck, *(f"--device={p}" for p in layers), str(fsmeta)])
    assert proc.stdout + proc.stderr == ""
    disk = concat([fsmeta, *layers], tmp_path / "disk.img")
    with loop_mount_erofs(disk, tmp_path / "mnt") as mnt:
        assert scan_mount(mnt) == flatten(want_merged(tars, msb_quirks=msb_quirks))


def test_device_table_geometry() -> None:
    assert [fsmeta_meta_blkaddr(n) for n in (0, 1, 23, 24, 55, 56)] == [1, 1, 1, 2, 2, 3]
    root = Node.directory()
    out = io.BytesIO()
    own = write_fsmeta(root, [812, 8, 5], out)
    raw = out.getvalue()
    slots = [F.DEVICE_SLOT.unpack_from(raw, 1152 + 128 * i) for i in range(3)]
    assert [(s[1], s[2]) for s in slots] == [(812, own), (8, own + 812), (5, own + 820)]
    sb = F.Superblock.unpack(raw[1024:])
    assert (sb.feature_incompat, sb.extra_devices, sb.devt_slotoff) == (0x0C, 3, 9)
    assert sb.checksum == F.superblock_checksum(raw[:4096])


@pytest.mark.system
def test_file_xattrs_align_chunks_and_missing_provenance_reads_zeros(tmp_path: Path) -> None:
    """Beyond msb: a regular file with xattrs (ibody % 8 == 4) gets its chunk array aligned
    to 8 where the kernel looks for it; content None gives null chunks that read as zeros."""
    layer_root = Node.directory()
    assert layer_root.children is not None
    data = pattern(2 * 4096 + 10, 3)
    spool = io.BytesIO(data)
    f = Node(FileType.REG, size=len(data), content=SpoolExtent(0))
    layer_root.children[b"f"] = f
    layer = tmp_path / "layer.erofs"
    with layer.open("wb") as out:
        bm = write_layer_erofs(layer_root, spool, out)

    merged = Node.directory()
    assert merged.children is not None
    merged.children[b"f"] = Node(FileType.REG, size=len(data), xattrs=[(b"user.a", b"b")],
                                 content=LayerBlocks(1, bm.files[b"f"][0]))
    merged.children[b"hole"] = Node(FileType.REG, size=5000, content=None)
    fsmeta = tmp_path / "fsmeta.erofs"
    with fsmeta.open("wb") as out:
        write_fsmeta(merged, [bm.total_blocks], out)
    proc = run([require_tool("fsck.erofs"), f"--device={layer}", str(fsmeta)])
    assert proc.stdout + proc.stderr == ""
    with loop_mount_erofs(concat([fsmeta, layer], tmp_path / "disk"), tmp_path / "m") as mnt:
        assert (mnt / "f").read_bytes() == data
        assert os.getxattr(mnt / "f", "user.a") == b"b"
        assert (mnt / "hole").read_bytes() == bytes(5000)


def test_chunks_pointing_past_the_device_table_are_refused() -> None:
    merged = Node.directory()
    assert merged.children is not None
    merged.children[b"f"] = Node(FileType.REG, size=1, content=LayerBlocks(2, 1))
    with pytest.raises(ErofsFormatError, match="device 2"):
        write_fsmeta(merged, [3], io.BytesIO())


# --- property test: random multi-layer images through the kernel ---------------------------


@st.composite
def layer_stacks(draw: st.DrawFn) -> list[bytes]:
    """1–4 random layers over one small name pool, so names collide across layers: files
    replaced by dirs and back, whiteouts of lower entries, and opaque directories."""
    tars = []
    for _ in range(draw(st.integers(1, 4))):
        entries = draw(layer_entries())
        dirs = sorted({ti.name.rstrip("/") for ti, _ in entries if ti.isdir()})
        if dirs and draw(st.booleans()):
            entries.append(reg(draw(st.sampled_from(dirs)) + "/.wh..wh..opq", b""))
        tars.append(layer_tar(entries))
    return tars


@pytest.mark.system
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tars=layer_stacks())
def test_random_images_mount_as_the_oci_merge(
    tmp_path_factory: pytest.TempPathFactory, tars: list[bytes]
) -> None:
    work = tmp_path_factory.mktemp("stack")
    layers, _ = build_layers(tars, work)
    fsmeta = work / "fsmeta.erofs"
    with fsmeta.open("wb") as out:
        fsmeta_from_layer_images(layers, out)
    disk = concat([fsmeta, *layers], work / "disk.img")
    with loop_mount_erofs(disk, work / "mnt") as mnt:
        assert scan_mount(mnt) == flatten(want_merged(tars))


def test_device_table_beyond_2_32_blocks_is_a_format_error() -> None:
    """Not a struct.error (an internal error): the image is too big for one fsmeta."""
    assert len(device_table(1, [0xFFFF_FFFE])) == 128
    with pytest.raises(ErofsFormatError, match="16 TiB"):
        device_table(1, [1 << 31, 1 << 31])


def test_metadata_written_in_pieces_is_byte_identical_to_msb(
    msb: Msb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk arrays and the metadata area go out in bounded pieces (memory must not grow
    with file sizes); tiny pieces here make every file and inode cross piece boundaries."""
    monkeypatch.setattr(writer, "_CHUNK_PIECE", 7)
    monkeypatch.setattr(writer, "_META_PIECE", 300)
    sizes = [1, 4096, 65 * 4096 + 3, 300 * 4096, 1000 * 4096 - 1]
    tars = [layer_tar([reg(f"f{i}", pattern(n, i)) for i, n in enumerate(sizes)]
                      + [reg(f"small/{k}", b"x" * k) for k in range(40)]),
            layer_tar([reg("f2", pattern(70 * 4096, 9)), reg("g", b"g")])]
    archive = docker_archive(TestImage(tars), ["example.com/t/pieces:1"], tmp_path / "a.tar")
    msb.load(archive)
    want = next((msb.cache / "fsmeta").glob("*.erofs")).read_bytes()
    msb_layers = [msb.cache / "layers" / f"{sha256(t).replace(':', '_')}.erofs" for t in tars]
    rebuilt = io.BytesIO()
    fsmeta_from_layer_images(msb_layers, rebuilt, msb_quirks=True)
    assert rebuilt.getvalue() == want
