"""The configuration users already have: registries.conf mirrors, blocks and aliases, the
auth files podman/skopeo write, ``cachefs login/logout``, and localhost without --insecure —
through the real ``cachefs`` command, the real docker-registry on 127.0.0.1 and skopeo."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.cache.store import GlobalCache
from cachefs.errors import EXIT_CODES
from tests.cli.conftest import CACHEFS, assert_one_line_error
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, free_port
from tests.fixtures.system import require_tool, system_fixture

IMAGE = TestImage([layer_tar([reg("etc/os-release", b"PRETTY_NAME=bookworm-ish\n")]),
                   layer_tar([reg("usr/bin/tool", b"\x7fELF" + b"t" * 5000, mode=0o755)])],
                  config={"Cmd": ["/usr/bin/tool"]})
HUB_REF = "docker.io/library/debian:bookworm"


class World:
    """A private HOME, XDG dirs and registries.conf for one test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.runtime = tmp_path / "run"
        for d in (self.home, self.runtime):
            d.mkdir(mode=0o700)
        self.conf = tmp_path / "registries.conf"
        self.conf.write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items()
               if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME")},
            "HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CACHE_HOME": str(tmp_path / "cache-home"),
            "CONTAINERS_REGISTRIES_CONF": str(self.conf),
        }

    def cachefs(self, cache: Path, *args: str, stdin: str | None = None,
                **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CACHEFS, "--cache", str(cache), *args], input=stdin,
                              capture_output=True, text=True, timeout=300,
                              env={**self.env, **env})

    def skopeo(self, *args: str, stdin: str | None = None,
               **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([require_tool("skopeo"), *args], input=stdin,
                              capture_output=True, text=True, timeout=120,
                              env={**self.env, **env})


@pytest.fixture
@system_fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
@system_fixture
def local(tmp_path: Path) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "registry") as r:
        r.push_docker_archive(docker_archive(IMAGE, ["x/y:1"], tmp_path / "img.tar"),
                              "library/debian", "bookworm")
        yield r


def _artifacts(cache: Path, ref: str) -> dict[str, bytes]:
    """Every byte a pull published for ``ref`` (the VMDK names absolute cache paths, so its
    extents are compared by file name)."""
    c = GlobalCache(cache)
    meta = c.read_image_metadata(ref)
    assert meta is not None
    out = {"metadata": c.image_metadata_path(ref).read_bytes(),
           "fsmeta": c.fsmeta_erofs_path(meta.manifest).read_bytes(),
           "vmdk": "\n".join(line.replace(str(cache), "<cache>") for line in c.vmdk_path(
               meta.manifest).read_text().splitlines()).encode()}
    for diff in meta.diff_ids:
        out[f"layer {diff}"] = c.layer_erofs_path(diff).read_bytes()
    return out


# registries.conf -----------------------------------------------------------------------------


def test_docker_hub_mirror_pull_is_byte_identical_to_a_direct_pull(
    world: World, local: LocalRegistry
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    world.conf.write_text(f"""
[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "{dead}"

[[registry.mirror]]
location = "{local.host}"
""")
    direct = world.cachefs(world.tmp / "direct", "pull", f"{local.host}/library/debian:bookworm")
    assert direct.returncode == 0, direct.stderr
    mirrored = world.cachefs(world.tmp / "mirrored", "pull", HUB_REF)
    assert mirrored.returncode == 0, mirrored.stderr
    assert mirrored.stdout.split() == [HUB_REF, direct.stdout.split()[1]]
    assert (_artifacts(world.tmp / "mirrored", HUB_REF)
            == _artifacts(world.tmp / "direct", f"{local.host}/library/debian:bookworm"))
    rows = json.loads(world.cachefs(world.tmp / "mirrored", "images", "--json").stdout)
    assert [r["reference"] for r in rows] == [HUB_REF]
    # the short name means the same image, through the same mirror
    again = world.cachefs(world.tmp / "mirrored", "pull", "--policy", "always", "debian:bookworm")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == HUB_REF


def test_blocked_registry_is_a_one_line_error_without_network(world: World,
                                                               local: LocalRegistry) -> None:
    world.conf.write_text(f'[[registry]]\nlocation = "{local.host}"\nblocked = true\n')
    before = local.log_path.read_text().count("/v2/")
    line = assert_one_line_error(
        world.cachefs(world.tmp / "c", "pull", f"{local.host}/library/debian:bookworm"),
        EXIT_CODES["RegistryBlocked"])
    assert f"registry {local.host} is blocked in {world.conf}" in line
    assert local.log_path.read_text().count("/v2/") == before


def test_malformed_registries_conf_is_a_one_line_config_error(world: World) -> None:
    world.conf.write_text("[[registry]]\nprefix = \"x.example\"\n")
    line = assert_one_line_error(world.cachefs(world.tmp / "c", "pull", "x.example/a:1"),
                                 EXIT_CODES["ConfigError"])
    assert str(world.conf) in line


def test_aliases_and_search_registries_resolve_short_names(world: World,
                                                           local: LocalRegistry) -> None:
    dead = f"127.0.0.1:{free_port()}"
    world.conf.write_text(f"""
unqualified-search-registries = ["{dead}", "{local.host}"]
[aliases]
"acme-os" = "{local.host}/library/debian"
""")
    aliased = world.cachefs(world.tmp / "c", "pull", "acme-os:bookworm")
    assert aliased.returncode == 0, aliased.stderr
    assert aliased.stdout.split()[0] == f"{local.host}/library/debian:bookworm"
    searched = world.cachefs(world.tmp / "c2", "pull", "library/debian:bookworm")
    assert searched.returncode == 0, searched.stderr
    assert searched.stdout.split()[0] == f"{local.host}/library/debian:bookworm"
    cached = world.cachefs(world.tmp / "c2", "pull", "--policy", "never",
                           "library/debian:bookworm")
    assert cached.stdout.split()[0] == f"{local.host}/library/debian:bookworm", cached.stderr
    assert_one_line_error(world.cachefs(world.tmp / "c3", "pull", "--policy", "never",
                                        "library/debian:bookworm"),
                          EXIT_CODES["NotCachedError"])
    missing = world.cachefs(world.tmp / "c3", "pull", "library/nothing:1")
    line = assert_one_line_error(missing, EXIT_CODES["RegistryError"])
    assert dead in line and local.host in line


# localhost --------------------------------------------------------------------------------------


def test_localhost_registries_need_no_insecure(world: World, local: LocalRegistry) -> None:
    for host in (local.host, f"localhost:{local.port}"):
        proc = world.cachefs(world.tmp / "c", "pull", f"{host}/library/debian:bookworm")
        assert proc.returncode == 0, proc.stderr


# credentials -----------------------------------------------------------------------------------


@pytest.fixture
def private(tmp_path: Path) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "private", auth="basic", anonymous_pull=False) as r:
        r.push_docker_archive(docker_archive(IMAGE, ["x/y:1"], tmp_path / "p.tar"),
                              "team/app", "v1")
        yield r


def test_skopeo_login_file_is_used_by_pull(world: World, private: LocalRegistry) -> None:
    ref = f"{private.host}/team/app:v1"
    authfile = world.tmp / "skopeo-auth.json"
    denied = world.cachefs(world.tmp / "c", "pull", ref, REGISTRY_AUTH_FILE=str(authfile))
    assert "requires credentials" in assert_one_line_error(denied, EXIT_CODES["AuthError"])
    login = world.skopeo("login", "--tls-verify=false", "-u", private.username,
                         "--password-stdin", private.host, stdin=private.password + "\n",
                         REGISTRY_AUTH_FILE=str(authfile))
    assert login.returncode == 0, login.stderr
    ok = world.cachefs(world.tmp / "c", "pull", ref, REGISTRY_AUTH_FILE=str(authfile))
    assert ok.returncode == 0, ok.stderr
    # podman's default file, found without REGISTRY_AUTH_FILE
    default = world.runtime / "containers" / "auth.json"
    default.parent.mkdir()
    default.write_bytes(authfile.read_bytes())
    ok = world.cachefs(world.tmp / "c2", "pull", ref)
    assert ok.returncode == 0, ok.stderr


def test_cachefs_login_writes_what_skopeo_reads_and_logout_forgets(
    world: World, private: LocalRegistry
) -> None:
    ref = f"{private.host}/team/app:v1"
    wrong = world.cachefs(world.tmp / "c", "login", "-u", private.username, "--password-stdin",
                          private.host, stdin="not-the-password\n")
    assert_one_line_error(wrong, EXIT_CODES["AuthError"])
    assert "not-the-password" not in wrong.stderr
    authfile = world.runtime / "containers" / "auth.json"
    assert not authfile.exists()  # a refused password is never stored
    ok = world.cachefs(world.tmp / "c", "login", "-u", private.username, "--password-stdin",
                       private.host, stdin=private.password + "\n")
    assert ok.returncode == 0, ok.stderr
    assert authfile.stat().st_mode & 0o777 == 0o600
    assert private.password not in ok.stdout + ok.stderr
    inspect = world.skopeo("inspect", "--tls-verify=false", f"docker://{ref}")
    assert inspect.returncode == 0, inspect.stderr
    pulled = world.cachefs(world.tmp / "c", "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    out = world.cachefs(world.tmp / "c", "logout", private.host)
    assert out.returncode == 0, out.stderr
    assert json.loads(authfile.read_text()) == {"auths": {}}
    assert world.skopeo("inspect", "--tls-verify=false", f"docker://{ref}").returncode != 0
    denied = world.cachefs(world.tmp / "c2", "pull", ref)
    assert_one_line_error(denied, EXIT_CODES["AuthError"])
    assert_one_line_error(world.cachefs(world.tmp / "c", "logout", private.host),
                          EXIT_CODES["AuthError"])
    # no password on the command line, and none from a pipe without --password-stdin
    assert_one_line_error(world.cachefs(world.tmp / "c", "login", "-u", "x", private.host,
                                        stdin="pw\n"), EXIT_CODES["UsageError"])


def test_login_with_token_auth(world: World, tmp_path: Path) -> None:
    with LocalRegistry(tmp_path / "tok", auth="token", anonymous_pull=False) as r:
        proc = world.cachefs(world.tmp / "c", "login", "-u", r.username, "--password-stdin",
                             r.host, stdin=r.password + "\n")
        assert proc.returncode == 0, proc.stderr
        bad = world.cachefs(world.tmp / "c", "login", "-u", r.username, "--password-stdin",
                            r.host, stdin="wrong\n")
        assert_one_line_error(bad, EXIT_CODES["AuthError"])
