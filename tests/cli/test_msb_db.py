"""cachefs records what it pulls and loads in msb's database, row for row as msb does.

Every test runs the real msb 0.7.11 twice: once as the reference (it pulls or loads the
same image into its own home, and its rows are what ours must equal) and once as the
user of a cache cachefs filled (``msb image ls/inspect/rm``).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.conftest import run
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, oci_layout
from tests.fixtures.system import Msb, msb_binary, system_fixture

BASE = layer_tar([dir_("etc"), reg("etc/os-release", b"ID=msbdb\n")])
APP = TestImage([BASE, layer_tar([reg("app", b"x" * 3000)])],
                config={"Env": ["PATH=/bin", "B=2"], "Cmd": ["/bin/sh", "-c", "echo hi"],
                        "WorkingDir": "/w", "User": "1:1", "StopSignal": "SIGTERM",
                        "Labels": {"zz": "1", "aa": "2", "ünï": "ç"}})
BARE = TestImage([BASE, layer_tar([reg("bare", b"bare")])], config={"Env": []})
OTHER = TestImage([layer_tar([reg("other", b"other\n")])], config={"Entrypoint": ["/other"]})
TS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?$")


@dataclass
class Served:
    registry: LocalRegistry

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


@pytest.fixture(scope="module")
@system_fixture
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = tmp_path_factory.mktemp("msbdbreg")
    with LocalRegistry(d / "registry") as r:
        for name, image in (("app", APP), ("bare", BARE), ("other", OTHER)):
            r.push_oci_layout(oci_layout(image, d / name, compression="gzip").path,
                              f"db/{name}", "v1")
        yield Served(r)


def fresh_msb(path: Path) -> Msb:
    """msb with an empty database of its own schema (``msb image ls`` migrates it)."""
    m = Msb(msb_binary(), path)
    proc = m("image", "ls")
    assert "No images" in proc.stdout + proc.stderr
    assert m.db.is_file()
    return m


def table_rows(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every image row msb keeps, ids replaced by what they point to, timestamps checked
    for msb's format and then left out (they are times, not values)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for table, cols in (("image_ref", "created_at, updated_at"), ("manifest", "created_at"),
                            ("layer", "created_at, last_used_at"), ("config", "created_at")):
            for row in conn.execute(f"SELECT {cols} FROM {table}"):
                assert all(isinstance(t, str) and TS.match(t) for t in row), (table, row)
        q = {
            "image_ref": "SELECT r.reference, m.digest FROM image_ref r "
                         "JOIN manifest m ON m.id = r.manifest_id",
            "manifest": "SELECT digest, media_type, config_digest, architecture, os, variant, "
                        "layer_count, total_size_bytes FROM manifest",
            "layer": "SELECT diff_id, blob_digest, media_type, compressed_size_bytes, "
                     "erofs_size_bytes FROM layer",
            "manifest_layer": "SELECT m.digest, ml.position, l.diff_id FROM manifest_layer ml "
                              "JOIN manifest m ON m.id = ml.manifest_id "
                              "JOIN layer l ON l.id = ml.layer_id",
            "config": "SELECT m.digest, c.digest, c.env, c.cmd, c.entrypoint, c.working_dir, "
                      "c.user, c.labels, c.stop_signal FROM config c "
                      "JOIN manifest m ON m.id = c.manifest_id",
        }
        out = {name: conn.execute(sql).fetchall() for name, sql in q.items()}
        # msb keeps labels in a HashMap: their order is random per msb process
        out["config"] = [(*r[:7], _unordered(r[7]), *r[8:]) for r in out["config"]]
        return {name: sorted(rows, key=repr) for name, rows in out.items()}
    finally:
        conn.close()


def _unordered(labels: object) -> object:
    return sorted(json.loads(labels).items()) if isinstance(labels, str) else labels


def cachefs(m: Msb, *args: str) -> subprocess.CompletedProcess[str]:
    return run(m.cache, *args)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def test_pulled_images_have_msbs_rows_and_msb_lists_inspects_and_removes_them(
    served: Served, tmp_path: Path
) -> None:
    ours, theirs = fresh_msb(tmp_path / "ours"), Msb(msb_binary(), tmp_path / "theirs")
    refs = [served.ref("db/app:v1"), served.ref("db/bare:v1")]
    for ref in refs:
        ok(cachefs(ours, "pull", "--insecure", ref))
        theirs("pull", "--insecure", "--quiet", ref)
    assert table_rows(ours.db) == table_rows(theirs.db)
    assert table_rows(ours.db)["image_ref"]  # not two empty databases
    # again (a cache hit): msb touches the rows; still the same values, no duplicates
    ok(cachefs(ours, "pull", "--insecure", refs[0]))
    theirs("pull", "--insecure", "--quiet", refs[0])
    assert table_rows(ours.db) == table_rows(theirs.db)

    listing = ours("image", "ls").stdout
    assert all(ref in listing for ref in refs), listing
    shown = ours("image", "inspect", refs[0]).stdout
    assert "/bin/sh -c echo hi" in shown and "PATH=/bin" in shown and "Layers (2)" in shown
    ours("image", "rm", refs[0])
    assert refs[0] not in ours("image", "ls").stdout
    assert table_rows(ours.db)["image_ref"] == [(refs[1], table_rows(ours.db)["manifest"][0][0])]
    # msb removed the image's files as well (cachefs's own record of the name stays, and
    # `cachefs images` shows it incomplete until `cachefs rm`)
    rows = {r["reference"]: r for r in json.loads(ok(cachefs(ours, "images", "--json")).stdout)}
    assert rows[refs[1]]["state"] == "ready"
    assert rows.get(refs[0], {"missing": ["metadata"]})["missing"][:1] == ["metadata"]


@pytest.mark.system
def test_loaded_images_have_msbs_rows(tmp_path: Path) -> None:
    ours, theirs = fresh_msb(tmp_path / "ours"), Msb(msb_binary(), tmp_path / "theirs")
    plain = docker_archive(APP, ["team/app:1", "team/app"], tmp_path / "app.tar")
    packed = docker_archive(OTHER, ["other:2"], tmp_path / "other.tar", compress=True)
    for archive, tag in ((plain, "extra/tag:3"), (packed, None)):
        extra = ["-t", tag] if tag else []
        ok(cachefs(ours, "load", str(archive), *extra))
        theirs("load", "-i", str(archive), *(["--tag", tag] if tag else []))
    assert table_rows(ours.db) == table_rows(theirs.db)
    assert len(table_rows(ours.db)["image_ref"]) == 4
    assert "team/app:1" in ours("image", "ls").stdout


def test_cachefs_rm_removes_the_rows_as_msb_image_rm_does(served: Served, tmp_path: Path) -> None:
    ours, theirs = fresh_msb(tmp_path / "ours"), Msb(msb_binary(), tmp_path / "theirs")
    app, bare = served.ref("db/app:v1"), served.ref("db/bare:v1")
    for ref in (app, bare):
        ok(cachefs(ours, "pull", "--insecure", ref))
        theirs("pull", "--insecure", "--quiet", ref)
    ok(cachefs(ours, "rm", app))  # no --force needed: cachefs keeps the database right
    theirs("image", "rm", app)
    assert table_rows(ours.db) == table_rows(theirs.db)
    assert app not in ours("image", "ls").stdout and bare in ours("image", "ls").stdout
    ours("image", "rm", bare)  # msb removes what is left, files and rows
    assert table_rows(ours.db) == {k: [] for k in table_rows(ours.db)}
    assert not list((ours.cache / "layers").glob("*.erofs"))


def test_no_msb_db_leaves_the_database_alone(served: Served, tmp_path: Path) -> None:
    ours = fresh_msb(tmp_path / "ours")
    ref = served.ref("db/other:v1")
    ok(cachefs(ours, "pull", "--no-msb-db", "--insecure", ref))
    assert table_rows(ours.db)["image_ref"] == []
    assert "No images" in ours("image", "ls").stderr
    # ... and rm without the database write refuses an image msb lists, unless --force
    ok(cachefs(ours, "pull", "--insecure", ref))
    refused = cachefs(ours, "rm", "--no-msb-db", ref)
    assert refused.returncode != 0 and "msb's database" in refused.stderr
    assert table_rows(ours.db)["image_ref"] != []


def test_another_schema_is_never_touched_and_said_once(served: Served, tmp_path: Path) -> None:
    ours = fresh_msb(tmp_path / "ours")
    with sqlite3.connect(ours.db) as conn:
        conn.execute("INSERT INTO seaql_migrations VALUES ('m20270101_000001_future', 1)")
    before = table_rows(ours.db)
    archive = docker_archive(APP, ["a:1", "b:1", "c:1"], tmp_path / "app.tar")
    proc = ok(cachefs(ours, "load", str(archive)))
    assert table_rows(ours.db) == before
    said = [line for line in proc.stderr.splitlines() if "not msb 0.7.11" in line]
    assert len(said) == 1, proc.stderr
    assert "m20270101_000001_future" in said[0]
    assert len(proc.stdout.splitlines()) == 3  # the images themselves are loaded


_HOLD = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_a_pull_waits_for_msbs_write_lock(served: Served, tmp_path: Path) -> None:
    """Another writer holds the database: cachefs publishes the image, waits (busy
    timeout) for the lock, and records the rows once it is free."""
    ours = fresh_msb(tmp_path / "ours")
    ref = served.ref("db/app:v1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(ours.db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "held"
    pull = subprocess.Popen([*run_argv(ours), "pull", "--insecure", ref],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: list((ours.cache / "manifests").glob("*.json")), pull)
        holder.stdin.close()  # the writer commits; cachefs gets the lock
        holder.wait(timeout=30)
        _, err = pull.communicate(timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
        if pull.poll() is None:
            pull.kill()
    assert pull.returncode == 0, err
    assert [r[0] for r in table_rows(ours.db)["image_ref"]] == [ref]


def test_msb_pulls_while_cachefs_writes(served: Served, tmp_path: Path) -> None:
    """Both tools pull into one home at once: both succeed, both images are listed."""
    ours = fresh_msb(tmp_path / "ours")
    mine, msbs = served.ref("db/app:v1"), served.ref("db/other:v1")
    results: dict[str, object] = {}

    def by_msb() -> None:
        results["msb"] = ours("pull", "--insecure", "--quiet", msbs, check=False)

    t = threading.Thread(target=by_msb)
    t.start()
    results["cachefs"] = cachefs(ours, "pull", "--insecure", mine)
    t.join(timeout=300)
    for who in ("cachefs", "msb"):
        proc = results[who]
        assert isinstance(proc, subprocess.CompletedProcess) and proc.returncode == 0, proc
    listing = ours("image", "ls").stdout
    assert mine in listing and msbs in listing
    inspect = ours("image", "inspect", mine).stdout
    assert "Layers (2)" in inspect


def run_argv(m: Msb) -> list[str]:
    from tests.cli.conftest import CACHEFS

    return [CACHEFS, "--cache", str(m.cache)]


def wait_for(cond: object, proc: subprocess.Popen[str], deadline_s: float = 120.0) -> bool:
    """Poll ``cond`` until true, the process ends, or the deadline passes."""
    import time

    assert callable(cond)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(0.02)
    return False



def test_rm_refuses_an_image_a_sandbox_uses(served: Served, tmp_path: Path) -> None:
    """msb's schema keeps a manifest a sandbox uses (ON DELETE RESTRICT): cachefs rm says
    so and removes nothing, neither rows nor files."""
    ours = fresh_msb(tmp_path / "ours")
    ref = served.ref("db/other:v1")
    ok(cachefs(ours, "pull", "--insecure", ref))
    with sqlite3.connect(ours.db) as conn:
        (manifest_id,) = conn.execute("SELECT id FROM manifest").fetchone()
        conn.execute("INSERT INTO sandbox (name, config, status) VALUES ('sb', '{}', 'stopped')")
        conn.execute("INSERT INTO sandbox_rootfs (sandbox_id, manifest_id, mode) "
                     "VALUES (1, ?, 'oci')", (manifest_id,))
    before = table_rows(ours.db)
    files = sorted(p.name for p in (ours.cache / "layers").glob("*.erofs"))
    proc = cachefs(ours, "rm", ref)
    assert proc.returncode == 24, proc.stderr
    assert "sandbox" in proc.stderr and ref in proc.stderr
    assert table_rows(ours.db) == before
    assert sorted(p.name for p in (ours.cache / "layers").glob("*.erofs")) == files
    assert ref in ours("image", "ls").stdout


def test_a_database_locked_past_msbs_busy_timeout_costs_only_the_listing(
    served: Served, tmp_path: Path
) -> None:
    """A writer that never lets go: cachefs waits msb's busy timeout, then says so once
    and succeeds; the image is cached, and msb's own pull (a cache hit) lists it."""
    ours = fresh_msb(tmp_path / "ours")
    ref = served.ref("db/bare:v1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(ours.db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = ok(cachefs(ours, "pull", "--insecure", ref))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    said = [line for line in proc.stderr.splitlines() if "locked" in line]
    assert len(said) == 1 and f"msb pull {ref}" in said[0], proc.stderr
    assert table_rows(ours.db)["image_ref"] == []
    again = ours("pull", "--insecure", ref)
    assert "already cached" in again.stdout + again.stderr
    assert ref in ours("image", "ls").stdout
