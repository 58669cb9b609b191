"""Is an image usable, what is wrong with it, and where are the cache's bytes? One place.

``cachefs images``, ``cachefs status``/``status.json``/``metrics`` (the view), ``df`` and
``verify`` each answered these questions with their own code, and the answers drifted:
``images`` said *ready* about an fsmeta the kernel refuses, ``df`` counted a
``tmp/*.work`` directory that ``status.json`` left out, and a stale ``.part`` counted as
a download in flight with nothing running. Here each answer is computed once:

* ``image_problems``: every cheap check of one image (metadata, each layer by msb's rule,
  the fsmeta's superblock and device table and the VMDK's extents via
  ``derived_check``), as typed ``Problem``s that name the command fixing them; an image
  is ready when the list is empty (``verify`` adds a full metadata walk on top);
* ``account_bytes``: bytes and files by kind (transient files of every form are ``tmp``);
* ``downloads_in_flight``: a ``tmp/<blob>.part`` counts only while its download lock is
  held, which is what "in flight" means (a dead pull leaves the file, not the lock).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..derived_check import (
    device_table_problems,
    one_line,
    superblock_problems,
    vmdk_problems,
)
from ..errors import CachefsError
from .catalog import ImageInfo, metadata_path
from .locks import LEASE_DIR, is_lock_entry, lock_is_busy
from .store import GlobalCache

KINDS = ("layers", "fsmeta", "vmdk", "manifests", "tmp")

Artifact = Literal["metadata", "layer", "fsmeta", "vmdk"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing that keeps an image from being used, and what fixes it.

    ``repairable``: derived from the layers alone (fsmeta, VMDK), so ``verify --repair``
    rebuilds it; otherwise only fetching the image again (``pull``/``load``) does.
    """

    artifact: Artifact
    path: Path | None
    message: str
    repairable: bool
    diff_id: str | None = None  # layer problems only

    @property
    def label(self) -> str:
        """``layer sha256:…``, ``fsmeta``, … (what verify prints before the message)."""
        return f"layer {self.diff_id}" if self.diff_id is not None else self.artifact

    def fix(self, reference: str) -> str:
        """The command that fixes it, for the image named ``reference``."""
        if self.repairable:
            return f"cachefs verify --repair {reference}"
        return f"cachefs pull {reference} (or cachefs load <archive> again, for a loaded image)"


def layer_problems(path: Path) -> list[str]:
    """msb's validity rule for a layer file (§1.7); [] when it holds."""
    from ..erofs.reader import is_valid_erofs

    try:
        os.stat(path)
    except FileNotFoundError:
        return ["missing"]
    except OSError as err:
        return [f"cannot stat: {err.strerror}"]
    if not os.access(path, os.R_OK):
        return ["not readable by this user"]
    if not is_valid_erofs(path):
        return ["not a valid EROFS image (msb would rebuild it)"]
    return []


def image_problems(cache: GlobalCache, metadata_path: Path, has_metadata: bool,
                   manifest_digest: str | None, diff_ids: Sequence[str], *,
                   deep: bool = False) -> list[Problem]:
    """Every check of one image; [] means ready (usable by msb and by a guest).

    Cheap by default (msb's rule for layers, ``derived_check`` for the fsmeta and VMDK:
    a few blocks read per image); ``deep`` (``verify``) also reads each EROFS's superblock
    checksum and walks its whole metadata. fsmeta and VMDK problems are ``repairable``
    only when every layer is sound: they are rebuilt from the layers.
    """
    problems: list[Problem] = []
    if not has_metadata:
        problems.append(Problem("metadata", metadata_path,
                                "image metadata is missing or does not parse as msb reads it",
                                False))
    layer_paths = [cache.layer_erofs_path(d) for d in diff_ids]
    for diff_id, path in zip(diff_ids, layer_paths, strict=True):
        texts = layer_problems(path)
        if deep and not texts:
            texts = erofs_walk_problems(path, devices=0)
        problems += [Problem("layer", path, text, False, diff_id) for text in texts]
    if manifest_digest is None:
        unknown = "unknown: no manifest digest (pull or load the image again)"
        return [*problems, Problem("fsmeta", None, unknown, False),
                Problem("vmdk", None, unknown, False)]
    return problems + derived_problems(cache, manifest_digest, layer_paths,
                                       layers_ok=not problems, deep=deep)


def derived_problems(cache: GlobalCache, manifest_digest: str, layer_paths: Sequence[Path],
                     *, layers_ok: bool = True, deep: bool = False) -> list[Problem]:
    """The fsmeta's superblock and device table and the VMDK's extents, against the layer
    files as they are now (the part of the verdict a caller that has judged the layers
    itself, such as the view with its memo, still needs)."""
    fsmeta = cache.fsmeta_erofs_path(manifest_digest)
    vmdk = cache.vmdk_path(manifest_digest)
    texts = superblock_problems(fsmeta, devices=len(layer_paths))
    if deep and not texts:
        texts = erofs_walk_problems(fsmeta, devices=len(layer_paths))
    texts = texts or device_table_problems(fsmeta, layer_paths)
    problems = [Problem("fsmeta", fsmeta, text, layers_ok) for text in texts]
    problems += [Problem("vmdk", vmdk, text, layers_ok)
                 for text in vmdk_problems(vmdk, [fsmeta, *layer_paths])]
    return problems


def info_problems(cache: GlobalCache, info: ImageInfo, *, deep: bool = False) -> list[Problem]:
    """``image_problems`` of one catalogue entry."""
    return image_problems(cache, metadata_path(cache, info), info.metadata is not None,
                          info.digest, info.diff_ids, deep=deep)


def missing_labels(problems: Iterable[Problem]) -> list[str]:
    """``metadata``, ``layer <diff_id>``, ``fsmeta``, ``vmdk``: each part with a problem,
    once, in image order (the ``missing`` column of ``cachefs images``)."""
    return list(dict.fromkeys(p.label for p in problems))


def erofs_walk_problems(path: Path, *, devices: int | None = 0) -> list[str]:
    """The superblock checks, then a walk of every inode and directory block."""
    from ..erofs.reader import ErofsImage

    problems = superblock_problems(path, devices=devices)
    if problems:
        return problems
    try:
        with ErofsImage.open(path) as image:
            for _ in image.walk():
                pass
    except (CachefsError, OSError) as err:
        problems.append(f"unreadable: {one_line(err)}")
    return problems


# ---------------------------------------------------------------------------------------
# bytes by kind
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class ByteAccount:
    """Apparent sizes (``st_size``) and file counts by kind (``KINDS``)."""

    bytes_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    files_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def total(self) -> int:
        return sum(self.bytes_by_kind.values())

    def add(self, kind: str, size: int) -> None:
        self.bytes_by_kind[kind] += size
        self.files_by_kind[kind] += 1


def _kind_of(name: str, directory: str) -> str | None:
    """The kind of ``<directory>/<name>``; None for lock files (zero bytes, never data)."""
    if is_lock_entry(name):
        return None
    if name.endswith(".part") or (directory == "layers" and name.endswith(".tar.gz")):
        return "tmp"  # a download or a publish under way (or abandoned): not cache content
    return directory


def _regular_size(entry: os.DirEntry[str]) -> int | None:
    try:
        if not entry.is_file(follow_symlinks=False):
            return None
        return entry.stat(follow_symlinks=False).st_size
    except OSError:
        return None


def _walk_files(directory: Path, account: ByteAccount, kind: str) -> None:
    """Every regular file below ``directory`` (a ``*.work`` directory's files too), less
    lock files and lease directories."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if d != LEASE_DIR]
        for name in filenames:
            if is_lock_entry(name):
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            account.add(kind, st.st_size)


def account_bytes(cache: GlobalCache) -> ByteAccount:
    """Where the cache's bytes are: ``layers``, ``fsmeta``, ``vmdk``, ``manifests``, and
    ``tmp`` (``tmp/`` recursively, ``layers/*.tar.gz`` and any ``*.part``)."""
    account = ByteAccount()
    for directory in ("layers", "fsmeta", "vmdk", "manifests"):
        try:
            with os.scandir(cache.root / directory) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            kind = _kind_of(entry.name, directory)
            size = _regular_size(entry) if kind is not None else None
            if kind is not None and size is not None:
                account.add(kind, size)
    _walk_files(cache.tmp_dir(), account, "tmp")
    return account


def downloads_in_flight(cache: GlobalCache) -> dict[str, int]:
    """``tmp/<blob>.part`` name → bytes so far, for the downloads running now: those
    whose download lock (``tmp/<blob>.download.lock``) someone holds."""
    out: dict[str, int] = {}
    tmp = cache.tmp_dir()
    try:
        with os.scandir(tmp) as it:
            entries = [e for e in it if e.name.endswith(".part")
                       and not e.name.endswith(".erofs.part")]
    except OSError:
        return out
    for entry in entries:
        size = _regular_size(entry)
        lock = tmp / f"{entry.name[: -len('.part')]}.download.lock"
        if size is not None and _held(lock):
            out[entry.name] = size
    return out


def _held(lock: Path) -> bool:
    try:
        return lock_is_busy(lock)
    except OSError:  # a lock file this user cannot open cannot be probed: not ours to say
        return False


__all__ = [
    "KINDS",
    "ByteAccount",
    "Problem",
    "account_bytes",
    "derived_problems",
    "downloads_in_flight",
    "erofs_walk_problems",
    "image_problems",
    "info_problems",
    "layer_problems",
    "missing_labels",
]
