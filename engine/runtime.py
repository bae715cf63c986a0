"""Process-wide settings that entrypoints apply before any work (never at import time)."""

from __future__ import annotations

import os


def configure_offline() -> None:
    """No code path may reach a model hub: weights come from files the user supplies.

    Set for this process and inherited by Ray workers started from it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Ultralytics checks connectivity and fetches fonts/assets when online.
    os.environ.setdefault("YOLO_OFFLINE", "1")
