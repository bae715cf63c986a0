"""A model replica's process is killed (SIGKILL) under load: Serve's controller
replaces it, and requests succeed again (the ingress retries a call whose replica died).
The detector has two replicas; the classifier one, and its answer reaches the segmenter
as an ObjectRef the segmenter awaits (engine.serving.deployments): its death must fail
those requests, not hang them."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from .conftest import auth, png_bytes, replica_pids

PNG = png_bytes((np.arange(64 * 64).reshape(64, 64) % 199).astype(np.uint8))


@pytest.mark.parametrize("role, replicas", [("detector", 2), ("classifier", 1)])
def test_killed_replica_is_replaced_and_errors_stop(client, served, role, replicas):
    key = served["env"]["analyze_key"]
    before = {n: p for n, p in replica_pids().items() if f"#{role}#" in n}
    assert len(before) == replicas
    victim_name, victim_pid = sorted(before.items())[0]
    log: list[tuple[float, int]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            r = client.post("/v1/analyze", files={"image": ("a.png", PNG, "image/png")},
                            data={"modality": "SEM", "pixel_size_nm": "5"}, headers=auth(key))
            log.append((time.monotonic(), r.status_code))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        while len(log) < 3:
            time.sleep(0.1)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 180
        replaced = None
        while time.monotonic() < deadline:
            now = {n: p for n, p in replica_pids().items() if f"#{role}#" in n}
            if len(now) == replicas and victim_pid not in now.values():
                replaced = now
                break
            time.sleep(0.5)
        assert replaced is not None, "the killed replica was not replaced within 180 s"
        settled = time.monotonic()
        while time.monotonic() < deadline and sum(t > settled for t, _ in log) < 10:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    after = [code for t, code in log if t > settled]
    assert len(after) >= 10 and all(code == 200 for code in after), after
    assert victim_name not in replaced or replaced[victim_name] != victim_pid
    assert client.get("/healthz").status_code == 200
