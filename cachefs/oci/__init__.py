"""Where images come from: OCI registries, docker-archive tars and OCI layouts.

* :class:`RegistryClient` — ``resolve(ref, platform)`` → :class:`ResolvedImage`;
  ``fetch_blob(ref, descriptor, part_path)`` resumable and verified.
* :func:`open_archive` — docker archives and OCI layouts → :class:`ArchiveSource`.
* :class:`SourceImage` — the one shape both sources give the pipeline
  (``ResolvedImage.source_image()``, ``ArchiveImage.source_image()``).
* :class:`Authenticator` / :class:`Credentials` — explicit credentials, docker config,
  credential helpers, bearer tokens.
* :class:`NetLimits` — every bound on what a registry may cost (time, bytes, attempts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .archive import ArchiveImage, ArchiveLayer, ArchiveSource, open_archive
    from .auth import Authenticator, Credentials, docker_config_credentials
    from .platform import host_platform, parse_platform, select_manifest
    from .registry import RegistryClient, ResolvedImage
    from .source import SourceImage, SourceLayer
    from .transfer import NetLimits

# Loaded on first use (PEP 562): a pull never needs the archive reader (tarfile), a load
# never needs the registry client (httpx), and each costs start-up time.
_LAZY = {
    "ArchiveImage": ".archive", "ArchiveLayer": ".archive", "ArchiveSource": ".archive",
    "open_archive": ".archive",
    "Authenticator": ".auth", "Credentials": ".auth", "docker_config_credentials": ".auth",
    "host_platform": ".platform", "parse_platform": ".platform", "select_manifest": ".platform",
    "RegistryClient": ".registry", "ResolvedImage": ".registry",
    "SourceImage": ".source", "SourceLayer": ".source",
    "NetLimits": ".transfer",
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ArchiveImage",
    "ArchiveLayer",
    "ArchiveSource",
    "Authenticator",
    "Credentials",
    "NetLimits",
    "RegistryClient",
    "ResolvedImage",
    "SourceImage",
    "SourceLayer",
    "docker_config_credentials",
    "host_platform",
    "open_archive",
    "parse_platform",
    "select_manifest",
]
