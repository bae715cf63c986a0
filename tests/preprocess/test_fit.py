"""fit_preprocessing as a user checks it: level-0 tiles clip as designed, a few bad pixels
do not spoil an image, memory stays bounded, and the pyramid's depth does not matter."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine.preprocess import PreprocessParams, apply, fit_preprocessing
from engine.stores.image import open_image
from engine.stores.writer import write_image
from tests.traced_memory import run_in_fresh_process, traced


def _noisy(shape, seed=0) -> np.ndarray:
    """Grains (smooth, ~8 px) with strong per-pixel shot noise, around 1.0: what averaging
    by a pyramid shrinks."""
    rng = np.random.default_rng(seed)
    grains = ndimage.gaussian_filter(rng.normal(size=shape), 4)
    return 1.0 + 0.1 * grains / grains.std() + 0.15 * rng.normal(size=shape)


def _image(tmp_path, name, pixels, chunk=128):
    uri = tmp_path / f"{name}.ome.zarr"
    write_image(uri, pixels, pixel_size=1.0, chunk=chunk)
    return open_image(uri)


def _clipped(out: np.ndarray) -> tuple[float, float]:
    return float(np.mean(out == 0)), float(np.mean(out == 1))


class TestLevel0TilesClipAsDesigned:
    """The stretch is meant for the tiles the models see; most read level 0."""

    @pytest.mark.parametrize("modality, tail", [("SEM", 0.005), ("default", 0.01), ("optical", 0.01)])
    def test_clipped_fraction_at_level_0(self, tmp_path, modality, tail):
        pixels = np.clip(_noisy((1024, 1024)) * 120, 0, 255).astype(np.uint8)
        image = _image(tmp_path, modality, pixels)
        assert len(image.levels) >= 3  # coarse levels exist, averaged 4x4 and more
        params = fit_preprocessing(image, modality, max_pixels=256)
        low, high = _clipped(apply(params, image.read_level(0)))
        # uint8 ties put a little more on the ends than the percentile; far from the 5-10x
        # a fit on an averaged level gives
        assert low <= 2 * tail and high <= 2 * tail, (low, high)
        assert low > 0 and high > 0

    def test_tem_spread_is_level_0s(self, tmp_path):
        pixels = np.clip(_noisy((1024, 1024), seed=1) * 9000, 0, 65535).astype(np.uint16)
        image = _image(tmp_path, "tem", pixels)
        params = fit_preprocessing(image, "TEM", max_pixels=256)
        q25, q75 = np.percentile(pixels, (25, 75))
        expected = 2 * 3.0 * (q75 - q25) / 1.349
        assert params.high - params.low == pytest.approx(expected, rel=0.03)


class TestBadPixels:
    """Float and 32-bit detectors: a few hot pixels, NaN (dead) or inf pixels."""

    @pytest.mark.parametrize("dtype, hot", [(np.float32, 1e6), (np.float32, -3e4), (np.uint32, 4_000_000_000)])
    def test_a_few_extreme_pixels_do_not_change_the_stretch(self, tmp_path, dtype, hot):
        clean = (_noisy((256, 256), seed=2) * 2000).astype(dtype)
        dirty = clean.copy()
        dirty[10, 20] = dirty[200, 100] = hot
        a = fit_preprocessing(_image(tmp_path, "clean", clean, chunk=64), "SEM")
        b = fit_preprocessing(_image(tmp_path, "dirty", dirty, chunk=64), "SEM")
        assert b.low == pytest.approx(a.low, rel=1e-3) and b.high == pytest.approx(a.high, rel=1e-3)
        out = apply(b, dirty)
        assert 0.3 < float(np.median(out)) < 0.7 and out.std() > 0.1  # not a black (or white) image

    @pytest.mark.parametrize("modality", ["SEM", "TEM", "optical", "default"])
    def test_nan_and_inf_pixels_are_left_out_of_the_fit_and_map_to_0(self, tmp_path, modality):
        clean = (_noisy((256, 256), seed=3) * 100).astype(np.float32)
        dirty = clean.copy()
        dirty[64:72, 64:72] = np.nan  # a masked block
        dirty[5, 7], dirty[9, 9] = np.inf, -np.inf
        a = fit_preprocessing(_image(tmp_path, "clean", clean, chunk=64), modality)
        b = fit_preprocessing(_image(tmp_path, "dirty", dirty, chunk=64), modality)
        assert b.low == pytest.approx(a.low, rel=0.01) and b.high == pytest.approx(a.high, rel=0.01)
        out = apply(b, dirty)
        bad = ~np.isfinite(dirty)
        assert np.isfinite(out).all() and (out[bad] == 0).all()
        np.testing.assert_allclose(out[~bad], apply(a, clean)[~bad], atol=0.02)

    def test_line_damping_with_nan_pixels(self):
        """A NaN pixel must not turn its scan line into NaN through the row's median."""
        rng = np.random.default_rng(4)
        tile = rng.uniform(100, 200, (64, 64)).astype(np.float32)
        tile[10, 3] = np.nan
        out = apply(PreprocessParams("SEM", 100.0, 200.0, line_damping=1.0), tile)
        assert np.isfinite(out).all() and out[10, 3] == 0 and out[10].std() > 0.1


class TestMemory:
    def test_a_one_level_image_is_not_copied_as_float64(self, tmp_path):
        """A foreign image with no pyramid (one 2048 x 2048 uint8 chunk, 4 MiB): the fit
        holds about a chunk, not float64 copies of the level (32 MiB each)."""
        pixels = np.clip(_noisy((2048, 2048), seed=5) * 120, 0, 255).astype(np.uint8)
        image = _image(tmp_path, "one", pixels, chunk=2048)
        assert len(image.levels) == 1
        peaks = run_in_fresh_process(_fit_traced, image, ("optical", "SEM"))  # an image pickles as its location
        for modality, peak in peaks.items():
            assert peak < 48 * 2**20, (modality, peak / 2**20)


def _fit_traced(image, modalities) -> dict[str, int]:
    """In a fresh process: modality -> peak traced bytes of fitting `image`."""
    return {m: traced(fit_preprocessing, image, m)[1] for m in modalities}


class TestPyramidDepthDoesNotMatter:
    """The job fits the archive's image, the endpoint an upload of the same pixels written
    with its own chunk size (so with fewer levels): the parameters must be the same."""

    @pytest.mark.parametrize("modality", ["SEM", "TEM", "optical", "default"])
    def test_same_pixels_same_params(self, tmp_path, modality):
        shape = (2048, 1536)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        light = 1.0 - 0.5 * ((xx / shape[1] - 0.6) ** 2 + (yy / shape[0] - 0.4) ** 2)
        pixels = np.clip(_noisy(shape, seed=6) * light * 150, 0, 255).astype(np.uint8)
        archive = _image(tmp_path, "archive", pixels, chunk=128)
        upload = _image(tmp_path, "upload", pixels, chunk=2048)  # one level
        assert len(archive.levels) > len(upload.levels)
        a, b = fit_preprocessing(archive, modality), fit_preprocessing(upload, modality)
        assert a == b


class TestLargeImages:
    def test_over_the_read_budget_spread_chunks_and_a_stored_level(self, tmp_path, monkeypatch):
        """An image over READ_PIXELS: statistics from evenly spread chunks of level 0, the
        illumination from a stored level; both close to reading everything."""
        from engine.preprocess import fit

        shape = (1024, 768)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        light = 1.0 - 0.6 * ((xx / shape[1] - 0.6) ** 2 + (yy / shape[0] - 0.4) ** 2)
        pixels = np.clip(_noisy(shape, seed=7) * light * 150, 0, 255).astype(np.uint8)
        image = _image(tmp_path, "big", pixels, chunk=128)
        whole = fit_preprocessing(image, "optical")
        monkeypatch.setattr(fit, "READ_PIXELS", 2**16)  # level 0 has 12x as many
        part = fit_preprocessing(image, "optical")
        assert part.low == pytest.approx(whole.low, rel=0.05) and part.high == pytest.approx(whole.high, rel=0.05)
        a, b = apply(whole, pixels), apply(part, pixels)
        assert np.mean(np.abs(a - b)) < 0.02
