"""The HTML report of a real run, checked as a user reads it: one self-contained page
whose tables and header agree with the run's own files."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.sinks import SUMMARY_FILE
from engine.reports import NotARunError, load_run, run_summary, write_report
from engine.reports.html import plain_number

from .conftest import CORRUPT_CHUNK, CORRUPT_TILE, grainflow


class Page(HTMLParser):
    """What a reader sees: tables by id (header row, body rows of cell text), the run
    header's name -> value pairs, section ids, every src/href, figure captions."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.header: dict[str, str] = {}
        self.sections: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.images: list[str] = []
        self.captions: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._dl = False
        self._dt: str | None = None
        self._text: list[str] | None = None
        self._caption: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href", "action", "data", "poster"):
            if name in a:
                self.links.append((tag, name, a[name] or ""))
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "table":
            self._table = a.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "dl" and a.get("id") == "run-header":
            self._dl = True
        elif tag in ("dt", "dd") and self._dl:
            self._text = []
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "dt" and self._text is not None:
            self._dt, self._text = "".join(self._text), None
        elif tag == "dd" and self._text is not None:
            self.header[self._dt] = "".join(self._text)
            self._text = None
        elif tag == "dl":
            self._dl = False
        elif tag == "figcaption" and self._caption is not None:
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        for sink in (self._cell, self._text, self._caption):
            if sink is not None:
                sink.append(data)

    def table(self, table_id: str) -> pd.DataFrame:
        rows = self.tables[table_id]
        return pd.DataFrame(rows[1:], columns=rows[0])


@pytest.fixture(scope="module")
def page(report_run) -> Page:
    return Page(report_run.report.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def summary(report_run) -> pd.DataFrame:
    return pd.read_parquet(report_run.out / SUMMARY_FILE)


class TestReportPage:
    def test_one_self_contained_page(self, report_run, page):
        text = report_run.report.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>")
        assert page.sections[:6] == ["run", "materials", "images", "sizes", "density", "overlays"]
        # nothing is loaded from anywhere: every src is an inline PNG, no links, no scripts
        assert "http://" not in text and "https://" not in text and "<script" not in text
        assert page.links and all(tag == "img" and name == "src" for tag, name, _ in page.links)
        from PIL import Image

        for src in page.images:
            assert src.startswith("data:image/png;base64,")
            png = base64.b64decode(src.split(",", 1)[1], validate=True)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO(png)) as im:
                im.verify()
        # a size histogram, the density maps, and an overlay per image (3 images <= the cap)
        assert len(page.images) == 1 + 1 + 3

    def test_written_beside_the_run_by_default(self, report_run):
        assert report_run.written == str(report_run.out / "report.html") == str(report_run.report)

    def test_every_image_of_the_archive_is_in_the_summary(self, report_run, page):
        catalog = pd.read_parquet(report_run.archive / "catalog.parquet")
        images = page.table("image-summary").set_index("image_id")
        assert sorted(images.index) == sorted(catalog["image_id"])
        # ground truth from the catalog beside the prediction
        truth = catalog.set_index("image_id")
        for image_id, row in images.iterrows():
            assert row["catalog_material"] == truth.at[image_id, "material"]
            assert row["catalog_grade"] == truth.at[image_id, "quality_grade"]

    def test_material_counts_equal_the_summary_table(self, report_run, page, summary):
        shown = page.table("material-summary").set_index("material")
        expected = summary.groupby("material").agg(images=("image_id", "size"), defects=("n_defects", "sum"))
        assert sorted(shown.index) == sorted(expected.index)
        for material, row in expected.iterrows():
            assert int(shown.at[material, "images"]) == row["images"]
            assert int(shown.at[material, "defects"]) == row["defects"]
            grades = summary.loc[summary["material"] == material, "grade"].value_counts()
            for grade, n in grades.items():
                assert int(shown.at[material, f"grade {grade}"]) == n
            per_class = pd.DataFrame([json.loads(t) for t in summary.loc[summary["material"] == material,
                                                                              "defect_counts"]]).sum()
            for name, n in per_class.items():
                assert int(shown.at[material, name]) == n
        # the DataFrame the notebook shows holds the same numbers
        df = run_summary(str(report_run.out))
        assert df["images"].to_dict() == expected["images"].to_dict()
        assert df["defects"].to_dict() == expected["defects"].to_dict()
        assert df["mean_density_per_mm2"].to_numpy() == pytest.approx(
            summary.groupby("material")["defect_density_per_mm2"].mean().to_numpy())

    def test_header_equals_the_job_manifest(self, report_run, page, summary):
        job = json.loads((report_run.out / "job.json").read_text())
        result, h = job["result"], page.header
        assert h["archive"] == str(report_run.archive) and h["outputs"] == str(report_run.out)
        assert h["models (bundle)"] == job["settings"]["bundle"] == "tiny/1"
        for name, key in (("tiles planned", "tiles_total"), ("tiles done", "tiles_done"),
                          ("tiles skipped", "tiles_skipped"), ("tile errors", "errors"), ("images", "images"),
                          ("defects (stitched objects)", "objects")):
            assert int(h[name]) == result[key], name
        hours, minutes, seconds = (int(v) for v in h["run time (h:mm:ss)"].split(":"))
        assert hours * 3600 + minutes * 60 + seconds == round(result["seconds"])
        assert float(h["throughput (tiles/s)"]) == pytest.approx(result["tiles_per_s"], rel=1e-3)
        assert (result["tiles_done"], result["errors"]) == (11, 1)
        # the tiny bundle records no pixel size: each image ran at its own level 0
        assert job["settings"]["tolerance"] == "inf"
        sizes = summary["pixel_size_nm"]
        span = f"{plain_number(sizes.min())}-{plain_number(sizes.max())} nm"
        assert h["model pixel size (nm)"] == f"each image's own level 0 ({span})"
        # member versions, as each image's tiles recorded them
        versions = json.loads(summary["model_versions"].iloc[0])
        for role, version in versions.items():
            if role != "bundle":
                assert h[f"model: {role}"] == version
        # megapixels/s: tiles/s times the mean level-0 megapixels of a done tile (128 x 128 px here)
        assert float(h["throughput (level-0 megapixels/s)"]) == pytest.approx(
            result["tiles_per_s"] * 128 * 128 / 1e6, rel=1e-3)

    def test_images_table_shows_the_level_and_pixel_size_each_image_ran_at(self, page, summary):
        images = page.table("image-summary").set_index("image_id")
        for row in summary.itertuples():
            assert images.at[row.image_id, "level"] == str(row.level) == "0"
            assert images.at[row.image_id, "pixel_size_nm"] == plain_number(row.pixel_size_nm)
            assert images.at[row.image_id, "resampled"] == ""  # read as stored

    def test_failed_tile_is_in_the_errors_table(self, report_run, page):
        assert "errors" in page.sections
        errors = page.table("errors-table")
        assert len(errors) == 1
        row = errors.iloc[0]
        assert row["image"] == report_run.corrupt_image
        assert row["tile (level, y, x)"] == ", ".join(map(str, CORRUPT_TILE))
        assert row["exception"] == "CorruptChunkError" and row["chunks"] == CORRUPT_CHUNK
        assert CORRUPT_CHUNK in row["message"]
        images = page.table("image-summary").set_index("image_id")
        assert images.at[report_run.corrupt_image, "tiles_error"] == "1"
        # its neighbours ran without the bad chunk's side of their halo: counted, and said
        reduced = int(pd.read_parquet(report_run.out / SUMMARY_FILE).set_index("image_id")
                      .at[report_run.corrupt_image, "tiles_halo_reduced"])
        assert reduced > 0 and images.at[report_run.corrupt_image, "tiles_halo_reduced"] == str(reduced)
        text = report_run.report.read_text(encoding="utf-8")
        assert f"{reduced} tile(s) beside them ran without part of their halo" in text

    def test_overlays_read_a_readable_level(self, report_run, page):
        """The image with the corrupt level-0 chunk is still shown, from level 1."""
        captions = {c.split(":", 1)[0]: c for c in page.captions if c.startswith("synth-")}
        assert set(captions) == set(pd.read_parquet(report_run.out / SUMMARY_FILE)["image_id"])
        assert "level 1" in captions[report_run.corrupt_image] and "corrupt" in captions[report_run.corrupt_image]
        assert all("outlines from" in c for c in captions.values())


    def test_overlay_for_a_notebook(self, report_run):
        from PIL import Image

        from engine.reports import overlay_png

        png = overlay_png(str(report_run.out), report_run.corrupt_image)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and min(im.size) > 100


class TestOtherRuns:
    def test_text_from_data_is_escaped_and_a_moved_archive_is_named(self, report_run, tmp_path):
        """A message with markup and a run whose recorded archive is gone: the report
        is still written, shows the text as text, and says the archive is missing."""
        out = tmp_path / "run"
        shutil.copytree(report_run.out, out, ignore=shutil.ignore_patterns("report.html"))
        [error_file] = (out / "errors").rglob("*.parquet")
        table = pq.read_table(error_file)
        hostile = "<script>alert('x')</script> & <b>bold</b>"
        pq.write_table(table.set_column(table.schema.get_field_index("message"), "message",
                                        pa.array([hostile])), error_file)
        job = json.loads((out / "job.json").read_text())
        gone = tmp_path / "moved-away"
        job["settings"]["archive"] = str(gone)
        (out / "job.json").write_text(json.dumps(job))

        where = write_report(str(out))
        assert where == str(out / "report.html")
        text = Path(where).read_text(encoding="utf-8")
        assert "<script" not in text and "<b>bold" not in text
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
        page = Page(text)
        assert page.table("errors-table").iloc[0]["message"] == hostile
        assert f"the archive {gone} cannot be read" in text
        assert len(page.images) == 2  # sizes and density maps; no overlays without the archive

    def test_dollar_signs_in_names_are_drawn_as_text(self, report_run, tmp_path):
        """matplotlib reads text between two '$' as math: a class name 'lot$a_b_c$' in a
        figure title used to abort the whole report."""
        out = tmp_path / "run"
        shutil.copytree(report_run.out, out, ignore=shutil.ignore_patterns("report.html"))
        for f in (out / "objects").rglob("*.parquet"):
            table = pq.read_table(f)
            i = table.schema.get_field_index("class_name")
            pq.write_table(table.set_column(i, "class_name", pa.array(["lot$a_b_c$"] * table.num_rows)), f)
        text = Path(write_report(str(out))).read_text(encoding="utf-8")
        assert "lot$a_b_c$" in text

    def test_report_of_a_run_on_s3(self, report_run, s3_bucket):
        """The run's files and the archive copied to S3 (moto): the report reads both
        there, with label outlines from the archive's copy, and is written to the run."""
        import s3fs

        fs = s3fs.S3FileSystem()
        bucket = s3_bucket.removeprefix("s3://")
        fs.put(str(report_run.out), f"{bucket}/runs/r1", recursive=True)
        fs.put(str(report_run.archive), f"{bucket}/archive", recursive=True)
        fs.rm(f"{bucket}/runs/r1/report.html")

        where = write_report(f"{s3_bucket}/runs/r1", archive=f"{s3_bucket}/archive")
        assert where == f"{s3_bucket}/runs/r1/report.html"
        page = Page(fs.cat_file(where).decode("utf-8"))
        images = page.table("image-summary")
        assert sorted(images["image_id"]) == sorted(pd.read_parquet(report_run.archive / "catalog.parquet")["image_id"])
        assert page.header["outputs"] == f"{s3_bucket}/runs/r1" and page.header["archive"] == f"{s3_bucket}/archive"
        assert page.table("errors-table").iloc[0]["image"] == report_run.corrupt_image
        overlays = [c for c in page.captions if c.startswith("synth-")]
        assert len(overlays) == 3 and all(f"outlines from {s3_bucket}/archive/images/" in c for c in overlays)

    def test_a_run_with_labels_under_it_keeps_its_outlines_when_moved(self, labels_out_run, tmp_path):
        """A run written with labels="out" (label images under <out>/labels/), then moved
        and renamed, as a user moves or downloads a run folder: the summary still records
        the label images' old absolute URIs, and the report finds them under the run's
        new folder (it used to look at the old --out and draw no outlines)."""
        moved = tmp_path / "downloads" / "renamed-run"
        moved.parent.mkdir()
        shutil.move(labels_out_run.out, moved)
        assert not labels_out_run.out.exists()
        [recorded] = pd.read_parquet(moved / SUMMARY_FILE)["labels_uri"]
        assert recorded.startswith(f"{labels_out_run.out}/labels/")

        page = Page(Path(write_report(str(moved))).read_text(encoding="utf-8"))
        [caption] = [c for c in page.captions if c.startswith("synth-")]
        assert f"outlines from {moved}/labels/" in caption and "not readable" not in caption

    def test_unfinished_run_is_refused(self, report_run, tmp_path):
        out = tmp_path / "run"
        out.mkdir()
        job = json.loads((report_run.out / "job.json").read_text())
        (out / "job.json").write_text(json.dumps({"settings": job["settings"]}))  # as a job writes it at start
        with pytest.raises(NotARunError, match=f"{out}: the run has not finished"):
            load_run(str(out))


class TestCommand:
    def test_writes_where_asked(self, report_run, tmp_path):
        target = tmp_path / "elsewhere" / "r.html"
        cli = grainflow("report", str(report_run.out), "--out", str(target))
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip() == str(target)
        assert Page(target.read_text(encoding="utf-8")).table("image-summary") is not None

    @pytest.mark.parametrize("what", ["missing", "not a run"])
    def test_bad_run_uri_exits_2_naming_it(self, report_run, tmp_path, what):
        uri = str(tmp_path / "nothing-here") if what == "missing" else str(report_run.archive)
        cli = grainflow("report", uri)
        assert cli.returncode == 2, cli.stderr
        assert uri in cli.stderr and "Traceback" not in cli.stderr
        assert ("no such run" if what == "missing" else "this is an archive") in cli.stderr
        if what == "not a run":
            assert "pass the job's --out" in cli.stderr
