"""What a reader looks for on a figure: a scale bar on overlays, both axes labelled."""

from __future__ import annotations

import numpy as np
import pytest

from engine.reports import figures
from engine.reports.overlay import Overlay


def _overlay(width=400, pixel_nm=147.3):
    return Overlay(image_id="img", image=np.zeros((200, width), np.float32), level=1, scale=(2.0, 2.0),
                   boxes=np.zeros((0, 4)), classes=[], outlines=None, pixel_size_nm=(pixel_nm, pixel_nm))


class TestScaleBar:
    @pytest.mark.parametrize("width, pixel_nm, label", [(400, 147.3, "10 µm"), (1000, 1.0, "200 nm"),
                                                        (1024, 5000.0, "1 mm"), (300, 0.05, "2 nm")])
    def test_round_length_of_about_a_fifth(self, width, pixel_nm, label):
        length_px, text = figures.scale_bar(width, pixel_nm)
        assert text == label
        assert 0.08 * width <= length_px <= 0.2 * width

    def test_overlay_draws_it_from_the_levels_pixel_size(self):
        fig = figures.draw_overlay(_overlay(), [])
        [ax] = fig.axes
        assert [t.get_text() for t in ax.texts] == ["10 µm"]
        [bar] = [line for line in ax.lines if line.get_color() == "white"]
        x = bar.get_xdata()
        assert (x[1] - x[0]) * 147.3 == pytest.approx(10_000)  # 10 µm at the level's 147.3 nm/px

    def test_non_square_pixels_are_drawn_with_their_physical_shape(self):
        """(200, 100) nm pixels, 200 x 400 px: 40 µm tall and 40 µm wide, so drawn square
        (it used to be drawn 1:2, as if its pixels were square); the bar still measures x."""
        ov = Overlay(image_id="img", image=np.zeros((200, 400), np.float32), level=0, scale=(1.0, 1.0),
                     boxes=np.zeros((0, 4)), classes=[], outlines=None, pixel_size_nm=(200.0, 100.0))
        fig = figures.draw_overlay(ov, [])
        [ax] = fig.axes
        fig.canvas.draw()
        box = ax.get_window_extent()
        assert box.height / box.width == pytest.approx(1.0, rel=0.02)
        [bar] = [line for line in ax.lines if line.get_color() == "white"]
        x = bar.get_xdata()
        assert [t.get_text() for t in ax.texts] == ["5 µm"]
        assert (x[1] - x[0]) * 100.0 == pytest.approx(5_000)  # 5 µm at the x size, 100 nm/px

    def test_no_bar_without_a_pixel_size(self):
        fig = figures.draw_overlay(_overlay(pixel_nm=float("nan")), [])
        assert not fig.axes[0].texts


class TestDensityMapAxes:
    def test_both_axes_are_labelled_with_their_unit(self):
        import pandas as pd

        tiles = pd.DataFrame({"y": [0, 0], "x": [0, 128], "status": ["done", "done"], "core_y1": [128.0, 128.0],
                              "core_x1": [128.0, 256.0], "n_objects": [1, 0],
                              "object_density_per_mm2": [10.0, 0.0]})
        fig = figures.draw_density_maps({"a": tiles, "b": tiles}, {"a": (12.8, 25.6), "b": None},
                                        {"a": (0.1, 0.1), "b": None})
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in panels] == [
            ("x (µm)", "y (µm)"), ("x (level-0 px)", "y (level-0 px)")]
        assert [ax.get_title() for ax in panels] == ["a (1 defect)", "b (1 defect)"]
