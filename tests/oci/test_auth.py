"""Registry auth against real registries: htpasswd Basic, token auth, docker config, helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefs.errors import AuthError
from cachefs.oci import Authenticator, Credentials, RegistryClient, docker_config_credentials
from cachefs.oci.auth import parse_www_authenticate
from cachefs.reference import Reference
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, oci_layout, registry_factory  # noqa: F401

IMG = TestImage([layer_tar([reg("hello", b"hi\n")])])
PW = "s3cret-pw"


def pushed(factory: Callable[..., LocalRegistry], tmp_path: Path, auth: str,
           **kw: object) -> tuple[LocalRegistry, Reference, str]:
    r = factory(auth=auth, **kw)
    layout = oci_layout(IMG, tmp_path / "layout")
    r.push_oci_layout(layout.path, "team/app", "v1")
    return r, Reference.parse(f"{r.host}/team/app:v1"), layout.images[0].manifest_digest


def client(auth: Authenticator) -> RegistryClient:
    return RegistryClient(insecure=True, authenticator=auth, backoff_s=0.0)


def test_parse_www_authenticate() -> None:
    ch = parse_www_authenticate(
        'Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {"realm": "http://127.0.0.1:1/token", "service": "reg",
                         "scope": "repository:a/b:pull,push"}
    basic = parse_www_authenticate('Basic realm="x y"')
    assert basic is not None and basic.scheme == "basic" and basic.params == {"realm": "x y"}


def test_credentials_repr_hides_secret() -> None:
    assert PW not in repr(Credentials("alice", PW))


async def test_basic_auth(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r, ref, digest = pushed(registry_factory, tmp_path, "basic")
    async with client(Authenticator(Credentials(r.username, r.password))) as c:
        res = await c.resolve(ref)
        await c.fetch_blob(ref, res.layers[0], tmp_path / "l.part")
    assert str(res.manifest_digest) == digest
    async with client(Authenticator(lookup=None)) as c:
        with pytest.raises(AuthError, match="requires credentials"):
            await c.resolve(ref)
    async with client(Authenticator(Credentials(r.username, "wrong-pw"))) as c:
        with pytest.raises(AuthError) as exc:
            await c.resolve(ref)
    msg = exc.value.one_line()
    assert "\n" not in msg and "401" in msg and "team/app:v1" in msg
    assert "/v2/team/app/manifests/v1" in msg and "wrong-pw" not in msg


async def test_token_auth_anonymous_and_cached(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r, ref, digest = pushed(registry_factory, tmp_path, "token", anonymous_pull=True)
    assert r.token_server is not None
    r.token_server.requests.clear()
    auth = Authenticator(lookup=None)
    async with client(auth) as c:
        res = await c.resolve(ref)
        await c.resolve(ref)
        await c.fetch_blob(ref, res.layers[0], tmp_path / "l.part")
    assert str(res.manifest_digest) == digest
    # One token for repository:team/app:pull, reused for manifests, config and blobs.
    assert r.token_server.requests == [
        {"user": None, "scope": ["repository:team/app:pull"], "ok": True}
    ]


async def test_token_auth_credentialed(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r, ref, digest = pushed(registry_factory, tmp_path, "token", anonymous_pull=False)
    assert r.token_server is not None
    async with client(Authenticator(lookup=None)) as c:
        with pytest.raises(AuthError) as exc:
            await c.resolve(ref)
    assert "401" in exc.value.one_line()  # anonymous token grants nothing
    r.token_server.requests.clear()
    async with client(Authenticator(Credentials(r.username, PW))) as c:
        res = await c.resolve(ref)
    assert str(res.manifest_digest) == digest
    assert r.token_server.requests[0]["user"] == r.username
    async with client(Authenticator(Credentials(r.username, "nope-pw"))) as c:
        with pytest.raises(AuthError) as exc:
            await c.resolve(ref)
    msg = exc.value.one_line()
    assert "token service refused user 'alice'" in msg and "nope-pw" not in msg


# ~/.docker/config.json ----------------------------------------------------------------------


def write_config(home: Path, doc: dict[str, object]) -> dict[str, str]:
    (home / ".docker").mkdir(parents=True, exist_ok=True)
    (home / ".docker" / "config.json").write_text(json.dumps(doc))
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "")}


def fake_helper(bindir: Path, name: str, store: dict[str, tuple[str, str]]) -> Path:
    """``docker-credential-<name>``: answers ``get`` from ``store`` and logs each query."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"STORE = {json.dumps({k: list(v) for k, v in store.items()})}\n"
        "assert sys.argv[1] == 'get'\n"
        "server = sys.stdin.read().strip()\n"
        f"open({str(bindir / 'queries.log')!r}, 'a').write(server + '\\n')\n"
        "if server not in STORE:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "u, s = STORE[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': u, 'Secret': s}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_docker_config_auths_forms(tmp_path: Path) -> None:
    auth = base64.b64encode(b"bob:pw:with:colons").decode()
    env = write_config(tmp_path, {"auths": {
        "127.0.0.1:5000": {"auth": auth},
        "https://127.0.0.1:6000/v1/": {"username": "carol", "password": "pw2"},
    }})
    assert docker_config_credentials("127.0.0.1:5000", environ=env) == Credentials(
        "bob", "pw:with:colons")
    assert docker_config_credentials("127.0.0.1:6000", environ=env) == Credentials("carol", "pw2")
    assert docker_config_credentials("127.0.0.1:7000", environ=env) is None  # port matters
    assert docker_config_credentials("127.0.0.1", environ=env) is None
    assert docker_config_credentials("x", environ={"HOME": str(tmp_path / "none")}) is None


async def test_docker_config_used_and_explicit_wins(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r, ref, digest = pushed(registry_factory, tmp_path, "basic")
    good = base64.b64encode(f"{r.username}:{PW}".encode()).decode()
    env = write_config(tmp_path / "home", {"auths": {r.host: {"auth": good}}})

    def lookup(registry: str) -> Credentials | None:
        return docker_config_credentials(registry, environ=env)

    async with client(Authenticator(lookup=lookup)) as c:
        assert str((await c.resolve(ref)).manifest_digest) == digest
    bad = base64.b64encode(f"{r.username}:bad".encode()).decode()
    env = write_config(tmp_path / "home", {"auths": {r.host: {"auth": bad}}})
    async with client(Authenticator(Credentials(r.username, PW), lookup=lookup)) as c:
        assert str((await c.resolve(ref)).manifest_digest) == digest
    async with client(Authenticator(lookup=lookup)) as c:
        with pytest.raises(AuthError):
            await c.resolve(ref)


async def test_credential_helpers(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    r, ref, digest = pushed(registry_factory, tmp_path, "token", anonymous_pull=False)
    bindir = tmp_path / "bin"
    fake_helper(bindir, "test", {r.host: (r.username, PW)})
    path = f"{bindir}:{os.environ.get('PATH', '')}"
    home = tmp_path / "home"
    for doc in ({"credHelpers": {r.host: "test"}}, {"credsStore": "test"}):
        env = write_config(home, doc) | {"PATH": path}

        def lookup(registry: str, env: dict[str, str] = env) -> Credentials | None:
            return docker_config_credentials(registry, environ=env)

        async with client(Authenticator(lookup=lookup)) as c:
            assert str((await c.resolve(ref)).manifest_digest) == digest
    assert (bindir / "queries.log").read_text().split() == [r.host, r.host]
    # The helper does not know this registry → no credentials → a clear AuthError.
    env = write_config(home, {"credsStore": "test"}) | {"PATH": path}
    assert docker_config_credentials("127.0.0.1:1", environ=env) is None
    # A helper that is not installed is named in the error.
    env = write_config(home, {"credHelpers": {r.host: "absent"}}) | {"PATH": path}
    with pytest.raises(AuthError, match="docker-credential-absent"):
        docker_config_credentials(r.host, environ=env)


async def test_concurrent_requests_share_one_token(registry_factory, tmp_path: Path) -> None:  # noqa: F811
    import trio

    r, ref, _ = pushed(registry_factory, tmp_path, "token", anonymous_pull=False)
    auth = Authenticator(Credentials(r.username, PW))
    assert r.token_server is not None
    r.token_server.requests.clear()
    async with client(auth) as c:
        res = await c.resolve(ref)
        auth.forget(ref.registry, f"repository:{ref.repository}:pull")  # as if it expired
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(c.fetch_blob, ref, res.layers[0], tmp_path / f"{i}.part")
    # one token for resolve, one shared by the four downloads (counted by the token server)
    assert len(r.token_server.requests) == 2, r.token_server.requests
    assert all((tmp_path / f"{i}.part").stat().st_size == res.layers[0].size for i in range(4))
