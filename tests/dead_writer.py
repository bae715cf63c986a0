"""Names of hidden image folders as a killed writer leaves them (engine.stores.staging)."""

from __future__ import annotations

import os
import subprocess
import sys

from engine.stores.staging import sibling_name


def dead_writers_sibling(target_name: str, kind: str) -> str:
    """A `kind` (PARTIAL or REPLACED) sibling name of `target_name` whose writer, a process
    on this host, has exited."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return sibling_name(target_name, kind).replace(f"-{os.getpid()}@", f"-{int(dead.stdout)}@")
