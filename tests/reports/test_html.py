"""Numbers as a reader reads them: plain digits, counts as integers, run time as h:mm:ss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.reports import write_report
from engine.reports.html import fmt

from .data import Img, Obj, write_run
from .test_report import Page


class TestFmt:
    @pytest.mark.parametrize("value, text", [
        (36000.0, "36000"), (9999.6, "10000"), (16881.55, "16882"), (1234.5678, "1235"), (0.5, "0.5"),
        (2.0, "2"), (0.000355, "0.000355"), (-3.14159, "-3.142"), (123456789.0, "123456789"), (0.0, "0"),
        (36000, "36000"), (float("nan"), "–"),
    ])
    def test_plain_digits_never_scientific(self, value, text):
        assert fmt(value) == text

    @pytest.mark.parametrize("seconds, text", [(36000.0, "10:00:00"), (18.66, "0:00:19"), (3599.6, "1:00:00"),
                                               (5 * 3600 + 7 * 60 + 9, "5:07:09")])
    def test_duration(self, seconds, text):
        from engine.reports.html import duration

        assert duration(seconds) == text


class TestReportNumbers:
    def test_a_long_dense_run_reads_in_plain_digits(self, tmp_path):
        """A 10 h run over a dense image: the header and tables had shown 3.600e+04 s and
        densities like 1.688e+04."""
        objects = [Obj("pore", (x, y, x + 2, y + 2)) for x in range(0, 250, 10) for y in range(0, 250, 25)]
        out = write_run(tmp_path / "run", {"dense": Img(objects)}, pixel_nm=50.0,
                        result={"seconds": 36000.0, "tiles_per_s": 0.000111, "tiles_total": 36000})
        text = Path(write_report(str(out))).read_text(encoding="utf-8")
        page = Page(text)
        assert page.header["run time (h:mm:ss)"] == "10:00:00"
        assert page.header["tiles planned"] == "36000"
        assert page.header["throughput (tiles/s)"] == "0.000111"
        density = page.table("image-summary").set_index("image_id").at["dense", "defect_density_per_mm2"]
        assert density == "1525879"  # 250 defects on 256 x 256 px of 50 nm: 0.00016384 mm²
        shown = re.sub(r'data:image/png;base64,[^"]+', "", text)
        assert not re.search(r"\d\.?\d*[eE][+-]\d", shown)
