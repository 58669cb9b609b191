"""Where images come from: OCI registries, docker-archive tars and OCI layouts.

* :class:`RegistryClient` — ``resolve(ref, platform)`` → :class:`ResolvedImage`;
  ``fetch_blob(ref, descriptor, part_path)`` resumable and verified.
* :func:`open_archive` — docker archives and OCI layouts → :class:`ArchiveSource`.
* :class:`Authenticator` / :class:`Credentials` — explicit credentials, docker config,
  credential helpers, bearer tokens.
"""

from .archive import ArchiveImage, ArchiveLayer, ArchiveSource, open_archive
from .auth import Authenticator, Credentials, docker_config_credentials
from .platform import host_platform, parse_platform, select_manifest
from .registry import RegistryClient, RegistryNotFound, ResolvedImage

__all__ = [
    "ArchiveImage",
    "ArchiveLayer",
    "ArchiveSource",
    "Authenticator",
    "Credentials",
    "RegistryClient",
    "RegistryNotFound",
    "ResolvedImage",
    "docker_config_credentials",
    "host_platform",
    "open_archive",
    "parse_platform",
    "select_manifest",
]
