"""Per-key request rate: a token bucket per key id, in the ingress replica's memory.

Each replica counts for itself, so with R ingress replicas a key gets up to R times its
rate; the limit protects replicas from one client, it is not a billing meter.
"""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    """`allow(key, rate_per_minute)` -> (allowed, seconds until a request would be allowed).

    The bucket holds up to `burst` requests (default: one minute's worth, at least 1) and
    refills continuously at rate_per_minute / 60 per second.
    """

    def __init__(self, burst_s: float = 60.0, clock=time.monotonic):
        self._burst_s = burst_s
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, key: str, rate_per_minute: float) -> tuple[bool, int]:
        per_s = rate_per_minute / 60.0
        cap = max(1.0, per_s * self._burst_s)
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (cap, now))
            tokens = min(cap, tokens + (now - last) * per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return True, 0
            self._buckets[key] = (tokens, now)
            return False, max(1, math.ceil((1.0 - tokens) / per_s))
