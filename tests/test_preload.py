"""The preload thread of a pull's build modules (issue 15): a module it is importing is
safe to import from another thread at the same time, and a failure stays in the thread.

Each case runs in a fresh interpreter: the modules must not be loaded beforehand.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# The module the thread imports; its body holds the import until another thread is
# blocked waiting for the same module (the import system's record of lock waiters), so
# the two imports really do overlap, whatever the scheduling.
_SLOW = '''
import time
import importlib._bootstrap as bootstrap

import gate

gate.entered.set()
deadline = time.monotonic() + 30
while not bootstrap._blocking_on and time.monotonic() < deadline:
    time.sleep(0.001)  # polls a condition, bounded by the deadline
gate.other_waited = bool(bootstrap._blocking_on)
COMPLETE = True  # set last: a half-initialised module would lack it
'''

_GATE = '''
import threading

entered = threading.Event()
other_waited = False
'''

_RACE = '''
import sys
import threading

sys.path.insert(0, sys.argv[1])
import gate
from cachefs.pipeline.preload import Preload

preload = Preload(("slow",))
preload.start()
assert gate.entered.wait(30), "the thread never began the import"
import slow  # while the thread is inside the same module

assert slow.COMPLETE and gate.other_waited
preload.wait()
assert sys.modules["slow"] is slow and not preload.running
print("ok")
'''

_FAILING = '''
import sys

from cachefs.pipeline.preload import Preload

preload = Preload(("cachefs.digest", "no_such_module_here", "json"))
preload.start()
preload.wait()
assert "cachefs.digest" in sys.modules
try:
    import no_such_module_here  # noqa: F401
except ModuleNotFoundError:
    print("ok")
'''


def _run(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_module_being_preloaded_can_be_imported_at_the_same_time(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(_SLOW)
    (tmp_path / "gate.py").write_text(_GATE)
    assert _run(_RACE, str(tmp_path)) == "ok"


def test_a_failed_preload_leaves_the_error_to_the_importer() -> None:
    assert _run(_FAILING) == "ok"


def test_nothing_to_preload_starts_no_thread() -> None:
    code = '''
    import threading
    from cachefs.pipeline.preload import Preload

    before = threading.active_count()
    preload = Preload(("os", "threading"))
    preload.start()
    assert threading.active_count() == before and not preload.running
    print("ok")
    '''
    assert _run(code) == "ok"
