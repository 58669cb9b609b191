"""The CLI as users and scripts meet it: exit codes, one-line errors, JSON, low-level tools."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from cachefs.errors import EXIT_CODES
from tests.cli.conftest import (
    CACHEFS,
    REF_A,
    REF_B,
    LoadedCache,
    assert_one_line_error,
    base_layer,
    cli,
    held_by_other_process,
    run,
)
from tests.fixtures.images import sha256
from tests.fixtures.system import require_tool


def test_help_documents_every_exit_code() -> None:
    result = cli(None, "--help")
    assert result.exit_code == 0
    rows = {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1].split(", ")
            for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+[A-Z]", line)}
    for name, code in EXIT_CODES.items():
        assert name in rows[str(code)], name  # each class, on its code's row
    assert len(rows) == len(set(EXIT_CODES.values()))  # one row per code
    version = run(None, "--version")
    assert version.returncode == 0 and version.stdout.startswith("cachefs, version ")


def test_error_families_exit_codes_and_one_line(loaded: LoadedCache, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.erofs"
    garbage.write_bytes(b"\0" * 8192)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (3, [str(loaded.root)], ["inspect", "Not A Valid//Ref"]),
        (4, [str(loaded.root)], ["inspect", "example.com/not/cached:1"]),
        (2, [str(a_file)], ["images"]),
        (9, [str(loaded.root)], ["erofs", "ls", str(garbage)]),
        (13, [str(loaded.root)], ["mount", str(tmp_path / "no-such-dir")]),
    ]
    for code, cache, args in cases:
        proc = run(Path(cache[0]), *args)
        assert_one_line_error(proc, code)
    loaded.fsmeta(REF_A).write_bytes(b"\0" * 4096)
    assert_one_line_error(run(loaded.root, "verify", REF_A), 10)
    with held_by_other_process(loaded.root / ".image-deletions" / "coordination.lock",
                               shared=False):
        assert_one_line_error(run(loaded.root, "gc"), 11)
        verbose = run(loaded.root, "-v", "gc")
    assert verbose.returncode == 11 and "Traceback" in verbose.stderr
    assert_one_line_error(run(loaded.root, "mount", "--notify", str(tmp_path)), 2)
    # click's own usage errors share UsageError's code.
    assert run(loaded.root, "rm").returncode == EXIT_CODES["UsageError"]


def test_images_table_json_and_quiet(loaded: LoadedCache) -> None:
    proc = run(loaded.root, "images", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["reference"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {REF_A, REF_B}
    md = loaded.metadata(REF_A)
    assert rows[REF_A]["manifest_digest"] == md.manifest_digest
    assert rows[REF_A]["state"] == "ready" and rows[REF_A]["layers"] == 2
    assert set(rows[REF_A]["sources"]) == {"msb-db", "manifest-json"}
    expected = sum(loaded.layer(layer.diff_id).stat().st_size for layer in md.layers)
    assert rows[REF_A]["size_bytes"] == expected + loaded.fsmeta(REF_A).stat().st_size

    quiet = run(loaded.root, "images", "-q")
    assert quiet.stdout.split() == sorted([REF_A, REF_B])
    table = run(loaded.root, "images").stdout.splitlines()
    assert table[0].split() == ["REFERENCE", "DIGEST", "LAYERS", "SIZE", "STATE", "SOURCES"]
    assert any(line.startswith(REF_A) and "ready" in line for line in table)
    loaded.vmdk(REF_B).unlink()
    rows = {r["reference"]: r for r in json.loads(run(loaded.root, "images", "--json").stdout)}
    assert rows[REF_B]["state"] == "incomplete" and rows[REF_B]["missing"] == ["vmdk"]


def test_inspect(loaded: LoadedCache) -> None:
    proc = run(loaded.root, "inspect", "--json", "example.com/cli/a:1")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    md = loaded.metadata(REF_A)
    assert doc["config_digest"] == md.config_digest
    assert doc["config"]["cmd"] == ["/bin/sh"] and doc["config"]["env"] == ["PATH=/bin"]
    assert [layer["diff_id"] for layer in doc["layer_details"]] == loaded.a.diff_ids()
    assert all(layer["valid"] for layer in doc["layer_details"])
    assert Path(doc["fsmeta"]["path"]) == loaded.fsmeta(REF_A)
    by_digest = run(loaded.root, "inspect", "--json", md.manifest_digest[:20])
    assert json.loads(by_digest.stdout)["reference"] == REF_A
    human = run(loaded.root, "inspect", REF_A).stdout
    assert md.manifest_digest in human and '"/bin/sh"' in human


def test_status_computed_without_a_mount(loaded: LoadedCache) -> None:
    proc = run(loaded.root, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {i["reference"] for i in doc["images"]["list"]} == {REF_A, REF_B}
    human = run(loaded.root, "status")
    assert "images:    2 ready of 2" in human.stdout and "source:    computed" in human.stdout


def test_erofs_from_tar_ls_cat_fsmeta_and_vmdk_match_msb(loaded: LoadedCache,
                                                          tmp_path: Path) -> None:
    tar = tmp_path / "base.tar"
    tar.write_bytes(base_layer())
    out = tmp_path / "base.erofs"
    proc = run(None, "erofs", "from-tar", str(tar), str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == sha256(tar.read_bytes())
    md = loaded.metadata(REF_A)
    assert out.read_bytes() == loaded.layer(md.layers[0].diff_id).read_bytes()

    listing = json.loads(run(None, "erofs", "ls", "--json", str(out)).stdout)
    by_path = {e["path"]: e for e in listing}
    assert by_path["/bin/t"]["target"] == "tool" and by_path["/etc/hostname"]["size"] == 8
    assert "/etc/hostname" in run(None, "erofs", "ls", str(out)).stdout
    assert run(None, "erofs", "cat", str(out), "/etc/hostname").stdout == "cachefs\n"
    missing = run(None, "erofs", "cat", str(out), "/nope")
    assert_one_line_error(missing, 2)

    layers = [loaded.layer(layer.diff_id) for layer in md.layers]
    fsmeta = tmp_path / "fsmeta.erofs"
    proc = run(None, "-q", "erofs", "fsmeta", str(fsmeta), *map(str, layers))
    assert proc.returncode == 0 and proc.stdout == ""
    assert fsmeta.read_bytes() == loaded.fsmeta(REF_A).read_bytes()
    through = run(None, "erofs", "cat", str(fsmeta), "/a.txt",
                  *[a for p in layers for a in ("--device", str(p))])
    assert through.stdout == "a" * 5000

    vmdk = tmp_path / "disk.vmdk"
    assert run(None, "vmdk", str(vmdk), str(fsmeta), *map(str, layers)).returncode == 0
    assert vmdk.read_text() == loaded.vmdk(REF_A).read_text().replace(
        str(loaded.fsmeta(REF_A).resolve()), str(fsmeta.resolve()))
    rel = tmp_path / "rel.vmdk"
    assert run(None, "vmdk", str(rel), str(fsmeta), *map(str, layers),
               "--relative-to", str(tmp_path)).returncode == 0
    assert '"fsmeta.erofs"' in rel.read_text()
    qemu_img = require_tool("qemu-img")
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", str(rel)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == sum(p.stat().st_size for p in [fsmeta, *layers])


# -- pull / load through the CLI ---------------------------------------------------------


def _archive(tmp_path: Path, tags: list[str], extra: bytes = b"x") -> Path:
    from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg

    image = TestImage([base_layer(), layer_tar([reg("extra", extra * 3000)])],
                      config={"Cmd": ["/bin/tool"]})
    return docker_archive(image, tags, tmp_path / f"{abs(hash(tuple(tags)))}.tar", compress=True)


def test_load_records_images_that_rm_and_gc_then_manage(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run(cache, "load", str(_archive(tmp_path, ["example.com/load/one:1"])))
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # no progress bars off a terminal
    ref, digest = first.stdout.split()
    assert ref == "example.com/load/one:1" and digest.startswith("sha256:")
    second = run(cache, "load", str(_archive(tmp_path, ["two"], extra=b"y")), "-t", "two:extra")
    assert second.returncode == 0, second.stderr
    assert [line.split()[0] for line in second.stdout.splitlines()] == [
        "docker.io/library/two:latest", "docker.io/library/two:extra"]
    rows = {r["reference"]: r for r in json.loads(run(cache, "images", "--json").stdout)}
    assert set(rows) == {"example.com/load/one:1", "docker.io/library/two:latest",
                         "docker.io/library/two:extra"}
    assert all(r["state"] == "ready" and "cachefs-load" in r["sources"] for r in rows.values())
    # One vocabulary: status.json (what the view serves) names the same sources.
    status = json.loads(run(cache, "status", "--json").stdout)
    assert {i["reference"]: i["sources"] for i in status["images"]["list"]} == {
        ref: row["sources"] for ref, row in rows.items()}
    assert run(cache, "verify").returncode == 0

    # Not in msb's database: plain rm works. The shared base layer and the retagged
    # manifest's fsmeta stay while another reference uses them.
    removed = json.loads(run(cache, "rm", "--json", "docker.io/library/two:latest").stdout)
    assert {r["kind"] for r in removed["removed"]} == {"manifest", "record"}
    removed = json.loads(run(cache, "rm", "--json", "two:extra").stdout)
    assert {r["kind"] for r in removed["removed"]} == {"manifest", "record", "fsmeta", "vmdk",
                                                      "layer"}
    assert len([r for r in removed["removed"] if r["kind"] == "layer"]) == 1
    assert run(cache, "verify").returncode == 0
    assert json.loads(run(cache, "gc", "--json").stdout)["removed"] == []
    assert run(cache, "images", "-q").stdout.split() == ["example.com/load/one:1"]


def test_load_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    assert_one_line_error(run(tmp_path / "cache", "load", str(bad)), EXIT_CODES["ArchiveError"])
    untagged = _archive(tmp_path, [])
    proc = run(tmp_path / "cache", "load", str(untagged))
    assert_one_line_error(proc, EXIT_CODES["ArchiveError"])
    assert "--tag" in proc.stderr


def _on_a_terminal(*args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run cachefs with stderr on a pseudo-terminal; return what the terminal showed."""
    import os
    import pty
    import threading

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run([CACHEFS, *args], stdout=subprocess.PIPE, stderr=slave, text=True,
                              timeout=120)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return proc, b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal_and_not_with_q(tmp_path: Path) -> None:
    archive = _archive(tmp_path, ["example.com/progress/img:1"])
    proc, shown = _on_a_terminal("--cache", str(tmp_path / "cache"), "load", str(archive))
    assert proc.returncode == 0
    assert "stitch fsmeta + vmdk" in shown and " done" in shown
    proc, shown = _on_a_terminal("-q", "--cache", str(tmp_path / "cache2"), "load", str(archive))
    assert proc.returncode == 0 and shown == ""


@pytest.mark.system
def test_pull_from_a_local_registry(tmp_path: Path) -> None:
    from tests.fixtures.registry import LocalRegistry

    cache = tmp_path / "cache"
    with LocalRegistry(tmp_path / "registry") as registry:
        registry.push_docker_archive(_archive(tmp_path, ["x/y:1"]), "cli/app", "v1")
        ref = f"{registry.host}/cli/app:v1"
        proc = run(cache, "pull", "--insecure", ref)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0] == ref and proc.stderr == ""
        again = run(cache, "pull", "--insecure", "--policy", "never", ref)
        assert again.returncode == 0
        assert again.stdout == proc.stdout.rstrip("\n") + " (already cached)\n"
        assert_one_line_error(run(cache, "pull", "--insecure", f"{registry.host}/cli/nope:v1"),
                              EXIT_CODES["RegistryError"])
        assert_one_line_error(
            run(cache, "pull", "--policy", "never", f"{registry.host}/cli/other:v1"),
            EXIT_CODES["NotCachedError"])
    rows = json.loads(run(cache, "images", "--json").stdout)
    assert [(r["reference"], r["state"]) for r in rows] == [(ref, "ready")]
    assert run(cache, "verify", ref).returncode == 0


@pytest.mark.system
def test_pull_with_credentials(tmp_path: Path) -> None:
    import os

    from tests.fixtures.registry import LocalRegistry

    with LocalRegistry(tmp_path / "registry", auth="basic", anonymous_pull=False) as registry:
        registry.push_docker_archive(_archive(tmp_path, ["x/y:1"]), "priv/app", "v1")
        ref = f"{registry.host}/priv/app:v1"
        cache = tmp_path / "cache"
        # nobody's ~/.docker/config.json may help: an empty HOME
        env = {**os.environ, "HOME": str(tmp_path / "home"), "DOCKER_CONFIG": str(tmp_path)}
        assert_one_line_error(run(cache, "pull", "--insecure", ref, env=env),
                              EXIT_CODES["AuthError"])
        wrong = subprocess.run([*_cli(cache), "pull", "--insecure", "--username",
                                registry.username, "--password-stdin", ref],
                               input="nope\n", capture_output=True, text=True, env=env)
        assert_one_line_error(wrong, EXIT_CODES["AuthError"])
        assert "nope" not in wrong.stderr
        ok = subprocess.run([*_cli(cache), "pull", "--insecure", "--username",
                             registry.username, "--password-stdin", ref],
                            input=registry.password + "\n", capture_output=True, text=True,
                            env=env)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split()[0] == ref
        assert_one_line_error(run(cache, "pull", "--password-stdin", ref, env=env), 2)


def _cli(cache: Path) -> list[str]:
    from tests.cli.conftest import CACHEFS

    return [CACHEFS, "--cache", str(cache)]


@pytest.mark.parametrize("args, names", [
    (["--bogus"], "--bogus"),
    (["frob"], "frob"),
    (["pull"], "REFERENCE"),
    (["erofs", "ls", "/nonexistent/a.erofs"], "/nonexistent/a.erofs"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], names: str) -> None:
    """click prints usage, a hint and the error on three lines; cachefs says it in one,
    naming what was wrong and where the help is."""
    line = assert_one_line_error(run(tmp_path, *args), 2)
    assert names in line and "--help" in line, line
