"""Registry credentials and the distribution auth dance.

Flow (what docker and oci-client do): every request first goes out with whatever
``Authorization`` we already hold for that (registry, scope) — nothing at all the first
time. A ``401`` carries ``WWW-Authenticate``:

* ``Basic realm=…`` → send the user's credentials as Basic; without any, fail with AuthError.
* ``Bearer realm=…,service=…,scope=…`` → ask the realm for a token for
  ``repository:<repo>:pull``, with Basic credentials when we have some, anonymously
  otherwise. Tokens are cached per (registry, scope) until they expire.

Credentials are looked up lazily (only when a registry asks), in this order: explicit
``username/password`` (``--username``, the password on stdin or asked), only ever sent to
the registry the user named (never to a registries.conf mirror on another host, as
podman), then the files
podman reads (:mod:`cachefs.oci.auth_files`: ``$REGISTRY_AUTH_FILE``, the containers
``auth.json`` files), then ``~/.docker/config.json``: ``credHelpers[<host>]``,
``credsStore``, and finally ``auths[<host>]`` (``auth`` = base64 ``user:pass``, or
``username``/``password``). The host matches including its port, with or without an
``http(s)://`` prefix or path in the key.

Secrets never reach logs or exception messages: :class:`Credentials` masks its repr.

Where credentials go: only to the registry they were configured for, and to the token realm
*that registry* names in its own challenge (a token service may live on another host, as
Docker Hub's does). :class:`~cachefs.oci.registry.RegistryClient` never asks this module to
answer a challenge from anyone else (a redirect target); the token request itself follows
redirects only without credentials once it leaves the realm's origin, runs under the same
deadline as every request, and its answer is size-capped (``max_token_bytes``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..errors import AuthError, RegistryError
from ._httpx import httpx
from .transfer import NetLimits, deadline, origin, read_body, send_following

_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
_TOKEN_MARGIN_S = 30.0
_HELPER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Credentials:
    """A user name and a secret (password or token). ``repr`` never shows the secret."""

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge."""

    scheme: str
    params: Mapping[str, str]


def parse_www_authenticate(header: str) -> Challenge | None:
    """``Bearer realm="…",service="…"`` → Challenge; None when unparseable."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    params = {k: v.replace('\\"', '"') for k, v in params.items()}
    return Challenge(scheme.lower(), params)


# ~/.docker/config.json --------------------------------------------------------------------


def _docker_config_path(environ: Mapping[str, str]) -> Path:
    if environ.get("DOCKER_CONFIG"):
        return Path(environ["DOCKER_CONFIG"]) / "config.json"
    return Path(environ.get("HOME", str(Path.home()))) / ".docker" / "config.json"


def _host_of(key: str) -> str:
    """``https://host:port/v1/`` → ``host:port``: config keys come in several spellings."""
    key = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip())
    return key.split("/", 1)[0]


def run_credential_helper(
    name: str, server: str, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """``docker-credential-<name> get`` with ``server`` on stdin (docker's protocol).

    "credentials not found" → None; any other failure → AuthError naming the helper (but
    never echoing its output, which could contain a secret).
    """
    env = dict(environ if environ is not None else os.environ)
    exe = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [exe, "get"], input=server.encode(), capture_output=True, env=env,
            timeout=_HELPER_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise AuthError(
            f"credential helper {exe} for {server} not found on PATH",
            hint="install it or remove it from ~/.docker/config.json",
        ) from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {exe} timed out for {server}") from None
    if proc.returncode != 0:
        if b"credentials not found" in (proc.stdout + proc.stderr).lower():
            return None
        raise AuthError(f"credential helper {exe} failed for {server} (exit {proc.returncode})")
    try:
        doc = json.loads(proc.stdout)
        username, secret = str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {exe} returned malformed output for {server}") from None
    return Credentials(username, secret)


def docker_config_credentials(
    registry: str,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]``) from docker's config file, or None."""
    env = environ if environ is not None else os.environ
    path = config_path or _docker_config_path(env)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise AuthError(f"cannot read docker config {path}: {err.__class__.__name__}") from None
    if not isinstance(doc, dict):
        return None
    host = _host_of(registry)
    for key, helper in (doc.get("credHelpers") or {}).items():
        if _host_of(key) == host and helper:
            return run_credential_helper(str(helper), key, env)
    store = doc.get("credsStore")
    if store:
        found = run_credential_helper(str(store), registry, env)
        if found is not None:
            return found
    for key, entry in (doc.get("auths") or {}).items():
        if _host_of(key) != host or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthError(f"docker config {path}: bad 'auth' value for {key}") from None
            if sep:
                return Credentials(user, pw)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def default_credentials_lookup(registry: str) -> Credentials | None:
    """The files podman reads, then docker's (:mod:`cachefs.oci.auth_files`)."""
    from .auth_files import default_credentials

    return default_credentials(registry)


# The per-client auth state ------------------------------------------------------------------


CredentialLookup = Callable[[str], "Credentials | None"]


@dataclass(eq=False, repr=False)
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Holds what a :class:`RegistryClient` has learned: credentials, challenges, tokens.

    ``credentials`` (explicit) wins; otherwise ``lookup(registry)`` is asked once per
    registry, the first time a registry demands authentication.
    """

    def __init__(
        self,
        credentials: Credentials | None = None,
        *,
        lookup: CredentialLookup | None = default_credentials_lookup,
        explicit_hosts: set[str] | None = None,
    ) -> None:
        """``lookup`` defaults to the files of
        :func:`cachefs.oci.auth_files.default_credentials`; ``lookup=None`` reads no file.
        ``explicit_hosts``: the registries ``credentials`` may be sent to (None: any); the
        registry client fills it with the hosts that references name."""
        self._explicit = credentials
        self.explicit_hosts = explicit_hosts
        self._lookup = lookup
        self._looked_up: dict[str, Credentials | None] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic: set[str] = set()
        self._locks: dict[tuple[str, str], trio.Lock] = {}

    def credentials_for(self, registry: str) -> Credentials | None:
        if self._explicit is not None and (self.explicit_hosts is None
                                           or registry in self.explicit_hosts):
            return self._explicit
        if self._lookup is None:
            return None
        if registry not in self._looked_up:
            self._looked_up[registry] = self._lookup(registry)
        return self._looked_up[registry]

    def header_for(self, registry: str, scope: str) -> str | None:
        """The Authorization value to send proactively, if we already know one."""
        tok = self._tokens.get((registry, scope))
        if tok is not None and tok.expires_at > time.monotonic():
            return f"Bearer {tok.value}"
        if registry in self._basic:
            creds = self.credentials_for(registry)
            if creds is not None:
                return creds.basic_header()
        return None

    def forget(self, registry: str, scope: str) -> None:
        self._tokens.pop((registry, scope), None)

    async def respond(
        self,
        http: httpx.AsyncClient,
        registry: str,
        scope: str,
        www_authenticate: str,
        what: str,
        sent: str | None = None,
        limits: NetLimits | None = None,
        challenger: httpx.URL | None = None,
    ) -> str:
        """Turn a 401 challenge *of the registry itself* into an Authorization value, or
        raise AuthError.

        ``what`` names the request (reference and path) for the error message; ``sent`` is
        the Authorization the refused request carried; ``challenger`` the URL that answered
        401 (an https registry's credentials never go to a plain-http realm). Concurrent
        downloads that are refused at once share one token request: whoever comes second
        finds a newer token and uses it.
        """
        lock = self._locks.setdefault((registry, scope), trio.Lock())
        async with lock:
            current = self.header_for(registry, scope)
            if current is not None and current != sent:
                return current
            return await self._respond(http, registry, scope, www_authenticate, what, sent,
                                       limits or NetLimits.from_env(), challenger)

    async def _respond(
        self,
        http: httpx.AsyncClient,
        registry: str,
        scope: str,
        www_authenticate: str,
        what: str,
        sent: str | None,
        limits: NetLimits,
        challenger: httpx.URL | None,
    ) -> str:
        self.forget(registry, scope)
        challenge = parse_www_authenticate(www_authenticate)
        if challenge is None:
            raise AuthError(f"{what}: 401 without a usable WWW-Authenticate challenge")
        # Credential helpers are subprocesses: keep them off the event loop.
        creds = await trio.to_thread.run_sync(self.credentials_for, registry)
        if sent is not None and creds is not None and sent == creds.basic_header():
            raise AuthError(f"{what}: HTTP 401, registry {registry} refused user "
                            f"{creds.username!r}", hint="check the username/password")
        if challenge.scheme == "basic":
            if creds is None:
                raise AuthError(
                    f"{what}: registry {registry} requires credentials",
                    hint="pass --username (the password via --password-stdin, or asked on "
                         "a terminal), or log in first: cachefs login (or podman/skopeo/"
                         "docker login)",
                )
            self._basic.add(registry)
            return creds.basic_header()
        if challenge.scheme != "bearer":
            raise AuthError(f"{what}: unsupported auth scheme {challenge.scheme!r}")
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{what}: Bearer challenge without a realm")
        params = {"scope": scope} if scope else {}  # no scope: a login check
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {"Authorization": creds.basic_header()} if creds is not None else {}
        if (creds is not None and challenger is not None and challenger.scheme == "https"
                and realm.lower().startswith("http://")):
            raise AuthError(f"{what}: registry {registry} names a plain-http token service "
                            f"{realm}; its credentials are not sent unencrypted")
        try:
            url = httpx.URL(realm, params=params)
            status, body = await _fetch_token(http, url, headers, limits)
        except httpx.HTTPError as err:
            raise RegistryError(
                f"{what}: token service {realm} unreachable ({err.__class__.__name__})"
            ) from None
        if status in (401, 403):
            who = f"user {creds.username!r}" if creds is not None else "anonymous access"
            raise AuthError(
                f"{what}: token service refused {who} for {scope} (HTTP {status})",
                hint="check the username/password" if creds else "credentials are required",
            )
        if status != 200:
            raise RegistryError(f"{what}: token service {realm} answered HTTP {status}")
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"{what}: token service {realm} sent malformed JSON") from None
        if not value:
            raise RegistryError(f"{what}: token service {realm} sent no token")
        self._tokens[(registry, scope)] = _Token(
            str(value), time.monotonic() + max(expires_in - _TOKEN_MARGIN_S, 1.0)
        )
        return f"Bearer {value}"


async def _fetch_token(http: httpx.AsyncClient, url: httpx.URL, headers: dict[str, str],
                       limits: NetLimits) -> tuple[int, bytes]:
    """(status, body) of a token request: bounded in time and size; credentials go only to
    the realm's own origin."""
    async with deadline(limits, "token request") as clock:
        resp = await send_following(http, "GET", url, headers, clock, home=origin(url))
        try:
            if resp.status_code != 200:
                return resp.status_code, b""
            body = await read_body(resp, clock, limits.max_token_bytes,
                                   f"the token answer of {url.host}")
            return resp.status_code, body
        finally:
            await resp.aclose()
    raise AssertionError("unreachable")  # deadline() raises when it cancels the block


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


__all__ = [
    "Authenticator",
    "Challenge",
    "Credentials",
    "default_credentials_lookup",
    "docker_config_credentials",
    "parse_www_authenticate",
    "pull_scope",
    "run_credential_helper",
]
