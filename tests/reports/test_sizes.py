"""Defect sizes: defects without a measured size are counted, not silently dropped;
the histograms are built image by image, in memory that does not grow with the run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from engine.reports import write_report
from engine.reports.run import load_run

from tests.traced_memory import run_in_fresh_process, traced

from .data import Img, Obj, write_run
from .test_report import Page

NAN = math.nan


class TestUnmeasured:
    def test_defects_without_a_size_are_counted_per_class(self, tmp_path):
        out = write_run(tmp_path / "run", {
            "a": Img([Obj("pore", (0, 0, 5, 5), 80.0), Obj("pore", (9, 9, 15, 15), NAN),
                      Obj("crack", (20, 20, 30, 30), NAN)]),
            "b": Img([Obj("pore", (0, 0, 5, 5), 120.0), Obj("pore", (40, 40, 50, 50), NAN)]),
        })
        text = Path(write_report(str(out))).read_text(encoding="utf-8")
        assert "pore: 2 of 4 defects have no measured size and are not shown" in text
        assert "crack: 1 of 1 defects have no measured size and are not shown" in text
        stats = Page(text).table("size-statistics").set_index("class")
        assert stats.at["pore", "count"] == "2" and stats.at["pore", "no size"] == "2"
        assert stats.at["pore", "median (nm)"] == "100"
        assert "crack" not in stats.index  # no measured crack: no row and no panel, only the note


class TestStreaming:
    def test_percentiles_exact_while_small_and_within_a_bin_beyond(self):
        from engine.reports.sizes import EXACT_MAX, ClassSizes

        rng = np.random.default_rng(0)
        d = rng.lognormal(math.log(500), 0.8, 3 * EXACT_MAX)
        small, large = ClassSizes(), ClassSizes()
        small.add(d[:1000])
        for part in np.array_split(d, 30):
            large.add(part)
        assert small.quantile(0.9) == pytest.approx(np.quantile(d[:1000], 0.9), rel=1e-12)
        assert large.exact is None  # past EXACT_MAX only the bins are kept
        for q in (0.1, 0.5, 0.9):
            assert large.quantile(q) == pytest.approx(np.quantile(d, q), rel=0.023)
        assert large.mean_nm == pytest.approx(d.mean(), rel=1e-12) and large.measured == len(d)

    def test_memory_does_not_grow_with_the_number_of_objects(self, tmp_path):
        """The sizes of a run with 8x the images (and objects) cost about the same peak
        memory: they had been gathered into one DataFrame of every object. (Images are
        read in batches: a small batch here, so both runs span several.)"""
        rng = np.random.default_rng(1)

        def image():
            return Img([Obj("pore", (0, 0, 4, 4), float(v)) for v in rng.lognormal(5, 1, 2500)])

        def peak(n_images: int) -> int:
            out = write_run(tmp_path / f"run{n_images}", {f"i{k:03d}": image() for k in range(n_images)})
            measured, top = run_in_fresh_process(_pore_sizes_traced, str(out), batch=2)
            assert measured == 2500 * n_images
            return top

        small, large = peak(6), peak(48)
        assert large < 2 * small, (small, large)


def _pore_sizes_traced(run_dir: str, *, batch: int) -> tuple[int, int]:
    """In a fresh process: (pores measured, peak traced bytes) of the run's size
    distributions, its images read `batch` at a time."""
    from engine.reports import sizes as sizes_module

    sizes_module._BATCH = batch
    run = load_run(run_dir)
    sizes, peak = traced(sizes_module.size_distributions, run, ["pore"])
    return sizes.classes["pore"].measured, peak
