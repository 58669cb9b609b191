"""Compressed layer blob → verified tar stream → layer tree (FORMATS.md §1.6, §3.12).

One pass over the blob does everything: decompress (gzip with any number of members,
zstd with any number of frames, or plain), hash every decompressed byte for the diff_id,
parse the tar, build the ``Node`` tree and append regular-file bytes to a spool file. The
diff_id covers the *whole* decompressed stream, including the zero padding after the
end-of-archive marker, because that is what ``rootfs.diff_ids`` hashes; so the stream is
drained to EOF after the tar ends.

Memory grows with the number of entries (one ``Node`` each), never with their size: data
moves in ≤1 MiB chunks from the decompressor straight into the spool.

The tree follows msb's ingest rules exactly, with one deliberate difference: msb fails a
layer that carries an empty PAX ``SCHILY.xattr`` value (Go's archive/tar writes those); we
accept it. PAX xattrs are then dropped, as msb drops them [FORMATS.md §3.10]: a layer EROFS
with xattrs msb never writes would differ byte for byte from msb's, and fsmeta rebuilds
from our layers would no longer match msb's.

A second difference: numbers an EROFS inode cannot hold fail the layer, naming the entry.
msb wraps them silently: a uid of 2^32 becomes 0 (root owns the file), an mtime of 2^64
becomes 0, and a minor device number of 2^20 encodes as 0:0, the whiteout marker, so the
merged tree would depend on whether fsmeta was built from the tar or from the layers.
Every value msb stores faithfully is accepted and stored the same way.
"""

from __future__ import annotations

import enum
import hashlib
import os
import queue
import threading
import zlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import BinaryIO, cast

from isal import isal_zlib as _inflate

from ..digest import Digest
from ..erofs.tree import OPAQUE_XATTR, FileType, Node, SpoolExtent
from ..errors import DigestMismatch, LayerFormatError, UsageError
from . import tarstream as ts
from .zstd_stream import zstd_chunks

# ISA-L inflate (a declared dependency): the same API and output as zlib, about twice as fast.
# isal's stub declares ``error`` an Exception instance; it is the class IsalError.
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error, cast(type[BaseException], _inflate.error)
)

MAX_PATH = 4096
MAX_DEPTH = 128
MAX_FILE = 5 << 30
MAX_TOTAL = 10 << 30  # default of the content cap; CACHEFS_MAX_LAYER_BYTES overrides it
CONTENT_CAP_ENV = "CACHEFS_MAX_LAYER_BYTES"
MAX_CONTENT_CAP = 1 << 40  # a layer image addresses 2^32 blocks of 4 KiB: stay well inside
MAX_ENTRIES = 1_000_000
MAX_SYMLINK = 4096
MAX_NAME = 255  # EROFS_NAME_LEN
MAX_ID = 0xFFFF_FFFF  # uid/gid: 32 bits in an extended inode
MAX_MTIME = (1 << 64) - 1  # i_mtime: 64 bits
MAX_MAJOR = 0xFFF  # i_u holds Linux new_encode_dev: 12-bit major, 20-bit minor
MAX_MINOR = 0xF_FFFF

_IN_CHUNK = 256 << 10  # compressed bytes per read
_OUT_CHUNK = 1 << 20  # gzip output bound per call
# Each file's bytes in the spool are followed by zeros up to the next 4 KiB boundary, as
# in the layer EROFS's data area: files that follow each other in both (a tar in walk
# order, the usual case) then reach the image in one kernel copy instead of one per file.
SPOOL_ALIGN = 4096
_ZEROS = bytes(SPOOL_ALIGN)
_PREFETCH_DEPTH = 4  # decompressed chunks (≤ _OUT_CHUNK each) queued ahead of the tar parser


class Compression(enum.Enum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


def compression_from_media_type(media_type: str | None) -> Compression:
    """What msb does on pull: a "gzip" or "zstd" substring, anything else is plain."""
    if media_type:
        if "gzip" in media_type:
            return Compression.GZIP
        if "zstd" in media_type:
            return Compression.ZSTD
    return Compression.NONE


def detect_compression(head: bytes) -> Compression:
    """What msb does on load: sniff the magic bytes."""
    if head[:2] == b"\x1f\x8b":
        return Compression.GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return Compression.ZSTD
    return Compression.NONE


def content_cap() -> int:
    """The most bytes one layer may hold: its file contents, and its decompressed stream.

    One number bounds both, because a bomb need not be a big file: 10 GiB of zeros after
    the end-of-archive marker is as costly to inflate and hash as a 10 GiB file.
    """
    text = os.environ.get(CONTENT_CAP_ENV)
    if text is None or not text.strip():
        return MAX_TOTAL
    try:
        cap = int(text)
    except ValueError:
        cap = -1
    if not 0 < cap <= MAX_CONTENT_CAP:
        raise UsageError(f"{CONTENT_CAP_ENV}={text!r} is not a number of bytes from 1 to "
                         f"{MAX_CONTENT_CAP}")
    return cap


def content_cap_error(cap: int, *, entry: str | None = None, layer: str | None = None
                      ) -> LayerFormatError:
    err = LayerFormatError(f"layer content exceeds {cap} bytes", layer=layer, entry=entry)
    err.hint = f"set {CONTENT_CAP_ENV} to allow more"
    return err


# -- decompression ----------------------------------------------------------------------


def _plain_chunks(blob: BinaryIO) -> Generator[bytes, None, None]:
    while data := blob.read(_OUT_CHUNK):
        yield data


def _gzip_chunks(blob: BinaryIO, label: str) -> Generator[bytes, None, None]:
    """Every gzip member in turn (``MultiGzDecoder`` semantics), output bounded per call.

    NUL bytes between or after members are skipped, as Python's ``gzip`` module does.
    """
    d = _inflate.decompressobj(31)
    in_member = False
    seen_member = False
    pending = b""
    more_output = False
    while True:
        if not pending and not more_output:
            pending = blob.read(_IN_CHUNK)
            if not pending:
                break
        if not in_member:
            pending = pending.lstrip(b"\0")
            if not pending:
                continue
            in_member = seen_member = True
        try:
            out = d.decompress(pending, _OUT_CHUNK)
        except _INFLATE_ERRORS as e:
            raise LayerFormatError(f"corrupt gzip stream: {e}", layer=label) from None
        if out:
            yield out
        if d.eof:
            pending = d.unused_data
            d = _inflate.decompressobj(31)
            in_member = more_output = False
        else:
            pending = d.unconsumed_tail
            more_output = len(out) == _OUT_CHUNK
    if in_member:
        raise LayerFormatError("truncated gzip stream (ends inside a member)", layer=label)
    if not seen_member:
        raise LayerFormatError("empty gzip stream", layer=label)


class _EndOfStream:
    """The producer's last queue item on success (a failure is queued as the exception)."""


_EOF = _EndOfStream()


class _PrefetchingStream:
    """``read(n)`` over decompressed chunks that worker threads produce, hash and count.

    Why threads: inflating (zlib/ISA-L/zstd) and sha256 release the GIL on large buffers,
    so they run on other cores while this thread parses the tar and writes the spool,
    which hold it. Inflating and hashing get a thread each: in one thread they took longer
    than the parser, which then waited for them. The queues are bounded
    (``_PREFETCH_DEPTH`` chunks of ≤ 1 MiB), so memory stays flat however large the
    layer. The producer's error (``LayerFormatError`` for a corrupt or truncated stream, an
    ``OSError`` reading the blob) is queued after the chunks that preceded it and raised by
    ``read`` at that same point of the stream, as if the parser had pulled the chunks
    itself. ``close()`` stops and joins both threads; the owner calls it before the blob is
    closed, on success and failure alike. ``count`` and ``hexdigest`` are final once
    ``read`` has returned ``b""`` (the producer joins the hasher before queueing the end).
    """

    def __init__(
        self,
        chunks: Generator[bytes, None, None],
        hasher: hashlib._Hash,
        label: str,
        cap: int,
    ) -> None:
        self._hash = hasher
        self._cap = cap
        self._label = label
        self._queue: queue.Queue[bytes | _EndOfStream | BaseException] = queue.Queue(
            _PREFETCH_DEPTH
        )
        self._to_hash: queue.Queue[bytes | _EndOfStream] = queue.Queue(_PREFETCH_DEPTH)
        self._stop = threading.Event()
        self._left = b""
        self._ended = False
        self.count = 0
        self._hasher = threading.Thread(target=self._digest, name=f"hash {label}", daemon=True)
        self._thread = threading.Thread(
            target=self._produce, args=(chunks,), name=f"inflate {label}", daemon=True
        )
        self._hasher.start()
        self._thread.start()

    def _digest(self) -> None:
        get, update = self._to_hash.get, self._hash.update
        while not isinstance(chunk := get(), _EndOfStream):
            update(chunk)

    def _produce(self, chunks: Generator[bytes, None, None]) -> None:
        put, put_hash, stop, cap = self._queue.put, self._to_hash.put, self._stop, self._cap
        try:
            for chunk in chunks:
                self.count += len(chunk)
                if self.count > cap:
                    raise content_cap_error(cap, layer=self._label)
                put_hash(chunk)
                put(chunk)
                if stop.is_set():
                    return
            item: _EndOfStream | BaseException = _EOF
        except BaseException as e:  # handed to the reading thread, which raises it
            item = e
        finally:
            if stop.is_set():
                chunks.close()
            put_hash(_EOF)  # the hasher only ever waits for input: room comes soon
            self._hasher.join()
        if not stop.is_set():
            put(item)

    def read(self, n: int = -1, /) -> bytes:
        data = self._left
        if not data:
            if self._ended:
                return b""
            item = self._queue.get()
            if isinstance(item, bytes):
                data = item
            else:
                self._ended = True
                if isinstance(item, BaseException):
                    raise item
                return b""
        if 0 <= n < len(data):
            self._left = data[n:]
            return data[:n]
        self._left = b""
        return data

    def close(self) -> None:
        """Stop the producer and wait for it: after this, nothing reads the blob."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        # A producer blocked on a full queue gets room; it then sees the flag and returns
        # after at most one more put, which the emptied queue also has room for.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def decompressed_chunks(
    blob: BinaryIO, compression: Compression, label: str
) -> Generator[bytes, None, None]:
    """The decompressed stream as chunks; truncated or corrupt input → ``LayerFormatError``."""
    if compression is Compression.GZIP:
        return _gzip_chunks(blob, label)
    if compression is Compression.ZSTD:
        return zstd_chunks(blob, label, read_size=_IN_CHUNK, out_chunk=_OUT_CHUNK)
    return _plain_chunks(blob)


# -- tree building ----------------------------------------------------------------------


@dataclass
class IngestedLayer:
    root: Node
    diff_id: Digest
    uncompressed_size: int
    entries: int  # tar members seen (PAX/GNU meta records excluded, skipped types included)


_SIMPLE_TYPES = {
    ts.SYMLINK: FileType.SYMLINK,
    ts.CHAR: FileType.CHR,
    ts.BLOCKDEV: FileType.BLK,
    ts.FIFO: FileType.FIFO,
    ts.SOCKET: FileType.SOCK,
}


# A path of at most this many bytes is within every path limit: MAX_PATH bytes, MAX_NAME
# bytes a name, MAX_DEPTH components (more take 2 * MAX_DEPTH + 1 bytes at least).
_SHORT = min(MAX_PATH, MAX_NAME, 2 * MAX_DEPTH - 1)
_ODD_NAMES = (b"", b".", b"..")  # a last component that ``_place`` has to look at


class _Builder:
    """Applies tar entries to a layer tree per FORMATS.md §3.12."""

    def __init__(self, spool: BinaryIO, label: str, cap: int) -> None:
        self.root = Node.directory()
        self._cap = cap
        self.label = label
        self._write = spool.write
        self._offset = spool.tell()
        self._total = 0
        self.entries = 0
        # every parent directory resolved so far, by its '/'-joined path (b"" is the root)
        self._dirs: dict[bytes, Node] = {b"": self.root}

    def _fail(self, entry: ts.TarEntry, rule: str) -> LayerFormatError:
        return LayerFormatError(rule, layer=self.label, entry=ts.display_name(entry.name))

    def _split(self, entry: ts.TarEntry, path: bytes) -> list[bytes]:
        # "./" prefixes, "." components, empty components (leading/trailing/double "/") go.
        parts = [p for p in path.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise self._fail(entry, "path has a '..' component")
        return parts

    def _parent(self, entry: ts.TarEntry, key: bytes, parts: list[bytes]) -> Node:
        """The directory ``key`` holding ``parts[-1]`` (``key`` is ``parts[:-1]`` '/'-joined);
        missing parents are created (0755 0:0 mtime 0).

        Directory Nodes are never removed or replaced within one layer (a non-dir cannot
        land on a dir, a dir entry on a dir updates it in place), so once resolved a parent
        path stays valid: caching every one by path makes nearly every entry a single dict
        lookup, including the return to a directory after its subdirectories.
        """
        node = self._dirs.get(key)
        if node is not None:
            return node
        node = self.root
        for comp in parts[:-1]:
            children = node.children
            assert children is not None
            child = children.get(comp)
            if child is None:
                child = children[comp] = Node.directory()
            elif child.type is not FileType.DIR:
                raise self._fail(entry, f"parent {ts.display_name(comp)!r} is not a directory")
            node = child
        self._dirs[key] = node
        return node

    def _put(self, entry: ts.TarEntry, parent: Node, name: bytes, node: Node) -> None:
        children = parent.children
        assert children is not None
        old = children.get(name)
        if old is not None and old.type is FileType.DIR:
            raise self._fail(entry, "a non-directory entry replaces a directory")
        children[name] = node

    def add(self, entry: ts.TarEntry) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise self._fail(entry, f"more than {MAX_ENTRIES} entries in the layer")
        kind = entry.kind
        if kind is ts.OTHER:
            return  # GNU sparse, volume headers, …: skipped with their data, as msb does
        # Fast path (this runs once per member, holding the GIL beside the inflate and hash
        # threads): "./usr/bin/x" or "usr/share/" whose parent directory was seen before.
        # ``_dirs`` holds only normalised paths, so a hit means the parent part has no "",
        # "." or ".." component; a path of at most ``_SHORT`` bytes is within every path
        # limit. Anything else goes through ``_place``, which checks it all in order.
        path = entry.name
        if path[:2] == b"./":
            path = path[2:]
        path = path.rstrip(b"/")
        slash = path.rfind(b"/")
        parent = self._dirs.get(path[:slash]) if slash > 0 else self.root if slash < 0 else None
        name = path[slash + 1 :]
        normal: bytes | None = path  # the normalised path, when the fast path knows it
        if parent is None or name in _ODD_NAMES or len(path) > _SHORT:
            place = self._place(entry)
            if place is None:
                return  # "./" — the layer root keeps its defaults
            parent, name = place
            normal = None
        elif (entry.uid | entry.gid) > MAX_ID or entry.mtime > MAX_MTIME:
            raise self._fail(entry, self._out_of_range(entry))
        mode = entry.mode & 0o7777
        if ((kind is ts.REGULAR or kind is ts.SYMLINK) and name.startswith(b".wh.")
                and self._whiteout(entry, parent, name, mode)):
            return
        if kind is ts.REGULAR:
            self._add_file(entry, parent, name, mode)
        elif kind is ts.DIRECTORY:
            node = self._add_directory(entry, parent, name, mode)
            if normal is not None:  # its children find it by one lookup (see _parent)
                self._dirs[normal] = node
        elif kind is ts.HARDLINK:
            self._put(entry, parent, name, self._link_target(entry))
        else:
            self._add_special(entry, parent, name, mode)

    def _place(self, entry: ts.TarEntry) -> tuple[Node, bytes] | None:
        """The parent directory and name of an entry's path (None: the layer root), its
        limits checked."""
        # Fast path for the usual "./usr/bin/x" or "usr/share/" shape: after the leading
        # "./" and trailing "/" go, the plain split has no "", "." or ".." component, so the
        # normalised path, its parent key and its name are slices of it.
        path = entry.name
        if path[:2] == b"./":
            path = path[2:]
        path = path.rstrip(b"/")
        parts = path.split(b"/")
        if b"" in parts or b"." in parts or b".." in parts:
            parts = self._split(entry, entry.name)
            if not parts:
                return None
            length = sum(map(len, parts)) + len(parts) - 1
            key = b"/".join(parts[:-1])
        else:
            length = len(path)
            slash = path.rfind(b"/")
            key = path[:slash] if slash >= 0 else b""
        if length > MAX_PATH:
            raise self._fail(entry, f"path longer than {MAX_PATH} bytes")
        if len(parts) > MAX_DEPTH:
            raise self._fail(entry, f"path deeper than {MAX_DEPTH} components")
        name = parts[-1]
        if len(name) > MAX_NAME:
            raise self._fail(entry, f"file name longer than {MAX_NAME} bytes")
        if entry.uid > MAX_ID or entry.gid > MAX_ID or entry.mtime > MAX_MTIME:
            raise self._fail(entry, self._out_of_range(entry))
        return self._parent(entry, key, parts), name

    def _whiteout(self, entry: ts.TarEntry, parent: Node, name: bytes, mode: int) -> bool:
        """Apply a ``.wh.`` entry (opaque marker or whiteout); False: a plain file after all."""
        if name == b".wh..wh..opq":
            if OPAQUE_XATTR not in parent.xattrs:
                parent.xattrs.append(OPAQUE_XATTR)
            return True
        if name in (b".wh..", b".wh..."):
            raise self._fail(entry, f"whiteout {ts.display_name(name)!r} names no file")
        if len(name) > 4:
            wh = Node(FileType.CHR, mode, entry.uid, entry.gid, entry.mtime)
            self._put(entry, parent, name[4:], wh)
            return True
        return False

    def _add_file(self, entry: ts.TarEntry, parent: Node, name: bytes, mode: int) -> None:
        """A regular file: its data appended to the spool, aligned for the writer."""
        size = entry.size
        if size > MAX_FILE:
            raise self._fail(entry, f"file larger than {MAX_FILE} bytes")
        self._total += size
        if self._total > self._cap:
            raise content_cap_error(self._cap, entry=ts.display_name(entry.name),
                                    layer=self.label)
        node = Node(
            FileType.REG, mode, entry.uid, entry.gid, entry.mtime,
            size=size, content=SpoolExtent(self._offset),
        )
        self._put(entry, parent, name, node)
        if size:
            assert entry.data is not None
            self._offset += entry.data.copy_to(self._write)
            pad = -self._offset % SPOOL_ALIGN
            if pad:  # the writer copies runs of files in one call (write_layer_erofs)
                self._write(_ZEROS[:pad])
                self._offset += pad

    def _add_directory(self, entry: ts.TarEntry, parent: Node, name: bytes, mode: int
                       ) -> Node:
        """A directory entry: a directory already there keeps its children, takes the
        entry's attributes. Returns the directory."""
        children = parent.children
        assert children is not None
        old = children.get(name)
        if old is not None and old.type is FileType.DIR:
            old.mode, old.uid, old.gid, old.mtime = mode, entry.uid, entry.gid, entry.mtime
            old.xattrs = []
            return old
        node = children[name] = Node.directory(mode, entry.uid, entry.gid, entry.mtime)
        return node

    def _add_special(self, entry: ts.TarEntry, parent: Node, name: bytes, mode: int) -> None:
        """A symlink, device node or FIFO."""
        ftype = _SIMPLE_TYPES[entry.kind]
        node = Node(ftype, mode, entry.uid, entry.gid, entry.mtime)
        if ftype is FileType.SYMLINK:
            if len(entry.linkname) > MAX_SYMLINK:
                raise self._fail(entry, f"symlink target longer than {MAX_SYMLINK} bytes")
            node.target = entry.linkname
        elif ftype is FileType.CHR or ftype is FileType.BLK:
            if entry.devmajor > MAX_MAJOR or entry.devminor > MAX_MINOR:
                raise self._fail(
                    entry,
                    f"device number {entry.devmajor}:{entry.devminor} out of range "
                    f"(major ≤ {MAX_MAJOR}, minor ≤ {MAX_MINOR})",
                )
            node.rdev_major, node.rdev_minor = entry.devmajor, entry.devminor
        self._put(entry, parent, name, node)

    @staticmethod
    def _out_of_range(entry: ts.TarEntry) -> str:
        for what, value, most in (("uid", entry.uid, MAX_ID), ("gid", entry.gid, MAX_ID),
                                  ("mtime", entry.mtime, MAX_MTIME)):
            if value > most:
                return f"{what} {value} out of range (at most {most})"
        raise AssertionError("called for an entry whose numbers are in range")

    def _link_target(self, entry: ts.TarEntry) -> Node:
        parts = self._split(entry, entry.linkname)
        node: Node | None = self.root
        for comp in parts:
            node = node.child(comp) if node is not None else None
        if node is None or not parts:
            raise self._fail(
                entry,
                f"hardlink target {ts.display_name(entry.linkname)!r} does not exist in this layer",
            )
        if node.type is not FileType.REG:
            raise self._fail(
                entry,
                f"hardlink target {ts.display_name(entry.linkname)!r} is not a regular file",
            )
        return node


def ingest_layer(
    blob: BinaryIO,
    *,
    compression: Compression,
    expected_diff_id: Digest | None,
    spool: BinaryIO,
    layer_label: str,
) -> IngestedLayer:
    """Read one layer blob into a tree; file bytes go to ``spool`` (a file opened ``wb+``),
    each followed by zeros up to the next multiple of ``SPOOL_ALIGN`` in the spool (what
    ``write_layer_erofs(..., padded_spool=True)`` relies on).

    Raises ``LayerFormatError`` (bad compression, bad tar, a §3.12 rule or limit broken)
    or ``DigestMismatch`` (decompressed stream ≠ ``expected_diff_id``). The digest is
    checked after the whole stream was read, so on mismatch the tree is discarded.
    """
    hasher = expected_diff_id.hasher() if expected_diff_id is not None else hashlib.sha256()
    cap = content_cap()
    stream = _PrefetchingStream(
        decompressed_chunks(blob, compression, layer_label), hasher, layer_label, cap
    )
    reader = ts.TarReader(stream)
    builder = _Builder(spool, layer_label, cap)
    try:
        for entry in reader:
            builder.add(entry)
        reader.drain()
    except LayerFormatError as e:
        if e.layer is not None:
            raise
        err = LayerFormatError(str(e), layer=layer_label)
        err.entry = e.entry
        raise err from None
    finally:
        stream.close()
    algorithm = expected_diff_id.algorithm if expected_diff_id is not None else "sha256"
    diff_id = Digest(algorithm, stream.hexdigest)
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise DigestMismatch(f"layer {layer_label} diff_id", str(expected_diff_id), str(diff_id))
    return IngestedLayer(builder.root, diff_id, stream.count, builder.entries)
