"""Content digests as OCI and msb spell them.

A ``Digest`` is validated once at the edge, so everything inside can trust it; the
``path_safe`` form is what msb uses for file names in the cache (FORMATS.md §1.2).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import DigestError, DigestMismatch

_ALGO_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_ENCODED_RE = re.compile(r"[A-Za-z0-9=_-]+")
_SAFE_BYTE_RE = re.compile(r"[^A-Za-z0-9+.=_-]")
_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """``algorithm:encoded``; only sha256/384/512 are hashable here, others parse only."""

    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algo, sep, encoded = text.partition(":")
        if not sep or not algo or not encoded:
            raise DigestError(f"invalid digest {text!r}: expected 'algorithm:hex'")
        if not _ALGO_RE.fullmatch(algo):
            raise DigestError(f"invalid digest {text!r}: bad algorithm {algo!r}")
        if not _ENCODED_RE.fullmatch(encoded):
            raise DigestError(f"invalid digest {text!r}: bad characters in the encoded part")
        want = _HEX_LENGTHS.get(algo)
        if want is not None and (
            len(encoded) != want or not re.fullmatch(r"[0-9a-f]+", encoded)
        ):
            raise DigestError(f"invalid digest {text!r}: {algo} needs {want} lowercase hex digits")
        return cls(algo, encoded)

    @classmethod
    def sha256_of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hash(cls, h: hashlib._Hash) -> Digest:
        return cls(h.name, h.hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    def path_safe(self) -> str:
        """``sha256:ab…`` → ``sha256_ab…``, each side with unsafe bytes replaced by ``_``."""
        return (
            _SAFE_BYTE_RE.sub("_", self.algorithm) + "_" + _SAFE_BYTE_RE.sub("_", self.encoded)
        )

    @property
    def short(self) -> str:
        return self.encoded[:12]

    def hasher(self) -> hashlib._Hash:
        if self.algorithm not in _HEX_LENGTHS:
            raise DigestError(f"cannot verify {self}: unsupported algorithm {self.algorithm!r}")
        return hashlib.new(self.algorithm)

    def verify_bytes(self, data: bytes, what: str = "content") -> None:
        h = self.hasher()
        h.update(data)
        if h.hexdigest() != self.encoded:
            raise DigestMismatch(what, str(self), f"{self.algorithm}:{h.hexdigest()}")


def sha256_file(path: str, bufsize: int = 1 << 20) -> Digest:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return Digest("sha256", h.hexdigest())
