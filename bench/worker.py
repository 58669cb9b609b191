"""One cachefs operation in its own process, for :func:`bench.measure.run_measured`.

``python -m bench.worker pull CACHE REF`` / ``python -m bench.worker load CACHE PATH``.

Why not the CLI: the benchmark measures the library's pipeline (the same code ``cachefs
pull`` runs) without the CLI's progress rendering, and a process of its own is the only way
the reporter's ``wait4`` sees this operation's peak RSS and not the harness's. The registry
is plain HTTP on 127.0.0.1, hence ``insecure``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cachefs.heap import imports_uncollected
from cachefs.pipeline.worker_spawn import prestarted


async def _main(op: str, cache_dir: str, arg: str) -> None:
    with imports_uncollected():  # as the cachefs console script imports (cachefs.entry)
        from cachefs.cache import GlobalCache
        from cachefs.pipeline.pull import load, pull

    cache = GlobalCache.new(Path(cache_dir))
    if op == "pull":
        await pull(cache, arg, insecure=True)
    elif op == "load":
        await load(cache, Path(arg))
    else:
        raise SystemExit(f"unknown operation {op!r} (pull | load)")


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: python -m bench.worker pull CACHE REF | load CACHE PATH")
    # as `cachefs pull` does: layer workers start while trio and httpx import
    with prestarted(None if argv[0] == "pull" else 0):
        with imports_uncollected():
            import trio

        trio.run(_main, argv[0], argv[1], argv[2])
    from cachefs.entry import leave

    leave(0)  # as the cachefs console script does after a success (cachefs.entry)


if __name__ == "__main__":
    main(sys.argv[1:])
