"""`grainflow serve` as a user runs it: its own embedded Ray, the default deployments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from engine.local_head import free_port

from .conftest import BUNDLE


def test_a_member_model_is_refused_before_ray_starts(serve_env, tmp_path):
    """--bundle naming one of the bundle's member models (a detector): the pre-Ray check
    let it through and every replica then failed to load it and was restarted for ever.
    Now one line naming the ref and its family, exit status 2, and no Ray."""
    member = f"{BUNDLE}-detector"
    assert serve_env["registry"].get(f"{member}@production").family == "detector"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--bundle", member, "--tracking-uri",
           serve_env["tracking_uri"], "--keys", serve_env["keys_file"], "--audit-log", str(tmp_path / "audit.jsonl"),
           "--port", str(free_port())]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and any Ray it started
        proc.communicate()
        raise AssertionError("grainflow serve --bundle <member model> did not refuse it; it went on serving")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr and "Started a local Ray" not in stderr, stderr
    assert f"{member}@production: {member}/1 is a detector model, not an ensemble bundle" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_grainflow_serve_comes_up_with_the_default_deployments(serve_env, tmp_path):
    """The defaults ask for 5 x 0.5 CPUs: on a 2-core machine an embedded Ray with one slot
    per core left the ingress unscheduled and the command waited for ever."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--bundle", BUNDLE, "--tracking-uri",
           serve_env["tracking_uri"], "--keys", serve_env["keys_file"], "--audit-log", str(tmp_path / "audit.jsonl"),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, health = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert health is not None and health.status_code == 200, "grainflow serve never answered /healthz"
        assert health.json()["arms"]["production"] == f"{BUNDLE}/1"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve and Ray shut down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
