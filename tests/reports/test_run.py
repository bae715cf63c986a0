"""Loading a run: a malformed or unfinished run, or an archive passed by mistake, is one
clear line naming the file (the CLI's exit 2, no traceback); looking images up is cheap."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pandas as pd
import pytest

from engine.errors import GrainflowError, user_error_message
from engine.reports import NotARunError, load_run
from engine.stores.uri import resolve

from tests.fresh_imports import heavy_modules_imported

from .conftest import grainflow
from .data import Img, Obj, write_run


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", {"a": Img([Obj("pore", (10, 10, 30, 30))]), "b": Img()})


class TestLoadRun:
    def test_result_without_tile_counts_names_the_manifest(self, run_dir):
        job = json.loads((run_dir / "job.json").read_text())
        del job["result"]["tiles_total"]
        (run_dir / "job.json").write_text(json.dumps(job))
        with pytest.raises(GrainflowError) as info:
            load_run(str(run_dir))
        message = user_error_message(info.value)
        assert message.startswith(f"{run_dir / 'job.json'}: ") and "tiles_total" in message
        assert "\n" not in message

    def test_result_with_a_value_that_is_no_number_names_it(self, run_dir):
        job = json.loads((run_dir / "job.json").read_text())
        job["result"]["seconds"] = "soon"
        (run_dir / "job.json").write_text(json.dumps(job))
        with pytest.raises(GrainflowError, match=r"job\.json: .*seconds='soon'"):
            load_run(str(run_dir))

    def test_garbage_summary_names_the_file(self, run_dir):
        (run_dir / "summary.parquet").write_bytes(b"not parquet at all" * 10)
        with pytest.raises(GrainflowError) as info:
            load_run(str(run_dir))
        assert user_error_message(info.value).startswith(f"{run_dir / 'summary.parquet'}: not a readable Parquet")

    def test_summary_of_another_table_names_the_missing_columns(self, run_dir):
        pd.DataFrame({"image_id": ["a"]}).to_parquet(run_dir / "summary.parquet")
        with pytest.raises(GrainflowError, match=r"summary\.parquet: not a grainflow run summary .*n_defects"):
            load_run(str(run_dir))

    def test_an_archive_is_named_as_one(self, tmp_path):
        archive = tmp_path / "archive"
        archive.mkdir()
        pd.DataFrame({"image_id": ["a"]}).to_parquet(archive / "catalog.parquet")
        with pytest.raises(NotARunError, match=r"this is an archive .*pass the job's --out"):
            load_run(str(archive))

    def test_unfinished_run_does_not_invite_a_second_job_onto_a_running_one(self, run_dir):
        job = json.loads((run_dir / "job.json").read_text())
        (run_dir / "job.json").write_text(json.dumps({"settings": job["settings"]}))
        with pytest.raises(NotARunError) as info:
            load_run(str(run_dir))
        message = str(info.value)
        assert message.startswith(f"{run_dir}: the run has not finished")
        # a rerun onto a running job's --out would race it: wait first, rerun only an interrupted one
        assert "still running, wait for it to finish" in message
        assert "if it was interrupted, rerun it with the same --out" in message


class TestImageLocation:
    def test_every_image_of_a_large_catalog_is_found(self, run_dir, tmp_path):
        """The report asks for the location of image after image (each look-up had scanned
        the whole catalog: 40000 images took 16 s for the overlay choice alone; now an
        index built once, `Run.image_location`)."""
        run = load_run(str(run_dir))
        ids = [f"img-{k:06d}" for k in range(40_000)]
        catalog = pd.DataFrame({"image_id": ids, "uri": [f"images/{i}.ome.zarr" for i in ids]})
        big = dataclasses.replace(run, catalog=catalog, archive=resolve(str(tmp_path / "archive")))
        found = [big.image_location(i) for i in ids]
        assert [f.uri for f in found[:2]] == [str(tmp_path / "archive" / "images" / f"{i}.ome.zarr") for i in ids[:2]]
        assert found[123].uri == str(tmp_path / "archive" / "images" / "img-000123.ome.zarr")
        assert big.image_location("not-there") is None

    def test_an_image_outside_the_archive_is_not_read(self, run_dir, tmp_path, caplog):
        """The job's rule (tests/data/test_archive_confinement.py): a catalog row whose
        folder is a link out of the archive, or whose uri climbs out, names no location,
        so no section of the report reads another lab's pixels."""
        archive, other = tmp_path / "archive", tmp_path / "lab-b" / "b.ome.zarr"
        for folder in (archive / "images" / "a.ome.zarr", other):
            folder.mkdir(parents=True)
        os.symlink(other, archive / "images" / "b.ome.zarr")
        os.symlink(archive / "images" / "a.ome.zarr", archive / "images" / "a2.ome.zarr")  # inside: fine
        catalog = pd.DataFrame({"image_id": ["a", "a2", "b", "c"],
                                "uri": ["images/a.ome.zarr", "images/a2.ome.zarr", "images/b.ome.zarr",
                                        "../lab-b/b.ome.zarr"]})
        run = dataclasses.replace(load_run(str(run_dir)), catalog=catalog, archive=resolve(str(archive)))
        with caplog.at_level(logging.WARNING, logger="engine.reports.run"):
            assert run.image_location("a").path == str(archive / "images" / "a.ome.zarr")
            assert run.image_location("a2").path == str(archive / "images" / "a2.ome.zarr")
            assert run.image_location("b") is None and run.image_location("c") is None
        warned = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("image 'b': not read: ") and f"symbolic link to {other}" in m for m in warned)
        assert any(m.startswith("image 'c': not read: ") for m in warned)


class TestCommand:
    @pytest.mark.parametrize("fault", ["result", "summary"])
    def test_malformed_run_is_one_line_exit_2(self, run_dir, fault):
        if fault == "result":
            job = json.loads((run_dir / "job.json").read_text())
            job["result"] = {"images": 3}
            (run_dir / "job.json").write_text(json.dumps(job))
            named = run_dir / "job.json"
        else:
            (run_dir / "summary.parquet").write_bytes(b"garbage")
            named = run_dir / "summary.parquet"
        cli = grainflow("report", str(run_dir))
        assert cli.returncode == 2, cli.stderr
        assert "Traceback" not in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
        assert str(named) in cli.stderr


def test_writing_a_report_imports_neither_torch_nor_ray():
    """`grainflow report` on a laptop: it reads the run's tables, it loads no model stack
    (seconds of imports). In a fresh interpreter, since this one has torch loaded."""
    assert heavy_modules_imported("from engine.reports import load_run, write_report",
                                  ("torch", "ray", "ultralytics", "mlflow")) == []
