"""Where images come from: OCI registries, docker-archive tars and OCI layouts."""

from .auth import Authenticator, Credentials, docker_config_credentials
from .platform import host_platform, parse_platform, select_manifest
from .registry import RegistryClient, RegistryNotFound, ResolvedImage

__all__ = [
    "Authenticator",
    "Credentials",
    "RegistryClient",
    "RegistryNotFound",
    "ResolvedImage",
    "docker_config_credentials",
    "host_platform",
    "parse_platform",
    "select_manifest",
]
