from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cachefs.digest import Digest, sha256_file
from cachefs.errors import DigestError, DigestMismatch

HEX = "ab" * 32


def test_parse_and_str() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.encoded) == ("sha256", HEX)
    assert str(d) == f"sha256:{HEX}"
    assert d.short == HEX[:12]


@pytest.mark.parametrize(
    "bad",
    ["", "sha256", f"sha256{HEX}", ":abc", "sha256:", f"SHA256:{HEX}", "sha256:abc",
     f"sha256:{HEX.upper()}", "sha256:" + "a" * 63 + "/", "a__b:xyz", "a:b c"],
)
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(DigestError):
        Digest.parse(bad)


def test_other_algorithms_parse_but_cannot_hash() -> None:
    d = Digest.parse("blake3+x.y:AbC=_-")
    assert d.path_safe() == "blake3+x.y_AbC=_-"
    with pytest.raises(DigestError, match="unsupported algorithm"):
        d.hasher()


def test_path_safe() -> None:
    assert Digest.parse(f"sha256:{HEX}").path_safe() == f"sha256_{HEX}"
    # unsafe bytes are replaced per component (FORMATS.md §1.2)
    assert Digest("sha256", "a/b").path_safe() == "sha256_a_b"


def test_verify_bytes(tmp_path: Path) -> None:
    data = b"hello" * 1000
    d = Digest.sha256_of(data)
    d.verify_bytes(data)
    with pytest.raises(DigestMismatch) as info:
        d.verify_bytes(data + b"!", what="blob x")
    assert "blob x" in str(info.value) and str(d) in str(info.value)

    p = tmp_path / "f"
    p.write_bytes(data)
    assert sha256_file(str(p)) == Digest("sha256", hashlib.sha256(data).hexdigest())


def test_ordering_and_hash() -> None:
    a, b = Digest("sha256", "0" * 64), Digest("sha256", "1" * 64)
    assert a < b and len({a, Digest.parse(str(a))}) == 1
