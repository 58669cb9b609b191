"""push-erofs against the real docker-registry: idempotence, other referrers, auth, uploads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cachefs.cache import GlobalCache
from cachefs.errors import NotCachedError, RegistryError
from cachefs.oci.referrers import ARTIFACT_TYPE, OCI_INDEX, OCI_MANIFEST, referrers_tag
from cachefs.pipeline.pull import pull
from cachefs.share.provenance import layer_origin
from cachefs.share.push import push_erofs
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import (  # noqa: F401  (fixtures)
    LocalRegistry,
    flaky_proxy_factory,
    oci_layout,
    registry_factory,
)
from tests.fixtures.registry import test_client as client
from tests.fixtures.system import python
from tests.test_pull import IMAGE, artifacts

BIG = TestImage([layer_tar([reg("big.bin", os.urandom(3 << 20))]),
                 layer_tar([reg("small", b"x\n")])])
_WRITES = re.compile(r'"(PUT|POST|PATCH|DELETE) (/v2/[^ ]+) HTTP')


def writes(registry: LocalRegistry) -> list[tuple[str, str]]:
    """Every write request the registry logged so far (its access log)."""
    return [(m.group(1), m.group(2)) for m in _WRITES.finditer(
        registry.log_path.read_text(errors="replace"))]


def get(registry: LocalRegistry, repo: str, path: str, accept: str = OCI_MANIFEST) -> bytes:
    req = urllib.request.Request(f"http://{registry.host}/v2/{repo}/{path}",
                                 headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()  # type: ignore[no-any-return]


async def setup(tmp_path: Path, registry: LocalRegistry, image: TestImage = IMAGE,
                repos: tuple[str, ...] = ("app/img",)) -> GlobalCache:
    layout = oci_layout(image, tmp_path / "layout")
    cache = GlobalCache.new(tmp_path / "a")
    for repo in repos:
        registry.push_oci_layout(layout.path, repo, "v1")
        async with client() as c:
            await pull(cache, f"{registry.host}/{repo}:v1", client=c, erofs_artifacts="never")
    return cache


async def test_second_push_changes_nothing(tmp_path: Path, registry_factory: Any) -> None:  # noqa: F811
    registry = registry_factory()
    cache = await setup(tmp_path, registry)
    ref = f"{registry.host}/app/img:v1"
    async with client() as c:
        first = await push_erofs(cache, ref, c)
    assert not first.unchanged and first.mechanism == "tag-schema"
    assert len(first.stats.uploaded) == 5  # empty config, 3 layers, fsmeta
    meta = cache.read_image_metadata(ref)
    assert meta is not None
    tag = referrers_tag(meta.manifest)
    index_before = get(registry, "app/img", f"manifests/{tag}", OCI_INDEX)
    before = writes(registry)
    async with client() as c:
        second = await push_erofs(cache, ref, c)
    assert second.unchanged and second.artifact == first.artifact
    assert writes(registry) == before  # not one PUT, POST or PATCH
    assert get(registry, "app/img", f"manifests/{tag}", OCI_INDEX) == index_before
    manifest = json.loads(get(registry, "app/img", f"manifests/{first.artifact}"))
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert manifest["subject"]["digest"] == str(meta.manifest)
    assert [a["annotations"].get("io.cachefs.erofs.diff_id") for a in manifest["layers"]] == \
        [*(layer.diff_id for layer in meta.layers), None]


async def test_other_tools_referrers_survive(tmp_path: Path, registry_factory: Any) -> None:  # noqa: F811
    registry = registry_factory()
    cache = await setup(tmp_path, registry)
    ref = f"{registry.host}/app/img:v1"
    meta = cache.read_image_metadata(ref)
    assert meta is not None
    subject_body = get(registry, "app/img", f"manifests/{meta.manifest}")
    # another tool (an SBOM attacher) pushed its referrer and the tag-schema index first
    config = registry.push_blob("app/img", b"{}")
    sbom = registry.push_blob("app/img", b'{"sbom": true}')
    other = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config,
                   "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": sbom, "size": 14}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": str(meta.manifest),
                    "size": len(subject_body)},
    }).encode()
    other_digest = registry.push_manifest("app/img", "sbom", other, OCI_MANIFEST)
    tag = referrers_tag(meta.manifest)
    registry.push_manifest("app/img", tag, json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": other_digest, "size": len(other),
                       "artifactType": "application/spdx+json",
                       "annotations": {"org.example.tool": "sbomer"}}]}).encode(), OCI_INDEX)
    async with client() as c:
        report = await push_erofs(cache, ref, c)
    entries = json.loads(get(registry, "app/img", f"manifests/{tag}", OCI_INDEX))["manifests"]
    assert [e["digest"] for e in entries] == [other_digest, report.artifact]
    assert entries[0]["annotations"] == {"org.example.tool": "sbomer"}
    assert entries[1]["artifactType"] == ARTIFACT_TYPE
    async with client() as c:  # a second push keeps both as well
        assert (await push_erofs(cache, ref, c)).unchanged
    again = json.loads(get(registry, "app/img", f"manifests/{tag}", OCI_INDEX))["manifests"]
    assert again == entries
    # and a host pulling with artifacts still finds ours among them
    b = GlobalCache.new(tmp_path / "b")
    async with client() as c:
        await pull(b, ref, client=c, erofs_artifacts="only")
    assert artifacts(b.root) == artifacts(cache.root)


async def test_read_only_credentials_one_line_error(
    tmp_path: Path, registry_factory: Any, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    registry = registry_factory(auth="token")
    token = registry.token_server
    assert token is not None
    token.users["reader"] = "read-only-pw"
    grant = token._grant

    def read_only(user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = grant(user, scopes)
        if user == "reader":
            for a in access:
                a["actions"] = [x for x in a["actions"] if x == "pull"]
        return access

    monkeypatch.setattr(token, "_grant", read_only)
    cache = await setup(tmp_path, registry)
    ref = f"{registry.host}/app/img:v1"
    before = writes(registry)
    proc = subprocess.run(
        [python(), "-m", "cachefs.cli", "--cache", str(cache.root), "push-erofs", "--insecure",
         "--username", "reader", "--password-stdin", ref],
        input="read-only-pw\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 6, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no push access" in lines[0] and "app/img" in lines[0], lines
    assert "read-only-pw" not in proc.stderr
    assert [w for w in writes(registry) if w not in before and w[0] != "POST"] == []
    # the same push with alice's credentials works, and a second one sends nothing
    for unchanged in (False, True):
        proc = subprocess.run(
            [python(), "-m", "cachefs.cli", "--cache", str(cache.root), "push-erofs",
             "--insecure", "--username", registry.username, "--password-stdin", "--json", ref],
            input=registry.password + "\n", capture_output=True, text=True, timeout=120,
            env={**os.environ, "HOME": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["unchanged"] is unchanged and doc["mechanism"] == "tag-schema"
        assert doc["blobs_uploaded"] == (0 if unchanged else 5)
    # a host with anonymous (pull-only) access finds and uses it
    b = GlobalCache.new(tmp_path / "b")
    async with client() as c:
        await pull(b, ref, client=c, erofs_artifacts="only")
    assert artifacts(b.root) == artifacts(cache.root)


async def test_chunked_upload_and_cross_repository_mount(
    tmp_path: Path, registry_factory: Any  # noqa: F811
) -> None:
    registry = registry_factory()
    cache = await setup(tmp_path, registry, BIG, repos=("team/one", "team/two"))
    async with client() as c:
        one = await push_erofs(cache, f"{registry.host}/team/one:v1", c, chunk_size=1 << 20)
    patches = [p for m, p in writes(registry) if m == "PATCH"]
    assert len(patches) >= 2, patches  # the 3 MiB layer's EROFS went in 1 MiB chunks
    assert len(one.stats.uploaded) == 4
    async with client() as c:
        two = await push_erofs(cache, f"{registry.host}/team/two:v1", c)
    # the two repositories hold the same image: its EROFS blobs are mounted, not re-sent
    assert len(two.stats.mounted) == 3 and len(two.stats.uploaded) == 1  # + empty config
    assert any("mount=" in p and ("from=team%2Fone" in p or "from=team/one" in p)
               for m, p in writes(registry) if m == "POST")
    b = GlobalCache.new(tmp_path / "b")
    ref_two = f"{registry.host}/team/two:v1"
    async with client() as c:
        await pull(b, ref_two, client=c, erofs_artifacts="only")
    meta = b.read_image_metadata(ref_two)
    assert meta is not None
    assert [layer_origin(b, d)["origin"] for d in meta.diff_ids] == ["fetched-erofs"] * 2
    for d in meta.diff_ids:
        assert b.layer_erofs_path(d).read_bytes() == cache.layer_erofs_path(d).read_bytes()


async def test_push_needs_the_image_cached_and_in_the_registry(
    tmp_path: Path, registry_factory: Any  # noqa: F811
) -> None:
    registry = registry_factory()
    cache = await setup(tmp_path, registry)
    async with client() as c:
        with pytest.raises(NotCachedError, match="not in the cache"):
            await push_erofs(cache, f"{registry.host}/app/absent:v1", c)
    other = registry_factory()  # same image cached, but this registry never had it
    meta = cache.read_image_metadata(f"{registry.host}/app/img:v1")
    assert meta is not None
    moved = f"{other.host}/app/img:v1"
    cache.write_image_metadata(moved, meta)
    async with client() as c:
        with pytest.raises(RegistryError) as err:
            await push_erofs(cache, moved, c)
    assert "is not in" in err.value.one_line()
    assert "push the image itself first" in err.value.one_line()


class ReferrersApiProxy:
    """The OCI 1.1 referrers API in front of a registry that lacks it (distribution 2.8):
    a manifest PUT with a ``subject`` is recorded and answered with ``OCI-Subject``, as an
    API registry does, and ``GET …/referrers/<digest>`` lists what was recorded. Everything
    else is forwarded unchanged."""

    def __init__(self, upstream_port: int) -> None:
        import hashlib
        import http.client
        import http.server
        import threading

        self.referrers: dict[str, list[dict[str, Any]]] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forward(self) -> None:
                if "/referrers/" in self.path:
                    subject = self.path.split("/referrers/", 1)[1].split("?", 1)[0]
                    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                             "manifests": outer.referrers.get(subject, [])}
                    self._reply(200, [("Content-Type", OCI_INDEX)], json.dumps(index).encode())
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                # Host kept: the registry then names the proxy in upload locations
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                up.putrequest(self.command, self.path, skip_host=True,
                              skip_accept_encoding=True)
                for k, v in headers.items():
                    up.putheader(k, v)
                up.endheaders(body)
                resp = up.getresponse()
                data = resp.read()
                up.close()
                extra = []
                if self.command == "PUT" and "/manifests/" in self.path and body and \
                        resp.status == 201:
                    doc = json.loads(body)
                    if isinstance(doc.get("subject"), dict):
                        subject = doc["subject"]["digest"]
                        outer.referrers.setdefault(subject, []).append({
                            "mediaType": doc.get("mediaType"), "size": len(body),
                            "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                            "artifactType": doc.get("artifactType"),
                            "annotations": doc.get("annotations") or {}})
                        extra.append(("OCI-Subject", subject))
                self._reply(resp.status, [*resp.getheaders(), *extra], data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_registry_with_the_referrers_api(tmp_path: Path, registry_factory: Any) -> None:  # noqa: F811
    registry = registry_factory()
    api = ReferrersApiProxy(registry.port)
    try:
        layout = oci_layout(IMAGE, tmp_path / "layout")
        registry.push_oci_layout(layout.path, "app/img", "v1")
        ref = f"{api.host}/app/img:v1"
        cache = GlobalCache.new(tmp_path / "a")
        async with client() as c:
            await pull(cache, ref, client=c, erofs_artifacts="never")
            report = await push_erofs(cache, ref, c)
            assert report.mechanism == "referrers-api" and not report.unchanged
            assert report.stats.manifests == [report.artifact]  # no tag-schema index written
            again = await push_erofs(cache, ref, c)
            assert again.unchanged and again.mechanism == "referrers-api"
        meta = cache.read_image_metadata(ref)
        assert meta is not None
        with pytest.raises(urllib.error.HTTPError):  # the registry holds no referrers tag
            get(registry, "app/img", f"manifests/{referrers_tag(meta.manifest)}", OCI_INDEX)
        b = GlobalCache.new(tmp_path / "b")
        async with client() as c:
            await pull(b, ref, client=c, erofs_artifacts="only")
        assert artifacts(b.root) == artifacts(cache.root)
    finally:
        api.close()


def test_artifact_manifests_that_are_not_believed() -> None:
    from cachefs.digest import Digest
    from cachefs.oci.referrers import ErofsBlob, artifact_manifest, parse_artifact

    subject = Digest.sha256_of(b"manifest")
    d = Digest.sha256_of
    layer = ErofsBlob(d(b"z1"), 10, d(b"e1"), 4096, d(b"tar1"))
    fsmeta = ErofsBlob(d(b"z2"), 10, d(b"e2"), 4096, None)
    subj = {"mediaType": OCI_MANIFEST, "digest": str(subject), "size": 8}
    good = json.loads(artifact_manifest(subj, [layer], fsmeta))
    parsed = parse_artifact(json.dumps(good).encode(), subject)
    assert parsed.layers == (layer,) and parsed.fsmeta == fsmeta

    def refused(doc: dict[str, Any], match: str, subject: Digest = subject) -> None:
        with pytest.raises(RegistryError, match=match):
            parse_artifact(json.dumps(doc).encode(), subject)

    refused(good, "does not refer to", Digest.sha256_of(b"another image"))
    refused({**good, "layers": good["layers"][:1]}, "no fsmeta")
    refused({**good, "artifactType": "application/spdx+json"}, "not a cachefs")
    huge = json.loads(json.dumps(good))
    huge["layers"][0]["annotations"]["io.cachefs.erofs.size"] = str(1 << 50)
    refused(huge, "out of range")
    bad = json.loads(json.dumps(good))
    bad["layers"][0]["annotations"]["io.cachefs.erofs.diff_id"] = "sha256:nothex"
    refused(bad, "diff_id")
    two = json.loads(json.dumps(good))
    two["layers"].append(two["layers"][1])
    refused(two, "unexpected media type")


async def test_upload_location_on_another_host_is_refused(
    tmp_path: Path, registry_factory: Any, flaky_proxy_factory: Any  # noqa: F811
) -> None:
    """Behind a proxy that hides its own name, distribution hands out upload locations on
    its own port: another origin than the one pushed to, so no request (and no credential)
    goes there."""
    registry = registry_factory()
    proxy = flaky_proxy_factory(registry)
    layout = oci_layout(IMAGE, tmp_path / "layout")
    registry.push_oci_layout(layout.path, "app/img", "v1")
    ref = f"{proxy.host}/app/img:v1"
    cache = GlobalCache.new(tmp_path / "a")
    async with client() as c:
        await pull(cache, ref, client=c, erofs_artifacts="never")
        before = writes(registry)
        with pytest.raises(RegistryError) as err:
            await push_erofs(cache, ref, c)
    assert "upload location on another host" in err.value.one_line()
    assert [w[0] for w in writes(registry)[len(before):]] == ["POST"]  # only the session
