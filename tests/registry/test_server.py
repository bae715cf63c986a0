"""The same registry through an MLflow tracking server (MLFLOW_TRACKING_URI=http://...).

Marked slow: `mlflow server` takes ~20 s to start on two cores. The server proxies
artifacts (`--artifacts-destination`), as a shared deployment would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.local_head import free_port
from engine.registry import ArtifactIntegrityError, ModelRegistry
from tests.registry.conftest import make_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(empty_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(empty_db, root / "mlflow.db")
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("wb"),
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.25)
        yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, nothing else
        proc.wait(timeout=30)


def test_register_promote_fetch_through_server(mlflow_server, tmp_path, monkeypatch):
    url, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    reg = ModelRegistry()
    assert reg.artifact_location is None  # the server decides

    v1 = reg.register("det", make_file(tmp_path, "best.pt", b"one"), family="detector", config={"a": 1})
    v2 = reg.register("det", make_file(tmp_path, "best.pt", b"two"), family="detector", config={"a": 2})
    reg.promote("det", v1.version)
    reg.promote("det", v2.version)
    assert reg.rollback("det").version == v1.version
    assert reg.fetch("det", tmp_path / "out")["best.pt"].read_bytes() == b"one"

    bundle = reg.register_bundle("ens", {"detector": "det"})
    assert reg.get_bundle(bundle.ref)["detector"].version == v1.version

    (stored,) = (root / "artifacts").rglob(f"{v2.run_id}/**/best.pt")
    stored.write_bytes(b"tampered")
    with pytest.raises(ArtifactIntegrityError, match="'best.pt'"):
        reg.fetch(v2, tmp_path / "out2")
