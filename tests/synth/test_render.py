"""Rendering: chunk independence, every material and modality, bounded memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.stores.image import open_image
from engine.synth import MATERIALS
from engine.synth.defects import rasterise
from engine.synth.image import render_image, render_region, write_image
from engine.synth.materials import get_material
from engine.synth.plan import plan_archive
from tests.traced_memory import run_in_fresh_process, traced

PAIRS = [(m, x) for m in MATERIALS for x in get_material(m).modalities]


def one_plan(material, modality, size, chunk=64, seed=5):
    return plan_archive(n_images=1, seed=seed, size=size, chunk=chunk, materials=[material], modalities=[modality])[0]


class TestEveryMaterial:
    @pytest.mark.parametrize("material,modality", PAIRS)
    def test_renders_a_real_image(self, material, modality):
        plan = one_plan(material, modality, (72, 80))
        pixels, labels = render_image(plan)
        assert pixels.shape == labels.shape == (72, 80)
        assert pixels.dtype == plan.dtype and labels.dtype == np.uint32
        top = np.iinfo(pixels.dtype).max
        # neither blank nor saturated: a micrograph uses a good part of its range
        assert 0.1 * top < pixels.mean() < 0.9 * top
        assert pixels.std() > 0.02 * top
        assert (pixels == top).mean() < 0.02 and (pixels == 0).mean() < 0.02


class TestChunkIndependence:
    @pytest.mark.parametrize("material,modality", [("am_alloy", "SEM"), ("grey_cast_iron", "optical"),
                                                   ("thin_film_lattice", "TEM")])
    def test_any_tiling_gives_the_same_image(self, tmp_path, material, modality):
        plan = one_plan(material, modality, (150, 130), chunk=64, seed=8)
        whole = render_image(plan)
        info, _ = write_image(plan, tmp_path / "x.ome.zarr")
        image = open_image(tmp_path / "x.ome.zarr")
        assert np.array_equal(image.read_level(0), whole[0])
        assert np.array_equal(image.open_labels("defects").read_level(0), whole[1])
        # a region starting off the chunk grid
        pixels, labels = render_region(plan, 37, 21, 50, 70)
        assert np.array_equal(pixels, whole[0][37:87, 21:91])
        assert np.array_equal(labels, whole[1][37:87, 21:91])

    def test_masks_follow_the_scan_distortion(self):
        """In SEM each row is shifted by jitter and drift; the mask is drawn on the same
        distorted grid, so it matches the label image exactly."""
        plan = one_plan("ferritic_steel", "SEM", (256, 256), seed=3)
        assert plan.imaging.max_shift_px > 0.3
        _, labels = render_image(plan)
        for d in plan.defects:
            dm = rasterise(d, plan.imaging)
            y0, x0, y1, x1 = dm.box
            assert np.array_equal(labels[y0:y1, x0:x1] == d.instance_id, dm.mask)
            assert (labels == d.instance_id).sum() == dm.area > 0

    def test_each_mask_row_moves_against_its_row_shift(self):
        """Row r samples the specimen at x + row_shift(r), so a blob's pixels in row r sit
        row_shift(r) to the left of where an undistorted scan puts them: each row's centre
        of the label moves by -row_shift(r) (to within the pixel grid's rounding)."""
        plan = one_plan("ferritic_steel", "SEM", (256, 256), seed=15)
        im = plan.imaging
        undistorted = dataclasses.replace(im, jitter_px=0.0, drift_px=0.0, glitch_px=0.0)
        _, labels = render_image(plan)
        blobs = [d for d in plan.defects if not d.is_line]
        assert blobs
        for d in blobs:
            y0, x0, y1, x1 = d.window
            shift = im.row_shift(np.arange(y0, y1))
            got = labels[y0:y1, x0:x1] == d.instance_id
            flat = np.zeros_like(got)
            dm = rasterise(d, undistorted)
            by0, bx0, by1, bx1 = dm.box
            flat[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] = dm.mask
            rows = (got.sum(axis=1) >= 3) & (flat.sum(axis=1) >= 3)
            cols = np.arange(x0, x1) + 0.5

            def centre(m):
                return (m[rows] * cols).sum(axis=1) / m[rows].sum(axis=1)

            # the test means something only where the scan moved rows by more than a pixel
            assert rows.sum() > 10 and np.abs(shift[rows]).mean() > 1.0
            moved = centre(got) - centre(flat)
            np.testing.assert_allclose(moved, -shift[rows], atol=0.75)


class TestLargeImages:
    def test_bounded_memory(self, tmp_path):
        """A 4096^2 uint16 image is written chunk by chunk: the peak of traced memory
        (numpy reports to tracemalloc) stays far below the image's size."""
        plan = one_plan("ferritic_steel", "SEM", 4096, chunk=256, seed=1)
        full = 4096 * 4096 * plan.dtype.itemsize
        (info, truth), peak = run_in_fresh_process(_write_traced, plan, tmp_path / "big.ome.zarr")
        assert peak < full / 4, f"peak {peak / 1e6:.1f} MB for a {full / 1e6:.1f} MB image"
        assert info.shape == (4096, 4096) and info.levels == 5
        assert len(truth) == len(plan.defects) > 50

    @pytest.mark.slow
    def test_bounded_memory_8192_chunk_512(self, tmp_path):
        peaks = {}
        for size in (2048, 8192):
            plan = one_plan("martensite", "SEM", size, chunk=512, seed=2)
            peaks[size] = run_in_fresh_process(_write_traced, plan, tmp_path / f"{size}.ome.zarr")[1]
        assert peaks[8192] < 8192 * 8192 * 2 / 4
        # memory does not grow with the image
        assert peaks[8192] < 1.5 * peaks[2048]


def _write_traced(plan, uri):
    """In a fresh process: (write_image's (info, truth), peak traced bytes of the write)."""
    return traced(write_image, plan, uri)
