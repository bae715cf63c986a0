"""Overlay pixels: non-finite pixels do not blacken the image; a level too large to read
whole is not read."""

from __future__ import annotations

import io

import numpy as np
import pytest

from engine.errors import GrainflowError
from engine.reports import figures
from engine.reports.overlay import read_overlay
from engine.stores.uri import resolve
from engine.stores.writer import write_image


def _image(tmp_path, pixels, chunk=64):
    loc = resolve(str(tmp_path / "img.ome.zarr"))
    write_image(loc, pixels, pixel_size=100.0, chunk=chunk)
    return loc


class TestNonFinitePixels:
    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_image_with_nan_or_inf_pixels_is_shown_and_they_are_flagged(self, tmp_path, bad):
        rng = np.random.default_rng(0)
        pixels = rng.uniform(10, 200, (64, 64)).astype(np.float32)
        pixels[:8, :8] = bad  # a masked corner
        ov = read_overlay(resolve(str(tmp_path / "run")), "img", _image(tmp_path, pixels), None)
        assert ov.level == 0
        # the finite pixels are stretched over the grey range, not all black
        finite = ov.image[8:, 8:]
        assert finite.min() == 0.0 and finite.max() == 1.0 and (finite > 0).mean() > 0.9
        assert ov.nonfinite is not None and ov.nonfinite[:8, :8].all() and ov.nonfinite.sum() == 64
        assert "64 of 4096 pixels at this level are NaN or inf" in ov.note

        from PIL import Image

        with Image.open(io.BytesIO(figures.overlay_figure(ov, []))) as im:
            rgb = np.asarray(im.convert("RGB"))
        magenta = (rgb[..., 0] > 240) & (rgb[..., 1] < 15) & (rgb[..., 2] > 240)
        assert magenta.sum() > 100  # the flagged corner (and its legend patch) are drawn in magenta


class TestLevelTooLarge:
    def test_no_level_small_enough_is_skipped_without_reading(self, tmp_path, monkeypatch):
        """256 x 256 px in one 256 px chunk has one level; with max_side 32 even that one is
        too large (more than 4 x 32): the overlay must not read it."""
        loc = _image(tmp_path, np.zeros((256, 256), np.uint8), chunk=256)
        from engine.stores.image import MultiscaleImage, open_image

        assert len(open_image(loc).levels) == 1

        def no_read(*args, **kwargs):
            raise AssertionError("a level too large for an overlay was read")

        monkeypatch.setattr(MultiscaleImage, "read_level", no_read)
        with pytest.raises(GrainflowError, match=r"img: even the coarsest pyramid level \(0, 256 x 256 px\) is "
                                                 r"larger than 128 px"):
            read_overlay(resolve(str(tmp_path / "run")), "img", loc, None, max_side=32)
