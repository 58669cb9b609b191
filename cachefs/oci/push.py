"""Writing to a registry: blob uploads, cross-repository mounts, manifest and tag PUTs.

Built on the public pieces of :class:`~cachefs.oci.registry.RegistryClient` (its HTTP
client, its :class:`~cachefs.oci.auth.Authenticator`, its URL and retry settings); the
client itself only ever reads. A :class:`RepoWriter` asks for ``pull,push`` scope, so a
token service hands out a token that may write, and a registry that refuses (read-only
credentials) is reported as one :class:`~cachefs.errors.AuthError` line naming the
repository.

Uploads (OCI distribution spec "pushing blobs"): a ``HEAD`` first (a blob the repository
has is never sent again); then, when another repository on the same registry is known to
hold it, a mount (``POST …/uploads/?mount=&from=``; a registry that cannot mount answers
202 with an upload session, which is then used); else ``POST`` + one ``PUT ?digest=``
with the whole body (monolithic), or ``PATCH`` chunks of ``chunk_size`` then the ``PUT``
(chunked) for blobs larger than that, or when the registry asks for a minimum chunk
(``OCI-Chunk-Min-Length``). Bodies stream from the file; nothing is held in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import trio

from ..digest import Digest
from ..errors import AuthError, RegistryError
from ..reference import Reference
from ._httpx import httpx
from .registry import ACCEPT_MANIFESTS, RETRY_STATUSES, RegistryClient
from .transfer import origin

CHUNK_SIZE = 64 << 20
READ_SIZE = 1 << 20
MAX_DOCUMENT_BYTES = 4 << 20
MAX_ERROR_BYTES = 64 << 10  # any other answer (errors, upload sessions) is small


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


@dataclass(eq=False)  # compared nowhere: no generated __eq__
class PushStats:
    """What a push did, for ``--json`` and for tests proving a second push is a no-op."""

    skipped: list[str] = field(default_factory=list)  # blobs the repository already had
    mounted: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)  # manifests and tags PUT


class RepoWriter:
    """Reads and writes of one repository with ``pull,push`` (or ``pull``) scope."""

    def __init__(self, client: RegistryClient, ref: Reference, *, push: bool = True,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self.client = client
        self.ref = ref
        self.push = push
        self.scope = push_scope(ref.repository) if push else f"repository:{ref.repository}:pull"
        self.chunk_size = chunk_size
        self.stats = PushStats()
        self._target: Reference | None = None

    # plumbing -----------------------------------------------------------------------------

    async def _destination(self) -> Reference:
        """Where requests go. A push goes to the registry the reference names (never a
        registries.conf mirror), its scheme settled as the client settles any; a read goes
        where the client resolved the image (a mirror, if it served the manifest)."""
        if self._target is None:
            client = self.client
            if self.push:
                host = client.mirrors.get(self.ref.registry, self.ref.registry)
                await client._settle_scheme(host, client.registries.insecure_for(
                    self.ref.registry))
                if client.auth.explicit_hosts is not None:  # --username is for this host
                    client.auth.explicit_hosts.add(self.ref.registry)
                self._target = self.ref
            else:
                self._target = await client._physical(self.ref)
        return self._target

    async def _send(self, method: str, path: str, headers: dict[str, str] | None = None,
                    content: bytes | AsyncIterator[bytes] | None = None,
                    replay: bool = True, limit: int = MAX_ERROR_BYTES) -> httpx.Response:
        """One request with our scope, answering one auth challenge; its body read, up to
        ``limit`` bytes (a registry sending more is refused, never buffered).

        ``path`` is relative to the repository (``blobs/…``), or an absolute upload
        location the registry handed out, which must be on the registry's own origin: the
        Authorization header never goes anywhere else. ``replay=False`` (a streamed body):
        a 401 is answered by an error, not a resend, so the caller authenticates with a
        body-less request first.
        """
        target = await self._destination()
        registry = target.registry
        home = self.client._url(target, "")
        url = path if path.startswith(("http://", "https://")) else self.client._url(target,
                                                                                      path)
        if origin(httpx.URL(url)) != origin(httpx.URL(home)):
            raise RegistryError(f"{self.ref.name}: the registry sent an upload location on "
                                f"another host ({httpx.URL(url).host}); refusing it")
        auth = self.client.auth
        http = self.client._http
        hdrs = dict(headers or {})
        for attempt in range(self.client.max_attempts):
            known = auth.header_for(registry, self.scope)
            if known:
                hdrs["Authorization"] = known
            try:
                resp = await self._bounded(method, url, hdrs, content, limit)
            except httpx.TransportError as err:
                if attempt + 1 >= self.client.max_attempts or not replay:
                    raise RegistryError(f"{self.ref.name}: {method} {_path(url)} failed: "
                                        f"{err.__class__.__name__}") from None
                await trio.sleep(self.client._delay(attempt))
                continue
            if resp.status_code == 401 and replay:
                hdrs["Authorization"] = await auth.respond(
                    http, registry, self.scope, resp.headers.get("WWW-Authenticate", ""),
                    f"{self.ref.name}: {method} {_path(url)}", sent=known,
                    limits=self.client.limits, challenger=resp.url)
                resp = await self._bounded(method, url, hdrs, content, limit)
            if resp.status_code in RETRY_STATUSES and replay and \
                    attempt + 1 < self.client.max_attempts:
                await trio.sleep(self.client._delay(attempt, resp))
                continue
            return resp
        raise AssertionError("unreachable")

    async def _bounded(self, method: str, url: str, headers: dict[str, str],
                       content: bytes | AsyncIterator[bytes] | None,
                       limit: int) -> httpx.Response:
        http = self.client._http
        resp = await http.send(http.build_request(method, url, headers=headers,
                                                  content=content), stream=True)
        try:
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise RegistryError(f"{self.ref.name}: {method} {_path(url)}: answer is "
                                        f"larger than {limit} bytes; refusing it")
        finally:
            await resp.aclose()
        return httpx.Response(resp.status_code, headers=resp.headers, content=bytes(body),
                              request=resp.request)

    def _fail(self, resp: httpx.Response, what: str) -> RegistryError:
        detail = ""
        try:
            err = resp.json()["errors"][0]
            detail = f" {err.get('code', '')}: {err.get('message', '')}".rstrip(": ")
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        where = f"{self.ref.name}: {what}"
        if resp.status_code in (401, 403):
            return AuthError(f"{where}: HTTP {resp.status_code}: no push access to "
                             f"{self.ref.registry}/{self.ref.repository}{detail}",
                             hint="use credentials that may push to this repository")
        return RegistryError(f"{where}: HTTP {resp.status_code}{detail}")

    # reads ------------------------------------------------------------------------------

    async def get_document(self, path: str, accept: str = ACCEPT_MANIFESTS) -> bytes | None:
        """A small document (manifest, index); None on 404 (and on 400/405: no such API)."""
        resp = await self._send("GET", path, {"Accept": accept},
                                limit=MAX_DOCUMENT_BYTES)
        if resp.status_code in (404, 400, 405):
            return None
        if resp.status_code != 200:
            raise self._fail(resp, f"GET {path}")
        return resp.content

    async def blob_exists(self, digest: Digest) -> bool:
        resp = await self._send("HEAD", f"blobs/{digest}")
        if resp.status_code == 200 or resp.status_code in (301, 302, 303, 307, 308):
            return True  # a redirect: the registry serves it from its storage
        if resp.status_code == 404:
            return False
        raise self._fail(resp, f"HEAD blobs/{digest}")

    # writes -----------------------------------------------------------------------------

    async def ensure_blob(self, path: Path | bytes, digest: Digest, size: int,
                          mount_from: list[str] | tuple[str, ...] = ()) -> str:
        """Make the repository hold the blob: "skipped", "mounted" or "uploaded"."""
        name = str(digest)
        if await self.blob_exists(digest):
            self.stats.skipped.append(name)
            return "skipped"
        location: str | None = None
        for source in mount_from:
            if source == self.ref.repository:
                continue
            resp = await self._send(
                "POST", f"blobs/uploads/?mount={digest}&from={source}")
            if resp.status_code == 201:
                self.stats.mounted.append(name)
                return "mounted"
            if resp.status_code == 202:  # cannot mount: an ordinary upload session instead
                location = self._location(resp)
                break
            if resp.status_code not in (401, 403, 404):
                raise self._fail(resp, "POST blobs/uploads/ (mount)")
        if location is None:
            resp = await self._send("POST", "blobs/uploads/")
            if resp.status_code != 202:
                raise self._fail(resp, "POST blobs/uploads/")
            location = self._location(resp)
            min_chunk = _int_header(resp, "OCI-Chunk-Min-Length")
        else:
            min_chunk = 0
        chunk = max(self.chunk_size, min_chunk)
        if size > chunk or min_chunk:
            location = await self._patch_chunks(location, path, size, chunk)
            body: bytes | AsyncIterator[bytes] | None = None
            length = 0
        else:
            body, length = _body(path, 0, size), size
        resp = await self._send(
            "PUT", _with_query(location, f"digest={digest}"),
            {"Content-Type": "application/octet-stream", "Content-Length": str(length)},
            content=body, replay=isinstance(body, bytes | None))
        if resp.status_code != 201:
            raise self._fail(resp, f"PUT blob {digest}")
        self.stats.uploaded.append(name)
        return "uploaded"

    async def _patch_chunks(self, location: str, path: Path | bytes, size: int,
                            chunk: int) -> str:
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            resp = await self._send(
                "PATCH", location,
                {"Content-Type": "application/octet-stream", "Content-Length": str(n),
                 "Content-Range": f"{offset}-{offset + n - 1}"},
                content=_body(path, offset, n), replay=isinstance(path, bytes))
            if resp.status_code != 202:
                raise self._fail(resp, f"PATCH upload at {offset}")
            location = self._location(resp)
            offset += n
        return location

    def _location(self, resp: httpx.Response) -> str:
        loc: str | None = resp.headers.get("Location")  # httpx types Headers.get as Any
        if not loc:
            raise RegistryError(f"{self.ref.name}: upload answer without a Location header")
        return urljoin(str(resp.request.url), loc)

    async def put_manifest(self, target: str, body: bytes, media_type: str) -> httpx.Response:
        resp = await self._send("PUT", f"manifests/{target}",
                                {"Content-Type": media_type}, content=body)
        if resp.status_code not in (200, 201):
            raise self._fail(resp, f"PUT manifests/{target}")
        self.stats.manifests.append(target)
        return resp


def _path(url: str) -> str:
    return httpx.URL(url).path


def _int_header(resp: httpx.Response, name: str) -> int:
    try:
        return max(0, int(resp.headers.get(name, "0")))
    except ValueError:
        return 0


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _body(source: Path | bytes, offset: int, length: int) -> bytes | AsyncIterator[bytes]:
    if isinstance(source, bytes):
        return source[offset:offset + length]
    return _stream(source, offset, length)


async def _stream(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """Part of a file as an async body; reads happen in a worker thread."""
    f = await trio.to_thread.run_sync(path.open, "rb")
    try:
        await trio.to_thread.run_sync(f.seek, offset)
        left = length
        while left:
            data = await trio.to_thread.run_sync(f.read, min(READ_SIZE, left))
            if not data:
                raise RegistryError(f"{path} shrank while it was being uploaded")
            left -= len(data)
            yield data
    finally:
        f.close()


__all__ = ["CHUNK_SIZE", "PushStats", "RepoWriter", "push_scope"]
