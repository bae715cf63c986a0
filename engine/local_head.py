"""A local Ray head in its own processes, for notebooks and tests that submit Ray jobs.

The head runs `ray start --head --block` in a new session with token authentication
on: the token is a random secret in a file only the user can read
(RAY_AUTH_TOKEN_PATH), and the dashboard (the Jobs API) listens on 127.0.0.1 only.
`stop()` stops this head alone, unlike `ray stop`, which stops every Ray on the machine.

Clients (JobSubmissionClient, `ray.init(address=...)`) need the variables of
`client_env()`; `export_client_env()` sets them in this process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from engine.errors import GrainflowError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalHead:
    gcs_address: str
    dashboard_url: str
    token_path: Path
    base_dir: Path
    session_dir: Path
    process: subprocess.Popen

    def client_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_ADDRESS": self.gcs_address}

    def export_client_env(self) -> None:
        os.environ.update(self.client_env())

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask `ray start --block` to shut its processes down; kill the session if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        shutil.rmtree(self.session_dir, ignore_errors=True)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_head(base_dir: str | Path, *, num_cpus: int | None = None, timeout_s: float = 90.0) -> LocalHead:
    """Start a head on free loopback ports; returns once the Jobs API answers.

    `base_dir` holds the token file and the head's log. Ray's session files go to a short
    folder under the system temp dir: Ray's Unix sockets live there and a socket path
    may not exceed 107 bytes. Jobs must not run from a folder that contains a folder
    named `ray`: Python would import it as the `ray` package.
    """
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    token_path = base / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    session_dir = Path(tempfile.mkdtemp(prefix="gfhead-"))
    port, dashboard_port = free_port(), free_port()
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--temp-dir", str(session_dir),
        # Ray's fixed default ports collide with any other Ray on the machine (a test
        # session's, a second head): take free ones.
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # Jobs run `python ...` with the head's PATH: make that this environment's Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    log = open(base / "head.log", "wb")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=base)
    head = LocalHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", token_path, base, session_dir, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GrainflowError(f"the Ray head exited with status {process.returncode}; see {base / 'head.log'}")
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2)
            return head
        except urllib.error.HTTPError:
            return head  # 401 without a token: the Jobs API is up
        except OSError:
            time.sleep(0.5)
    head.stop()
    raise GrainflowError(f"the Ray head did not answer within {timeout_s:.0f} s; see {base / 'head.log'}")
