"""Preprocessing: fitted once per image from a sample of level 0, applied to tiles alike."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from engine.preprocess import PreprocessParams, apply, fit_preprocessing, method_for
from engine.stores.image import MultiscaleImage, open_image
from engine.stores.writer import write_image
from engine.tiling import TileGrid


def _texture(shape, seed=0) -> np.ndarray:
    """Grain-like texture around 1.0 with a few dark pores."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    t = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    t = 1.0 + 0.15 * t / t.std()
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for cy, cx in rng.uniform(0, 1, (6, 2)) * shape:
        t[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] *= 0.3
    return t


def _vignette(shape) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - shape[0] * 0.4) / shape[0]) ** 2 + ((xx - shape[1] * 0.55) / shape[1]) ** 2
    return 1.0 - 1.3 * r2  # bright off-centre spot falling to ~15% in the far corner


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of 768 x 1024 (4 levels with 128-pixel chunks), one per modality."""
    root = tmp_path_factory.mktemp("pre")
    shape = (768, 1024)
    tex = _texture(shape)
    pixels = {
        "SEM": np.clip(tex * 30000 + 2000, 0, 65535).astype(np.uint16),
        "TEM": np.clip(tex * 9000 + 500, 0, 65535).astype(np.uint16),
        "optical": np.clip(tex * _vignette(shape) * 160, 0, 255).astype(np.uint8),
        "default": (tex * 1000).astype(np.float32),
    }
    out = {}
    for name, px in pixels.items():
        uri = root / f"{name}.ome.zarr"
        write_image(uri, px, pixel_size=50.0, unit="nm", chunk=128, attributes={"modality": name})
        out[name] = open_image(uri)
    return out


class TestMethods:
    @pytest.mark.parametrize("modality, method", [
        ("SEM", "SEM"), ("sem", "SEM"), ("TEM", "TEM"), ("STEM", "TEM"), ("optical", "optical"),
        ("EBSD", "default"), (None, "default"),
    ])
    def test_method_for(self, modality, method):
        assert method_for(modality) == method

    def test_params_are_small_frozen_and_pickle(self, images):
        for name, image in images.items():
            params = fit_preprocessing(image, name)
            assert params.method == name
            assert pickle.loads(pickle.dumps(params)) == params
            assert len(pickle.dumps(params)) < 64 * 1024
            with pytest.raises(AttributeError):
                params.low = 0  # frozen

    def test_bad_range_is_refused(self):
        with pytest.raises(ValueError, match="high > low"):
            PreprocessParams("SEM", 5.0, 5.0)


class TestApply:
    @pytest.mark.parametrize("modality", ["SEM", "TEM", "optical", "default"])
    def test_output_is_float32_in_unit_range(self, images, modality):
        image = images[modality]
        params = fit_preprocessing(image, modality)
        out = apply(params, image.read_region(0, 0, 256, 0, 256))
        assert out.dtype == np.float32 and out.shape == (256, 256)
        assert out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0.05

    @pytest.mark.parametrize("modality", ["SEM", "TEM", "default"])
    def test_same_raw_values_in_two_tiles_give_the_same_output(self, images, modality):
        image = images[modality]
        params = fit_preprocessing(image, modality)
        raw = image.read_region(0, 128, 384, 256, 512)
        a = apply(params, raw, origin=(128, 256), scale=1)
        b = apply(params, raw, origin=(512, 768), scale=1)  # same pixels, another tile's place
        np.testing.assert_array_equal(a, b)

    @pytest.mark.parametrize("modality", ["SEM", "TEM", "optical", "default"])
    @pytest.mark.parametrize("level", [0, 1])
    def test_tiles_agree_with_the_whole_level(self, images, modality, level):
        """A pixel's output does not depend on which tile (with which halo) it was read in."""
        image = images[modality]
        params = fit_preprocessing(image, modality)
        f = 2**level
        whole = apply(params, image.read_level(level), origin=(0, 0), scale=f)
        for spec in TileGrid.from_image(image, modality, level, tile=256, halo=16):
            y0, y1, x0, x1 = spec.read_region
            out = apply(params, image.read_region(level, y0, y1, x0, x1), origin=spec.read_origin0, scale=f)
            np.testing.assert_array_equal(out, whole[y0:y1, x0:x1])

    def test_flattening_removes_a_vignette(self, images):
        image = images["optical"]
        params = fit_preprocessing(image, "optical")
        raw = image.read_level(0).astype(np.float64)
        out = apply(params, raw, origin=(0, 0), scale=1)

        def gradient(a):
            """Spread of 64 x 64 block medians over the texture's contrast within blocks
            (unchanged by the final linear stretch)."""
            blocks = [a[y : y + 64, x : x + 64] for y in range(0, 768, 64) for x in range(0, 1024, 64)]
            return np.std([np.median(b) for b in blocks]) / np.median([np.std(b) for b in blocks])

        before, after = gradient(raw), gradient(out)
        assert before > 1.0  # the vignette dominates the texture
        assert after < before / 5, (before, after)

    def test_tem_brightness_normalised(self, tmp_path):
        """Two exposures of one foil (different dose and offset) come out alike."""
        tex = _texture((256, 256), seed=4)
        outs = []
        for i, (gain, offset) in enumerate([(4000, 300), (12000, 5000)]):
            uri = tmp_path / f"t{i}.ome.zarr"
            write_image(uri, (tex * gain + offset).astype(np.uint16), pixel_size=1.0, chunk=64)
            image = open_image(uri)
            outs.append(apply(fit_preprocessing(image, "TEM"), image.read_level(0)))
        assert np.median(outs[0]) == pytest.approx(0.5, abs=0.02)
        np.testing.assert_allclose(outs[0], outs[1], atol=0.01)

    def test_sem_line_damping_removes_row_offsets(self, tmp_path):
        rng = np.random.default_rng(2)
        tex = _texture((256, 256), seed=5) * 20000
        lines = rng.normal(0, 3000, 256)[:, None]  # scan-line offsets
        uri = tmp_path / "sem.ome.zarr"
        write_image(uri, np.clip(tex + lines + 10000, 0, 65535).astype(np.uint16), pixel_size=1.0, chunk=64)
        image = open_image(uri)
        plain = apply(fit_preprocessing(image, "SEM"), image.read_level(0))
        damped = apply(fit_preprocessing(image, "SEM", line_damping=1.0), image.read_level(0))
        row_noise = lambda a: np.std(np.diff(np.median(a, axis=1)))  # noqa: E731
        assert row_noise(damped) < row_noise(plain) / 3


class TestFitReadsLevel0ChunkByChunk:
    @pytest.mark.parametrize("modality", ["SEM", "TEM", "optical", "default"])
    def test_levels_read(self, images, modality, monkeypatch):
        """Statistics come from level 0 (where tiles have their noise), read through its
        zarr array chunk by chunk, never as one region or a whole level."""
        image = images[modality]
        seen = []
        real_array = MultiscaleImage.array

        def spy_array(self, level=0):
            seen.append(level)
            return real_array(self, level)

        def no_region_reads(self, *args, **kwargs):
            raise AssertionError("fit_preprocessing read pixels through read_regions or read_level")

        monkeypatch.setattr(MultiscaleImage, "array", spy_array)
        monkeypatch.setattr(MultiscaleImage, "read_regions", no_region_reads)
        monkeypatch.setattr(MultiscaleImage, "read_level", no_region_reads)
        params = fit_preprocessing(image, modality, max_pixels=300)
        assert params.level == 0 and set(seen) == {0}


def test_flattening_without_a_pyramid(tmp_path):
    """An image with one level (no small level to fit on) is block-averaged for its background."""
    import zarr

    from engine.stores.ngff import multiscales_v05

    shape = (600, 1100)
    pixels = np.clip(_texture(shape, seed=8) * _vignette(shape) * 160, 0, 255).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "flat.ome.zarr"), mode="w", zarr_format=3)
    group.create_array("0", data=pixels, chunks=(200, 200))
    ms = multiscales_v05(name="flat", unit="nanometer", pixel_size=(1.0, 1.0), n_levels=1, centre_shift=True)
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}})
    image = open_image(tmp_path / "flat.ome.zarr")
    params = fit_preprocessing(image, "optical", max_pixels=256)
    truth = _vignette(shape) * 160
    field = params.background.evaluate(np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5)
    ratio = field / truth
    assert ratio.max() / ratio.min() < 1.25  # the field follows the vignette (about 6x across)


class TestPreprocessBatch:
    def test_rows_of_a_batch(self, images):
        from engine.preprocess import preprocess_batch

        image = images["optical"]
        params = fit_preprocessing(image, "optical")
        a, b = image.read_region(0, 0, 64, 0, 64), image.read_region(0, 100, 130, 200, 260)
        batch = {
            "image_id": np.array(["o", "o", "o"], dtype=object),
            "tile": np.array([a, b, np.zeros((0, 0), a.dtype)], dtype=object),
            "origin": np.array([[0.0, 0.0], [100.0, 200.0], [0.0, 0.0]]),
            "scale": np.ones((3, 2)),
            "error": np.array([None, None, "CorruptChunkError: chunk 0/c/0/0"], dtype=object),
        }
        out = preprocess_batch(batch, {"o": params})
        np.testing.assert_array_equal(out["tile"][0], apply(params, a, (0, 0), 1))
        np.testing.assert_array_equal(out["tile"][1], apply(params, b, (100, 200), 1))
        assert out["tile"][2].shape == (0, 0) and out["error"] is batch["error"]
        same = preprocess_batch({**batch, "tile": np.stack([a, a, a]), "error": np.array([None] * 3)},
                                lambda image_id: params)
        assert same["tile"].shape == (3, 64, 64) and same["tile"].dtype == np.float32


class TestFitOnAwkwardImages:
    """Images a lab does produce: a blank or saturated optical frame, a thin strip, a float
    image with NaN pixels. Fits or says what is wrong; never a numpy error."""

    @pytest.mark.parametrize("value", [0, 128, 255])
    def test_a_flat_optical_frame_fits(self, tmp_path, value):
        uri = tmp_path / "flat.ome.zarr"
        write_image(uri, np.full((300, 400), value, np.uint8), pixel_size=1.0, chunk=64)
        image = open_image(uri)
        out = apply(fit_preprocessing(image, "optical"), image.read_level(0))
        assert np.isfinite(out).all()

    @pytest.mark.parametrize("shape", [(128, 4096), (2000, 3), (1, 300)])
    def test_a_thin_optical_image_fits(self, tmp_path, shape):
        uri = tmp_path / "strip.ome.zarr"
        write_image(uri, np.clip(_texture(shape, seed=2) * 200, 0, 255).astype(np.uint8), pixel_size=1.0, chunk=64)
        image = open_image(uri)
        out = apply(fit_preprocessing(image, "optical"), image.read_level(0))
        assert out.shape == shape and np.isfinite(out).all() and out.max() > out.min()

    def test_a_float_image_of_tiny_values_is_not_taken_for_flat(self, tmp_path):
        """Detector currents in amperes (1e-11 .. 1e-10): stretched like any other image."""
        uri = tmp_path / "amps.ome.zarr"
        write_image(uri, (_texture((128, 128), seed=6) * 9e-11 + 1e-11).astype(np.float32), pixel_size=1.0, chunk=64)
        image = open_image(uri)
        out = apply(fit_preprocessing(image, "SEM"), image.read_level(0))
        assert out.max() - out.min() > 0.5

    def test_an_image_without_finite_pixels_is_named(self, tmp_path):
        from engine.errors import GrainflowError

        uri = tmp_path / "nan.ome.zarr"
        write_image(uri, np.full((128, 128), np.nan, np.float32), pixel_size=1.0, chunk=64)
        for modality in ("SEM", "TEM", "optical"):
            with pytest.raises(GrainflowError, match="no finite pixels"):
                fit_preprocessing(open_image(uri), modality)
