"""Hostile layers through the real CLI.

Decompression bombs: ``cachefs load`` of a layer that inflates to hundreds of MiB of zeros
runs in memory that does not depend on the layer's size, in time linear in it, and a bomb
larger than the content cap fails with the cap's message. Numbers an EROFS inode cannot
hold fail as a layer error (exit 8), never as an internal error or a silent wrap.

Each load runs in a fresh process (a small Python parent around the real CLI) so its peak
RSS is its own and not the largest of everything this test session started before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.cli.conftest import CACHEFS
from tests.fixtures.registry import LocalRegistry
from tests.fixtures.system import system_fixture

_MEASURE = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(proc.returncode, peak_kib)
"""

_MIB = 1 << 20


class Sink:
    """Streaming compressor into memory: the compressed bomb is small, its content is not."""

    def __init__(self, kind: str) -> None:
        self.out = io.BytesIO()
        self.kind = kind
        if kind == "zstd":
            self._z = zstandard.ZstdCompressor(level=3).stream_writer(self.out, closefd=False)
        elif kind == "gzip":
            self._c = zlib.compressobj(6, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> None:
        if self.kind == "zstd":
            self._z.write(data)
        elif self.kind == "gzip":
            self.out.write(self._c.compress(data))
        else:
            self.out.write(data)

    def finish(self) -> bytes:
        if self.kind == "zstd":
            self._z.close()
        elif self.kind == "gzip":
            self.out.write(self._c.flush())
        return self.out.getvalue()


def zeros_layer(size: int, kind: str) -> tuple[bytes, str]:
    """A layer tar holding one file of ``size`` zero bytes, compressed; and its diff_id."""
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    ti.mode = 0o644
    header = ti.tobuf(tarfile.PAX_FORMAT)
    sink, digest = Sink(kind), hashlib.sha256()
    zeros = bytes(_MIB)

    def put(data: bytes) -> None:
        sink.write(data)
        digest.update(data)

    put(header)
    for _ in range(size // _MIB):
        put(zeros)
    put(bytes(size % _MIB + (-size % 512) + 1024))
    return sink.finish(), "sha256:" + digest.hexdigest()


def bomb_archive(out: Path, size: int, kind: str) -> Path:
    """A docker-archive whose one layer is ``zeros_layer(size, kind)``."""
    blob, diff_id = zeros_layer(size, kind)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["example.com/bomb:1"],
                            "Layers": ["l0/layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tf:
        for name, data in (("config.json", config), ("l0/layer.tar", blob),
                           ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return out


def measured_load(cache: Path, archive: Path, env: dict[str, str] | None = None
                  ) -> tuple[int, int, float, str]:
    """(exit code, peak RSS in bytes, seconds, stderr) of ``cachefs load`` in a fresh process."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, CACHEFS, "--cache", str(cache), "-q", "load",
         str(archive)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    elapsed = time.monotonic() - start
    code, peak_kib = proc.stdout.split()
    return int(code), int(peak_kib) * 1024, elapsed, proc.stderr


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak RSS of loading a 1 MiB image: everything but the layer's size."""
    tmp = tmp_path_factory.mktemp("baseline")
    code, peak, _, err = measured_load(tmp / "cache", bomb_archive(tmp / "a.tar", _MIB, "gzip"))
    assert code == 0, err
    return peak


@pytest.mark.parametrize("kind", ["zstd", "gzip", "plain"])
def test_bomb_load_memory_does_not_depend_on_layer_size(
    tmp_path: Path, baseline_rss: int, kind: str
) -> None:
    size = 256 * _MIB if kind == "plain" else 512 * _MIB
    archive = bomb_archive(tmp_path / "bomb.tar", size, kind)
    if kind != "plain":
        assert archive.stat().st_size < 4 * _MIB  # a bomb: tiny outside, big inside
    code, peak, elapsed, err = measured_load(tmp_path / "cache", archive)
    assert code == 0, err
    assert peak - baseline_rss < 48 * _MIB, (peak, baseline_rss)
    # linear time: a quadratic zstd path took 20 s for 256 MiB; this is ~2 s of work
    assert elapsed < 120
    layers = list((tmp_path / "cache" / "layers").glob("*.erofs"))
    assert len(layers) == 1 and layers[0].stat().st_size > size


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_bomb_over_the_content_cap_fails_with_the_cap_message(tmp_path: Path, kind: str) -> None:
    archive = bomb_archive(tmp_path / "bomb.tar", 256 * _MIB, kind)
    cap = 64 * _MIB
    code, _, elapsed, err = measured_load(tmp_path / "cache", archive,
                                          {"CACHEFS_MAX_LAYER_BYTES": str(cap)})
    assert code == 8, err
    assert f"layer content exceeds {cap} bytes" in err
    assert "CACHEFS_MAX_LAYER_BYTES" in err
    assert len(err.strip().splitlines()) == 1, err
    assert elapsed < 60
    assert not list((tmp_path / "cache" / "layers").glob("*.erofs"))


def test_gzip_and_zstd_bombs_give_the_same_layer(tmp_path: Path) -> None:
    """The zstd path is bounded, not different: both compressions give one EROFS."""
    for kind in ("zstd", "gzip"):
        archive = bomb_archive(tmp_path / f"{kind}.tar", 32 * _MIB, kind)
        code, _, _, err = measured_load(tmp_path / "cache", archive)
        assert code == 0, err
    assert len(list((tmp_path / "cache" / "layers").glob("*.erofs"))) == 1



def _hostile_header(ti: tarfile.TarInfo, *fields: tuple[int, int, bytes]) -> bytes:
    """``ti``'s ustar header with raw bytes put into numeric fields, checksum fixed."""
    hdr = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    for start, end, value in fields:
        hdr[start:end] = value
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _pax_uid_2_40() -> bytes:
    ti = tarfile.TarInfo("etc/passwd")
    ti.pax_headers = {"uid": str(1 << 40)}
    return ti.tobuf(tarfile.PAX_FORMAT)


def _char_device(major: int, minor: int) -> bytes:
    ti = tarfile.TarInfo("dev/evil")
    ti.type = tarfile.CHRTYPE
    return _hostile_header(ti, (329, 337, b"\x80" + major.to_bytes(7, "big")),
                           (337, 345, b"\x80" + minor.to_bytes(7, "big")))


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (_pax_uid_2_40(), "entry 'etc/passwd': uid 1099511627776 out of range"),
        (_hostile_header(tarfile.TarInfo("old"),
                         (136, 148, b"\x80" + (1 << 70).to_bytes(11, "big"))),
         f"entry 'old': mtime {1 << 70} out of range"),
        (_char_device(1 << 40, 1), f"entry 'dev/evil': device number {1 << 40}:1 out of range"),
        (_char_device(1, 1 << 33), f"entry 'dev/evil': device number 1:{1 << 33} out of range"),
    ],
    ids=["pax-uid-2^40", "mtime-2^70", "major-2^40", "minor-2^33"],
)
def test_numbers_erofs_cannot_hold_are_a_layer_error(tmp_path: Path, tar: bytes,
                                                     message: str) -> None:
    """Not an internal error (exit 70, a struct traceback), not a silent 0 (root, 0:0)."""
    tar += bytes(1024)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["example.com/evil:1"],
                            "Layers": ["l.tar"]}]).encode()
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("c.json", config), ("l.tar", tar), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    proc = subprocess.run([CACHEFS, "--cache", str(tmp_path / "cache"), "-q", "load",
                           str(archive)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 8, proc.stderr
    assert message in proc.stderr
    assert f"layer {diff_id}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "cache" / "layers").glob("*.erofs"))


# -- the same bombs through a pull from a registry on 127.0.0.1 ---------------------------

_MEDIA = {"zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
          "gzip": "application/vnd.oci.image.layer.v1.tar+gzip"}


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def bomb_layout(out: Path, size: int, kind: str) -> Path:
    """An OCI layout whose one layer is ``zeros_layer(size, kind)`` (built streaming)."""
    blob, diff_id = zeros_layer(size, kind)
    out.mkdir()
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(out, config)},
        "layers": [{"mediaType": _MEDIA[kind], **_blob(out, blob)}],
    }).encode()
    top = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(out, manifest),
           "annotations": {"org.opencontainers.image.ref.name": "latest"}}
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return out


@pytest.fixture(scope="module")
@system_fixture
def bomb_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    d = tmp_path_factory.mktemp("bombreg")
    with LocalRegistry(d / "registry") as registry:
        for name, size, kind in (("small", _MIB, "gzip"), ("zstd", 512 * _MIB, "zstd"),
                                 ("gzip", 512 * _MIB, "gzip")):
            registry.push_oci_layout(bomb_layout(d / name, size, kind), f"bomb/{name}", "v1")
        yield registry


def measured_pull(cache: Path, ref: str) -> tuple[int, int, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, CACHEFS, "--cache", str(cache), "-q", "pull",
         "--insecure", ref], capture_output=True, text=True, timeout=600)
    code, peak_kib = proc.stdout.split()
    return int(code), int(peak_kib) * 1024, proc.stderr


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_bomb_pull_memory_does_not_depend_on_layer_size(
    bomb_registry: LocalRegistry, tmp_path: Path, kind: str
) -> None:
    code, baseline, err = measured_pull(tmp_path / "small", f"{bomb_registry.host}/bomb/small:v1")
    assert code == 0, err
    code, peak, err = measured_pull(tmp_path / "cache", f"{bomb_registry.host}/bomb/{kind}:v1")
    assert code == 0, err
    assert peak - baseline < 48 * _MIB, (peak, baseline)
