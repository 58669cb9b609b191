from __future__ import annotations

import hashlib

import pytest

from cachefs.errors import InvalidReference
from cachefs.reference import Reference

# FORMATS.md §2.1, every row.
TABLE = [
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/nginx", "docker.io/library/nginx:latest"),
    ("index.docker.io/library/redis:7", "docker.io/library/redis:7"),
    ("user/repo", "docker.io/user/repo:latest"),
    ("localhost/foo", "localhost/foo:latest"),
    ("localhost:5000/bar:1", "localhost:5000/bar:1"),
    ("example.com:8443/ns/sub/img", "example.com:8443/ns/sub/img:latest"),
    ("alpine@sha256:" + "0" * 64, "docker.io/library/alpine@sha256:" + "0" * 64),
    ("alpine:3@sha256:" + "1" * 64, "docker.io/library/alpine:3@sha256:" + "1" * 64),
    ("alpine:V1-Upper", "docker.io/library/alpine:V1-Upper"),
    ("127.0.0.1:5055/fmt/img", "127.0.0.1:5055/fmt/img:latest"),
    ("example.COM/x", "example.COM/x:latest"),
]


@pytest.mark.parametrize(("typed", "normalised"), TABLE)
def test_normalisation_table(typed: str, normalised: str) -> None:
    ref = Reference.parse(typed)
    assert str(ref) == normalised
    assert ref.cache_key == hashlib.sha256(normalised.encode()).hexdigest()
    # normalising is idempotent
    assert str(Reference.parse(normalised)) == normalised


def test_key_of_formats_example() -> None:
    # FORMATS.md §2.5: the file name of wh1's metadata
    ref = Reference.parse("example.com/fmt/wh1:v1")
    assert ref.cache_key == hashlib.sha256(b"example.com/fmt/wh1:v1").hexdigest()


def test_parts() -> None:
    ref = Reference.parse("127.0.0.1:5000/team/app:v2@sha256:" + "a" * 64)
    assert ref.registry == "127.0.0.1:5000"
    assert ref.repository == "team/app"
    assert ref.tag == "v2"
    assert str(ref.digest) == "sha256:" + "a" * 64
    assert ref.name == "127.0.0.1:5000/team/app"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "empty"),
        (" alpine", "spaces"),
        ("alpine@sha256:abc", "64"),
        ("alpine@sha256:" + "G" * 64, "hex"),
        ("alpine@md5:" + "0" * 32, "unsupported digest algorithm"),
        ("a//b", "empty path component"),
        ("example.com//x", "empty path component"),
        ("example.com/", "empty path component"),
        ("x/" + "a" * 260, "longer than 255"),
        ("alpine:bad tag", "bad tag"),
        ("alpine:", "bad tag"),
        ("Alp ine", "bad path component"),
        ("-lead/x", "bad path component"),
        # msb (oci-client) keeps these and fails at the registry; skopeo refuses locally
        ("Upper/case", "repository name must be lowercase"),
        ("127.0.0.1:5000/Team/app:v1", "repository name must be lowercase"),
    ],
)
def test_rejected(bad: str, why: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(bad)
    assert why in str(info.value)
    assert "\n" not in info.value.one_line()


def test_tag_and_digest_both_kept() -> None:
    ref = Reference.parse("alpine:3.20@sha256:" + "b" * 64)
    assert str(ref) == "docker.io/library/alpine:3.20@sha256:" + "b" * 64


def test_upper_case_host_and_tag_are_kept() -> None:
    ref = Reference.parse("Example.COM:5000/team/app:V1")
    assert (ref.registry, ref.repository, ref.tag) == ("Example.COM:5000", "team/app", "V1")
