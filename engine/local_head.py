"""A local Ray cluster in its own processes: a head, and extra worker nodes, on loopback.

For notebooks and tests that submit Ray jobs, and for `cluster/local/*.sh`:

    head = start_local_head("~/.grainflow/cluster", num_cpus=4)
    head.add_worker(num_cpus=2, resources={"worker-1": 1})
    head.export_client_env()       # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    ...
    head.stop()                    # this cluster only, unlike `ray stop`

Security, what holds and why:

- Token authentication is on (RAY_AUTH_MODE=token): the token is a random secret in
  ``<base_dir>/auth_token``, mode 0600. The dashboard, the Jobs API, the agents' HTTP
  servers and every gRPC service refuse callers without it.
- Loopback only (`loopback_only=True`, the default). `ray start --node-ip-address
  127.0.0.1` does not do it: Ray rewrites a loopback node address into the machine's
  outward address (`ray._private.services.resolve_ip_for_localhost`) and its GCS, raylet
  and agents listen on all interfaces. Ray's own single-machine mode (the one it uses on
  macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) binds every one of them to
  127.0.0.1; the head runs in that mode. Worker nodes on the same machine join the
  head's loopback address (tests/cluster/test_control_plane.py checks the sockets).

`python -m engine.local_head start|add-worker|env|stop --dir DIR` drives the same from a
shell; DIR keeps the token, the logs and ``cluster.json`` (addresses and process ids).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import GrainflowError

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
# Ray's switch for its single-machine mode: "0" makes the node address 127.0.0.1.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def free_port() -> int:
    """A loopback TCP port nothing listens on now (bound, then closed: another process
    may still take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _agent_ports() -> list[str]:
    # Ray's fixed default ports collide with any other Ray on the machine (a test
    # session's, a second head, a worker node beside its head): take free ones.
    return [
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
    ]


def _node_env(token_path: Path) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # Jobs run `python ...` with the node's PATH: make that this environment's Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    # `ray start --disable-usage-stats` still posts a "disabled" report to Ray's server
    # from the dashboard (only clusters made by ray.init skip it): nowhere to post it to.
    # (A loopback URL already set is kept: a test listens there.)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    url = env.get("RAY_USAGE_STATS_REPORT_URL", "")
    if urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        env["RAY_USAGE_STATS_REPORT_URL"] = "http://127.0.0.1:9/"  # discard port: refused at once
    return env


def stop_process_group(pid: int, timeout_s: float = 30.0) -> None:
    """SIGINT the session led by `pid` (`ray start --block` then stops its processes);
    SIGKILL whatever is left after `timeout_s`."""
    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if _reap(pid):
            break
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> bool:
    """True once `pid` (a child of this process or not) has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child: it is gone once kill(pid, 0) fails
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True


@dataclass
class LocalWorker:
    """A worker node: `ray start --address ... --block` in its own session."""

    pid: int
    num_cpus: int | None
    resources: dict[str, float]
    process: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process_group(self.pid, timeout_s)
        if self.process is not None:
            self.process.wait()


@dataclass
class LocalHead:
    gcs_address: str
    dashboard_url: str
    token_path: Path
    base_dir: Path
    session_dir: Path
    process: subprocess.Popen | None
    pid: int = 0
    loopback_only: bool = True
    workers: list[LocalWorker] = field(default_factory=list)
    stopped: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not self.pid and self.process is not None:
            self.pid = self.process.pid

    def client_env(self) -> dict[str, str]:
        """What a client process needs: the address and the token; for a loopback-only
        cluster also Ray's single-machine mode, else `ray.init` would turn 127.0.0.1
        into the machine's address, where nothing listens (Ray reads it at import)."""
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_ADDRESS": self.gcs_address}
        if self.loopback_only:
            env[_SINGLE_MACHINE_ENV] = "0"
        return env

    def export_client_env(self) -> None:
        os.environ.update(self.client_env())

    def add_worker(self, *, num_cpus: int | None = None, resources: dict[str, float] | None = None,
                   timeout_s: float = 90.0) -> LocalWorker:
        """Start a worker node that joins this head; returns once the head lists it."""
        before = self._alive_nodes()
        # Not `ray start --address`: in Ray's single-machine mode the CLI refuses worker
        # nodes, and outside it Ray rewrites 127.0.0.1 into the machine's address. The
        # worker entry point below starts the same node the CLI would, on 127.0.0.1.
        cmd = [sys.executable, "-m", "engine.local_head", "_worker", "--address", self.gcs_address,
               "--temp-dir", str(self.session_dir)]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        env = _node_env(self.token_path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
        n = len(self.workers) + 1
        log = open(self.base_dir / f"worker-{n}.log", "wb")
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=self.base_dir)
        worker = LocalWorker(process.pid, num_cpus, dict(resources or {}), process)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise GrainflowError(f"the worker node exited with status {process.returncode}; "
                                     f"see {self.base_dir / f'worker-{n}.log'}")
            if self._alive_nodes() > before:
                self.workers.append(worker)
                self.save()
                return worker
            time.sleep(0.5)
        worker.stop()
        raise GrainflowError(f"the worker node did not join within {timeout_s:.0f} s; "
                             f"see {self.base_dir / f'worker-{n}.log'}")

    def _alive_nodes(self) -> int:
        """Alive nodes, from the dashboard's node list (with the token)."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?detail=0&limit=1000",
                                     headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                nodes = json.load(r)["data"]["result"]["result"]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise GrainflowError(f"cannot list the nodes of {self.dashboard_url}: {exc}") from None
        return sum(1 for node in nodes if node.get("state") == "ALIVE")

    def save(self) -> Path:
        """Write ``cluster.json`` (addresses, process ids) for the shell entry points."""
        state = {"gcs_address": self.gcs_address, "dashboard_url": self.dashboard_url,
                 "token_path": str(self.token_path), "session_dir": str(self.session_dir), "pid": self.pid,
                 "loopback_only": self.loopback_only,
                 "workers": [{"pid": w.pid, "num_cpus": w.num_cpus, "resources": w.resources} for w in self.workers]}
        path = self.base_dir / STATE_FILE
        path.write_text(json.dumps(state, indent=1))
        return path

    @classmethod
    def load(cls, base_dir: str | Path) -> LocalHead:
        """The cluster a `start` in `base_dir` left running (no process handles)."""
        base = Path(base_dir).expanduser().resolve()
        try:
            state = json.loads((base / STATE_FILE).read_text())
        except FileNotFoundError:
            raise GrainflowError(f"{base}: no local cluster here (no {STATE_FILE}); start one first") from None
        workers = [LocalWorker(w["pid"], w["num_cpus"], w["resources"]) for w in state["workers"]]
        return cls(state["gcs_address"], state["dashboard_url"], Path(state["token_path"]), base,
                   Path(state["session_dir"]), None, state["pid"], state["loopback_only"], workers)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker nodes, then the head; remove the session folder. Once: a second
        call (an atexit hook after an explicit stop) must not signal a reused pid."""
        if self.stopped:
            return
        self.stopped = True
        for worker in reversed(self.workers):
            worker.stop(timeout_s)
        self.workers.clear()
        stop_process_group(self.pid, timeout_s)
        if self.process is not None:
            self.process.wait()
        shutil.rmtree(self.session_dir, ignore_errors=True)
        (self.base_dir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_head(base_dir: str | Path, *, num_cpus: int | None = None, timeout_s: float = 90.0,
                     loopback_only: bool = True, resources: dict[str, float] | None = None) -> LocalHead:
    """Start a head on free loopback ports; returns once the Jobs API answers.

    `base_dir` holds the token file (0600), the head's log and ``cluster.json``. Ray's
    session files go to a short folder under the system temp dir: Ray's Unix sockets live
    there and a socket path may not exceed 107 bytes. Jobs must not run from a folder
    that contains a folder named `ray`: Python would import it as the `ray` package.
    loopback_only: every socket on 127.0.0.1 (module doc); False lets Ray pick the
    machine's address (nodes on other machines may then join; the token still guards).
    """
    base = Path(base_dir).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    token_path = base / TOKEN_FILE
    # Created 0600 before the secret is written: never readable by others, not even briefly.
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    token_path.chmod(0o600)
    session_dir = Path(tempfile.mkdtemp(prefix="gfhead-", dir="/tmp" if os.path.isdir("/tmp") else None))
    port, dashboard_port = free_port(), free_port()
    cmd = [
        _ray_bin(), "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--temp-dir", str(session_dir), *_agent_ports(), "--ray-client-server-port", str(free_port()),
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    env = _node_env(token_path)
    if loopback_only:
        env[_SINGLE_MACHINE_ENV] = "0"
    else:
        cmd += ["--node-ip-address", "127.0.0.1"]  # Ray turns it into the machine's address
        env.pop(_SINGLE_MACHINE_ENV, None)
    log = open(base / "head.log", "wb")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=base)
    head = LocalHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", token_path, base, session_dir,
                     process, loopback_only=loopback_only)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GrainflowError(f"the Ray head exited with status {process.returncode}; see {base / 'head.log'}")
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # 401 without a token: the Jobs API is up
        except OSError:
            time.sleep(0.5)
    else:
        head.stop()
        raise GrainflowError(f"the Ray head did not answer within {timeout_s:.0f} s; see {base / 'head.log'}")
    if not loopback_only:
        head.gcs_address = _advertised_gcs_address(session_dir) or head.gcs_address
    head.save()
    return head


def _advertised_gcs_address(session_dir: Path) -> str | None:
    """The GCS address Ray advertises (the machine's address when not loopback-only)."""
    try:
        return (session_dir / "session_latest" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


# ------------------------------------------------------------------------ shell entry point


def _run_worker_node(address: str, *, temp_dir: str, num_cpus: int | None, resources: dict[str, float]) -> None:
    """Run a worker node on 127.0.0.1 until SIGINT/SIGTERM (what `ray start --address
    --block` does, in Ray's single-machine mode). An entry point: sets its own env."""
    import threading

    os.environ[_SINGLE_MACHINE_ENV] = "0"  # read when ray is imported, below
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1", gcs_address=address, temp_dir=temp_dir, num_cpus=num_cpus,
        resources=resources or None, dashboard_agent_listen_port=free_port(), metrics_agent_port=free_port(),
        runtime_env_agent_port=free_port(), metrics_export_port=free_port(),
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True, connect_only=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"worker node up on 127.0.0.1, joined {address}", flush=True)
    while not stop.wait(1.0):
        pass
    node.kill_all_processes(check_alive=False, allow_graceful=True)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_worker"]:  # internal: started by LocalHead.add_worker
        w = argparse.ArgumentParser(prog="python -m engine.local_head _worker")
        w.add_argument("--address", required=True)
        w.add_argument("--temp-dir", required=True)
        w.add_argument("--num-cpus", type=int, default=None)
        w.add_argument("--resources", default=None)
        a = w.parse_args(argv[1:])
        _run_worker_node(a.address, temp_dir=a.temp_dir, num_cpus=a.num_cpus,
                         resources=json.loads(a.resources) if a.resources else {})
        return 0
    p = argparse.ArgumentParser(prog="python -m engine.local_head",
                                description="Start and stop a local Ray cluster with token auth on loopback.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("start", "start a head in DIR (its token, logs and cluster.json)"),
                        ("add-worker", "start a worker node that joins the head of DIR"),
                        ("env", "print the client environment as shell exports"),
                        ("stop", "stop the worker nodes and the head of DIR")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--dir", default=os.environ.get("GRAINFLOW_CLUSTER_DIR", "~/.grainflow/cluster"),
                       help="cluster folder (default: $GRAINFLOW_CLUSTER_DIR or ~/.grainflow/cluster)")
        if name in ("start", "add-worker"):
            s.add_argument("--num-cpus", type=int, default=None)
            s.add_argument("--resources", default=None, help='custom resources as JSON, e.g. \'{"gpu-like": 1}\'')
        if name == "start":
            s.add_argument("--all-interfaces", action="store_true",
                           help="let Ray use the machine's address (other machines may join; the token still guards)")
    args = p.parse_args(argv)
    base = Path(args.dir).expanduser()
    try:
        if args.command == "start":
            if (base / STATE_FILE).exists():
                raise GrainflowError(f"{base}: a cluster is already running here; stop it first")
            head = start_local_head(base, num_cpus=args.num_cpus, loopback_only=not args.all_interfaces,
                                    resources=json.loads(args.resources) if args.resources else None)
            print(f"head up: {head.gcs_address}  dashboard {head.dashboard_url}  token {head.token_path}")
            _print_env(head)
        elif args.command == "add-worker":
            head = LocalHead.load(base)
            worker = head.add_worker(num_cpus=args.num_cpus,
                                     resources=json.loads(args.resources) if args.resources else None)
            print(f"worker node up (pid {worker.pid}); {len(head.workers)} worker node(s)")
        elif args.command == "env":
            _print_env(LocalHead.load(base))
        else:
            head = LocalHead.load(base)
            head.stop()
            print(f"stopped the cluster of {head.base_dir}")
    except GrainflowError as exc:
        print(f"local_head: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_env(head: LocalHead) -> None:
    for key, value in {**head.client_env(), "GRAINFLOW_DASHBOARD_URL": head.dashboard_url}.items():
        print(f"export {key}={shlex.quote(str(value))}")


if __name__ == "__main__":
    sys.exit(main())
