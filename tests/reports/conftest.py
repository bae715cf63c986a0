"""One real reprocessing run for the report tests, made once for the package.

The archive, registry and job settings are the pipeline tests' (tests/pipeline): three
256 x 256 images of 2 x 2 tiles, the tiny untrained ensemble registered as
``tiny@production``, run on the session's Ray. One chunk of one image is corrupt, so the
run has an error row and an incomplete image, as real archives do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from engine.runtime import configure_offline

CORRUPT_TILE = (0, 128, 0)  # (level, y, x) of the tile over chunk 0/c/1/0
CORRUPT_CHUNK = "0/c/1/0"


@dataclass(frozen=True)
class ReportRun:
    """A finished run: its archive, outputs, JobResult, the image whose chunk is
    corrupt, and its report at the default place (path, and what write_report returned)."""

    archive: Path
    out: Path
    result: object
    corrupt_image: str
    report: Path
    written: str
    registry: object  # the ModelRegistry holding tiny@production, for further runs


def grainflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The `grainflow` command as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="package", autouse=True)
def offline(tmp_path_factory):
    """No hub access; Ultralytics keeps its settings file out of the user's home."""
    configure_offline()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))


@pytest.fixture(scope="package")
def report_run(ray_session, tmp_path_factory) -> ReportRun:
    from engine.pipeline.bundle import register_ensemble
    from engine.pipeline.demo_models import untrained_tiny_models
    from engine.registry import ModelRegistry
    from engine.reports import write_report
    from engine.synth.archive import generate_archive
    from tests.pipeline.test_job import RUN, run

    root = tmp_path_factory.mktemp("report-run")
    archive = root / "archive"
    generate_archive(archive, n_images=3, seed=11, size=256, chunk=128)
    corrupt = sorted(pd.read_parquet(archive / "catalog.parquet")["image_id"])[1]
    (archive / "images" / f"{corrupt}.ome.zarr" / CORRUPT_CHUNK).write_bytes(b"\x00not zstd at all" * 5)

    registry = ModelRegistry(tracking_uri=f"sqlite:///{root}/m.db")
    register_ensemble(registry, untrained_tiny_models(0), "tiny", workdir=root / "w")
    out = root / "run"
    # batch_size 4: fewer ensemble calls than the pipeline tests' 1, the outputs are not compared here
    result = run(archive, out, registry, **{**RUN, "batch_size": 4})

    # in this process (`grainflow report` runs as a command in test_report.TestCommand)
    where = write_report(str(out))
    return ReportRun(archive, out, result, corrupt, out / "report.html", where, registry)


@dataclass(frozen=True)
class LabelsOutRun:
    """A finished run whose label images went under its own folder (``labels="out"``):
    its archive (one 256 x 256 image of 2 x 2 tiles) and output folder."""

    archive: Path
    out: Path


@pytest.fixture
def labels_out_run(report_run, tmp_path) -> LabelsOutRun:
    """A fresh run for each test (tests move it), with the report run's registry and Ray."""
    from engine.synth.archive import generate_archive
    from tests.pipeline.test_job import RUN, run

    archive = tmp_path / "archive"
    generate_archive(archive, n_images=1, seed=11, size=256, chunk=128)
    out = tmp_path / "run"
    run(archive, out, report_run.registry, **{**RUN, "batch_size": 4, "labels": "out"})
    return LabelsOutRun(archive, out)
