"""The `grainflow` command as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from engine.stores.catalog import CatalogRow, write_catalog
from engine.stores.uri import resolve


def grainflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "archive"
    result = grainflow("synth", str(out), "--images", "3", "--size", "256", "--chunk", "128", "--seed", "5")
    assert result.returncode == 0, result.stderr
    return out


class TestSynthAndCatalog:
    def test_synth_prints_its_catalog(self, small_archive):
        listing = grainflow("catalog", str(small_archive))
        assert listing.returncode == 0, listing.stderr
        assert "3 images" in listing.stdout

    def test_catalog_json_lists_every_image(self, small_archive):
        rows = json.loads(grainflow("catalog", str(small_archive), "--json").stdout)
        assert len(rows) == 3
        assert {r["modality"] for r in rows} <= {"SEM", "TEM", "optical"}
        assert all(r["height"] == 256 and r["width"] == 256 for r in rows)

    def test_describe_one_image(self, small_archive):
        image_id = json.loads(grainflow("catalog", str(small_archive), "--json").stdout)[0]["image_id"]
        info = json.loads(grainflow("catalog", str(small_archive), "--image", image_id, "--json").stdout)
        assert info["ngff"] == "0.5" and info["labels"] == ["defects"]
        assert [lv["shape"] for lv in info["levels"]] == [[256, 256], [128, 128]]

    def test_unknown_image(self, small_archive):
        assert_user_error(grainflow("catalog", str(small_archive), "--image", "nope"), "no image 'nope'")

    def test_unknown_material(self, tmp_path):
        assert_user_error(grainflow("synth", str(tmp_path / "a"), "-m", "unobtainium"), "unobtainium", "ferritic_steel")


class TestErrors:
    def test_not_an_archive(self, tmp_path):
        assert_user_error(grainflow("catalog", str(tmp_path)), str(tmp_path), "no catalog.parquet")

    def test_synth_into_an_existing_archive_needs_overwrite(self, small_archive, tmp_path):
        """Its catalog would be replaced: images ingested there would no longer be listed."""
        assert_user_error(grainflow("synth", str(small_archive), "--images", "1", "--size", "64", "--chunk", "32"),
                          "already an archive", "--overwrite")

    def test_overwrite_replaces_the_old_images_and_keeps_the_users_files(self, tmp_path):
        archive = tmp_path / "archive"
        assert grainflow("synth", str(archive), "-n", "3", "--size", "64", "--chunk", "32").returncode == 0
        (archive / "notes.txt").write_text("mine")
        (archive / "images" / "mine.txt").write_text("mine too")
        again = grainflow("synth", str(archive), "-n", "1", "--size", "64", "--chunk", "32", "--seed", "4", "--overwrite")
        assert again.returncode == 0, again.stderr
        rows = json.loads(grainflow("catalog", str(archive), "--json").stdout)
        assert [r["image_id"] for r in rows] == ["synth-00000"]
        assert sorted(p.name for p in (archive / "images").iterdir()) == ["mine.txt", "synth-00000.ome.zarr"]
        assert (archive / "notes.txt").read_text() == "mine"

    def test_data_must_outlive_the_command(self):
        assert_user_error(grainflow("synth", "memory://scratch/a", "-n", "1", "--size", "64", "--chunk", "32"),
                          "memory://", "gone when the command ends")

    def test_an_unwritable_place_is_one_line(self, tmp_path):
        """Errors of the user's environment (here a path through a file) are named in one
        line, as grainflow's own are, not shown as a traceback."""
        (tmp_path / "file").write_text("not a folder")
        assert_user_error(grainflow("synth", str(tmp_path / "file" / "a"), "-n", "1", "--size", "64", "--chunk", "32"),
                          "NotADirectoryError", str(tmp_path / "file"))

    def test_reprocess_input_is_checked_before_ray_starts(self, small_archive, tmp_path):
        def reprocess(*args):
            return subprocess.run([sys.executable, "-m", "jobs.reprocess", *args], capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "RAY_ADDRESS": ""})

        for args, words in (
            (["--archive", str(tmp_path), "--out", str(tmp_path / "o"), "--models", "x@production"],
             "no catalog.parquet"),
            (["--archive", str(small_archive), "--out", str(tmp_path / "o"), "--models", "x@production",
              "--tracking-uri", f"sqlite:///{tmp_path}/typo.db"], "no registry at"),
            (["--archive", str(small_archive), "--out", "memory://o", "--models", "x@production"], "memory://"),
            # a path (or any text an archive holds) with terminal escapes: printed visible, not run
            (["--archive", str(tmp_path / "runs\x1b]0;title\x07"), "--out", str(tmp_path / "o"),
              "--models", "x@production"], "runs\\x1b]0;title\\x07"),
        ):
            p = reprocess(*args)
            assert p.returncode == 2 and words in p.stderr, p.stderr[-2000:]
            assert "Traceback" not in p.stderr and "Started a local Ray" not in p.stderr
            assert "\x1b" not in p.stderr and "\x07" not in p.stderr
        assert not (tmp_path / "typo.db").exists()  # a mistyped registry is not created empty

    def test_unknown_scheme(self):
        assert_user_error(grainflow("catalog", "gs://bucket/archive"), "unknown scheme 'gs'")


class TestIngest:
    def test_tiff_without_pixel_size_then_with(self, tmp_path):
        tif = tmp_path / "plain.tif"
        tifffile.imwrite(tif, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
        archive = tmp_path / "archive"
        assert_user_error(grainflow("ingest", str(tif), "--archive", str(archive), "--modality", "SEM"),
                          "plain.tif", "--pixel-size")
        ok = grainflow("ingest", str(tif), "--archive", str(archive), "--modality", "SEM",
                       "--pixel-size", "2.5", "--unit", "nm")
        assert ok.returncode == 0, ok.stderr
        rows = json.loads(grainflow("catalog", str(archive), "--json").stdout)
        assert [(r["image_id"], r["pixel_size_x"], r["unit"]) for r in rows] == [("plain", 2.5, "nanometer")]

def _catalog_row(image_id: str, size_y: float, size_x: float, unit: str = "nanometer") -> CatalogRow:
    return CatalogRow(image_id=image_id, uri=f"images/{image_id}.ome.zarr", modality="SEM", pixel_size_y=size_y,
                      pixel_size_x=size_x, unit=unit, height=512, width=256, dtype="uint8", levels=1, chunk=256,
                      checksum="0")


class TestCatalogListing:
    def test_non_square_pixels_are_listed_y_by_x(self, tmp_path):
        archive = tmp_path / "archive"
        rows = [_catalog_row("fast-scan", 200.0, 100.0), _catalog_row("square", 100.0, 100.0),
                _catalog_row("optical", 1.0, 1.0, "micrometer")]
        write_catalog(resolve(str(archive)), rows)
        cli = grainflow("catalog", str(archive))
        assert cli.returncode == 0, cli.stderr
        rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
                for line in cli.stdout.splitlines() if line.startswith("│")}
        assert rows["fast-scan"][-1] == "200 x 100 nm"
        assert rows["square"][-1] == "100 nm"
        assert rows["optical"][-1] == "1 µm"
        assert rows["fast-scan"][4] == "512 x 256"  # the shape, in the same y x x order


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """image_id -> the cells of its row in `grainflow catalog`'s table."""
    return {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
            for line in stdout.splitlines() if line.startswith("│")}


class TestCatalogTextIsData:
    """Catalog and metadata text is printed as written: rich reads "[...]" as markup,
    so "[as-built]" vanished as an unknown tag and "[/HIP]" crashed the command."""

    def test_materials_with_brackets_in_the_listing_and_summary(self, tmp_path):
        from dataclasses import replace

        archive = tmp_path / "archive"
        write_catalog(resolve(str(archive)), [replace(_catalog_row("a", 1.0, 1.0), material="IN718 [as-built]"),
                                              replace(_catalog_row("b", 1.0, 1.0), material="Ti64 [/HIP]")])
        cli = grainflow("catalog", str(archive))
        assert cli.returncode == 0, cli.stderr
        rows = _table_rows(cli.stdout)
        assert (rows["a"][2], rows["b"][2]) == ("IN718 [as-built]", "Ti64 [/HIP]")
        assert "  material: IN718 [as-built] 1, Ti64 [/HIP] 1" in cli.stdout.splitlines()

    def test_an_images_attributes_are_printed_as_written(self, tmp_path):
        raw = tmp_path / "[raw]"
        raw.mkdir()
        tifffile.imwrite(raw / "s1.tif", np.zeros((32, 32), dtype=np.uint8))
        archive = tmp_path / "archive"
        ingested = grainflow("ingest", str(raw / "s1.tif"), "--archive", str(archive), "--modality", "SEM",
                             "--pixel-size", "1", "--material", "Ti64 [/HIP]")
        assert ingested.returncode == 0, ingested.stderr
        cli = grainflow("catalog", str(archive), "--image", "s1")
        assert cli.returncode == 0, cli.stderr
        lines = cli.stdout.splitlines()
        assert f"  source: {raw / 's1.tif'}" in lines
        assert "  material: Ti64 [/HIP]" in lines


class TestTerminalControlsInDataArePrintedVisibly:
    """Instrument files put any text in their tags: printed raw, ESC ] 52 wrote the
    user's clipboard and ESC [ 2K erased what the terminal showed. Control characters
    in data are printed as visible escapes (\\x1b); --json keeps the text exact."""

    def test_escape_sequences_in_a_tiff_model_tag(self, tmp_path):
        model = "Zeiss \x1b]52;c;ZWNobyBoaQ==\x1b\\ Sigma\x1b[2K 300"
        tifffile.imwrite(tmp_path / "s1.tif", np.zeros((32, 32), dtype=np.uint8),
                         extratags=[(272, "s", 0, model, True)])  # 272: the Model tag
        archive = tmp_path / "archive\x1b[2K"  # the ingest summary names it
        ingested = grainflow("ingest", str(tmp_path / "s1.tif"), "--archive", str(archive), "--modality", "SEM",
                             "--pixel-size", "1")
        assert ingested.returncode == 0, ingested.stderr
        assert "\x1b" not in ingested.stdout and "archive\\x1b[2K" in ingested.stdout

        described = grainflow("catalog", str(archive), "--image", "s1")
        assert described.returncode == 0, described.stderr
        assert "\x1b" not in described.stdout
        assert "  instrument: Zeiss \\x1b]52;c;ZWNobyBoaQ==\\x1b\\ Sigma\\x1b[2K 300" in described.stdout.splitlines()
        as_json = grainflow("catalog", str(archive), "--image", "s1", "--json")
        assert "\x1b" not in as_json.stdout
        assert json.loads(as_json.stdout)["attributes"]["instrument"] == model

    def test_c1_controls_and_del_in_catalog_cells(self, tmp_path):
        """U+009B is ESC [ to a terminal that reads C1 controls; json.dumps writes it raw."""
        from dataclasses import replace

        material = "IN718\x9b2J\x7f [as-built]"
        archive = tmp_path / "archive"
        write_catalog(resolve(str(archive)), [replace(_catalog_row("a", 1.0, 1.0), material=material)])
        listing = grainflow("catalog", str(archive))
        assert listing.returncode == 0, listing.stderr
        assert not {"\x9b", "\x7f"} & set(listing.stdout)
        assert _table_rows(listing.stdout)["a"][2] == "IN718\\x9b2J\\x7f [as-built]"
        assert "  material: IN718\\x9b2J\\x7f [as-built] 1" in listing.stdout.splitlines()
        as_json = grainflow("catalog", str(archive), "--json")
        assert not {"\x9b", "\x7f"} & set(as_json.stdout)
        assert json.loads(as_json.stdout)[0]["material"] == material

    def test_an_error_quoting_a_path_with_escapes(self, tmp_path):
        archive = tmp_path / "runs\x1b[2K\x1b]0;title\x07"
        result = grainflow("catalog", str(archive))
        assert_user_error(result, "runs\\x1b[2K\\x1b]0;title\\x07", "no catalog.parquet")
        assert "\x1b" not in result.stderr and "\x07" not in result.stderr
