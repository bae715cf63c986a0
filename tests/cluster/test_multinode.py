"""The reprocessing job on several Ray nodes (`ray.cluster_utils.Cluster`: a head and two
worker nodes with distinct custom resources, all processes of this machine).

The pytest process never connects to that cluster (the session's own Ray may already
be connected here): the job runs as its own driver, `python -m jobs.reprocess` with
RAY_ADDRESS set, the way `ray job submit` runs it. Outputs are compared with a run on
one node (the session Ray) by tests.pipeline.test_job's snapshot. Runs use
batch_size=1, which makes "identical outputs" exact (see that module).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from engine.data.ledger import Ledger
from engine.local_head import free_port
from tests.pipeline.test_job import (  # noqa: F401  (job_registry: a fixture, used by name)
    CONFIG, REF, assert_same_outputs, job_registry, run, snapshot,
)

N_TILES = 8  # 2 images of 2 x 2 chunks: small, and enough for two nodes to share

ENSEMBLE_TASK = "MapBatches(JobEnsemble)"
# Not the repository root: jobs must not start from a folder holding a `ray/` folder,
# and the job's modules come from the installed project.
DRIVER_CWD = Path(tempfile.gettempdir())


@pytest.fixture(scope="module")
def job_archive(tmp_path_factory):
    from engine.synth.archive import generate_archive

    out = tmp_path_factory.mktemp("multinode-archive") / "a"
    generate_archive(out, n_images=2, seed=11, size=256, chunk=128)
    return out


@pytest.fixture(scope="module")
def one_node(ray_session, job_archive, job_registry, tmp_path_factory):
    """The reference: the same job on the session's single-node Ray."""
    out = tmp_path_factory.mktemp("one-node") / "out"
    result = run(job_archive, out, job_registry, labels="out")
    assert result.tiles_done == N_TILES and result.errors == 0
    return snapshot(out)


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + worker nodes a and b (1 CPU each, custom resources node-a/node-b):
    two ensemble actors of 1 CPU cannot share a node.

    One cluster for the module (each start costs ~10 s of both cores): each test counts
    only its own job's tasks (`earlier_jobs`), and test_worker_node_killed_mid_job, which
    replaces a worker node, leaves three nodes of the same shape (head + 2 workers).
    """
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    # Cluster records the head's address in /tmp/ray whatever temp_dir says, and fails
    # on a fresh machine where no Ray has created that folder yet.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="gfc", dir="/tmp")
    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "temp_dir": temp_dir, "gcs_server_port": free_port(),
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(), "runtime_env_agent_port": free_port(),
        "metrics_export_port": free_port(), "ray_client_server_port": free_port(),
        "object_store_memory": 200 * 1024**2,
        # A killed raylet refuses the GCS's health check at once, and the GCS declares the
        # node dead after 5 failed checks (health_check_failure_threshold): 3 s apart by
        # default, ~15 s during which the killed node's tile waits for its actor's
        # restart. 1 s apart: the same 5 failures, and a slow but live raylet still has
        # the default 10 s per check (health_check_timeout_ms) to answer.
        "_system_config": {"health_check_period_ms": 1000},
    })
    c.workers = {name: add_node(c, name) for name in ("node-a", "node-b")}
    yield c
    c.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def add_node(cluster, name: str, attempts: int = 3):
    """A 1-CPU worker node with resource `name`. Ray gives a raylet 30 s to register,
    which a loaded CI machine can miss: try again rather than fail the test on it."""
    for attempt in range(attempts):
        try:
            return cluster.add_node(num_cpus=1, resources={name: 1}, object_store_memory=200 * 1024**2,
                                    runtime_env_agent_port=free_port(), metrics_export_port=free_port())
        except Exception as exc:  # Ray raises a bare Exception for the startup timeout
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise


def start_driver(cluster, archive, out, registry) -> subprocess.Popen:
    """`python -m jobs.reprocess` as its own driver on `cluster` (two ensemble actors)."""
    # Ray 2.60 starts this cluster with token auth (the token in ~/.ray/auth_token unless
    # RAY_AUTH_TOKEN_PATH says otherwise); the driver must present it.
    env = dict(os.environ, RAY_ADDRESS=cluster.address, RAY_AUTH_MODE="token")
    cmd = [sys.executable, "-m", "jobs.reprocess", "--archive", str(archive), "--out", str(out), "--models", REF,
           "--tracking-uri", registry.tracking_uri, "--conf", str(CONFIG.conf), "--max-det", str(CONFIG.max_det),
           "--halo", "16", "--batch-size", "1", "--concurrency", "2", "--labels", "out"]
    return subprocess.Popen(cmd, env=env, cwd=DRIVER_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the job did not end within {timeout_s:.0f} s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def cluster_tasks(cluster) -> list[dict]:
    """Every task Ray's state API knows of (the dashboard's REST endpoint, so this
    process stays unconnected)."""
    url = f"http://{cluster.webui_url}/api/v0/tasks?detail=1&limit=10000"
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
        return json.load(r)["data"]["result"]["result"]


def earlier_jobs(cluster) -> set[str]:
    """The jobs that have run tasks on the (module's shared) cluster so far."""
    return {t["job_id"] for t in cluster_tasks(cluster)}


def ensemble_calls_by_node(cluster, skip_jobs: set[str]) -> dict[str, int]:
    """Finished ensemble actor tasks per node id, of the jobs not in `skip_jobs`."""
    counts: dict[str, int] = {}
    for t in cluster_tasks(cluster):
        if (ENSEMBLE_TASK in t.get("name", "") and t.get("state") == "FINISHED" and t.get("type") == "ACTOR_TASK"
                and t["job_id"] not in skip_jobs):
            counts[t["node_id"]] = counts.get(t["node_id"], 0) + 1
    return counts


def node_ids(cluster) -> dict[str, str]:
    ids = {"head": cluster.head_node.node_id}
    ids.update({name: node.node_id for name, node in cluster.workers.items()})
    return ids


def test_tiles_on_several_nodes_same_outputs_as_one_node(one_node, cluster, job_archive, job_registry, tmp_path):
    out = tmp_path / "out"
    before = earlier_jobs(cluster)
    result = finish(start_driver(cluster, job_archive, out, job_registry))
    assert (result["tiles_done"], result["errors"]) == (N_TILES, 0)

    by_node = ensemble_calls_by_node(cluster, skip_jobs=before)
    assert len(by_node) >= 2, f"the ensemble ran on one node only: {by_node}"
    assert set(by_node) <= set(node_ids(cluster).values())
    assert_same_outputs(one_node, snapshot(out))


def test_worker_node_killed_mid_job(one_node, cluster, job_archive, job_registry, tmp_path):
    """A worker node dies once some tiles are written; a fresh node joins (as the
    autoscaler would add one); the job completes with every tile written once and the
    outputs of a clean run."""
    out = tmp_path / "out"
    before = earlier_jobs(cluster)
    proc = start_driver(cluster, job_archive, out, job_registry)
    ledger = Ledger(out)
    deadline = time.monotonic() + 240
    while len(ledger.keys()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    at_kill = len(ledger.keys())
    assert proc.poll() is None and 2 <= at_kill < N_TILES, "the node must be killed mid-job"
    busy = ensemble_calls_by_node(cluster, skip_jobs=before)
    # the worker node whose ensemble actor has done the most work, else node-b
    victim = max(cluster.workers, key=lambda n: busy.get(cluster.workers[n].node_id, 0))
    cluster.remove_node(cluster.workers.pop(victim), allow_graceful=False)
    cluster.workers["node-c"] = add_node(cluster, "node-c")

    result = finish(proc)
    assert result["tiles_total"] == N_TILES and result["errors"] == 0
    assert result["tiles_done"] + result["tiles_skipped"] == N_TILES
    ledger_rows = ledger.read().to_pandas()
    assert len(ledger_rows) == N_TILES and not ledger_rows.duplicated(["image_id", "level", "y", "x"]).any()
    assert_same_outputs(one_node, snapshot(out))
