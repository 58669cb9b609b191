"""The command line as people type it: options after the command, pipes, digests as tools
print them, terminals (progress bars, password prompts), and mistakes said plainly.

Terminal behaviour is tested on a real pseudo-terminal; registries are Debian's
``docker-registry`` on 127.0.0.1; OCI layouts with a tag-only ``ref.name`` are written by
the real skopeo.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.cache import GlobalCache
from cachefs.pipeline.progress import Event, LayerProgress, Resolved
from cachefs.pipeline.pull import load as load_archive
from cachefs.pipeline.pull import pull
from tests.cli.conftest import CACHEFS
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, oci_layout, registry_factory  # noqa: F401
from tests.fixtures.registry import test_client as client
from tests.fixtures.system import require_fuse, require_tool, system_fixture

APP = TestImage([layer_tar([dir_("etc"), reg("etc/motd", b"hand\n")]),
                 layer_tar([reg("app", b"a" * 4000)])], config={"Cmd": ["/app"]})
ARM = TestImage([layer_tar([reg("arch", b"arm64\n")])], architecture="arm64")
BIG = TestImage([layer_tar([reg("big.bin", os.urandom(3 << 20))])])
BIG_TAR_SIZE = len(BIG.layers[0])
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@dataclass
class Served:
    registry: LocalRegistry
    big_blobs: list[bytes]

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


@pytest.fixture(scope="module")
@system_fixture
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("handreg")
    with LocalRegistry(d / "registry") as r:
        r.push_oci_layout(oci_layout(APP, d / "app").path, "hand/app", "v1")
        r.push_oci_layout(oci_layout([APP, ARM], d / "multi").path, "hand/multi", "v1")
        big = oci_layout(BIG, d / "big")
        r.push_oci_layout(big.path, "hand/big", "v1")
        yield Served(r, big.images[0].layer_blobs)


def cachefs(*args: str, env: dict[str, str] | None = None, stdin: object = None,
            home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, with a private HOME (no developer credentials)."""
    full_env = dict(os.environ if env is None else env)
    if home is not None:
        full_env["HOME"] = str(home)
    return subprocess.run([CACHEFS, *args], capture_output=True, text=True, timeout=300,
                          env=full_env, stdin=stdin)  # type: ignore[call-overload]


def on_tty(argv: list[str], *, replies: dict[str, str] | None = None,
           env: dict[str, str] | None = None, deadline_s: float = 120.0) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a fresh pseudo-terminal (160x40);
    answer each prompt in ``replies`` once it appears. Returns (exit code, output
    without terminal control sequences)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    full_env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", **(env or {})}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=full_env,
                            start_new_session=True)
    os.close(slave)
    pending = dict(replies or {})
    out = b""
    end = time.monotonic() + deadline_s
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    break
                if not data:
                    break
                out += data
                for prompt in [p for p in pending if p.encode() in out]:
                    os.write(master, pending.pop(prompt).encode())
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, ANSI.sub("", out.decode(errors="replace"))


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


# -- global options after the command, --json results -----------------------------------


def test_global_options_after_the_command_and_json_results(served: Served,
                                                            tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ref = served.ref("hand/app:v1")
    doc = json.loads(ok(cachefs("pull", "--insecure", "--json", "--cache", str(cache), ref)).stdout)
    assert doc["reference"] == ref and doc["cached"] is False and doc["layers"] == 2
    assert Path(doc["fsmeta"]).is_file() and Path(doc["vmdk"]).is_file()
    # the cache option after the command reached the command
    assert (cache / "manifests").is_dir()
    assert ok(cachefs("images", "--cache", str(cache), "-q")).stdout.split() == [ref]
    again = json.loads(ok(cachefs("pull", "-q", "--json", "--insecure", ref, "--cache",
                                  str(cache))).stdout)
    assert again["cached"] is True and again["manifest_digest"] == doc["manifest_digest"]
    listed = json.loads(ok(cachefs("images", "--json", "--cache", str(cache))).stdout)
    assert [r["reference"] for r in listed] == [ref]
    # one vocabulary: every per-image JSON object names its image by "reference"
    df = json.loads(ok(cachefs("df", "--json", "--cache", str(cache))).stdout)
    verify = json.loads(ok(cachefs("verify", "--json", "--cache", str(cache))).stdout)
    assert df["images"][0]["reference"] == verify["images"][0]["reference"] == ref
    # every --json has help text
    for command in ("pull", "load", "images", "inspect", "rm", "gc", "df", "verify",
                    "status"):
        helptext = ok(cachefs(command, "--help")).stdout
        assert re.search(r"--json\s+\S", helptext), command
        assert "--cache" in helptext and "--quiet" in helptext, command


def test_pull_q_prints_no_progress_on_a_terminal(served: Served, tmp_path: Path) -> None:
    code, out = on_tty([CACHEFS, "pull", "-q", "--insecure", "--cache", str(tmp_path / "c"),
                        served.ref("hand/app:v1")])
    assert code == 0, out
    assert out.strip().splitlines() == [next(line for line in out.splitlines() if "sha256:"
                                             in line)]
    assert "pulling" not in out


# -- load from a pipe, OCI ref.name tags ---------------------------------------------------


def test_load_reads_an_archive_from_a_pipe(tmp_path: Path) -> None:
    archive = docker_archive(APP, ["example.com/hand/piped:1"], tmp_path / "app.tar")
    cache = tmp_path / "cache"
    for source in ("-", "/dev/stdin"):
        with subprocess.Popen(["cat", str(archive)], stdout=subprocess.PIPE) as cat:
            proc = cachefs("--cache", str(cache), "load", "--json", "--force", source,
                           stdin=cat.stdout)
        docs = json.loads(ok(proc).stdout)
        assert [d["reference"] for d in docs] == ["example.com/hand/piped:1"]
    assert ok(cachefs("--cache", str(cache), "verify", "example.com/hand/piped:1"))
    assert not [p for p in (cache / "tmp").iterdir() if p.name.endswith(".blob")]
    # a forgotten pipe: a terminal on stdin is refused rather than waited on
    code, out = on_tty([CACHEFS, "--cache", str(cache), "load", "-"], deadline_s=30)
    assert code == 2 and "standard input is a terminal" in out


@pytest.mark.system
def test_an_oci_ref_name_that_is_a_tag_is_not_an_image_name(tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    archive = docker_archive(APP, ["example.com/hand/src:1"], tmp_path / "app.tar")
    layout = tmp_path / "layout"
    subprocess.run([skopeo, "--insecure-policy", "copy", "--quiet",
                    f"docker-archive:{archive}", f"oci:{layout}:bookworm"], check=True)
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "bookworm"
    cache = tmp_path / "cache"
    refused = cachefs("--cache", str(cache), "load", str(layout))
    assert refused.returncode == 12 and "'bookworm' is only a tag" in refused.stderr
    assert "--tag" in refused.stderr
    ok(cachefs("--cache", str(cache), "load", str(layout), "-t", "example.com/hand/deb:bookworm"))
    assert ok(cachefs("--cache", str(cache), "images", "-q")).stdout.split() == [
        "example.com/hand/deb:bookworm"]


# -- names and digests ---------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 that accepts nothing: a connection attempt stays
    in its backlog, where the test can see it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def connections(sock: socket.socket) -> int:
    n = 0
    while select.select([sock], [], [], 0)[0]:
        sock.accept()[0].close()
        n += 1
    return n


def test_bad_names_and_platforms_fail_before_any_network(listener: socket.socket,
                                                         tmp_path: Path) -> None:
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    upper = cachefs("--cache", str(tmp_path / "c"), "pull", "--insecure", f"{host}/Team/app:v1")
    assert upper.returncode == 3
    assert "repository name must be lowercase" in upper.stderr
    assert len(upper.stderr.strip().splitlines()) == 1
    bad = cachefs("--cache", str(tmp_path / "c"), "pull", "--insecure", "--platform", "arm64",
                  f"{host}/team/app:v1")
    assert bad.returncode == 2 and "invalid platform 'arm64'" in bad.stderr
    assert connections(listener) == 0
    assert not (tmp_path / "c").exists()


def test_platforms_missing_and_mismatched(served: Served, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    missing = cachefs("--cache", cache, "pull", "--insecure", "--platform", "linux/s390x",
                      served.ref("hand/multi:v1"))
    assert missing.returncode != 0
    assert "linux/amd64" in missing.stderr and "linux/arm64" in missing.stderr
    ref = served.ref("hand/app:v1")
    ok(cachefs("--cache", cache, "pull", "--insecure", ref))
    hit = ok(cachefs("--cache", cache, "pull", "--insecure", "--platform", "linux/arm64", ref))
    assert "warning" in hit.stderr and "linux/amd64" in hit.stderr
    assert "linux/arm64" in hit.stderr
    same = ok(cachefs("--cache", cache, "pull", "--insecure", "--platform", "linux/amd64", ref))
    assert "warning" not in same.stderr


def test_inspect_by_every_spelling_of_a_digest(served: Served, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    ref = served.ref("hand/app:v1")
    doc = json.loads(ok(cachefs("--cache", cache, "pull", "--insecure", "--json", ref)).stdout)
    digest = doc["manifest_digest"]
    repo = ref.rsplit(":", 1)[0]
    for spelling in (ref, f"{repo}@{digest}", digest, digest[:19]):
        shown = json.loads(ok(cachefs("--cache", cache, "inspect", "--json", spelling)).stdout)
        assert shown["reference"] == ref and shown["manifest_digest"] == digest, spelling
    other_repo = cachefs("--cache", cache, "inspect", f"{served.ref('hand/other')}@{digest}")
    assert other_repo.returncode == 4


def test_inspect_shows_platform_created_and_compressed_layers(served: Served,
                                                              tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    ref = served.ref("hand/app:v1")
    ok(cachefs("--cache", cache, "pull", "--insecure", ref))
    doc = json.loads(ok(cachefs("--cache", cache, "inspect", "--json", ref)).stdout)
    config = json.loads(GlobalCache(Path(cache)).read_image_metadata(ref).raw_config_json)
    assert (doc["architecture"], doc["os"], doc["variant"]) == ("amd64", "linux", None)
    assert doc["created"] == config.get("created")
    manifest = json.loads(GlobalCache(Path(cache)).read_image_metadata(ref).raw_manifest_json)
    assert [(x["digest"], x["size_bytes"]) for x in doc["layer_details"]] == [
        (layer["digest"], layer["size"]) for layer in manifest["layers"]]
    text = ok(cachefs("--cache", cache, "inspect", ref)).stdout
    assert re.search(r"architecture:\s+amd64", text) and re.search(r"os:\s+linux", text)
    assert "BLOB DIGEST" in text and "COMPRESSED" in text and "DIFF_ID" in text
    for layer in manifest["layers"]:
        assert layer["digest"] in text


# -- progress on a terminal ------------------------------------------------------------------


def test_pull_progress_on_a_terminal(served: Served, tmp_path: Path) -> None:
    ref = served.ref("hand/big:v1")
    code, out = on_tty([CACHEFS, "--cache", str(tmp_path / "c"), "pull", "--insecure", ref])
    assert code == 0, out
    assert re.search(rf"pulling {re.escape(ref)} [0-9a-f]{{12}}: 1 layer", out), out
    blob = hashlib.sha256(served.big_blobs[0]).hexdigest()
    assert f"{blob[:12]} " in out  # the bar is labelled by the compressed digest
    size_mib = f"{len(served.big_blobs[0]) / (1 << 20):.1f} MiB"
    assert size_mib in out and re.search(r"\d MiB/s|\d KiB/s", out), out
    assert "total" in out and "stitch fsmeta + vmdk" in out
    code, out = on_tty([CACHEFS, "--cache", str(tmp_path / "c"), "pull", "--insecure", ref])
    assert code == 0, out
    assert re.search(rf"pulling {re.escape(ref)} [0-9a-f]{{12}}: 1 layer \(cached\)", out)
    assert f"{blob[:12]} cached" in out and f"{blob[:12]} waiting" not in out


def test_load_progress_on_a_terminal(tmp_path: Path) -> None:
    archive = docker_archive(BIG, ["example.com/hand/big:1"], tmp_path / "big.tar")
    code, out = on_tty([CACHEFS, "--cache", str(tmp_path / "c"), "load", str(archive)])
    assert code == 0, out
    assert "loading example.com/hand/big:1" in out and "MiB" in out and "total" in out


async def test_a_resumed_download_starts_at_the_bytes_on_disk(served: Served,
                                                               tmp_path: Path) -> None:
    blob = served.big_blobs[0]
    cache = GlobalCache.new(tmp_path / "cache")
    kept = len(blob) // 2
    part = cache.part_path("sha256:" + hashlib.sha256(blob).hexdigest())
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(blob[:kept])
    events: list[Event] = []
    async with client(insecure=True) as c:
        await pull(cache, served.ref("hand/big:v1"), client=c, progress=events.append)
    downloads = [e for e in events if isinstance(e, LayerProgress) and e.phase == "download"]
    assert downloads[0].done == kept and downloads[-1].done == len(blob)
    resolved = next(e for e in events if isinstance(e, Resolved))
    assert resolved.blobs == ("sha256:" + hashlib.sha256(blob).hexdigest(),)


async def test_load_reports_bytes_while_converting(tmp_path: Path) -> None:
    archive = docker_archive(BIG, ["example.com/hand/big:2"], tmp_path / "big.tar")
    events: list[Event] = []
    await load_archive(GlobalCache.new(tmp_path / "cache"), archive, progress=events.append)
    layer = [e for e in events if isinstance(e, LayerProgress)]
    converting = [e for e in layer if e.phase == "materialize" and e.done]
    done = [e.done for e in converting]
    assert len(done) >= 3 and done == sorted(done)
    assert done[-1] == converting[-1].total == BIG_TAR_SIZE  # every byte, then "done"
    assert layer[-1].phase == "done"


# -- credentials on a terminal ---------------------------------------------------------------


def test_username_alone_on_a_terminal_asks_for_the_password(
    registry_factory, tmp_path: Path  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    r = registry_factory(auth="basic")
    r.push_oci_layout(oci_layout(APP, tmp_path / "app").path, "hand/secret", "v1")
    ref = f"{r.host}/hand/secret:v1"
    home = {"HOME": str(tmp_path / "home")}
    code, out = on_tty([CACHEFS, "--cache", str(tmp_path / "c"), "pull", "--insecure",
                        "--username", r.username, ref],
                       replies={"Password for": r.password + "\n"}, env=home)
    assert code == 0, out
    assert f"Password for {r.username}" in out and r.password not in out
    # not on a terminal: say which options give the password
    piped = cachefs("--cache", str(tmp_path / "c2"), "pull", "--insecure", "--username",
                    r.username, ref, home=tmp_path / "home", stdin=subprocess.DEVNULL)
    assert piped.returncode == 2 and "--password-stdin" in piped.stderr
    # no credentials at all: the hint names options that exist
    anonymous = cachefs("--cache", str(tmp_path / "c3"), "pull", "--insecure", ref,
                        home=tmp_path / "home")
    assert anonymous.returncode == 6 and "--username" in anonymous.stderr
    assert "--password " not in anonymous.stderr and "--password)" not in anonymous.stderr


# -- a cache directory that does not exist ---------------------------------------------------


def test_a_missing_cache_directory_is_said_and_not_created(tmp_path: Path) -> None:
    nowhere = tmp_path / "typo"
    for args in (["images"], ["inspect", "x"], ["df"], ["verify"], ["verify", "--repair"],
                 ["gc", "--dry-run"], ["rm", "x"], ["status"]):
        proc = cachefs("--cache", str(nowhere), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"cache directory {nowhere} does not exist" in proc.stderr, args
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = cachefs("--cache", str(nowhere), "mount", str(mnt))
    assert refused.returncode == 2 and "--create" in refused.stderr
    assert not nowhere.exists()


@pytest.mark.system
def test_mount_create_makes_the_cache_and_serves_by_digest_aliases(tmp_path: Path) -> None:
    require_fuse()
    cache, mnt = tmp_path / "new-cache", tmp_path / "mnt"
    mnt.mkdir()
    ok(cachefs("--cache", str(cache), "mount", "--create", str(mnt)))
    try:
        assert cache.is_dir() and (mnt / "status.json").is_file()
        archive = docker_archive(APP, ["example.com/hand/view:1"], tmp_path / "app.tar")
        doc = json.loads(ok(cachefs("--cache", str(cache), "load", "--json",
                                    str(archive))).stdout)[0]
        digest = doc["manifest_digest"]
        safe = mnt / "by-digest" / digest.replace(":", "_")
        alias = mnt / "by-digest" / digest
        deadline = time.monotonic() + 20
        while not safe.is_dir() and time.monotonic() < deadline:  # the view refreshes
            time.sleep(0.1)
        assert safe.is_dir() and alias.is_dir()
        assert (alias / "disk.vmdk").read_bytes() == (safe / "disk.vmdk").read_bytes()
        assert os.readlink(alias) == safe.name
    finally:
        ok(cachefs("umount", str(mnt)))
