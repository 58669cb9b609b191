"""rm, gc, df and verify over caches msb filled, with other processes holding locks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cachefs.cache.locks import lease_path, publication_gate_path
from cachefs.digest import Digest
from cachefs.maintenance import list_images
from cachefs.reference import Reference
from tests.cli.conftest import REF_A, REF_B, LoadedCache, cli, held_by_other_process, run

FAKE = "sha256:" + "ab" * 32
FAKE2 = "sha256:" + "cd" * 32


def _orphans(loaded: LoadedCache) -> dict[str, Path]:
    """One of every kind of garbage: an unreferenced layer, fsmeta and VMDK, transient files."""
    c = loaded.cache
    some_layer = loaded.layer(loaded.metadata(REF_A).layers[1].diff_id)
    out = {
        "layer": c.layer_erofs_path(FAKE),
        "fsmeta": c.fsmeta_erofs_path(FAKE),
        "vmdk": c.vmdk_path(FAKE),
        "part": c.part_path(FAKE2),
        "spool": c.spool_path(FAKE2),
        "layer_part": c.layer_part_path(FAKE2),
        "targz": c.tar_path(FAKE2),
        "work": c.work_dir(FAKE2),
        "json_part": c.manifests_dir() / ("ef" * 32 + ".json.part"),
    }
    shutil.copyfile(some_layer, out["layer"])
    shutil.copyfile(loaded.fsmeta(REF_A), out["fsmeta"])
    out["vmdk"].write_text("# Disk DescriptorFile\n")
    for key in ("part", "spool", "layer_part", "targz", "json_part"):
        out[key].write_bytes(b"x" * 1000)
    out["work"].mkdir()
    (out["work"] / "fsmeta.erofs").write_bytes(b"y" * 4096)
    return out


def _gc(loaded: LoadedCache, *args: str) -> dict:
    result = cli(loaded.root, "gc", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_gc_dry_run_removes_nothing_then_gc_removes_exactly_the_garbage(
        loaded: LoadedCache) -> None:
    garbage = _orphans(loaded)
    before = loaded.files()
    report = _gc(loaded, "--dry-run")
    assert report["dry_run"] is True
    assert {Path(r["path"]) for r in report["removed"]} == set(garbage.values())
    after = loaded.files()
    assert all(after.get(k) == v for k, v in before.items()), "dry run changed the cache"

    report = _gc(loaded)
    assert {Path(r["path"]) for r in report["removed"]} == set(garbage.values())
    assert report["bytes_reclaimed"] == sum(r["size"] for r in report["removed"])
    expected_bytes = sum(v for k, v in before.items()
                         if any((loaded.root / k).is_relative_to(p) or loaded.root / k == p
                                for p in garbage.values()))
    assert report["bytes_reclaimed"] == expected_bytes
    assert not any(p.exists() for p in garbage.values())
    # Every image is untouched and still sound; lock files are never removed.
    assert run(loaded.root, "verify").returncode == 0
    for rel in before:
        if rel.endswith(".lock"):
            assert (loaded.root / rel).exists()
    # Nothing left to collect.
    assert _gc(loaded)["removed"] == []


def test_gc_prints_bytes_reclaimed(loaded: LoadedCache) -> None:
    garbage = _orphans(loaded)
    garbage_total = sum(loaded.files()[str(p.relative_to(loaded.root))]
                        for p in garbage.values() if p.is_file())
    garbage_total += 4096  # the work dir's file
    proc = run(loaded.root, "gc")
    assert proc.returncode == 0, proc.stderr
    assert f"reclaimed {garbage_total} bytes" in proc.stdout
    assert not any(p.exists() for p in garbage.values())
    again = run(loaded.root, "gc")
    assert again.returncode == 0 and "reclaimed 0 bytes" in again.stdout, again.stdout


def test_gc_skips_what_a_shared_lease_or_a_download_holds(loaded: LoadedCache) -> None:
    garbage = _orphans(loaded)
    with held_by_other_process(lease_path(garbage["layer"])), \
            held_by_other_process(lease_path(garbage["fsmeta"])), \
            held_by_other_process(loaded.cache.download_lock_path(FAKE2), shared=False):
        report = _gc(loaded)
        skipped = {Path(s["path"]): s["reason"] for s in report["skipped"]}
        assert garbage["layer"].exists() and "lease" in skipped[garbage["layer"]]
        assert garbage["fsmeta"].exists() and "lease" in skipped[garbage["fsmeta"]]
        assert garbage["part"].exists() and "download.lock" in skipped[garbage["part"]]
        assert garbage["targz"].exists()
        assert not garbage["spool"].exists()  # its layer lock was free
    report = _gc(loaded)  # the holders are gone
    assert not garbage["layer"].exists() and not garbage["part"].exists()
    assert not garbage["targz"].exists()


def test_gc_leaves_blobs_alone_while_a_pull_runs(loaded: LoadedCache) -> None:
    garbage = _orphans(loaded)
    pull_lock = loaded.cache.image_lock_path(Reference.parse("example.com/other:1"))
    with held_by_other_process(pull_lock, shared=False):
        report = _gc(loaded)
        assert garbage["targz"].exists()
        assert any(Path(s["path"]) == garbage["targz"] for s in report["skipped"])


def test_gc_keeps_layers_of_a_json_no_record_names(loaded: LoadedCache) -> None:
    """msb's database gone, no cachefs records: the json files alone keep layers alive."""
    shutil.rmtree(loaded.msb.db.parent)
    report = _gc(loaded)
    assert report["removed"] == []
    assert run(loaded.root, "verify").returncode == 0


def test_rm_removes_the_image_and_its_unique_layers_only(loaded: LoadedCache) -> None:
    md_a, md_b = loaded.metadata(REF_A), loaded.metadata(REF_B)
    base, only_a = md_a.layers[0].diff_id, md_a.layers[1].diff_id
    assert md_b.layers[0].diff_id == base
    a_files = [loaded.json(REF_A), loaded.fsmeta(REF_A), loaded.vmdk(REF_A), loaded.layer(only_a)]
    dry = cli(loaded.root, "rm", "--force", "--dry-run", "--json", REF_A)
    assert dry.exit_code == 0, dry.output
    assert {Path(r["path"]) for r in json.loads(dry.stdout)["removed"]} == set(a_files)
    assert all(p.exists() for p in a_files)

    result = cli(loaded.root, "rm", "--force", REF_A)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in a_files)
    assert loaded.layer(base).exists()
    assert run(loaded.root, "verify", REF_B).returncode == 0
    # Lock and lease files stay (their inodes must be stable for msb).
    assert loaded.cache.layer_erofs_lock_path(only_a).exists()
    assert lease_path(loaded.layer(only_a)).exists()


def test_rm_of_an_image_msb_registered_needs_force_without_the_database(
    loaded: LoadedCache,
) -> None:
    proc = run(loaded.root, "rm", "--no-msb-db", REF_A)
    assert proc.returncode == 2
    assert "msb" in proc.stderr and "--force" in proc.stderr
    assert loaded.json(REF_A).exists()


def test_rm_of_an_image_msb_registered_removes_its_rows(loaded: LoadedCache) -> None:
    """msb's database is of msb 0.7.11's schema: rm removes the rows as msb image rm does."""
    assert REF_A in loaded.msb("image", "ls").stdout
    proc = run(loaded.root, "rm", REF_A)
    assert proc.returncode == 0, proc.stderr
    listing = loaded.msb("image", "ls").stdout
    assert REF_A not in listing and REF_B in listing
    assert not loaded.json(REF_A).exists()
    assert "image not found" in loaded.msb("image", "inspect", REF_A, check=False).stderr.lower()


def test_rm_refuses_while_a_shared_lease_is_held(loaded: LoadedCache) -> None:
    before = loaded.files()
    for entry in (loaded.fsmeta(REF_A), loaded.json(REF_A),
                  loaded.layer(loaded.metadata(REF_A).layers[1].diff_id)):
        with held_by_other_process(lease_path(entry)):
            proc = run(loaded.root, "rm", "--force", REF_A)
            assert proc.returncode == 11, proc.stderr
            assert "in use" in proc.stderr
        assert all((loaded.root / k).exists() for k in before), "rm removed something"


def test_rm_refuses_while_the_reference_is_being_pulled(loaded: LoadedCache) -> None:
    with held_by_other_process(loaded.cache.image_lock_path(Reference.parse(REF_A)),
                               shared=False):
        proc = run(loaded.root, "rm", "--force", REF_A)
    assert proc.returncode == 11 and "pulled" in proc.stderr
    assert loaded.json(REF_A).exists()


def test_rm_refuses_while_published_or_another_deletion_runs(loaded: LoadedCache) -> None:
    gate = publication_gate_path(loaded.cache.manifests_dir(), Reference.parse(REF_A).cache_key)
    with held_by_other_process(gate):
        assert run(loaded.root, "rm", "--force", REF_A).returncode == 11
    with held_by_other_process(loaded.root / ".image-deletions" / "coordination.lock",
                               shared=False):
        assert run(loaded.root, "rm", "--force", REF_A).returncode == 11
        assert run(loaded.root, "gc").returncode == 11
    assert loaded.json(REF_A).exists()


def test_rm_of_a_cachefs_recorded_image_keeps_layers_a_loose_json_uses(
        loaded: LoadedCache) -> None:
    """Without msb's database: a cachefs record names A; B is only a json on disk."""
    md_a = loaded.metadata(REF_A)
    shutil.rmtree(loaded.msb.db.parent)
    loaded.cache.record_reference(REF_A, REF_A, md_a.manifest_digest, "load")
    images = {i.reference: i for i in list_images(loaded.cache)}
    assert images[REF_A].sources == ["cachefs", "manifest-json"]
    assert None in images  # B: a json nobody names
    result = cli(loaded.root, "rm", REF_A)
    assert result.exit_code == 0, result.output
    assert not loaded.cache.ref_record_path(REF_A).exists()
    assert not loaded.json(REF_A).exists()
    assert loaded.layer(md_a.layers[0].diff_id).exists()  # B's json still uses it
    assert not loaded.layer(md_a.layers[1].diff_id).exists()


def test_rm_unknown_reference(loaded: LoadedCache) -> None:
    assert run(loaded.root, "rm", "example.com/nope:1").returncode == 4
    assert run(loaded.root, "rm", "--force", "example.com/nope:1").returncode == 0


def test_df_bytes_by_kind_and_shared_vs_unique(loaded: LoadedCache) -> None:
    result = cli(loaded.root, "df", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    layers = [p for p in loaded.cache.layers_dir().glob("*.erofs")]
    assert doc["bytes_by_kind"]["layers"] == sum(p.stat().st_size for p in layers)
    assert doc["files_by_kind"]["layers"] == 3
    assert doc["bytes_by_kind"]["fsmeta"] == sum(
        p.stat().st_size for p in loaded.cache.fsmeta_dir().glob("*.erofs"))
    assert doc["bytes_by_kind"]["vmdk"] == sum(
        p.stat().st_size for p in loaded.cache.vmdk_dir().glob("*.vmdk"))
    assert doc["bytes_by_kind"]["manifests"] == sum(
        p.stat().st_size for p in loaded.cache.manifests_dir().glob("*.json"))
    assert doc["bytes_by_kind"]["tmp"] == 0
    per = {i["reference"]: i for i in doc["images"]}
    base = loaded.layer(loaded.metadata(REF_A).layers[0].diff_id).stat().st_size
    for ref in (REF_A, REF_B):
        own = loaded.layer(loaded.metadata(ref).layers[1].diff_id).stat().st_size
        own += loaded.fsmeta(ref).stat().st_size + loaded.vmdk(ref).stat().st_size
        assert per[ref]["shared_bytes"] == base
        assert per[ref]["unique_bytes"] == own
    human = run(loaded.root, "df")
    assert human.returncode == 0 and "layers" in human.stdout and REF_A in human.stdout


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_finds_a_bad_crc_and_repair_restores_msbs_bytes(loaded: LoadedCache) -> None:
    fsmeta = loaded.fsmeta(REF_A)
    original = fsmeta.read_bytes()
    _flip(fsmeta, 1152 + 0x48)  # reserved bytes of device slot 0: only the crc notices
    proc = run(loaded.root, "verify", "--json", REF_A)
    assert proc.returncode == 10
    doc = json.loads(proc.stdout)
    [image] = doc["images"]
    assert any("checksum" in p["message"] and p["repairable"] for p in image["problems"])
    assert run(loaded.root, "verify", REF_B).returncode == 0
    fixed = run(loaded.root, "verify", "--repair", REF_A)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired" in fixed.stdout
    assert fsmeta.read_bytes() == original


def test_verify_sees_a_layer_that_changed_size_and_repair_rebuilds(loaded: LoadedCache) -> None:
    layer = loaded.layer(loaded.metadata(REF_B).layers[1].diff_id)
    with layer.open("ab") as f:
        f.write(bytes(4096))
    proc = run(loaded.root, "verify", "--json", REF_B)
    assert proc.returncode == 10
    problems = json.loads(proc.stdout)["images"][0]["problems"]
    kinds = {p["artifact"] for p in problems}
    assert kinds == {"fsmeta", "vmdk"}, problems
    assert any("blocks" in p["message"] for p in problems if p["artifact"] == "fsmeta")
    assert run(loaded.root, "verify", "--repair", REF_B).returncode == 0
    assert run(loaded.root, "verify").returncode == 0


def test_verify_sees_a_stale_vmdk_path(loaded: LoadedCache) -> None:
    vmdk = loaded.vmdk(REF_A)
    vmdk.write_text(vmdk.read_text().replace(str(loaded.root), "/elsewhere/cache"))
    proc = run(loaded.root, "verify", REF_A)
    assert proc.returncode == 10 and "/elsewhere/cache" in proc.stdout
    assert run(loaded.root, "verify", "--repair", REF_A).returncode == 0
    assert str(loaded.root.resolve()) in vmdk.read_text()


def test_verify_missing_layer_is_not_repairable(loaded: LoadedCache) -> None:
    diff_id = loaded.metadata(REF_A).layers[1].diff_id
    loaded.layer(diff_id).unlink()
    proc = run(loaded.root, "verify", "--repair", REF_A)
    assert proc.returncode == 10
    assert Digest.parse(diff_id).path_safe() in proc.stdout or diff_id in proc.stdout
    assert "missing" in proc.stdout


def test_pull_of_a_cached_image_rebuilds_an_fsmeta_with_a_bad_superblock(
    loaded: LoadedCache,
) -> None:
    """msb's rule calls this fsmeta valid (magic and root intact); the kernel would not."""
    fsmeta = loaded.fsmeta(REF_A)
    original = fsmeta.read_bytes()
    _flip(fsmeta, 1152 + 0x48)  # only the superblock crc notices
    proc = run(loaded.root, "-q", "pull", "--policy", "never", REF_A)
    assert proc.returncode == 0, proc.stderr
    assert fsmeta.read_bytes() == original
    assert run(loaded.root, "verify", REF_A).returncode == 0


def test_pull_of_a_cached_image_rewrites_a_vmdk_naming_another_cache(
    loaded: LoadedCache,
) -> None:
    vmdk = loaded.vmdk(REF_B)
    original = vmdk.read_text()
    vmdk.write_text(original.replace(str(loaded.root), "/elsewhere/cache"))
    proc = run(loaded.root, "-q", "pull", "--policy", "never", REF_B)
    assert proc.returncode == 0, proc.stderr
    assert vmdk.read_text() == original


def test_repair_replaces_while_a_reader_holds_the_image(loaded: LoadedCache) -> None:
    """A reader's shared lease does not block the repair; it keeps reading what it opened."""
    fsmeta = loaded.fsmeta(REF_A)
    original = fsmeta.read_bytes()
    _flip(fsmeta, 1152 + 0x48)
    damaged = fsmeta.read_bytes()
    with fsmeta.open("rb") as reader, held_by_other_process(lease_path(fsmeta)), \
            held_by_other_process(lease_path(loaded.vmdk(REF_A))):
        fixed = run(loaded.root, "verify", "--repair", REF_A)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "repaired" in fixed.stdout
        assert fsmeta.read_bytes() == original
        assert reader.read() == damaged  # the old inode, untouched
