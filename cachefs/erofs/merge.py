"""The OCI merge of layer trees into the one tree an fsmeta EROFS describes (FORMATS.md §4.5).

Input: the layer roots bottom → top, as the tar ingest builds them or as the reader reads
them back from layer EROFS images: whiteouts are chr 0:0 Nodes, opaque dirs carry
``OPAQUE_XATTR``, and every regular Node carries ``.block`` (its start block in that
layer's EROFS; ``NULL_BLOCK`` for empty files) and ``.size``.

Output: a brand-new tree (the inputs are never mutated). Every regular file is a new Node
with ``content = LayerBlocks(device_id=i+1, start_block=block)``, i.e. its provenance is the
layer that last wrote it. A hardlink group inside one layer stays one merged Node.

Rules (msb's, in order, per layer and directory):

* a chr 0:0 entry removes that name (and its subtree) from the merged dir and is not inserted;
* a dir onto a merged dir: if opaque, clear the merged dir first; then replace its mode,
  uid, gid, mtime and xattrs with the layer dir's and recurse. This applies to implicit
  parents too, which therefore clobber lower metadata. We keep this msb behaviour on
  purpose: a layer EROFS cannot tell an implicit dir from an explicit one, and an fsmeta
  rebuilt from layer images must equal the one built from the tars;
* a dir that is new (or replaces a non-dir) is inserted with its whole subtree;
* anything else is inserted or replaces what was there (a dir with all its contents).

Finally ``OPAQUE_XATTR`` is stripped from every merged dir, and the root is reset to
040755 0:0 mtime 0 without xattrs.

Deviations from msb (``leak_nested_whiteouts=True`` reproduces msb exactly, for byte
identity tests):

* msb copies a new dir's subtree as-is, so a whiteout nested in it (``newdir/.wh.ghost``)
  survives as a real char device ``newdir/ghost``. There is nothing below a new dir to hide,
  so per OCI the whiteout simply vanishes; we drop it.
* An opaque marker on a *layer root* (``/.wh..wh..opq``) hides every lower layer per OCI;
  msb merges only the root's children and (as far as FORMATS.md says) ignores the root's
  own opaque flag. We honour it; msb mode ignores it. (Not verified against msb.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .tree import NULL_BLOCK, OPAQUE_XATTR, FileType, LayerBlocks, Node


def merge_layers(layer_roots: Sequence[Node], *, leak_nested_whiteouts: bool = False) -> Node:
    """Merge layer trees bottom → top into a new tree whose files point into the layers."""
    root = Node.directory()
    for i, layer_root in enumerate(layer_roots):
        m = _Merger(i + 1, leak_nested_whiteouts)
        if not leak_nested_whiteouts and layer_root.is_opaque:
            root.children = {}
        m.merge_children(root, layer_root)
    _strip_opaque(root)
    root.mode, root.uid, root.gid, root.mtime, root.xattrs = 0o755, 0, 0, 0, []
    return root


def merge_layers_msb_compatible(layer_roots: Sequence[Node]) -> Node:
    """Exactly msb's merge, quirks included (nested whiteouts leak as char devices)."""
    return merge_layers(layer_roots, leak_nested_whiteouts=True)


class _Merger:
    """One layer's pass; ``memo`` maps a layer regular file Node to its merged copy (one
    merged Node per hardlink group; Nodes hash by identity)."""

    __slots__ = ("device_id", "leak", "memo")

    def __init__(self, device_id: int, leak: bool) -> None:
        self.device_id = device_id
        self.leak = leak
        self.memo: dict[Node, Node] = {}

    def merge_children(self, merged: Node, layer_dir: Node) -> None:
        mchildren = merged.children
        assert mchildren is not None
        for name, lnode in (layer_dir.children or {}).items():
            ltype = lnode.type  # the properties inlined: this runs once per name of a layer
            if ltype is _REG:
                mchildren[name] = self.copy_file(lnode)
                continue
            if ltype is _CHR and not lnode.rdev_major and not lnode.rdev_minor:  # whiteout
                mchildren.pop(name, None)
                continue
            existing = mchildren.get(name)
            if ltype is _DIR and existing is not None and existing.type is _DIR:
                if OPAQUE_XATTR in lnode.xattrs:
                    existing.children = {}
                existing.mode, existing.uid, existing.gid = lnode.mode, lnode.uid, lnode.gid
                existing.mtime = lnode.mtime
                existing.xattrs = list(lnode.xattrs)
                self.merge_children(existing, lnode)
            else:
                mchildren[name] = self.copy(lnode)

    def copy(self, lnode: Node) -> Node:
        """A new merged Node for a layer Node (a whole subtree for a dir).

        Positional ``Node`` calls and inlined checks: this runs once per file of every
        pulled layer. A directory's regular files (most entries) are copied in its own
        loop, without a call per file.
        """
        ltype = lnode.type
        if ltype is _DIR:
            out = Node(_DIR, lnode.mode, lnode.uid, lnode.gid, lnode.mtime, list(lnode.xattrs),
                       {})
            children = out.children
            assert children is not None
            leak, copy, memo, device_id = self.leak, self.copy, self.memo, self.device_id
            new_blocks, set_device, set_start = object.__new__, _SET_DEVICE, _SET_START
            for name, child in (lnode.children or {}).items():
                ctype = child.type
                if ctype is _REG:
                    hit = memo.get(child)
                    if hit is None:
                        block = child.block
                        if block is None:
                            block = _missing_block(child)
                        where = new_blocks(LayerBlocks)
                        set_device(where, device_id)
                        set_start(where, block)
                        hit = memo[child] = Node(
                            _REG, child.mode, child.uid, child.gid, child.mtime,
                            list(child.xattrs), None, b"", 0, 0, child.size, where,
                        )
                    children[name] = hit
                elif (ctype is _CHR and not child.rdev_major and not child.rdev_minor
                        and not leak):
                    continue  # a whiteout: nothing below a new dir to hide (OCI); msb leaks it
                else:
                    children[name] = copy(child)
            return out
        if ltype is _REG:
            return self.copy_file(lnode)
        return Node(
            ltype, lnode.mode, lnode.uid, lnode.gid, lnode.mtime, list(lnode.xattrs), None,
            lnode.target, lnode.rdev_major, lnode.rdev_minor,
        )

    def copy_file(self, lnode: Node) -> Node:
        """The merged Node of a layer regular file (the same one for every name of a
        hardlink group)."""
        hit = self.memo.get(lnode)
        if hit is None:
            block = lnode.block
            if block is None:
                block = _missing_block(lnode)
            hit = self.memo[lnode] = Node(
                _REG, lnode.mode, lnode.uid, lnode.gid, lnode.mtime, list(lnode.xattrs), None,
                b"", 0, 0, lnode.size, LayerBlocks(self.device_id, block),
            )
        return hit


def _missing_block(lnode: Node) -> int:
    """An empty file may lack ``.block`` (nothing to point at); any other cannot."""
    if lnode.size:
        raise ValueError("regular file without .block: write the layer EROFS first")
    return NULL_BLOCK


_DIR, _REG, _CHR = FileType.DIR, FileType.REG, FileType.CHR
# LayerBlocks is a frozen slotted dataclass: its __init__ sets each slot through
# object.__setattr__, half the cost of a merged file's Node. The merge fills the two slots
# through their descriptors directly (what that __init__ ends up doing), once per file.
_SET_DEVICE: Callable[[LayerBlocks, int], None] = vars(LayerBlocks)["device_id"].__set__
_SET_START: Callable[[LayerBlocks, int], None] = vars(LayerBlocks)["start_block"].__set__


def _strip_opaque(root: Node) -> None:
    stack = [root]
    while stack:
        node = stack.pop()
        if OPAQUE_XATTR in node.xattrs:
            node.xattrs = [x for x in node.xattrs if x != OPAQUE_XATTR]
        children = node.children
        if children:
            stack += [child for child in children.values() if child.type is _DIR]
