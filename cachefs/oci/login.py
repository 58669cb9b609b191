"""``cachefs login`` / ``logout``: check a password at the registry, then record it where
``podman login`` does (:mod:`cachefs.oci.auth_files`), so podman, skopeo, buildah and
cachefs share one login."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import UsageError
from .auth import Authenticator, Credentials
from .auth_files import erase_credentials, normalize_registry, store_credentials
from .registries_conf import load_registries_conf
from .registry import RegistryClient


def login_key(registry: str) -> str:
    """What the user typed → the auth-file key: ``host[:port]`` (a scheme or path dropped)."""
    key = normalize_registry(registry)
    if not key or "@" in key:
        raise UsageError(f"invalid registry {registry!r}: expected host[:port]")
    return key


async def login(registry: str, credentials: Credentials, *, insecure: bool = False,
                ca_certs: Path | None = None, authfile: Path | None = None,
                environ: Mapping[str, str] | None = None) -> Path:
    """Verify ``credentials`` against ``registry``; store them; return the file written."""
    key = login_key(registry)
    async with RegistryClient(
        insecure=insecure, ca_certs=ca_certs, registries=load_registries_conf(environ),
        authenticator=Authenticator(credentials, lookup=None), max_attempts=1,
    ) as client:
        await client.check_credentials(key)
    return store_credentials(key, credentials, environ, authfile)


def logout(registry: str | None, *, authfile: Path | None = None,
           environ: Mapping[str, str] | None = None) -> Path:
    return erase_credentials(None if registry is None else login_key(registry), environ,
                             authfile)


__all__ = ["login", "login_key", "logout"]
