"""The view as data: a snapshot of the cache → a tree of virtual nodes.

Two halves, kept apart on purpose:

* ``scan_cache`` does the I/O: it indexes the references (``cache.index``), stats every
  artifact and checks its validity (msb's rule), and asks ``cachefs.derived_check`` (the
  one place for those checks, shared with pull, verify and ``cachefs images``) about each
  manifest's fsmeta (superblock crc, device table against the layer files); its VMDK
  must exist (msb's rule).
  Results are memoised by file identity, so a poll every half second costs a few ``stat``
  calls, not a re-read of every image.
* ``build_tree`` is a pure function of that ``CacheSnapshot``; the FUSE layer only serves
  what it returns, and tests can exercise every status text without mounting anything.

Layout: DESIGN.md "The view".
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

from ..cache.health import account_bytes, downloads_in_flight
from ..cache.index import IndexedImage, index_images
from ..cache.locks import LEASE_DIR
from ..cache.store import GlobalCache
from ..digest import Digest
from ..errors import CachefsError
from ..share.provenance import CONVERTED, fetched_layers
from ..vmdk import render_descriptor

BLOCK = 4096
K = TypeVar("K")
V = TypeVar("V")

# ---------------------------------------------------------------------------------------
# Snapshot of cache state (the model's input)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Artifact:
    """One cache file as the scan found it. ``problem`` is None when it is usable."""

    path: Path
    exists: bool
    size: int = 0
    mtime_ns: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.exists and self.problem is None


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """Everything ``build_tree`` and the status renderers need, gathered in one scan."""

    cache_root: Path
    images: list[IndexedImage]
    layers: Mapping[str, Artifact]  # diff_id → layer file (every *.erofs plus referenced ones)
    fsmeta: Mapping[str, Artifact]  # manifest digest → fsmeta file
    metadata_mtime_ns: Mapping[str, int]  # normalised reference → mtime of its json
    bytes_by_kind: Mapping[str, int] = field(default_factory=dict)
    downloads: Mapping[str, int] = field(default_factory=dict)  # tmp/*.part name → size
    problems: list[str] = field(default_factory=list)  # cache-wide (e.g. msb.db unreadable)
    taken_at_ns: int = 0
    # Why the view cannot take msb leases on what it serves (read-only cache, another
    # user's lease files), or None. Disks are still served; deleters just cannot see it.
    lease_problem: str | None = None
    fetched_layers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # as EROFS
    # manifest digest → (artifact, text) of what ``cache.health`` finds wrong with its
    # fsmeta and VMDK (empty: both are what the layers need).
    derived: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


class _Memo(Generic[K, V]):
    """Verdicts keyed by file identities; thread-safe (scans run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memo: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._memo.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            if len(self._memo) > 100_000:
                self._memo.clear()
            self._memo[key] = value


_MEMO: _Memo[tuple[str, int, int, int, int], Artifact] = _Memo()
_DERIVED: _Memo[tuple[object, ...], tuple[tuple[str, str], ...]] = _Memo()


def _check_erofs(path: Path) -> Artifact:
    """Stat ``path`` and judge it by msb's rule (memoised). Never raises: problems become
    text. (An fsmeta's deeper checks are ``_derived_problems``.)"""
    from ..erofs.reader import is_valid_erofs

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Artifact(path, exists=False, problem="missing")
    except OSError as err:
        return Artifact(path, exists=False, problem=f"cannot stat: {err.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return Artifact(path, True, st.st_size, st.st_mtime_ns, problem="not a regular file")
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _MEMO.get(key)
    if cached is not None:
        return cached
    art = Artifact(path, True, st.st_size, st.st_mtime_ns)
    if not os.access(path, os.R_OK):
        art = Artifact(path, True, st.st_size, st.st_mtime_ns,
                       problem=f"not readable by the view (user {_user()})")
    elif not is_valid_erofs(path):
        art = Artifact(path, True, st.st_size, st.st_mtime_ns,
                       problem="corrupt (not a valid EROFS image)")
    _MEMO.put(key, art)
    return art


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _derived_problems(cache: GlobalCache, manifest: str, layers: list[str]
                      ) -> tuple[tuple[str, str], ...]:
    """``cache.health``'s verdict on the fsmeta and VMDK of ``manifest`` given its layer
    files as they are now, as (artifact, text) pairs (memoised by the identity of every
    file involved): the same checks ``cachefs images``, ``status`` and ``verify`` make."""
    from ..cache.health import derived_problems

    fsmeta = cache.fsmeta_erofs_path(manifest)
    vmdk = cache.vmdk_path(manifest)
    paths = [cache.layer_erofs_path(d) for d in layers]
    key = (str(fsmeta), _identity(fsmeta), _identity(vmdk),
           *((str(p), _identity(p)) for p in paths))
    cached = _DERIVED.get(key)
    if cached is not None:
        return cached
    result = tuple(
        (p.artifact, f"{p.artifact} {p.message}: {p.artifact}/{(p.path or fsmeta).name}")
        for p in derived_problems(cache, manifest, paths))
    _DERIVED.put(key, result)
    return result


def _dir_entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:
        return []


def scan_cache(cache: GlobalCache, msb_db: Path | None = None,
               previous: CacheSnapshot | None = None, *,
               db_required: bool = False) -> CacheSnapshot:
    """Read the cache's current state (blocking I/O: run it in a worker thread).

    ``previous``: a snapshot whose references are known to be current (the caller saw no
    change to the reference records, metadata files or msb's database since it was
    taken). Its index is reused (reading every metadata file is most of a scan); the
    artifacts, byte counts and downloads are read afresh. ``db_required``: an unreadable
    msb database raises ``MsbDbUnreadable`` rather than reading as empty (the refresher
    decides which, ``Refresher.scan``).
    """
    problems: list[str] = []
    if previous is None:
        images = index_images(cache, msb_db, problems, db_required=db_required)
    else:
        images = previous.images
        problems = list(previous.problems)

    layers: dict[str, Artifact] = {}
    for entry in _dir_entries(cache.layers_dir()):
        name = entry.name
        if name.endswith(".erofs"):
            digest = _digest_from_name(name[: -len(".erofs")])
            if digest is not None:
                layers[digest] = _check_erofs(Path(entry.path))
    # Bytes and downloads: cache.health's numbers, the same `cachefs df` shows.
    bytes_by_kind = account_bytes(cache).bytes_by_kind
    downloads = downloads_in_flight(cache)

    fsmeta: dict[str, Artifact] = {}
    derived: dict[str, tuple[tuple[str, str], ...]] = {}
    metadata_mtime: dict[str, int] = {}
    for img in images:
        for diff in img.layers:
            if diff not in layers:
                layers[diff] = _check_erofs(cache.layer_erofs_path(diff))
        if img.manifest_digest and img.manifest_digest not in fsmeta:
            fsmeta[img.manifest_digest] = fm = _check_erofs(
                cache.fsmeta_erofs_path(img.manifest_digest))
            if fm.ok and all(layers[d].ok for d in img.layers):
                derived[img.manifest_digest] = _derived_problems(
                    cache, img.manifest_digest, img.layers)
        if previous is not None:
            known = previous.metadata_mtime_ns.get(str(img.reference))
            if known is not None:
                metadata_mtime[str(img.reference)] = known
            continue
        try:
            metadata_mtime[str(img.reference)] = img.metadata_path.stat().st_mtime_ns
        except OSError:
            pass
    return CacheSnapshot(
        lease_problem=lease_problem(cache),
        cache_root=cache.root,
        images=images,
        layers=layers,
        fsmeta=fsmeta,
        metadata_mtime_ns=metadata_mtime,
        bytes_by_kind=bytes_by_kind,
        downloads=downloads,
        problems=problems,
        taken_at_ns=time.time_ns(),
        fetched_layers=fetched_layers(cache),
        derived=derived,
    )


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())


def lease_problem(cache: GlobalCache) -> str | None:
    """Can the view take leases on the disk files it serves? (None: yes.)

    A lease is an flock on ``<dir>/.msb-leases/<hash>.lock``; the view creates that file
    if missing, so the lease directory (or, before it exists, the artifact directory)
    must be writable for the daemon.
    """
    for directory in (cache.layers_dir(), cache.fsmeta_dir()):
        lease_dir = directory / LEASE_DIR
        target = lease_dir if lease_dir.is_dir() else directory
        if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
            return (f"cannot create leases: {target} is not writable by the view (user "
                    f"{_user()}); a disk file whose lease file does not exist yet is "
                    f"served without one, unseen by msb image rm and cachefs rm/gc")
    return None


def _digest_from_name(stem: str) -> str | None:
    """``sha256_<hex>`` → ``sha256:<hex>`` (the inverse of ``Digest.path_safe``)."""
    algo, sep, encoded = stem.partition("_")
    if not sep:
        return None
    try:
        return str(Digest.parse(f"{algo}:{encoded}"))
    except CachefsError:
        return None


# ---------------------------------------------------------------------------------------
# Virtual nodes (the model's output)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirNode:
    children: Mapping[str, Node]
    mtime_ns: int
    # An image's own directory: the kernel re-asks for it at every path walk, so a
    # removed image is gone at once (see ``ViewOperations.lookup``).
    image: bool = False


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    """Opt-in (``cachefs mount --symlinks``): ``fsmeta.erofs``/``layers/*`` as links to the
    cache files, so a VMM running as the cache's owner reads them without FUSE (FUSE's
    page cache is 4 KiB pages: warm reads at about half the speed). No lease is held for a
    reader of a link, and a user who may not enter the cache cannot follow it."""

    target: str
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class BytesNode:
    """A generated file whose content is fixed for this snapshot (never cached by the kernel)."""

    content: bytes
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class DocNode:
    """A generated document rendered at open (and for its size), never kept rendered.

    ``image.json`` lists every reference of its manifest: kept rendered, one image with
    N tags would hold N documents of N names each (quadratic; 6,000 tags took 1.67 GB).
    ``key`` says when the content changed (for invalidation); ``render`` is not compared.
    """

    render: Callable[[], bytes] = field(compare=False)
    key: object
    mtime_ns: int
    size: int  # of what ``render`` returns, known without rendering it


@dataclass(frozen=True, slots=True)
class RefsBlock:
    """The ``references`` of one manifest, encoded once for all of its images' image.json
    (shared, so memory stays linear in the number of names)."""

    text: str  # as ``json.dumps(refs, indent=2)`` prints it one level deep
    nbytes: int
    key: int

    @classmethod
    def of(cls, refs: list[str]) -> RefsBlock:
        text = json.dumps(refs, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        return cls(text, len(text.encode()), hash(tuple(refs)))


# Stands in for the references while the rest of image.json is encoded; a NUL cannot
# occur in a reference, and the random part keeps it out of any config text.
_REFS_TOKEN = f"\0refs-{os.urandom(8).hex()}\0"
_REFS_TOKEN_JSON = json.dumps(_REFS_TOKEN)
_REFS_TOKEN_BYTES = len(_REFS_TOKEN_JSON.encode())


@dataclass(frozen=True, slots=True)
class LiveNode:
    """A file rendered at open time from a fresh scan (``status.json``, ``metrics``)."""

    kind: Literal["status.json", "metrics"]
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ConcatNode:
    """A disk file served from cache artifacts: the byte concatenation of ``parts``.

    ``rootfs.img`` has fsmeta and every layer; ``fsmeta.erofs`` and each layer file have
    one part. All are served by FUSE reads with the daemon's rights (a VMM running as
    another user cannot follow a path into a private cache) and a lease held while open.
    The parts are content-addressed cache files, immutable while they exist, so the
    kernel may cache the pages.
    """

    parts: tuple[tuple[Path, int], ...]
    mtime_ns: int

    @property
    def size(self) -> int:
        return sum(size for _, size in self.parts)


Node = DirNode | SymlinkNode | BytesNode | DocNode | LiveNode | ConcatNode


@dataclass(frozen=True, slots=True)
class ImageState:
    """The verdict on one image: usable parts and what is wrong with the rest."""

    ready: bool
    problems: list[tuple[str, str]]  # (what is wrong, command that fixes it)
    # The view's own disks (rootfs.img, disk.vmdk with relative extents) are correct:
    # fsmeta and every layer are sound. msb's VMDK is not part of them, so a missing or
    # stale one (a moved cache) makes the image not ready without hiding working disks.
    disks: bool = False


README = """\
cachefs view of an msb image cache (read-only)
================================================

images/<reference>/      one directory per image reference, e.g.
                         images/docker.io/library/alpine:3.20/
  disk.vmdk              VMDK descriptor; extents are relative to this directory,
                         so it keeps working when the cache moves:
                           qemu-system-x86_64 -drive file=<dir>/disk.vmdk,format=vmdk,readonly=on
  rootfs.img             the same disk as one raw file (fsmeta followed by the layers),
                         for VMMs without VMDK support (e.g. -drive format=raw)
  fsmeta.erofs           the merged metadata EROFS (read-only, served from the cache)
  layers/NN-<diff>.erofs the layer EROFS images, bottom first (read-only)
  manifest.json          the image manifest, as stored by msb
  config.json            the image config blob
  image.json             reference, digests, parsed config, layers with sizes and state
  status                 "ready", or what is missing or corrupt and the command to fix it
by-digest/<manifest>/    the same directories, named by manifest digest
layers/<diff>.erofs      every layer image in the cache
status.json, metrics     cache-wide state (JSON, Prometheus text), generated on read

disk.vmdk and rootfs.img appear only when fsmeta and every layer are valid (msb's own
vmdk/ file is not part of them: a missing or stale one makes status say not ready).
Mount the disk inside the guest as EROFS: mount -t erofs -o ro /dev/vdX /mnt
"""


def judge_image(img: IndexedImage, snap: CacheSnapshot) -> ImageState:
    """Is every artifact of ``img`` present and valid, and consistent with each other?"""
    ref = str(img.reference)
    pull = f"cachefs pull {ref}"
    repair = f"cachefs verify --repair {ref}"
    problems: list[tuple[str, str]] = []
    if img.metadata is None:
        what = "corrupt" if str(img.reference) in snap.metadata_mtime_ns else "missing"
        problems.append((f"image metadata {what}: manifests/{img.metadata_path.name}", pull))
    if not img.layers and img.metadata is not None:
        problems.append(("image has no layers", pull))
    for i, diff in enumerate(img.layers):
        art = snap.layers.get(diff)
        if art is None or not art.exists:
            problems.append((f"layer {i} {diff} missing: layers/{_safe(diff)}.erofs", pull))
        elif art.problem:
            # A layer is made from its blob, which the cache does not keep: only fetching
            # it again (pull, or load of its archive) rebuilds it; verify --repair cannot.
            problems.append((f"layer {i} {diff} {art.problem}: layers/{_safe(diff)}.erofs",
                             _fix_for(art, f"{pull} (or cachefs load <archive> again, for "
                                           "a loaded image)")))
    if img.manifest_digest is None:
        problems.append(("manifest digest unknown", pull))
    else:
        fm = snap.fsmeta.get(img.manifest_digest)
        rel = f"fsmeta/{_safe(img.manifest_digest)}.erofs"
        if fm is None or not fm.exists:
            problems.append((f"fsmeta missing: {rel}", repair))
        elif fm.problem:
            problems.append((f"fsmeta {fm.problem}: {rel}", _fix_for(fm, repair)))
        else:
            # fsmeta and VMDK are derived from the layers: verify --repair rebuilds them.
            derived = snap.derived.get(img.manifest_digest, ())
            problems += [(what, repair) for _, what in derived]
            disk_faults = len(problems) - sum(kind == "vmdk" for kind, _ in derived)
            return ImageState(ready=not problems, problems=problems, disks=not disk_faults)
    return ImageState(ready=not problems, problems=problems)


def _fix_for(art: Artifact, repair: str) -> str:
    if art.problem is not None and art.problem.startswith("not readable"):
        return (f"let user {_user()} read {art.path.parent} (or run the view as the "
                f"cache's owner)")
    return repair


def status_text(img: IndexedImage, state: ImageState, lease_note: str | None = None) -> str:
    """``ready`` (first line) or what is wrong; a lease problem is a note, not a fault."""
    if state.ready:
        return "ready\n" if lease_note is None else f"ready\nnote: {lease_note}\n"
    lines = [f"not ready: {img.reference}"]
    lines += [f"  {what}" for what, _ in state.problems]
    fixes = list(dict.fromkeys(fix for _, fix in state.problems))
    lines += [f"fix: {fix}" for fix in fixes]
    return "\n".join(lines) + "\n"


def _safe(digest: str) -> str:
    return Digest.parse(digest).path_safe()


def layer_link_name(index: int, count: int, diff: str) -> str:
    """``NN-sha256_<hex>.erofs``: two digits, more when the image has over 99 layers."""
    width = max(2, len(str(count - 1)))
    return f"{index:0{width}d}-{_safe(diff)}.erofs"


def _disk_file(art: Artifact, links: bool) -> Node:
    """One artifact as the view serves it: a FUSE file (default) or a link to it."""
    if links:
        return SymlinkNode(str(art.path), art.mtime_ns)
    return ConcatNode(((art.path, art.size),), art.mtime_ns)


def _image_dir(
    img: IndexedImage, refs: RefsBlock, snap: CacheSnapshot, links: bool = False,
) -> tuple[DirNode, ImageState]:
    """One image's directory. Its documents are ``DocNode``s: rendered on read, so the
    tree's memory is linear in the number of names however many tags share a manifest."""
    state = judge_image(img, snap)
    meta = img.metadata
    mtime = snap.metadata_mtime_ns.get(str(img.reference), snap.taken_at_ns)
    children: dict[str, Node] = {}
    fm = snap.fsmeta.get(img.manifest_digest) if img.manifest_digest else None
    if fm is not None and fm.exists and fm.problem is None:
        children["fsmeta.erofs"] = _disk_file(fm, links)
    layer_files: dict[str, Node] = {}
    for i, diff in enumerate(img.layers):
        art = snap.layers.get(diff)
        if art is not None and art.ok:
            name = layer_link_name(i, len(img.layers), diff)
            layer_files[name] = _disk_file(art, links)
    children["layers"] = DirNode(layer_files, mtime)
    if meta is not None:
        raw_manifest, raw_config = meta.raw_manifest_json, meta.raw_config_json
        children["manifest.json"] = DocNode(raw_manifest.encode, ("m", mtime), mtime,
                                            len(raw_manifest.encode()))
        children["config.json"] = DocNode(raw_config.encode, ("c", mtime), mtime,
                                          len(raw_config.encode()))
    disk_size: int | None = None
    if state.disks and fm is not None:
        files = [("fsmeta.erofs", fm.size)]
        parts = [(fm.path, fm.size)]
        for i, diff in enumerate(img.layers):
            art = snap.layers[diff]
            files.append((f"layers/{layer_link_name(i, len(img.layers), diff)}", art.size))
            parts.append((art.path, art.size))
        newest = max(mtime, *(snap.layers[d].mtime_ns for d in img.layers), fm.mtime_ns)
        children["disk.vmdk"] = BytesNode(render_descriptor(files).encode(), newest)
        # Only the artifacts' own mtimes: the content is theirs, and a retag (a new
        # metadata file) must not change the attributes, or the kernel would drop the
        # cached pages of an unchanged disk (FUSE_AUTO_INVAL_DATA compares mtimes).
        data_mtime = max(fm.mtime_ns, *(snap.layers[d].mtime_ns for d in img.layers))
        rootfs = ConcatNode(tuple(parts), data_mtime)
        children["rootfs.img"] = rootfs
        disk_size = rootfs.size

    def render_image_json() -> bytes:
        text = _image_json(img, state, snap, disk_size)
        return text.replace(_REFS_TOKEN_JSON, refs.text, 1).encode()

    key = (mtime, refs.key, state, disk_size,
           tuple(_state_word(snap.layers.get(d)) for d in img.layers),
           tuple(_origin(snap, d) for d in img.layers),
           None if fm is None else (fm.size, _state_word(fm)))
    size = (len(_image_json(img, state, snap, disk_size).encode()) - _REFS_TOKEN_BYTES
            + refs.nbytes)
    children["image.json"] = DocNode(render_image_json, key, mtime, size)
    children["status"] = BytesNode(status_text(img, state, snap.lease_problem).encode(), mtime)
    return DirNode(children, mtime, image=True), state


def _origin(snap: CacheSnapshot, diff: str) -> str:
    """Where the layer came from: converted from its tar, or fetched as EROFS."""
    return snap.fetched_layers.get(diff, {}).get("origin", CONVERTED)


def _image_json(img: IndexedImage, state: ImageState, snap: CacheSnapshot,
                disk_size: int | None) -> str:
    """image.json with ``_REFS_TOKEN`` where the references go."""
    meta = img.metadata
    fm = snap.fsmeta.get(img.manifest_digest) if img.manifest_digest else None
    layer_docs = []
    for i, diff in enumerate(img.layers):
        art = snap.layers.get(diff)
        lm = meta.layers[i] if meta is not None and i < len(meta.layers) else None
        layer_docs.append({
            "index": i,
            "diff_id": diff,
            "digest": lm.digest if lm else None,
            "media_type": lm.media_type if lm else None,
            "compressed_size": lm.size_bytes if lm else None,
            "erofs_size": art.size if art is not None and art.exists else None,
            "path": f"layers/{layer_link_name(i, len(img.layers), diff)}",
            "state": _state_word(art),
            "origin": _origin(snap, diff),
        })
    doc = {
        "reference": str(img.reference),
        "typed": img.typed,
        "references": _REFS_TOKEN,
        "manifest_digest": img.manifest_digest,
        "config_digest": meta.config_digest if meta else None,
        "ready": state.ready,
        "problems": [{"problem": what, "fix": fix} for what, fix in state.problems],
        "leases": snap.lease_problem or "held while a disk file is open",
        "sources": sorted(img.sources),
        "config": _parsed_config(meta.raw_config_json) if meta else None,
        "runtime_config": meta.config.model_dump() if meta else None,
        "fsmeta": None if fm is None else {
            "path": "fsmeta.erofs",
            "size": fm.size if fm.exists else None,
            "state": _state_word(fm),
        },
        "layers": layer_docs,
        "disk_size": disk_size,
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _state_word(art: Artifact | None) -> str:
    if art is None or not art.exists:
        return "missing"
    return "ok" if art.problem is None else art.problem


def _parsed_config(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


# names below images/: a directory is a nested dict until _freeze turns it into a DirNode
_NameTree = dict[str, "_NameTree | Node"]


def _insert(root: _NameTree, parts: list[str], node: Node) -> None:
    """Place ``node`` at ``parts`` below ``root`` (a nested dict of names)."""
    cur = root
    for name in parts[:-1]:
        nxt = cur.setdefault(name, {})
        if not isinstance(nxt, dict):  # a file where a directory should be: keep the file
            return
        cur = nxt
    cur.setdefault(parts[-1], node)


def _freeze(tree: _NameTree, mtime: int) -> DirNode:
    children: dict[str, Node] = {}
    for name, value in sorted(tree.items()):
        children[name] = _freeze(value, mtime) if isinstance(value, dict) else value
    newest = max((c.mtime_ns for c in children.values()), default=mtime)
    return DirNode(children, newest)


def _path_components(text: str) -> list[str] | None:
    parts = text.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def build_tree(snap: CacheSnapshot, *, links: bool = False) -> DirNode:
    """The whole view for one snapshot. Pure: same snapshot, same tree. ``links``:
    fsmeta and layer files as symlinks into the cache (``SymlinkNode``)."""
    now = snap.taken_at_ns
    by_manifest: dict[str, list[str]] = {}
    for img in snap.images:
        if img.manifest_digest:
            by_manifest.setdefault(img.manifest_digest, []).append(str(img.reference))
    # One encoded list (and change key) per manifest, shared by all of its images.
    shared = {digest: RefsBlock.of(refs) for digest, refs in by_manifest.items()}

    images: _NameTree = {}
    by_digest: dict[str, Node] = {}
    for img in snap.images:
        refs = shared.get(img.manifest_digest or "") or RefsBlock.of([str(img.reference)])
        node, _ = _image_dir(img, refs, snap, links)
        parts = _path_components(str(img.reference))
        if parts is not None:
            _insert(images, parts, node)
        if img.manifest_digest:
            by_digest.setdefault(_safe(img.manifest_digest), node)
            # the digest as every tool prints it (sha256:<hex>): a link to the safe name
            by_digest.setdefault(img.manifest_digest,
                                 SymlinkNode(_safe(img.manifest_digest), now))

    layer_files: dict[str, Node] = {
        f"{_safe(diff)}.erofs": _disk_file(art, links)
        for diff, art in sorted(snap.layers.items())
        if art.ok
    }
    root: dict[str, Node] = {
        "README": BytesNode(README.encode(), 0),
        "status.json": LiveNode("status.json", now),
        "metrics": LiveNode("metrics", now),
        "images": _freeze(images, now),
        "by-digest": DirNode(dict(sorted(by_digest.items())), now),
        "layers": DirNode(layer_files, now),
    }
    return DirNode(root, now)


def image_states(snap: CacheSnapshot) -> Iterable[tuple[IndexedImage, ImageState]]:
    """Every image with its verdict (for the status renderers)."""
    for img in snap.images:
        yield img, judge_image(img, snap)


def walk(node: Node, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Node]]:
    """Every (path, node) in the tree, parents before children."""
    yield prefix, node
    if isinstance(node, DirNode):
        for name, child in node.children.items():
            yield from walk(child, (*prefix, name))


def resolve(root: DirNode, path: tuple[str, ...]) -> Node | None:
    node: Node = root
    for name in path:
        if not isinstance(node, DirNode):
            return None
        child = node.children.get(name)
        if child is None:
            return None
        node = child
    return node
