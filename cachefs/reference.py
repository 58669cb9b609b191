"""Image references, normalised exactly as msb (oci-client 0.17) does (FORMATS.md §2.1).

The normalised string is what msb hashes into ``manifests/<key>.json``, so every byte
of ``str(Reference)`` matters: case is preserved, ports are kept, ``index.docker.io``
becomes ``docker.io`` and single-component Docker Hub names gain ``library/``.

One deliberate difference from oci-client: a repository with upper-case letters is
rejected here, as docker's reference grammar and skopeo do (``repository name must be
lowercase``), because no registry serves one; oci-client accepts it and then fails at
the registry after a round trip. Registry host and tag keep their case.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .digest import Digest
from .errors import DigestError, InvalidReference

DOCKER_HUB = "docker.io"
_LEGACY_HUB = "index.docker.io"
_MAX_REPOSITORY = 255

# distribution/reference grammar, case-insensitive components as oci-client accepts.
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9]+(?:(?:[._]|__|-+)[A-Za-z0-9]+)*")
_DOMAIN_COMPONENT = re.compile(r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])")
_DOMAIN = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|"
    + _DOMAIN_COMPONENT.pattern
    + r"(?:\."
    + _DOMAIN_COMPONENT.pattern
    + r")*)(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        original = text
        if not text or text != text.strip():
            raise InvalidReference(f"invalid reference {original!r}: empty or surrounded by spaces")
        digest: Digest | None = None
        if "@" in text:
            text, _, digest_text = text.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except DigestError as err:
                raise InvalidReference(f"invalid reference {original!r}: {err}") from None
            if digest.algorithm not in ("sha256", "sha384", "sha512"):
                raise InvalidReference(
                    f"invalid reference {original!r}: unsupported digest algorithm "
                    f"{digest.algorithm!r}"
                )
        tag: str | None = None
        last_slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > last_slash:
            text, tag = text[:colon], text[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReference(f"invalid reference {original!r}: bad tag {tag!r}")
        if not text:
            raise InvalidReference(f"invalid reference {original!r}: missing repository name")
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
            if not _DOMAIN.fullmatch(registry):
                raise InvalidReference(f"invalid reference {original!r}: bad registry {registry!r}")
        else:
            registry, repository = DOCKER_HUB, text
        if registry == _LEGACY_HUB:
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = "library/" + repository
        for component in repository.split("/"):
            if not component:
                raise InvalidReference(
                    f"invalid reference {original!r}: empty path component in {repository!r}"
                )
            if not _PATH_COMPONENT.fullmatch(component):
                raise InvalidReference(
                    f"invalid reference {original!r}: bad path component {component!r}"
                )
        if repository != repository.lower():
            raise InvalidReference(
                f"invalid reference {original!r}: repository name must be lowercase"
            )
        if len(repository) > _MAX_REPOSITORY:
            raise InvalidReference(
                f"invalid reference {original!r}: repository name longer than "
                f"{_MAX_REPOSITORY} characters"
            )
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def cache_key(self) -> str:
        """sha256 hex of the normalised string: the stem of ``manifests/<key>.json``."""
        return hashlib.sha256(str(self).encode()).hexdigest()

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

