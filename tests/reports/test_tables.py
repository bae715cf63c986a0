"""Class order: the detector's, as the run recorded it, so each class keeps its colour."""

from __future__ import annotations

from engine.reports.run import load_run
from engine.reports.tables import class_names

from .data import Img, Obj, write_run
from .test_report import Page


class TestClassNames:
    def test_detector_order_from_the_runs_label_images(self, report_run):
        from engine.models.labels import defect_class_names

        detector = list(defect_class_names())  # the tiny ensemble's detector classes
        assert detector != sorted(detector)  # (so the test tells the orders apart)
        assert class_names(load_run(str(report_run.out))) == detector
        page = Page(report_run.report.read_text(encoding="utf-8"))
        columns = list(page.table("material-summary").columns)
        assert [c for c in columns if c in detector] == detector

    def test_by_name_when_the_run_recorded_no_order(self, tmp_path):
        out = write_run(tmp_path / "run", {"a": Img([Obj("pore", (0, 0, 4, 4))])}, classes=("pore", "crack"))
        assert class_names(load_run(str(out))) == ["crack", "pore"]
