"""registries.conf: files, merge order, prefix matching and rewriting, and a RegistryClient
that follows mirrors against real registries on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefs.errors import ConfigError, InvalidReference, RegistryBlocked, RegistryError
from cachefs.oci import Authenticator, Credentials, RegistryClient
from cachefs.oci.registries_conf import RegistriesConf, load_registries_conf
from cachefs.reference import Reference
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, free_port
from tests.fixtures.system import system_fixture

IMAGE = TestImage([layer_tar([reg("etc/os-release", b"ID=debian\n")])],
                  config={"Cmd": ["/bin/sh"]})


def _env(tmp_path: Path, main: str | None = None, **extra: str) -> dict[str, str]:
    """An environment whose HOME is empty; ``main`` becomes $CONTAINERS_REGISTRIES_CONF."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), **extra}
    if main is not None:
        path = tmp_path / "registries.conf"
        path.write_text(main)
        env["CONTAINERS_REGISTRIES_CONF"] = str(path)
    return env


def _conf(tmp_path: Path, text: str) -> RegistriesConf:
    return load_registries_conf(_env(tmp_path, text))


def _sources(conf: RegistriesConf, ref: str) -> list[str]:
    return [str(s.reference) for s in conf.pull_sources(Reference.parse(ref))]


# files and merging -----------------------------------------------------------------------


def test_longest_prefix_wins_and_location_replaces_it(tmp_path: Path) -> None:
    conf = _conf(tmp_path, """
[[registry]]
prefix = "example.com"
location = "mirror.example.net"

[[registry]]
prefix = "example.com/foo"
location = "internal.example.net/bar"

[[registry]]
location = "example.org"
insecure = true
""")
    assert _sources(conf, "example.com/foo/img:1") == ["internal.example.net/bar/img:1"]
    assert _sources(conf, "example.com/foobar/img:1") == ["mirror.example.net/foobar/img:1"]
    assert _sources(conf, "example.com:5000/x:1") == ["example.com:5000/x:1"]  # no match
    assert _sources(conf, "other.io/x@sha256:" + "a" * 64) == ["other.io/x@sha256:" + "a" * 64]
    assert conf.insecure_for("example.org") is True
    assert conf.insecure_for("example.com") is None


def test_wildcard_prefix_matches_subdomains_without_rewriting(tmp_path: Path) -> None:
    conf = _conf(tmp_path, """
[[registry]]
prefix = "*.example.com"
blocked = true
""")
    for ref in ("a.example.com/x:1", "b.a.example.com:5000/x/y:1"):
        with pytest.raises(RegistryBlocked, match=r"\*\.example\.com is blocked"):
            conf.pull_sources(Reference.parse(ref))
    assert _sources(conf, "example.com/x:1") == ["example.com/x:1"]
    assert _sources(conf, "other.io/a.example.com/x:1") == ["other.io/a.example.com/x:1"]


def test_mirrors_in_order_then_primary_and_pull_from_mirror(tmp_path: Path) -> None:
    conf = _conf(tmp_path, """
[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "tags.example.net/hub"
pull-from-mirror = "tag-only"

[[registry.mirror]]
location = "digests.example.net"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "all.example.net"

[[registry]]
prefix = "quay.io"
location = "quay.io"
mirror-by-digest-only = true

[[registry.mirror]]
location = "q.example.net"
""")
    assert _sources(conf, "docker.io/library/debian:bookworm") == [
        "tags.example.net/hub/library/debian:bookworm", "all.example.net/library/debian:bookworm",
        "docker.io/library/debian:bookworm"]
    digest = "@sha256:" + "b" * 64
    assert _sources(conf, "debian" + digest) == [
        "digests.example.net/library/debian" + digest, "all.example.net/library/debian" + digest,
        "docker.io/library/debian" + digest]
    assert _sources(conf, "quay.io/a/b:1") == ["quay.io/a/b:1"]
    assert _sources(conf, "quay.io/a/b" + digest) == ["q.example.net/a/b" + digest,
                                                       "quay.io/a/b" + digest]


def test_drop_ins_merge_in_name_order_and_user_file_hides_system_dirs(tmp_path: Path) -> None:
    env = _env(tmp_path, """
unqualified-search-registries = ["one.example"]
[[registry]]
location = "a.example"
[aliases]
"tool" = "one.example/tools/tool"
"gone" = "one.example/gone"
""")
    dropins = Path(env["HOME"]) / ".config/containers/registries.conf.d"
    dropins.mkdir(parents=True)
    (dropins / "10-first.conf").write_text('unqualified-search-registries = ["two.example"]\n'
                                           '[[registry]]\nlocation = "a.example"\nblocked = true\n')
    (dropins / "20-second.conf").write_text('[aliases]\n"gone" = ""\n')
    (dropins / "30-ignored.txt").write_text("not toml at all [[[")
    conf = load_registries_conf(env)
    assert conf.unqualified_search == ("two.example",)
    with pytest.raises(RegistryBlocked):
        conf.pull_sources(Reference.parse("a.example/x:1"))
    assert conf.expand_short_name("tool:2") == ["one.example/tools/tool:2"]
    assert conf.expand_short_name("gone") == ["two.example/gone"]  # alias erased
    assert conf.expand_short_name("localhost/x") == ["localhost/x"]
    # a user registries.conf replaces the system one and only the user dir is read then
    del env["CONTAINERS_REGISTRIES_CONF"]
    user = Path(env["HOME"]) / ".config/containers/registries.conf"
    user.write_text('unqualified-search-registries = ["user.example"]\n')
    conf = load_registries_conf(env)
    assert conf.files[0] == user and conf.unqualified_search == ("two.example",)
    assert all(str(f).startswith(env["HOME"]) for f in conf.files)


def test_short_names_alias_search_and_docker_hub_default(tmp_path: Path) -> None:
    conf = _conf(tmp_path, """
unqualified-search-registries = ["reg1.example", "docker.io"]
short-name-mode = "enforcing"
[aliases]
"ubi" = "registry.example/ubi9/ubi"
""")
    assert conf.expand_short_name("ubi@sha256:" + "c" * 64) == [
        "registry.example/ubi9/ubi@sha256:" + "c" * 64]
    # names no alias of the machine's own drop-ins (e.g. Debian's shortnames.conf) covers
    with pytest.raises(InvalidReference, match="ambiguous"):
        conf.expand_short_name("acme-app")
    relaxed = _conf(tmp_path, 'unqualified-search-registries = ["reg1.example", "docker.io"]')
    assert relaxed.expand_short_name("acme-app:12") == ["reg1.example/acme-app:12",
                                                         "docker.io/acme-app:12"]
    assert RegistriesConf().expand_short_name("acme-app:12") == ["acme-app:12"]


def test_version_1_files_are_converted(tmp_path: Path) -> None:
    conf = _conf(tmp_path, """
[registries.search]
registries = ["s.example"]
[registries.insecure]
registries = ["i.example:5000"]
[registries.block]
registries = ["b.example"]
""")
    assert conf.unqualified_search == ("s.example",)
    assert conf.insecure_for("i.example:5000") is True
    with pytest.raises(RegistryBlocked):
        conf.pull_sources(Reference.parse("b.example/x:1"))


@pytest.mark.parametrize("text,message", [
    ("[[registry]\n", "not valid TOML"),
    ('[[registry]]\nlocation = "https://x.example"\n', "URI schemes are not supported"),
    ('[[registry]]\nprefix = "x.example"\n', "has no location"),
    ('[[registry]]\nprefix = "*.x.example/foo"\n', "must look like"),
    ('[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\nlocation = "m.example"\n'
     'pull-from-mirror = "sometimes"\n', "unsupported pull-from-mirror"),
    ('[[registry]]\nlocation = "x.example"\nmirror-by-digest-only = true\n'
     '[[registry.mirror]]\nlocation = "m.example"\npull-from-mirror = "all"\n', "choose one"),
    ('[[registry]]\nprefix = "a.example"\nlocation = "x.example"\ninsecure = true\n'
     '[[registry]]\nprefix = "b.example"\nlocation = "x.example"\n', "conflicting 'insecure'"),
    ('short-name-mode = "loud"\n', "invalid short-name-mode"),
    ('[aliases]\n"x.example/y" = "x.example/y"\n', "must be a short name"),
    ('[aliases]\n"y" = "y:1"\n', "fully-qualified"),
])
def test_malformed_files_are_one_line_config_errors(tmp_path: Path, text: str,
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        _conf(tmp_path, text)
    assert str(tmp_path) in exc.value.one_line() and "\n" not in exc.value.one_line()


def test_missing_explicit_file_is_an_error_but_missing_defaults_are_not(tmp_path: Path) -> None:
    env = _env(tmp_path, CONTAINERS_REGISTRIES_CONF=str(tmp_path / "nope.conf"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_registries_conf(env)


# the client follows the routes --------------------------------------------------------------


class _Recorder:
    """A plain-HTTP server on 127.0.0.1 that answers 404 and records each request's path and
    Authorization header (a mirror that does not have the image)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                if self.path == "/v2/":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    r = _Recorder()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
@system_fixture
def local(tmp_path: Path) -> Iterator[LocalRegistry]:
    with LocalRegistry(tmp_path / "registry") as r:
        r.push_docker_archive(docker_archive(IMAGE, ["x/y:1"], tmp_path / "img.tar"),
                              "library/debian", "bookworm")
        yield r


async def test_dead_and_empty_mirrors_fall_through_in_order_and_explicit_credentials_stay_home(
    tmp_path: Path, local: LocalRegistry, recorder: _Recorder
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    conf = _conf(tmp_path, f"""
[[registry]]
prefix = "example.com/hub"
location = "{local.host}/library"

[[registry.mirror]]
location = "{dead}"

[[registry.mirror]]
location = "{recorder.host}/mirror"
""")
    auth = Authenticator(Credentials("alice", "only-for-example-com"), lookup=None,
                         explicit_hosts=set())
    async with RegistryClient(registries=conf, authenticator=auth, backoff_s=0.0,
                              max_attempts=1) as c:
        res = await c.resolve(Reference.parse("example.com/hub/debian:bookworm"))
    assert str(res.reference) == "example.com/hub/debian:bookworm"
    assert any(path == "/v2/mirror/debian/manifests/bookworm" for path, _ in recorder.requests)
    assert all(header is None for _, header in recorder.requests)  # no credential left home


async def test_all_locations_failing_names_each_of_them(tmp_path: Path,
                                                        recorder: _Recorder) -> None:
    primary, dead = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    conf = _conf(tmp_path, f"""
[[registry]]
prefix = "example.com"
location = "{primary}"
[[registry.mirror]]
location = "{dead}"
[[registry.mirror]]
location = "{recorder.host}"
""")
    async with RegistryClient(registries=conf, authenticator=Authenticator(lookup=None),
                              backoff_s=0.0, max_attempts=1) as c:
        with pytest.raises(RegistryError) as exc:
            await c.resolve(Reference.parse("example.com/a/b:1"))
    line = exc.value.one_line()
    assert f"at {primary}/a/b:1" in line and f"[{recorder.host}/a/b:1:" in line
    assert "404" in line
    assert f"[{dead}/a/b:1: mirror {dead} refused the connection]" in line  # not retried


async def test_tls_handshake_against_plain_http_is_one_clear_error_without_retries(
    tmp_path: Path, recorder: _Recorder
) -> None:
    conf = _conf(tmp_path, f'[[registry]]\nlocation = "{recorder.host}"\ninsecure = false\n')
    async with RegistryClient(registries=conf, authenticator=Authenticator(lookup=None),
                              backoff_s=0.0) as c:
        with pytest.raises(RegistryError) as exc:
            await c.resolve(Reference.parse(f"{recorder.host}/a/b:1"))
    line = exc.value.one_line()
    assert "answered the TLS handshake with plain HTTP" in line and "--insecure" in line
    assert "attempts" not in line
    assert len(recorder.requests) == 0  # the handshake never became an HTTP request


async def test_loopback_registry_needs_no_insecure(local: LocalRegistry) -> None:
    async with RegistryClient(authenticator=Authenticator(lookup=None), max_attempts=1) as c:
        res = await c.resolve(Reference.parse(f"{local.host}/library/debian:bookworm"))
    assert res.manifest.layers


@pytest.mark.system
async def test_insecure_true_skips_certificate_checks(tmp_path: Path) -> None:
    with LocalRegistry(tmp_path / "tls", tls=True) as r:
        r.push_docker_archive(docker_archive(IMAGE, ["x/y:1"], tmp_path / "i.tar"), "t", "1")
        ref = Reference.parse(f"{r.host}/t:1")
        conf = _conf(tmp_path, f'[[registry]]\nlocation = "{r.host}"\ninsecure = false\n')
        async with RegistryClient(registries=conf, authenticator=Authenticator(lookup=None),
                                  max_attempts=1) as c:
            with pytest.raises(RegistryError) as exc:
                await c.resolve(ref)
        line = exc.value.one_line()
        assert "certificate not trusted" in line and "--ca-certs" in line
        conf = _conf(tmp_path, f'[[registry]]\nlocation = "{r.host}"\ninsecure = true\n')
        async with RegistryClient(registries=conf, authenticator=Authenticator(lookup=None),
                                  max_attempts=1) as c:
            assert (await c.resolve(ref)).manifest.layers
