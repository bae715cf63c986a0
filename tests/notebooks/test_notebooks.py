"""The notebooks in notebooks/, executed top to bottom by a real Jupyter kernel.

Each runs against a local Ray head that the test starts (token auth on loopback), the
way a user's notebook joins a cluster: through GRAINFLOW_DASHBOARD_URL and the token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from engine.local_head import start_local_head

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    head = start_local_head(tmp_path_factory.mktemp("head"), num_cpus=4)
    yield head
    head.stop()


def execute(name: str, workdir: Path, env: dict[str, str], timeout_s: int = 900) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The kernel is killed once the last cell has run: a graceful shutdown costs 1-3 s a
    # notebook (the kernel's own exit, with torch, Ray and MLflow loaded) and checks
    # nothing. Nothing is lost: the outputs are in `notebook` already, the cells closed
    # their files, and the kernel owns no Ray (the tests give it their head, so the
    # notebooks' atexit hook has nothing to stop).
    client = NotebookClient(notebook, timeout=timeout_s, kernel_name="python3", shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env={**os.environ, **env})
    return notebook


def text_outputs(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_02_finetune(tmp_path, local_head):
    env = {**local_head.client_env(), "GRAINFLOW_DASHBOARD_URL": local_head.dashboard_url,
           "GRAINFLOW_NOTEBOOK_DIR": str(tmp_path), "GRAINFLOW_EPOCHS": "2"}
    notebook = execute("02_finetune.ipynb", tmp_path, env)
    text = text_outputs(notebook)
    assert "status: SUCCEEDED" in text
    assert "train_loss" in text  # the metrics table read back from MLflow
    # one row per epoch, numbered as MLflow's step records it (1..EPOCHS), not list positions
    [table] = [out["data"]["text/plain"] for cell in notebook.cells if "get_metric_history" in cell.source
               for out in cell.get("outputs", []) if out.get("output_type") == "execute_result"]
    first_block = table.split("\n\n")[0]  # pandas wraps wide frames into blocks
    assert re.findall(r"^(\d+)\s", first_block, re.M) == ["1", "2"], table
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").rglob("*.safetensors"))


def test_01_reprocess_archive(tmp_path, local_head):
    """The notebook registers the untrained tiny ensemble (no trained one in its fresh
    registry), submits the job to the head, and shows the summary, an overlay and the report."""
    env = {**local_head.client_env(), "GRAINFLOW_DASHBOARD_URL": local_head.dashboard_url,
           "GRAINFLOW_NOTEBOOK_DIR": str(tmp_path), "GRAINFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'registry.db'}",
           "GRAINFLOW_MODELS": "nb-ensemble@production"}
    notebook = execute("01_reprocess_archive.ipynb", tmp_path, env)
    text = text_outputs(notebook)
    assert "UNTRAINED" in text and "status: SUCCEEDED" in text
    result = next(json.loads(line) for line in text.splitlines() if line.startswith('{"bundle"'))
    assert result["tiles_done"] == result["tiles_total"] > 0 and result["errors"] == 0
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert images, "no overlay image in the notebook's outputs"
    report = tmp_path / "run" / "report.html"
    assert report.is_file() and f"report: {report}" in text
    summary = pd.read_parquet(tmp_path / "run" / "summary.parquet")
    assert len(summary) == 3 and summary.complete.all()
