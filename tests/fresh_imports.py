"""What a fresh interpreter imports: for tests that a light entry point stays light
(the test process itself has torch and the rest loaded long before)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fresh(code: str, *, timeout: float = 120) -> str:
    """Run `code` in a fresh interpreter at the repository root; its standard output
    (a failure fails the calling test with the tail of its standard error)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def heavy_modules_imported(statement: str, heavy: tuple[str, ...]) -> list[str]:
    """Run `statement` in a fresh interpreter at the repository root; which of the
    top-level packages `heavy` it left imported, sorted."""
    out = run_fresh(f"import sys; {statement}; print(sorted(m for m in {heavy!r} if m in sys.modules))")
    return ast.literal_eval(out.strip().splitlines()[-1])
