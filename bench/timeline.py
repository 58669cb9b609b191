"""Where one pull's wall time goes: the spans of its pipeline stages, on one time axis.

``python -m bench.timeline CACHE REF`` pulls ``REF`` (plain HTTP, as the benchmark's local
registry is) into a fresh ``CACHE`` and prints, sorted by start, every stage's span in
seconds since the interpreter started, its thread and that thread's CPU during the span.

Why: on 2 cores a pull is CPU-bound, so the whole-run wall time says little about where
to cut; the serial stretches do (imports, resolve, the last layer's planning, image
write and fsmeta, publish). Issue 15's rounds in ``docs/pull-profile.md`` were measured
this way. The stages are wrapped where the pipeline looks them up (``from x import y``
binds them per module), so the tool follows the code it measures; a stage that no longer
exists is reported as missing instead of silently dropped.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

_EPOCH = time.monotonic() - time.process_time()  # ≈ when this interpreter started
_spans: list[tuple[float, float, str, str, float]] = []
_lock = threading.Lock()

# (module, attribute) pairs, each where the pipeline calls it from
STAGES = (
    ("cachefs.pipeline.pull", "_resolve_plan"),
    ("cachefs.pipeline.pull", "_publish"),
    ("cachefs.pipeline.pull", "_drop_blobs"),
    # the pull imports these where it calls them (issue 15: after its first request), so
    # they are wrapped where they live; instrumenting loads their modules before the pull
    ("cachefs.pipeline.materialize", "start_layer"),
    ("cachefs.pipeline.materialize", "stitch_image"),
    ("cachefs.ingest.image", "ingest_layer"),
    ("cachefs.ingest.image", "plan_layer"),
    ("cachefs.ingest.image", "write_layer"),
    ("cachefs.erofs.fsmeta", "merge_layers"),  # called by fsmeta_of_layers
    ("cachefs.erofs.fsmeta", "write_fsmeta"),
    ("cachefs.pipeline.materialize", "publish_file"),
    ("cachefs.oci.registry", "RegistryClient.fetch_blob"),
)


def _record(label: str, start: float, cpu: float) -> None:
    with _lock:
        _spans.append((start - _EPOCH, time.monotonic() - _EPOCH, label,
                       threading.current_thread().name, time.thread_time() - cpu))


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.monotonic(), time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                _record(label, start, cpu)  # CPU of the trio thread, other tasks' too
        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.monotonic(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(label, start, cpu)
    return timed


def instrument() -> list[str]:
    """Wrap every stage; the labels of those not found (the code moved on)."""
    import importlib

    missing = []
    for module_name, attr in STAGES:
        owner: ModuleType | type = importlib.import_module(module_name)
        *outer, name = attr.split(".")
        for part in outer:
            owner = getattr(owner, part)
        fn = getattr(owner, name, None)
        if fn is None:
            missing.append(f"{module_name}.{attr}")
            continue
        setattr(owner, name, _timed(attr, fn))
    return missing


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m bench.timeline CACHE REF")
    import trio

    from cachefs.cache import GlobalCache
    from cachefs.pipeline.pull import pull

    imported = time.monotonic() - _EPOCH
    missing = instrument()

    async def run() -> None:
        await pull(GlobalCache.new(Path(argv[0])), argv[1], insecure=True)

    trio.run(run)
    done = time.monotonic() - _EPOCH
    print(f"{0:7.3f} {imported:7.3f}  imports", file=sys.stderr)
    for start, end, label, thread, cpu in sorted(_spans):
        print(f"{start:7.3f} {end:7.3f}  {label:28s} cpu {cpu:.3f}  [{thread}]", file=sys.stderr)
    print(f"{done:7.3f}          done, process CPU {time.process_time():.3f} s", file=sys.stderr)
    for name in missing:
        print(f"missing stage: {name}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
