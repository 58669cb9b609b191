"""Merged tree + layer block counts → the fsmeta EROFS (FORMATS.md §4).

The fsmeta holds only metadata: every regular file is CHUNK_BASED and its chunk indexes
point at (layer device, layer-local block), so a guest reading the VMDK concatenation
``fsmeta ‖ layer1 ‖ … ‖ layerN`` in flat-device mode finds the data in the layer images.
The layout itself is the layer writer's engine (``writer.plan_layout``) with
``chunked=True`` and the metadata area moved behind the device table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import ErofsFormatError
from ..heap import collector_paused
from . import format as F
from .merge import merge_layers
from .reader import ErofsImage
from .tree import FileType, LayerBlocks, Node, walk
from .writer import plan_layout, write_image

DEVT_SLOTOFF = 9  # device table at 9 * 128 = 1152, right after the superblock


def fsmeta_meta_blkaddr(layer_count: int) -> int:
    """M: first block after the device table (1 for up to 23 layers, §4.1)."""
    return F.blocks_for(DEVT_SLOTOFF * F.DEVICE_SLOT_SIZE + F.DEVICE_SLOT_SIZE * layer_count)


def device_table(own_blocks: int, layer_blocks: Sequence[int]) -> bytes:
    """Device slots: slot i is layer i+1, mapped right after everything before it (§4.3)."""
    out = bytearray()
    mapped = own_blocks
    for blocks in layer_blocks:
        if mapped + blocks > 0xFFFF_FFFF:
            raise ErofsFormatError(
                f"image of {len(layer_blocks)} layers is larger than the 2^32 blocks (16 TiB) "
                "an EROFS device table can address"
            )
        out += F.DEVICE_SLOT.pack(bytes(64), blocks, mapped, bytes(56))
        mapped += blocks
    return bytes(out)


def write_fsmeta(merged_root: Node, layer_blocks: Sequence[int], out: BinaryIO) -> int:
    """Write the fsmeta for ``merged_root`` and return its own block count.

    ``merged_root`` is the §4.5 merge result; its regular files carry
    ``content = LayerBlocks(device_id, start_block)`` (``None`` → null chunks that read as
    zeros). ``layer_blocks[i]`` is the block count of layer ``i+1``. The layout is planned
    first because the device slots' ``mapped_blkaddr`` depend on our own size.

    OCI-correct where msb never goes: a regular file with xattrs gets its chunk array
    aligned to 8 bytes, where the kernel looks for it (§4.4).
    """
    n = len(layer_blocks)
    if n > 0xFFFF:
        raise ErofsFormatError(f"fsmeta cannot address {n} layers (at most 65535)")
    plan = plan_layout(merged_root, meta_blkaddr=fsmeta_meta_blkaddr(n), chunked=True)
    for inode in plan.inodes:
        if not inode.chunks:  # a directory, symlink, device or empty file: nothing to check
            continue
        content = inode.node.content
        if isinstance(content, LayerBlocks) and not 1 <= content.device_id <= n:
            raise ErofsFormatError(
                f"fsmeta: {inode.path.decode(errors='replace')!r} points at device "
                f"{content.device_id}, but the image has {n} layers"
            )
    own = plan.total_blocks
    sb = F.Superblock(
        inos=len(plan.inodes), blocks=own, meta_blkaddr=plan.meta_blkaddr,
        feature_incompat=F.FEATURE_INCOMPAT_CHUNKED_FILE | F.FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices=n, devt_slotoff=DEVT_SLOTOFF,
    )
    write_image(plan, sb, device_table(own, layer_blocks), None, out)
    return own


def fsmeta_of_layers(
    layer_roots: Sequence[Node], layer_blocks: Sequence[int], out: BinaryIO, *,
    msb_quirks: bool = False,
) -> int:
    """Merge layer trees (bottom → top) and write their fsmeta; returns its block count.

    With the cyclic collector paused (``heap.collector_paused``): the merged tree and the
    plan are ~3 objects per entry that only reference counts free, and collections that
    walk the layer trees meanwhile cost more than the merge itself.
    """
    with collector_paused():
        merged = merge_layers(layer_roots, leak_nested_whiteouts=msb_quirks)
        return write_fsmeta(merged, layer_blocks, out)


def fsmeta_from_layer_images(
    layer_paths: Sequence[Path], out: BinaryIO, *, msb_quirks: bool = False
) -> int:
    """Rebuild an image's fsmeta from its layer EROFS files alone (§4.7); no data is read.

    Every regular file must be FLAT_PLAIN in its layer (msb refuses anything else), since
    its start block becomes the chunk address. ``msb_quirks`` selects msb's exact merge
    (nested whiteouts leak as 0:0 devices, see ``merge``), which makes the result
    byte-identical to msb's own fsmeta; the default is the OCI-correct merge.
    """
    roots: list[Node] = []
    blocks: list[int] = []
    for path in layer_paths:
        with ErofsImage.open(path) as image:
            root = image.to_tree()
            blocks.append(image.total_blocks)
        for sub, node in walk(root):
            if node.type is FileType.REG and node.block is None:
                raise ErofsFormatError(
                    f"{path}: regular file {sub.decode(errors='replace')!r} is not FLAT_PLAIN; "
                    "an fsmeta can only point at plain layer blocks"
                )
        roots.append(root)
    return fsmeta_of_layers(roots, blocks, out, msb_quirks=msb_quirks)
