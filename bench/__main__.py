"""``make bench``: every benchmark, printed as a table and as JSON lines.

``BENCH_ARGS="--quick"`` shrinks the inputs for a smoke run; ``--only NAME`` picks one.
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import json
from pathlib import Path

SECTIONS = ["layers", "pull", "view", "artifacts"]


def msb_binary() -> str:
    import microsandbox  # type: ignore[import-not-found]

    return str(Path(microsandbox.__file__).parent / "_bundled" / "bin" / "msb")


def compile_bytecode() -> None:
    """Write ``__pycache__`` for the work tree, as ``pip install`` does for an installed package.

    The editable install runs cachefs from its sources; under ``PYTHONDONTWRITEBYTECODE``
    (set on our machines) every timed process would otherwise compile ~30 modules from
    source again, ~0.06 s that no installed ``cachefs`` pays. ``compileall`` writes the
    caches regardless of that setting, and Python reads them as usual (stale ones are
    recompiled in memory, so this never runs old code).
    """
    root = Path(__file__).resolve().parent.parent
    for package in ("cachefs", "bench"):
        compileall.compile_dir(root / package, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="small inputs (smoke run)")
    parser.add_argument("--only", choices=SECTIONS, action="append")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    msb = msb_binary()
    compile_bytecode()
    for section in args.only or SECTIONS:
        try:
            module = importlib.import_module(f"bench.{section}")
        except ModuleNotFoundError:
            print(f"# {section}: not available yet")
            continue
        for row in module.run(msb, quick=args.quick, rounds=args.rounds):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
