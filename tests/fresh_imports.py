"""What a fresh interpreter imports: for tests that a light entry point stays light
(the test process itself has torch and the rest loaded long before)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def heavy_modules_imported(statement: str, heavy: tuple[str, ...]) -> list[str]:
    """Run `statement` in a fresh interpreter at the repository root; which of the
    top-level packages `heavy` it left imported, sorted."""
    code = f"import sys; {statement}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])
