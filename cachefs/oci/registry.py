"""OCI distribution client: resolve a reference to one platform's image, fetch blobs.

Semantics follow msb (oci-client 0.17) where they are observable in the cache:

* ``manifest_digest`` is the registry digest of the **platform-specific** manifest, never
  the index digest (FORMATS.md §2.4): ``Docker-Content-Digest`` when the registry sends it,
  else the sha256 of the body. Bodies fetched by digest are verified.
* ``raw_manifest_json`` is the manifest re-serialised the way oci-client does
  (:meth:`ImageManifest.to_oci_client_json`), not the registry's bytes.
* Blob downloads follow §1.6: stream into a ``.part``; resume a shorter ``.part`` with
  ``Range: bytes=<size>-`` hashing the existing prefix; a ``200`` answer to a range request
  restarts from zero; the whole-file sha256 must match or the ``.part`` is deleted.

``insecure=True`` means plain HTTP only, exactly like ``msb pull --insecure``; without it,
loopback hosts and hosts registries.conf marks insecure are tried over HTTPS, then plain HTTP
(:mod:`cachefs.oci.endpoints`). Mirrors and location rewrites from registries.conf
(:mod:`cachefs.oci.registries_conf`) are tried in order for the manifest; the blobs then
come from the location that served it. Transient failures (429, 5xx, connection errors) are
retried with bounded exponential backoff; a retried blob download resumes from the bytes
already written.

Everything the registry controls is bounded (:mod:`cachefs.oci.transfer`, README
"Limits"): every request has a deadline scaled to what it carries, attempts are bounded in
count and time per document and per blob (progress or not), a blob is never read past its
descriptor's size, redirects are followed by hand and never carry credentials to another
origin, and every digest is verified against the bytes (an algorithm cachefs cannot
verify is refused before anything is keyed by it). Digested content is requested with
``Accept-Encoding: identity``: the digest is over the bytes as stored.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import trio

from ..cache.publish import naming
from ..digest import Digest
from ..errors import (
    AuthError,
    CachefsError,
    DigestError,
    DigestMismatch,
    RegistryError,
    RegistryNotFound,
)
from ..models import (
    DOCKER_CONFIG,
    DOCKER_LAYER_FOREIGN,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER_NONDIST_PREFIX,
    Descriptor,
    ImageConfigFile,
    ImageIndex,
    ImageManifest,
    Platform,
    ValidationError,
)
from ..reference import Reference
from ._httpx import httpx
from .auth import Authenticator, Credentials, pull_scope
from .endpoints import (
    answered_plain_http,
    connection_refused,
    schemes_for,
    untrusted_certificate,
)
from .platform import format_platform, select_manifest
from .registries_conf import PullSource, RegistriesConf
from .source import SourceImage, SourceLayer
from .transfer import Deadline, NetLimits, deadline, origin, read_body, send_following
from .warmup import Warming, warm_connections

ACCEPT_MANIFESTS = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 32 << 20
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

Progress = Callable[[int], None]


@dataclass(frozen=True, eq=False)  # compared nowhere: no generated __eq__/__hash__
class ResolvedImage:
    """One platform's image as the registry describes it (everything but the layer bytes)."""

    reference: Reference
    manifest_digest: Digest
    manifest: ImageManifest
    manifest_bytes: bytes  # the registry's exact bytes of the platform manifest
    media_type: str
    config_bytes: bytes
    config: ImageConfigFile
    config_digest: Digest
    index_digest: Digest | None = None  # set when the reference named a multi-platform index
    platform: Platform | None = None  # the index entry's platform that was chosen

    @property
    def raw_manifest_json(self) -> str:
        """What msb stores as ``raw_manifest_json`` after a registry pull."""
        return self.manifest.to_oci_client_json()

    @property
    def layers(self) -> list[Descriptor]:
        return self.manifest.layers

    def source_image(self) -> SourceImage:
        """The image as the pipeline takes it from any source."""
        diff_ids = self.config.rootfs.diff_ids
        if len(diff_ids) != len(self.layers):
            raise RegistryError(
                f"{self.reference}: manifest lists {len(self.layers)} layers but the config "
                f"has {len(diff_ids)} diff_ids"
            )
        return SourceImage(
            self.manifest_digest, self.raw_manifest_json, self.config_bytes, self.config,
            tuple(SourceLayer(d.digest, d.media_type, d.size, str(diff))
                  for d, diff in zip(self.layers, diff_ids, strict=True)),
        )


def _is_foreign(media_type: str) -> bool:
    return media_type == DOCKER_LAYER_FOREIGN or media_type.startswith(OCI_LAYER_NONDIST_PREFIX)


def check_layer_descriptor(layer: Descriptor, where: str) -> None:
    """Refuse layers cachefs cannot turn into EROFS, with a message that says why."""
    if _is_foreign(layer.media_type):
        raise RegistryError(
            f"{where}: layer {layer.digest} is a foreign/non-distributable layer "
            f"({layer.media_type}); it is not served by the registry and cannot be pulled"
        )
    if layer.media_type not in LAYER_TYPES:
        raise RegistryError(f"{where}: layer {layer.digest} has unsupported media type "
                            f"{layer.media_type!r}")


def verifiable(digest: Digest, what: str) -> Digest:
    """``digest`` if cachefs can check bytes against it; else a RegistryError, raised before
    anything (a download, a cache path) is keyed by a digest nobody verified."""
    try:
        digest.hasher()
    except DigestError:
        raise RegistryError(f"{what}: digest {digest} uses algorithm {digest.algorithm!r}, "
                            "which cannot be verified; refusing it") from None
    return digest


def check_blob_descriptor(layer: Descriptor, where: str, limits: NetLimits) -> None:
    """A layer is downloaded only with a verifiable digest and a size in (0, max_blob_bytes]:
    the size is what bounds the download, so a descriptor without one is refused."""
    verifiable(layer.parsed_digest, f"{where}: layer")
    if layer.size <= 0:
        raise RegistryError(f"{where}: layer {layer.digest} has no size in the manifest "
                            f"(size {layer.size}); refusing a download of unknown length")
    if layer.size > limits.max_blob_bytes:
        raise RegistryError(
            f"{where}: layer {layer.digest} declares {layer.size} bytes, more than the "
            f"limit of {limits.max_blob_bytes}",
            hint=f"{limits.env_name('max_blob_bytes')} sets the limit",
        )


class _Retries:
    """Attempts at one document or blob: at most ``attempts``, and none started after
    ``window_s`` from the first, whether or not the previous ones made progress."""

    def __init__(self, attempts: int, window_s: float) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.started = trio.current_time()
        self.count = 0  # attempts that failed so far

    def elapsed(self) -> float:
        return trio.current_time() - self.started

    def last(self) -> bool:
        """Is the attempt about to start the last one allowed?"""
        return self.count + 1 >= self.attempts or self.elapsed() >= self.window_s


def _manifest_kind(body: bytes, content_type: str, where: str) -> tuple[str, str]:
    """("index"|"manifest", media type) from the body's mediaType, else Content-Type."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError(f"{where}: manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: manifest is not a JSON object")
    media_type = doc.get("mediaType") or content_type.split(";", 1)[0].strip()
    if media_type in INDEX_TYPES:
        return "index", media_type
    if media_type in MANIFEST_TYPES:
        return "manifest", media_type
    if not doc.get("mediaType") and doc.get("schemaVersion") == 2:
        # OCI allows omitting mediaType; registries then send a generic Content-Type.
        if "manifests" in doc:
            return "index", media_type or INDEX_TYPES[0]
        if "config" in doc and "layers" in doc:
            return "manifest", media_type or MANIFEST_TYPES[0]
    raise RegistryError(f"{where}: unsupported manifest media type {media_type!r}")


def _error_detail(body: bytes) -> str:
    """The registry's ``errors[0]`` code/message, for one-line error messages."""
    try:
        err = json.loads(body)["errors"][0]
        return f" {err.get('code', '')}: {err.get('message', '')}".rstrip(": ")
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


class RegistryClient:
    """An async (trio) client for OCI distribution registries.

    Use as ``async with RegistryClient(...) as client``. ``credentials`` are explicit
    ``--username/--password``; without them, ``~/.docker/config.json`` is consulted when a
    registry asks (see :mod:`cachefs.oci.auth`). ``mirrors`` maps a registry name to the
    host actually contacted.
    """

    def __init__(
        self,
        *,
        insecure: bool = False,
        ca_certs: Path | None = None,
        credentials: Credentials | None = None,
        authenticator: Authenticator | None = None,
        mirrors: dict[str, str] | None = None,
        registries: RegistriesConf | None = None,
        max_attempts: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        timeout_s: float = 60.0,
        limits: NetLimits | None = None,
    ) -> None:
        self.insecure = insecure
        self.auth = authenticator or Authenticator(credentials, explicit_hosts=set())
        self.mirrors = dict(mirrors or {})
        self.registries = registries or RegistriesConf()
        self._routes: dict[Reference, PullSource] = {}
        self._schemes: dict[str, str] = {}
        self._warming: dict[str, Warming] = {}  # by host: what warm_up opened there
        self._certain: dict[str, str] = {}  # host → the only scheme it may be reached by
        self.limits = limits or NetLimits.from_env()
        self.max_attempts = max(1, max_attempts or self.limits.attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        verify: ssl.SSLContext | bool = True
        if ca_certs is not None:
            import certifi

            ctx = ssl.create_default_context(cafile=certifi.where())
            try:
                ctx.load_verify_locations(cafile=str(ca_certs))
            except (OSError, ssl.SSLError) as err:
                raise RegistryError(f"cannot load CA certificates from {ca_certs}: {err}") from None
            verify = ctx
        self._http = httpx.AsyncClient(
            verify=verify,
            transport=_PlainFirstTransport(verify) if insecure else None,
            mounts=_unverified_mounts(self.registries),
            follow_redirects=False,  # send_following: credentials stay with their origin
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            headers={"User-Agent": "cachefs/0.1", "Accept-Encoding": "identity"},
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # plumbing ------------------------------------------------------------------------------

    def _host(self, registry: str) -> str:
        """The host that serves requests for ``registry`` (``mirrors`` redirects some)."""
        return self.mirrors.get(registry, registry)

    def _url(self, ref: Reference, path: str) -> str:
        host = self._host(ref.registry)
        scheme = self._schemes.get(host) or ("http" if self.insecure else "https")
        return f"{scheme}://{host}/v2/{ref.repository}/{path}"

    def _delay(self, attempt: int, resp: httpx.Response | None = None) -> float:
        delay: float = min(self.backoff_s * (2**attempt), self.max_backoff_s)
        if resp is not None:
            try:
                delay = min(max(float(resp.headers.get("Retry-After", "")), 0.0),
                            self.max_backoff_s)
            except ValueError:
                pass
        return delay

    async def _open(self, method: str, ref: Reference, path: str,
                    headers: dict[str, str], clock: Deadline) -> httpx.Response:
        """Send (streaming), answering one auth challenge of the registry itself.

        Credentials and tokens are scoped to the registry's origin: a redirect target gets
        none (:func:`send_following`), and its 401, whatever realm it names, is an error
        naming it — answering its challenge would hand it the user's credentials.
        Caller must ``aclose()``.
        """
        ref = await self._physical(ref)  # registries.conf: the location serving ``ref``
        scope = pull_scope(ref.repository)
        url = self._url(ref, path)
        home = origin(httpx.URL(url))
        what = f"{ref}: {method} /v2/{ref.repository}/{path}"
        hdrs = dict(headers)
        known = self.auth.header_for(ref.registry, scope)
        if known:
            hdrs["Authorization"] = known
        resp = await send_following(self._http, method, url, hdrs, clock, home=home)
        if resp.status_code != 401:
            return resp
        await resp.aclose()
        self._refuse_foreign_challenge(resp, home, what)
        challenge = resp.headers.get("WWW-Authenticate", "")
        hdrs["Authorization"] = await self.auth.respond(
            self._http, ref.registry, scope, challenge, what, sent=known, limits=self.limits,
            challenger=resp.url,
        )
        resp = await send_following(self._http, method, url, hdrs, clock, home=home)
        if resp.status_code == 401 and origin(resp.url) != home:
            await resp.aclose()
            self._refuse_foreign_challenge(resp, home, what)
        return resp

    @staticmethod
    def _refuse_foreign_challenge(resp: httpx.Response, home: tuple[str, str, int],
                                  what: str) -> None:
        if origin(resp.url) == home:
            return
        target = resp.url.netloc.decode("ascii", "replace")
        raise AuthError(
            f"{what}: redirected to {target}, which answered HTTP 401; the registry's "
            f"credentials are never sent to another host",
            hint=f"{target} is not the registry; ask the registry's operator",
        )

    # registries.conf routes and scheme choice --------------------------------------------

    def _route(self, ref: Reference) -> PullSource:
        """The location serving ``ref``: the one :meth:`resolve` settled on, else the first."""
        source = self._routes.get(ref)
        if source is None:
            source = self._routes[ref] = self.registries.pull_sources(ref)[0]
        return source

    async def _physical(self, ref: Reference) -> Reference:
        """The reference at the location serving the logical ``ref``, its scheme settled.

        Requests, scopes and credential lookups use it: a mirror's own login applies there.
        """
        source = self._route(ref)
        if source.reference.registry == ref.registry and self.auth.explicit_hosts is not None:
            # explicit --username credentials are for the registry the user named only
            self.auth.explicit_hosts.add(ref.registry)
        host = self._host(source.reference.registry)
        await self._settle_scheme(host, source.insecure, mirror=source.mirror)
        return source.reference

    async def _announce(self, ref: Reference,
                        location_known: Callable[[Reference], None]) -> None:
        """``location_known(physical)`` as soon as the location's scheme is certain: before
        the ``/v2/`` ping when only https may serve it (the ping then only checks the
        certificate, and its round trips overlap the warm-ups'), else once settled."""
        source = self._route(ref)
        host = self._host(source.reference.registry)
        schemes = schemes_for(host, insecure_flag=self.insecure, conf_insecure=source.insecure)
        certain = host in self._schemes or len(schemes) == 1
        if certain:
            self._certain.setdefault(host, self._schemes.get(host, schemes[0]))
            location_known(source.reference)
        physical = await self._physical(ref)
        if not certain:
            location_known(physical)

    async def _settle_scheme(self, host: str, conf_insecure: bool | None, *,
                             mirror: bool = False) -> None:
        """Ping ``https://host/v2/`` once (as podman and docker do) unless ``--insecure``.

        A TLS handshake answered in plain HTTP, or an untrusted certificate, is a one-line
        error at once — or, where plain HTTP may follow (loopback, ``insecure = true``),
        the plain-HTTP answer selects ``http``. A mirror that refuses the connection is
        given up at once (the next location is tried, as podman does). Other failures leave
        ``https`` to the request itself, with its retries.
        """
        if host in self._schemes:
            return
        schemes = schemes_for(host, insecure_flag=self.insecure, conf_insecure=conf_insecure)
        scheme = schemes[0]
        if scheme == "https":
            try:
                resp = await self._http.get(f"https://{host}/v2/")
                await resp.aclose()
            except httpx.TransportError as err:
                if mirror and connection_refused(err):
                    raise RegistryError(f"mirror {host} refused the connection") from None
                why = untrusted_certificate(err)
                if why is not None:
                    raise RegistryError(
                        f"{host}: TLS certificate not trusted ({why})",
                        hint="pass --ca-certs FILE, or set insecure = true for it in "
                             "registries.conf",
                    ) from None
                if len(schemes) > 1:
                    scheme = schemes[1]
                elif answered_plain_http(err):
                    raise RegistryError(
                        f"{host} answered the TLS handshake with plain HTTP: it is not an "
                        "HTTPS registry",
                        hint="pass --insecure, or set insecure = true for it in "
                             "registries.conf",
                    ) from None
        self._schemes[host] = scheme

    async def warm_up(self, physical: Reference, count: int) -> None:
        """Open up to ``count`` more keep-alive connections to the location ``physical``
        (a reference :meth:`resolve` passed to ``location_known``), without credentials;
        once per location. See :mod:`cachefs.oci.warmup`; failures only lose the gain."""
        host = self._host(physical.registry)
        scheme = self._schemes.get(host) or self._certain.get(host)
        if count < 1 or scheme is None or host in self._warming:
            return
        warming = self._warming[host] = Warming()
        try:
            await warm_connections(self._http, f"{scheme}://{host}/v2/", count)
        finally:
            warming.settled.set()

    async def warmed(self, ref: Reference) -> None:
        """Wait for the warm-ups of the location serving ``ref`` if they are still in
        flight (see :meth:`Warming.wait`): a request about to need a connection of its own
        takes a warmed one instead of opening another."""
        warming = self._warming.get(self._host(self._route(ref).reference.registry))
        if warming is not None:
            await warming.wait()

    async def check_credentials(self, registry: str) -> None:
        """``GET /v2/`` at ``registry``, answering its challenge with the client's credentials.

        What ``podman login`` and ``docker login`` do before they store a password: a wrong
        one raises AuthError here and is never written anywhere.
        """
        host = self._host(registry)
        await self._settle_scheme(host, self.registries.insecure_for(registry))
        url = f"{self._schemes[host]}://{host}/v2/"
        try:
            resp = await self._http.get(url)
            await resp.aclose()
            if resp.status_code == 401:
                header = await self.auth.respond(
                    self._http, registry, "", resp.headers.get("WWW-Authenticate", ""),
                    f"{registry}: GET /v2/")
                resp = await self._http.get(url, headers={"Authorization": header})
                await resp.aclose()
        except httpx.TransportError as err:
            raise RegistryError(f"{registry}: GET /v2/ failed: "
                                f"{err.__class__.__name__}: {err}") from None
        if resp.status_code in (401, 403):
            raise AuthError(f"{registry}: HTTP {resp.status_code}: the registry refused the "
                            "credentials", hint="check the username and password")
        if resp.status_code != 200:
            raise RegistryError(f"{registry}: GET /v2/ answered HTTP {resp.status_code}")

    @contextlib.asynccontextmanager
    async def _exchange(self, method: str, ref: Reference, path: str,
                        headers: dict[str, str]) -> AsyncIterator[tuple[httpx.Response, Deadline]]:
        """One request and its body, under a deadline (TransferTooSlow names the host)."""
        async with deadline(self.limits, f"{method} /v2/{ref.repository}/{path}") as clock:
            resp = await self._open(method, ref, path, headers, clock)
            try:
                yield resp, clock
            finally:
                await resp.aclose()

    async def _raise_for_status(self, resp: httpx.Response, ref: Reference, path: str,
                                clock: Deadline) -> None:
        if resp.status_code < 400:
            return
        body = b""
        try:
            async for chunk in resp.aiter_raw():
                clock.received(len(chunk))
                body += chunk
                if len(body) > 65536:
                    break
        except httpx.HTTPError:
            pass
        where = f"{ref}: {resp.request.method} /v2/{ref.repository}/{path}"
        detail = _error_detail(body)
        status = resp.status_code
        if status == 401:
            raise AuthError(f"{where}: HTTP 401 unauthorized{detail}",
                            hint="check the username/password or docker login")
        if status == 403:
            raise AuthError(f"{where}: HTTP 403 forbidden{detail}",
                            hint="the credentials lack pull access to this repository")
        if status == 404:
            raise RegistryNotFound(f"{where}: HTTP 404 not found{detail}")
        if resp.url.host and origin(resp.url) != origin(httpx.URL(self._url(ref, path))):
            where += f" (redirected to {resp.url.netloc.decode('ascii', 'replace')})"
        raise RegistryError(f"{where}: HTTP {status}{detail}")

    async def _get_small(self, ref: Reference, path: str, headers: dict[str, str],
                         limit: int) -> tuple[httpx.Response, bytes]:
        """GET a document (manifest, config) with retries; returns the response and body."""
        retries = _Retries(self.max_attempts, self.limits.retry_window_s)
        while True:
            last = retries.last()
            delay = self._delay(retries.count)
            try:
                async with self._exchange("GET", ref, path, headers) as (resp, clock):
                    if resp.status_code in RETRY_STATUSES and not last:
                        delay = self._delay(retries.count, resp)
                    else:
                        await self._raise_for_status(resp, ref, path, clock)
                        body = await read_body(resp, clock, limit,
                                               f"{ref}: /v2/{ref.repository}/{path}")
                        return resp, body
            except httpx.TransportError as err:
                if last:
                    raise RegistryError(
                        f"{ref}: GET /v2/{ref.repository}/{path} failed after "
                        f"{retries.count + 1} attempts: {err.__class__.__name__}: {err}"
                    ) from None
            retries.count += 1
            await trio.sleep(delay)

    # manifests -------------------------------------------------------------------------------

    async def fetch_manifest(self, ref: Reference, target: str) -> tuple[bytes, str, Digest]:
        """(body, content type, digest) of ``manifests/<target>`` (a tag or a digest)."""
        path = f"manifests/{target}"
        what = f"manifest {target} of {ref.name}"
        wanted: Digest | None = None
        if ":" in target:  # a digest (tags cannot contain ':')
            wanted = verifiable(Digest.parse(target), f"{ref}: {what}")
        resp, body = await self._get_small(ref, path, {"Accept": ACCEPT_MANIFESTS},
                                           MAX_MANIFEST_BYTES)
        if wanted is not None:
            wanted.verify_bytes(body, what)
        header = resp.headers.get("Docker-Content-Digest", "").strip()
        claimed: Digest | None = None
        if header:
            try:
                claimed = Digest.parse(header)
            except DigestError:
                raise RegistryError(f"{ref}: {what}: malformed Docker-Content-Digest "
                                    f"{header[:200]!r}") from None
            verifiable(claimed, f"{ref}: {what} (Docker-Content-Digest)")
            claimed.verify_bytes(body, what + " (Docker-Content-Digest)")
        digest = wanted or claimed or Digest.sha256_of(body)
        return body, resp.headers.get("Content-Type", ""), digest

    async def resolve(self, ref: Reference, platform: Platform | None = None, *,
                      manifest_known: Callable[[Digest], None] | None = None,
                      location_known: Callable[[Reference], None] | None = None,
                      layers_known: Callable[[list[Descriptor]], None] | None = None,
                      ) -> ResolvedImage:
        """Tag or digest → the platform manifest, its digest and its verified config.

        An index (OCI or Docker manifest list) is narrowed to ``platform`` (default:
        linux/<host arch>); a plain manifest is taken as is, whatever its platform.
        Each location registries.conf gives for ``ref`` is tried in order (mirrors, then
        the primary); the first that serves the image also serves its blobs. When all fail,
        the primary's error is raised with the mirrors' errors in its message (podman's way).

        ``manifest_known(digest)`` is called with the platform manifest's digest before its
        config is fetched (per location tried), so work that needs only the digest can run
        beside that round trip. ``location_known(physical)`` is called with each location's
        reference once its route is chosen and its scheme certain, before its manifest
        is requested (and before the ``/v2/`` ping when only https may serve it):
        :meth:`warm_up` can then open connections beside those requests.
        ``layers_known(layers)``, right after ``manifest_known``, gets the platform
        manifest's layer descriptors, checked: their downloads may start beside the config
        request (:mod:`cachefs.pipeline.early`).
        """
        sources = self.registries.pull_sources(ref)
        failures: list[tuple[PullSource, CachefsError]] = []
        for source in sources:
            self._routes[ref] = source
            try:
                if location_known is not None:
                    await self._announce(ref, location_known)
                return await self._resolve_at(ref, platform, manifest_known, layers_known)
            except CachefsError as err:
                if len(sources) == 1:
                    raise
                failures.append((source, err))
        where, primary = failures[-1]
        others = "; ".join(f"[{s.reference}: {e.one_line()}]" for s, e in failures[:-1])
        primary.args = (f"{primary} (at {where.reference}; mirrors also failed: {others})",)
        raise primary

    async def _resolve_at(self, ref: Reference, platform: Platform | None,
                          manifest_known: Callable[[Digest], None] | None = None,
                          layers_known: Callable[[list[Descriptor]], None] | None = None,
                          ) -> ResolvedImage:
        target = str(ref.digest) if ref.digest is not None else (ref.tag or "latest")
        body, ctype, digest = await self.fetch_manifest(ref, target)
        kind, media_type = _manifest_kind(body, ctype, f"{ref}")
        index_digest: Digest | None = None
        chosen: Platform | None = None
        if kind == "index":
            try:
                index = ImageIndex.model_validate_json(body)
            except ValidationError as err:
                raise RegistryError(f"{ref}: malformed image index: {_first_error(err)}") from None
            desc = select_manifest(index.manifests, platform, source=f"{ref}",
                                   error=RegistryError)
            index_digest, chosen = digest, desc.platform
            body, ctype, digest = await self.fetch_manifest(ref, desc.digest)
            kind, media_type = _manifest_kind(body, ctype, f"{ref} ({format_platform(chosen)})")
            if kind != "manifest":
                raise RegistryError(f"{ref}: nested image indexes are not supported")
        try:
            manifest = ImageManifest.model_validate_json(body)
        except ValidationError as err:
            raise RegistryError(f"{ref}: malformed image manifest: {_first_error(err)}") from None
        for layer in manifest.layers:
            check_layer_descriptor(layer, f"{ref}")
            check_blob_descriptor(layer, f"{ref}", self.limits)
        verifiable(manifest.config.parsed_digest, f"{ref}: config")
        if manifest_known is not None:
            manifest_known(digest)
        if layers_known is not None:
            layers_known(manifest.layers)
        config_bytes = await self.fetch_config(ref, manifest.config)
        try:
            config = ImageConfigFile.model_validate_json(config_bytes)
        except ValidationError as err:
            raise RegistryError(f"{ref}: malformed image config: {_first_error(err)}") from None
        for diff_id in config.diff_ids:
            verifiable(diff_id, f"{ref}: config rootfs.diff_ids")
        if len(config.rootfs.diff_ids) != len(manifest.layers):
            raise RegistryError(
                f"{ref}: manifest has {len(manifest.layers)} layers but the config lists "
                f"{len(config.rootfs.diff_ids)} diff_ids"
            )
        return ResolvedImage(
            reference=ref,
            manifest_digest=digest,
            manifest=manifest,
            manifest_bytes=body,
            media_type=media_type,
            config_bytes=config_bytes,
            config=config,
            config_digest=manifest.config.parsed_digest,
            index_digest=index_digest,
            platform=chosen,
        )

    async def fetch_config(self, ref: Reference, descriptor: Descriptor) -> bytes:
        """The config blob, verified against its descriptor digest (and size, if given)."""
        if descriptor.media_type and descriptor.media_type not in CONFIG_TYPES:
            raise RegistryError(
                f"{ref}: config media type {descriptor.media_type!r} is not a container image "
                "config (is this an OCI artifact?)"
            )
        path = f"blobs/{descriptor.digest}"
        _, body = await self._get_small(ref, path, {}, MAX_CONFIG_BYTES)
        descriptor.parsed_digest.verify_bytes(body, f"config blob of {ref}")
        if descriptor.size and len(body) != descriptor.size:
            raise RegistryError(f"{ref}: config blob is {len(body)} bytes, descriptor says "
                                f"{descriptor.size}")
        return body

    # blobs ---------------------------------------------------------------------------------

    async def fetch_blob(
        self,
        ref: Reference,
        descriptor: Descriptor,
        dest: Path,
        *,
        resume: bool = True,
        progress: Progress | None = None,
        written: Progress | None = None,
    ) -> None:
        """Download a blob into ``dest`` (the ``.part`` file) and verify it.

        ``written(n)`` is called whenever ``dest`` holds ``n`` bytes of the blob (flushed,
        so another reader sees them): once the kept prefix is known, after each chunk, and
        with 0 when a restart truncates it. A reader may follow the file with it; the bytes
        are verified only when this returns.

        ``progress(n)`` is called with the number of bytes *newly received* from the network
        for each chunk (bytes reused from an existing partial file are not reported). On
        return ``dest`` holds exactly the verified blob; on DigestMismatch it is deleted; on
        other errors it keeps what was received so a later call can resume.
        """
        where = f"{ref}"
        if _is_foreign(descriptor.media_type):
            check_layer_descriptor(descriptor, where)
        check_blob_descriptor(descriptor, where, self.limits)
        digest = descriptor.parsed_digest
        hasher, have, done = await trio.to_thread.run_sync(
            _prepare_part, dest, digest, descriptor.size, resume
        )
        if written is not None:
            written(have)
        if done:
            return
        fetch = _BlobFetch(self, ref, descriptor, dest, hasher, have, progress, written)
        await fetch.run()
        actual = f"{digest.algorithm}:{fetch.hasher.hexdigest()}"
        if actual != str(digest):
            await trio.to_thread.run_sync(_unlink, dest)
            raise DigestMismatch(f"blob of {where}", str(digest), actual)


class _BlobFetch:
    """The attempts at one blob download into its ``.part``: each asks for the bytes after
    the kept prefix; a cut after progress is resumed at once, anything else after a backoff,
    within the client's attempt and time bounds."""

    def __init__(self, client: RegistryClient, ref: Reference, descriptor: Descriptor,
                 dest: Path, hasher: Any, have: int, progress: Progress | None,
                 written: Progress | None) -> None:
        self._client = client
        self._ref = ref
        self._digest = descriptor.parsed_digest
        self._expected = descriptor.size
        self._path = f"blobs/{self._digest}"
        self._dest = dest
        self._progress = progress
        self._written = written
        self.hasher = hasher  # over the bytes in ``dest``
        self.have = have  # bytes in ``dest``
        self._got = 0  # bytes the current attempt received

    async def run(self) -> None:
        """Until ``dest`` holds ``expected`` bytes (not yet verified), or the retries end."""
        client = self._client
        retries = _Retries(client.max_attempts, client.limits.retry_window_s)
        while True:
            delay = client._delay(retries.count)
            self._got = 0
            try:
                reason, delay = await self._attempt(retries, delay)
                if self.have == self._expected:
                    return
            except httpx.TransportError as err:
                reason = f"{err.__class__.__name__} ({self.have} bytes kept for resume)"
            if retries.last():
                raise RegistryError(
                    f"{self._ref}: downloading blob {self._digest} failed after "
                    f"{retries.count + 1} attempts in {retries.elapsed():.1f} s: {reason}",
                    hint=f"{client.limits.env_name('attempts')} and "
                         f"{client.limits.env_name('retry_window_s')} bound the retries",
                )
            retries.count += 1
            await trio.sleep(0 if self._got else delay)

    async def _attempt(self, retries: _Retries, delay: float) -> tuple[str, float]:
        """One request: (why it did not finish the blob, the delay before the next)."""
        client, ref, path, have = self._client, self._ref, self._path, self.have
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with client._exchange("GET", ref, path, headers) as (resp, clock):
            if resp.status_code in RETRY_STATUSES:
                if retries.last():
                    await client._raise_for_status(resp, ref, path, clock)
                return f"HTTP {resp.status_code}", client._delay(retries.count, resp)
            if resp.status_code == 416 and have:
                # Our prefix is not a prefix of theirs (or already complete): start over.
                await self._restart()
                return "HTTP 416 to a resume request", delay
            await client._raise_for_status(resp, ref, path, clock)
            status = resp.status_code
            restarted = False
            if have and (status != 206 or not _range_starts_at(resp, have)):
                # A full body (or a range we did not ask for): truncate, restart.
                await self._restart()
                restarted = True
            if status == 200 or (status == 206 and not restarted):
                await self._receive(resp, clock)
                return f"the body ended after {self.have} of {self._expected} bytes", delay
            return f"HTTP {status} to a request for bytes {self.have}-", delay

    async def _restart(self) -> None:
        """Drop the kept prefix: the next bytes written are the blob's first."""
        self.hasher, self.have = self._digest.hasher(), 0
        await trio.to_thread.run_sync(_truncate, self._dest)
        if self._written is not None:
            self._written(0)

    async def _receive(self, resp: httpx.Response, clock: Deadline) -> None:
        part = _Part(self.hasher, self.have)
        try:
            await _receive(resp, clock, self._dest, part, self._expected, self._progress,
                           self._written)
        finally:
            self._got, self.have = part.size - self.have, part.size  # even on an error


class _PlainFirstTransport(httpx.AsyncBaseTransport):
    """The transport of an ``insecure`` client, whose registry speaks plain HTTP.

    Why: a verifying TLS context loads the CA bundle (~20 ms at the start of every pull),
    which plain HTTP never uses. It is built on the first ``https`` request (a redirect, a
    token realm), and such requests are verified exactly as before.
    """

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self._verify = verify
        self._plain = httpx.AsyncHTTPTransport(verify=False)  # only ever sees http:// URLs
        self._tls: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            return await self._plain.handle_async_request(request)
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(verify=self._verify)
        return await self._tls.handle_async_request(request)

    async def aclose(self) -> None:
        await self._plain.aclose()
        if self._tls is not None:
            await self._tls.aclose()


def _unverified_mounts(conf: RegistriesConf) -> dict[str, httpx.AsyncBaseTransport]:
    """HTTPS without certificate checks for the hosts registries.conf marks insecure."""
    hosts: set[str] = set()
    for entry in conf.registries:
        for endpoint in (entry.endpoint, *entry.mirrors):
            if endpoint.insecure:
                hosts.add((endpoint.location or entry.prefix).split("/", 1)[0])
    return {f"https://{host}": httpx.AsyncHTTPTransport(verify=False)
            for host in sorted(hosts)}


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return f"{loc}: {first.get('msg', '')}" if loc else str(first.get("msg", ""))


def _range_starts_at(resp: httpx.Response, offset: int) -> bool:
    value = resp.headers.get("Content-Range", "")
    # "bytes <start>-<end>/<total>"
    try:
        unit, _, spec = value.partition(" ")
        return unit == "bytes" and int(spec.split("-", 1)[0]) == offset
    except ValueError:
        return False


@dataclass(eq=False, repr=False)
class _Part:
    """A ``.part`` being appended to: the hash of its bytes and their count."""

    hasher: Any
    size: int


async def _receive(resp: httpx.Response, clock: Deadline, dest: Path, part: _Part,
                   expected: int, progress: Progress | None, written: Progress | None) -> None:
    """Append the body to ``dest`` at ``part.size``, never past ``expected`` bytes: whatever
    a server sends beyond the descriptor's size is not read."""
    with naming(dest), dest.open("r+b" if dest.exists() else "wb") as f:
        f.seek(part.size)
        f.truncate()
        async for chunk in resp.aiter_raw():
            clock.received(len(chunk))
            chunk = chunk[: expected - part.size]
            f.write(chunk)
            part.hasher.update(chunk)
            part.size += len(chunk)
            if written is not None:
                f.flush()
                written(part.size)
            if progress is not None:
                progress(len(chunk))
            if part.size >= expected:
                break


def _hash_file(f: BinaryIO, hasher: Any) -> int:
    n = 0
    while chunk := f.read(1 << 20):
        hasher.update(chunk)
        n += len(chunk)
    return n


def _prepare_part(dest: Path, digest: Digest, expected: int | None,
                  resume: bool) -> tuple[Any, int, bool]:
    """Apply §1.6 to an existing ``.part``: (hasher over the kept prefix, its size, complete?)."""
    hasher = digest.hasher()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = dest.stat().st_size if resume else 0
    except FileNotFoundError:
        size = 0
    if size == 0 or (expected is not None and size > expected):
        dest.open("wb").close()
        return hasher, 0, False
    with dest.open("rb") as f:
        n = _hash_file(f, hasher)
    if expected is not None and n == expected:
        if hasher.hexdigest() == digest.encoded:
            return hasher, n, True
        dest.open("wb").close()
        return digest.hasher(), 0, False
    return hasher, n, False


def _truncate(dest: Path) -> None:
    dest.open("wb").close()


def _unlink(dest: Path) -> None:
    dest.unlink(missing_ok=True)


__all__ = [
    "ACCEPT_MANIFESTS",
    "RegistryClient",
    "ResolvedImage",
    "check_layer_descriptor",
]
