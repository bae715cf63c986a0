"""Session-wide test set-up: a real S3 endpoint (moto's server on 127.0.0.1), one local Ray,
and how pytest-xdist workers share the suite (`make test`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

from engine.local_head import free_port

from .crash_report import CRASH_DIR_ENV, FAULTHANDLER_FILE, crash_evidence, record_ray_dir

# The file Python's faulthandler writes to while `ray_session`'s Ray runs in a pytest-xdist
# test process (faulthandler keeps only its descriptor: the file stays open till then).
_faulthandler_file = None


def pytest_configure(config):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        # Test processes share the machine's cores: one torch thread each (read when
        # torch starts; subprocesses and this worker's Ray inherit it), where two
        # threads per process would spin-wait for each other's cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Every Ray node the tests start (ray.cluster_utils.Cluster's too) would post Ray's
    # "usage disabled" report outward; tests talk to 127.0.0.1 only (discard port).
    os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist's controller, before it starts the test processes (they inherit it).
        os.environ[CRASH_DIR_ENV] = tempfile.mkdtemp(prefix="gfcrash-")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(CRASH_DIR_ENV):
        shutil.rmtree(os.environ.pop(CRASH_DIR_ENV), ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """A test process died: its Python and native stacks into the test's report."""
    evidence = crash_evidence(report.node.gateway.id)  # and the crashed process's Ray folder removed
    if evidence:
        report.longrepr = f"{report.longrepr}\n\n{evidence}"


# The test packages that take longest (minutes each on 2 cores), longest first; the rest
# follow in collection order. With two workers, starting these first keeps one long
# package from being left to run alone at the end.
_LONGEST_PACKAGES = ("pipeline", "serving", "notebooks", "training", "cluster", "data")


def _package(nodeid: str) -> str:
    """The test package a node id belongs to (``tests/<package>/...``), or the module's
    name for a test file directly under tests/."""
    parts = nodeid.split("::", 1)[0].split("/")
    return parts[1] if len(parts) > 2 else parts[-1].removesuffix(".py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`) the longest packages are handed out first."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(_LONGEST_PACKAGES)}
        items.sort(key=lambda item: rank.get(_package(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the suite in pytest-xdist workers, one test package at a time per
    worker: a package's session- and package-scoped fixtures (an archive, trained models,
    a Serve app, a multi-node cluster) are built once, in one worker, not in every one.

    (xdist's own `--dist loadgroup` would do it from marks, but xdist 3.8 cannot rename
    node ids under pytest 9.2, so its groups are silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    class PackageScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _package(nodeid)

    return PackageScheduling(config, log)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback; the standard AWS_* variables point botocore at it.

    Going through the environment (not explicit storage options) tests the path a user
    takes: s3fs and botocore find the endpoint and credentials themselves.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    })
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket; returns its s3:// URI."""
    import s3fs

    name = f"gf-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    # s3fs's mkdir sends a region constraint moto refuses; create through the S3 API.
    fs.call_s3("create_bucket", Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session (never one per test).

    Started after moto's S3 endpoint, so that every Ray worker inherits the AWS_*
    variables and jobs over s3:// URIs run on this Ray as they would on a cluster.

    Four logical CPUs on a 2-core machine: Ray Train's workers and Ray Data's read tasks
    each hold a CPU slot, and with only two slots a 2-worker trainer would starve its
    own data pipeline.
    """
    import ray

    from engine.runtime import configure_offline

    configure_offline()
    # A short session folder: Ray's Unix socket paths must stay under 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="gfray-")
    ray.init(
        num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}},
    )
    global _faulthandler_file
    import faulthandler
    import sys

    if record_ray_dir(temp_dir):
        # ray.init put Ray's fatal-signal handler (native stack to its driver log) in
        # front of pytest's faulthandler, and Ray's hands on to it: its Python stacks go
        # to a file in the same folder, where the controller looks (tests/crash_report.py).
        _faulthandler_file = open(os.path.join(temp_dir, FAULTHANDLER_FILE), "w")
        faulthandler.enable(file=_faulthandler_file, all_threads=True)
    yield ray
    ray.shutdown()
    if _faulthandler_file is not None:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
        _faulthandler_file.close()
        _faulthandler_file = None
    shutil.rmtree(temp_dir, ignore_errors=True)
