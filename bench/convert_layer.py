"""Worker: convert one layer blob into a layer EROFS exactly as ``cachefs load`` does.

Run as its own process so the harness can measure its peak RSS alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cachefs.erofs.writer import write_layer_erofs
from cachefs.layer import detect_compression, ingest_layer


def main(blob: Path, out: Path) -> None:
    spool_path = out.with_name(out.name + ".spool")
    with open(blob, "rb") as src, open(spool_path, "wb+") as spool, open(out, "wb") as dst:
        compression = detect_compression(src.read(4))
        src.seek(0)
        layer = ingest_layer(src, compression=compression, expected_diff_id=None,
                             spool=spool, layer_label=blob.name)
        spool.flush()
        write_layer_erofs(layer.root, spool, dst)
    spool_path.unlink()
    print(layer.diff_id, file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
