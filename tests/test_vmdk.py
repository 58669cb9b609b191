"""VMDK descriptors: exact text, 2 GiB split, relative paths, parsing, and QEMU reading them."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from cachefs.erofs.fsmeta import fsmeta_from_layer_images
from cachefs.erofs.writer import write_layer_erofs
from cachefs.errors import VmdkError
from cachefs.vmdk import (
    MAX_EXTENT_SECTORS,
    Extent,
    descriptor_for_paths,
    parse_descriptor,
    render_descriptor,
)
from tests.erofs.layer_cases import overlay_tars, tar_to_tree
from tests.fixtures.system import require_tool, run

EXAMPLE = """\
# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="twoGbMaxExtentFlat"

# Extent description
RW 136 FLAT "/c/fsmeta/m.erofs" 0
RW 6496 FLAT "/c/layers/a.erofs" 0
RW 64 FLAT "/c/layers/b.erofs" 0
RW 40 FLAT "/c/layers/c.erofs" 0

# The Disk Data Base
#DDB
ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "7"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "ide"
"""


def test_exact_text_of_formats_example() -> None:
    files = [("/c/fsmeta/m.erofs", 136 * 512), ("/c/layers/a.erofs", 6496 * 512),
             ("/c/layers/b.erofs", 64 * 512), ("/c/layers/c.erofs", 40 * 512)]
    assert render_descriptor(files) == EXAMPLE
    assert parse_descriptor(EXAMPLE) == [Extent(p, s // 512, 0) for p, s in files]


def test_files_over_2gib_are_split() -> None:
    big = 5 * 1024**3 + 4096
    text = render_descriptor([("/f", 4096), ("/big", big)])
    extents = parse_descriptor(text)
    assert extents == [
        Extent("/f", 8, 0),
        Extent("/big", MAX_EXTENT_SECTORS, 0),
        Extent("/big", MAX_EXTENT_SECTORS, MAX_EXTENT_SECTORS),
        Extent("/big", big // 512 - 2 * MAX_EXTENT_SECTORS, 2 * MAX_EXTENT_SECTORS),
    ]
    total = 8 + big // 512
    assert f'ddb.geometry.cylinders = "{-(-total // 1008)}"' in text


def test_relative_paths() -> None:
    text = render_descriptor([("/v/img/fsmeta.erofs", 4096), ("/v/img/layers/00-x.erofs", 8192)],
                             relative_to=Path("/v/img"))
    assert [e.path for e in parse_descriptor(text)] == ["fsmeta.erofs", "layers/00-x.erofs"]


@pytest.mark.parametrize("bad,match", [
    ("hello", "missing"),
    (EXAMPLE.replace("RW 136 FLAT", "RW 136 SPARSE"), "unsupported extent"),
    (EXAMPLE.replace("RW 64 FLAT", "WHAT 64 FLAT"), "unexpected"),
    ("# Disk DescriptorFile\nversion=1\n", "no extents"),
])
def test_parse_rejects_garbage(bad: str, match: str) -> None:
    with pytest.raises(VmdkError, match=match):
        parse_descriptor(bad)


@pytest.mark.parametrize("files", [[], [("/x", 1000)], [("/x", 0)], [('/a"b', 512)]])
def test_render_rejects_bad_input(files: list[tuple[str, int]]) -> None:
    with pytest.raises(VmdkError):
        render_descriptor(files)


@pytest.mark.system
def test_qemu_reads_the_concatenation(tmp_path: Path) -> None:
    """qemu-img sees our descriptor (absolute and relative) as exactly fsmeta ‖ layers."""
    qemu_img = require_tool("qemu-img")
    layers = []
    for i, tar in enumerate(overlay_tars()):
        spool = io.BytesIO()
        root = tar_to_tree(tar, spool)
        layers.append(tmp_path / f"l{i}.erofs")
        with layers[-1].open("wb") as out:
            write_layer_erofs(root, spool, out)
    fsmeta = tmp_path / "fsmeta.erofs"
    with fsmeta.open("wb") as out:
        fsmeta_from_layer_images(layers, out)
    parts = [fsmeta, *layers]
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"".join(p.read_bytes() for p in parts))

    absolute = tmp_path / "abs.vmdk"
    absolute.write_text(descriptor_for_paths(parts))
    view = tmp_path / "view"
    (view / "layers").mkdir(parents=True)
    (view / "fsmeta.erofs").symlink_to(fsmeta)
    links = [view / "fsmeta.erofs"]
    for i, p in enumerate(layers):
        links.append(view / "layers" / f"{i:02d}-{p.name}")
        links[-1].symlink_to(p)
    relative = view / "disk.vmdk"
    relative.write_text(descriptor_for_paths(links, relative_to=view))
    assert '"layers/00-l0.erofs"' in relative.read_text()

    for vmdk in (absolute, relative):
        out = run([qemu_img, "compare", "-f", "vmdk", "-F", "raw", str(vmdk), str(raw)])
        assert "identical" in out.stdout
        info = json.loads(run([qemu_img, "info", "--output=json", str(vmdk)]).stdout)
        assert info["virtual-size"] == os.path.getsize(raw)
