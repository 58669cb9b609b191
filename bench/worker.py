"""One cachefs operation in its own process, for :func:`bench.measure.run_measured`.

``python -m bench.worker pull CACHE REF`` / ``python -m bench.worker load CACHE PATH``.

Why not the CLI: the benchmark measures the library's pipeline (the same code ``cachefs
pull`` runs) without the CLI's progress rendering, and a process of its own is the only way
the reporter's ``wait4`` sees this operation's peak RSS and not the harness's. The registry
is plain HTTP on 127.0.0.1, hence ``insecure``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cachefs.heap import imports_uncollected
from cachefs.pipeline.worker_spawn import prestarted

# Printed with the time.perf_counter() (CLOCK_MONOTONIC: one clock for every process) of the
# operation's first network connection, so bench.measure.run_measured can split the wall
# time into start-up (interpreter, imports: ~0.1 s on one core before a pull asks anything)
# and the operation itself.
FIRST_CONNECT = "bench-first-connect"
_first_connect: list[float] = []


def _note_first_connect(event: str, args: tuple[object, ...]) -> None:
    """An audit hook (PEP 578): sockets raise ``socket.connect`` however high the stack
    above them, so the pull's code stays as it runs in ``cachefs pull``."""
    if event == "socket.connect" and not _first_connect and isinstance(args[1], tuple):
        _first_connect.append(time.perf_counter())  # an address (host, port): TCP


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
    sys.addaudithook(_note_first_connect)
    # as `cachefs pull` does: layer workers start while trio and httpx import
    with prestarted(None if argv[0] == "pull" else 0):
        with imports_uncollected():
            import trio

        trio.run(_main, argv[0], argv[1], argv[2])
    if _first_connect:
        print(FIRST_CONNECT, _first_connect[0], flush=True)
    from cachefs.entry import leave

    leave(0)  # as the cachefs console script does after a success (cachefs.entry)


if __name__ == "__main__":
    main(sys.argv[1:])
