"""Waiting on a GPU request: a refusal comes at once, a request Ray queued never does.

Shared by the tests that jobs refuse GPUs the session's CPU-only Ray can never give
(tests/test_runtime.py, the training and synthesis tests).
"""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from engine.runtime import GPU_AUTOSCALING_ENV

# A refusal comes within a second or two; a request Ray queued never does.
PROMPTLY_S = 60.0
NO_GPU = ("the Ray cluster has 0 and no autoscaler reports GPU nodes it could add "
          f"(set {GPU_AUTOSCALING_ENV}=1 where one does)")


def raised_within(seconds: float, call: Callable[[], object]) -> BaseException:
    """The exception `call()` raises; fails the test when `call` returns, or is still
    running after `seconds` (a daemon thread: a queued Ray request cannot block exit)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["returned"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test to judge
            outcome["raised"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds:g} s: the GPU request was queued, not refused")
    if "raised" not in outcome:
        pytest.fail(f"returned {outcome['returned']!r} instead of refusing the GPU request")
    return outcome["raised"]
