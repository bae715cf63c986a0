"""Peak traced memory (tracemalloc) measured in a fresh interpreter.

tracemalloc.start() and stop() swap Python's allocators while other threads may be
allocating; CPython before 3.12.9 / 3.13.2 can crash there (gh-128679), and a test
worker that has hosted a Ray driver or the moto server has such threads (seen: a
segfault in CI, in a thread with no Python frame). So memory tests run the measured
code in a spawned interpreter, whose only threads are the code's own.
"""

from __future__ import annotations

import multiprocessing
import tracemalloc
from concurrent.futures import ProcessPoolExecutor


def run_in_fresh_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh (spawned) interpreter; its return value. fn must be
    importable (a module-level function) and its arguments and result picklable;
    monkeypatches of the calling test do not reach it (fn sets what it needs)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=600)


def traced(fn, *args, **kwargs):
    """(fn(*args, **kwargs), peak bytes tracemalloc traced during the call); numpy reports
    its arrays to tracemalloc. Call it in a fresh process (`run_in_fresh_process`)."""
    tracemalloc.start()
    try:
        out = fn(*args, **kwargs)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
