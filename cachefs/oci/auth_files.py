"""containers-auth.json(5): the credential files podman, skopeo and buildah read and write.

Lookup order (containers/image ``pkg/docker/config``), first file with an entry wins:

1. ``$REGISTRY_AUTH_FILE`` when set — and then **only** that file, as podman's ``--authfile``;
2. ``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/<uid>/auth.json`` without
   ``XDG_RUNTIME_DIR``) — where ``podman login`` writes;
3. ``$XDG_CONFIG_HOME/containers/auth.json`` (default ``~/.config``);
4. docker's ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, read the way docker
   reads it (``credHelpers``, ``credsStore``, ``auths``: :func:`docker_config_credentials`);
5. the legacy ``~/.dockercfg``.

In a containers auth file, ``credHelpers[<host>]`` names a helper to run; ``auths`` keys are
matched exactly, then by host after dropping an ``http(s)://`` scheme and any path, with
``docker.io``, ``index.docker.io`` and ``registry-1.docker.io`` the same registry.
Namespaced keys (``host/namespace``) are not consulted: credentials here are per registry.

:func:`store_credentials` and :func:`erase_credentials` edit the file ``podman login``
and ``podman logout`` edit (1 or 2), atomically and with mode 0600.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cache.publish import publish_file
from ..errors import AuthError, ConfigError
from .auth import Credentials, docker_config_credentials, run_credential_helper

MAX_AUTH_FILE_BYTES = 4 << 20
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


def normalize_registry(key: str) -> str:
    """An auth-file key → the registry host it stands for (docker.io for Docker Hub)."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip()).split("/", 1)[0]
    return "docker.io" if host in _DOCKER_HUB else host


def write_path(environ: Mapping[str, str] | None = None) -> Path:
    """The file ``podman login`` writes: ``$REGISTRY_AUTH_FILE`` or the runtime-dir one."""
    env = os.environ if environ is None else environ
    if env.get("REGISTRY_AUTH_FILE"):
        return Path(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def auth_file_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The containers auth files to read, in order (docker's files come after them)."""
    env = os.environ if environ is None else environ
    if env.get("REGISTRY_AUTH_FILE"):
        return [Path(env["REGISTRY_AUTH_FILE"])]
    home = Path(env.get("HOME") or Path.home())
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return [write_path(env), config_home / "containers" / "auth.json"]


def read_auth_file(path: Path) -> dict[str, Any]:
    """The parsed file, ``{}`` when it does not exist; ConfigError when it is not JSON."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_AUTH_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"cannot read auth file {path}: {err.strerror}") from None
    if len(data) > MAX_AUTH_FILE_BYTES:
        raise ConfigError(f"auth file {path} is larger than {MAX_AUTH_FILE_BYTES} bytes")
    try:
        doc = json.loads(data) if data.strip() else {}
    except ValueError as err:
        raise ConfigError(f"auth file {path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"auth file {path} is not a JSON object")
    return doc


def _decode(path: Path, key: str, entry: object) -> Credentials | None:
    if not isinstance(entry, dict) or not entry.get("auth"):
        return None
    try:
        user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"auth file {path}: bad 'auth' value for {key}") from None
    return Credentials(user, password.strip("\x00")) if sep else None


def _in_auth_file(path: Path, registry: str, environ: Mapping[str, str],
                  legacy: bool = False) -> Credentials | None:
    doc = read_auth_file(path)
    host = normalize_registry(registry)
    auths = doc if legacy else doc.get("auths") or {}
    if not legacy:
        helpers = doc.get("credHelpers") or {}
        for key, helper in helpers.items() if isinstance(helpers, dict) else ():
            if normalize_registry(key) == host and helper:
                return run_credential_helper(str(helper), registry, environ)
    if not isinstance(auths, dict):
        raise ConfigError(f"auth file {path}: 'auths' is not an object")
    if registry in auths:
        return _decode(path, registry, auths[registry])
    for key, entry in auths.items():
        namespaced = "/" in key and not legacy and not re.match(r"^https?://", key)
        if not namespaced and normalize_registry(key) == host:
            return _decode(path, key, entry)
    return None


def default_credentials(registry: str, environ: Mapping[str, str] | None = None,
                        ) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``) from the files above, or None."""
    env = os.environ if environ is None else environ
    for path in auth_file_paths(env):
        found = _in_auth_file(path, registry, env)
        if found is not None:
            return found
    if env.get("REGISTRY_AUTH_FILE"):
        return None
    names = [registry]
    if normalize_registry(registry) == "docker.io":
        names.append("https://index.docker.io/v1/")  # the key `docker login` writes
    for name in names:
        found = docker_config_credentials(name, environ=env)
        if found is not None:
            return found
    home = Path(env.get("HOME") or Path.home())
    return _in_auth_file(home / ".dockercfg", registry, env, legacy=True)


def store_credentials(registry: str, credentials: Credentials,
                      environ: Mapping[str, str] | None = None,
                      path: Path | None = None) -> Path:
    """Record a login the way ``podman login`` does; returns the file written."""
    env = os.environ if environ is None else environ
    target = path or write_path(env)
    runtime = env.get("XDG_RUNTIME_DIR")
    if path is None and not env.get("REGISTRY_AUTH_FILE") and runtime and not Path(
            runtime).is_dir():
        raise ConfigError(f"$XDG_RUNTIME_DIR ({runtime}) does not exist",
                          hint="create it, unset it, or pass --authfile")
    doc = read_auth_file(target)
    auths = doc.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"auth file {target}: 'auths' is not an object")
    raw = f"{credentials.username}:{credentials.password}".encode()
    auths[registry] = {"auth": base64.b64encode(raw).decode()}
    _write(target, doc)
    return target


def erase_credentials(registry: str | None, environ: Mapping[str, str] | None = None,
                      path: Path | None = None) -> Path:
    """Forget one registry's login (``None``: every login) in the file podman writes."""
    target = path or write_path(environ)
    doc = read_auth_file(target)
    auths = doc.get("auths") or {}
    if registry is None:
        doc["auths"] = {}
    else:
        host = normalize_registry(registry)
        keys = [k for k in auths if k == registry or normalize_registry(k) == host]
        if not keys:
            raise AuthError(f"not logged in to {registry} (no entry in {target})")
        for key in keys:
            del auths[key]
    _write(target, doc)
    return target


def _write(target: Path, doc: dict[str, Any]) -> None:
    """Temp file created 0600 (a secret is never readable by others, even briefly), fsync,
    rename: a crash leaves the old file or the new one."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps(doc, indent="\t").encode() + b"\n"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_file(tmp, target, durable=True)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write auth file {target}: {err.strerror}") from None


__all__ = [
    "auth_file_paths",
    "default_credentials",
    "erase_credentials",
    "normalize_registry",
    "store_credentials",
    "write_path",
]
