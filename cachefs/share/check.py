"""Structural checks of EROFS images that arrived from outside (a registry artifact).

A downloaded layer image is published only if the kernel and msb will accept it and our
reader can walk all of it: the superblock parses with a matching checksum, the image has
no device table (a layer stands alone), the superblock's block count fits the file, every
inode and directory block parses (:meth:`ErofsImage.walk` reads each one through
bounds-checked preads), and every regular file's data lies inside the file. Regular files
must be FLAT_PLAIN, as msb writes them, or no fsmeta could point at them.

The walk also yields the layer's tree: the fsmeta is then merged from the trees exactly
as a pull that converted the layers would.
"""

from __future__ import annotations

from pathlib import Path

from ..erofs import format as fmt
from ..erofs.reader import ErofsImage, is_valid_erofs
from ..erofs.tree import FileType, Node, walk
from ..errors import CachefsError, ErofsFormatError

BLOCK = fmt.BLOCK_SIZE


def check_layer_image(path: Path, label: str | None = None) -> tuple[Node, int]:
    """(tree, total blocks) of a layer EROFS that passes every check; else ErofsFormatError.

    ``label`` names the image in messages (default: its file name).
    """
    name = label or path.name
    if not is_valid_erofs(path):
        raise ErofsFormatError(f"{name}: not a valid EROFS image (msb's rule)")
    try:
        with ErofsImage.open(path) as image:
            image.check_crc()
            if image.devices:
                raise ErofsFormatError(
                    f"{name}: a layer image has a device table ({len(image.devices)} "
                    "slots)")
            if image.superblock.blocks * BLOCK > image.file_size:
                raise ErofsFormatError(
                    f"{name}: superblock claims {image.superblock.blocks} blocks, the "
                    f"file has {image.file_size // BLOCK}")
            root = image.to_tree()  # reads every inode and directory block, bounds-checked
            size = image.file_size
            for sub, node in walk(root):
                if node.type is not FileType.REG:
                    continue
                if node.block is None:
                    raise ErofsFormatError(
                        f"{name}: file {sub!r} is not FLAT_PLAIN (an fsmeta can only point "
                        "at plain layer blocks)")
                if node.size and node.block * BLOCK + node.size > size:
                    raise ErofsFormatError(
                        f"{name}: file {sub!r} data ends at byte "
                        f"{node.block * BLOCK + node.size}, beyond the {size}-byte image")
            return root, image.total_blocks
    except ErofsFormatError:
        raise
    except (CachefsError, OSError, ValueError) as err:
        raise ErofsFormatError(f"{name}: unreadable: {err}") from None
