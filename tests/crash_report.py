"""What a crashed test process left behind, for the failure report of the test it was running.

pytest-xdist reports a test process that died (a segfault in native code, say) as only
"worker 'gw0' crashed". A test process's Ray driver installs Ray's own fatal-signal
handler, which writes the native stack to the driver's log in Ray's session folder, not
to the terminal, then hands on to Python's faulthandler, which `ray_session` points at a
file there. Each test process records where its Ray folder is (`record_ray_dir`); when it
crashes, the controller reads both files (`crash_evidence`) into the test's report.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

# Set by the controller for its test processes: one file per process names its Ray folder.
CRASH_DIR_ENV = "GRAINFLOW_TEST_CRASH_DIR"
FAULTHANDLER_FILE = "faulthandler.log"
# Ray's fatal-signal and check-failure lines in a driver log.
_NATIVE = re.compile(r"\*\*\* SIG|PC: @|logging\.cc:\d+: +@|Check failed|FATAL")


def record_ray_dir(ray_dir: str) -> bool:
    """In a pytest-xdist test process: note that this process's Ray folder is `ray_dir`.
    False (nothing noted) elsewhere: no controller would read it."""
    crash_dir, worker = os.environ.get(CRASH_DIR_ENV), os.environ.get("PYTEST_XDIST_WORKER")
    if not (crash_dir and worker):
        return False
    Path(crash_dir, worker).write_text(ray_dir)
    return True


def crash_evidence(worker: str, max_lines: int = 300) -> str:
    """Python stacks and Ray's native stack that test process `worker` left, or "";
    its Ray folder is removed once read. Python's stacks list the newest thread first
    and the test's own (the main thread) last: a long dump keeps its head and tail."""
    crash_dir = os.environ.get(CRASH_DIR_ENV)
    pointer = Path(crash_dir, worker) if crash_dir else None
    if pointer is None or not pointer.is_file():
        return ""
    ray_dir = Path(pointer.read_text())
    parts = []
    python = ray_dir / FAULTHANDLER_FILE
    if python.is_file() and python.stat().st_size:
        lines = python.read_text(errors="replace").splitlines()
        if len(lines) > max_lines:
            lines = [*lines[: max_lines // 3], "  ...", *lines[-(max_lines - max_lines // 3):]]
        parts.append("Python stacks at the crash (faulthandler):\n" + "\n".join(lines))
    for log in sorted(ray_dir.glob("session_2*/logs/python-core-driver-*.log")):  # not session_latest, a link
        native = [line for line in log.read_text(errors="replace").splitlines() if _NATIVE.search(line)]
        if native:
            parts.append(f"native stack ({log.name}):\n" + "\n".join(native[-max_lines:]))
    shutil.rmtree(ray_dir, ignore_errors=True)
    pointer.unlink()
    return "\n\n".join(parts)
