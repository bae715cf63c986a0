"""Render any region of a planned image: specimen fields -> defects -> instrument.

A region is rendered with a halo of context (`Imaging.halo`) for the blur and slope
filters and cropped, and every random draw is keyed by global position, so regions
tile the image seamlessly and an image of any size is made chunk by chunk in memory
proportional to one chunk. Within a region, the material is evaluated in strips of
about `BLOCK_PIXELS` pixels into four float32 field arrays over the region and its
halo (a material holds a few dozen temporaries; strips keep them small and in cache),
then the instrument is applied strip by strip, each strip reading its halo rows from
the field arrays.
"""

from __future__ import annotations

import numpy as np

from engine.synth.defects import DefectMask, apply, rasterise
from engine.synth.hashing import derive_seed
from engine.synth.materials import get_material
from engine.synth.materials.base import Fields, Grid
from engine.synth.modality import NOISE_BLOCK, detect, expected_signal
from engine.synth.plan import ImagePlan

BLOCK_PIXELS = 1 << 14


class ImageRenderer:
    """Renders regions of one planned image; caches rasterised defect masks.

    Call `region` in row-major chunk order and `forget_above(y)` after each chunk row to
    keep the cache to the defects near the current row. `masks` holds each defect's mask
    once it has been rasterised (bounded by the eviction); `truth` keeps each defect's
    box and area for the ground-truth table.
    """

    def __init__(self, plan: ImagePlan):
        self.plan = plan
        self.material = get_material(plan.material)
        self.imaging = plan.imaging
        self.scale = plan.pixel_size_nm / self.material.length_nm  # material units per pixel
        self.material_seed = derive_seed(plan.seed, "material")
        self._windows = np.array([d.window for d in plan.defects], dtype=np.int64).reshape(-1, 4)
        self.masks: dict[int, DefectMask] = {}
        self.truth: dict[int, tuple[tuple[int, int, int, int], int]] = {}

    def mask(self, index: int) -> DefectMask:
        d = self.plan.defects[index]
        dm = self.masks.get(d.instance_id)
        if dm is None:
            dm = rasterise(d, self.imaging)
            self.masks[d.instance_id] = dm
            self.truth[d.instance_id] = (dm.box, dm.area)
        return dm

    def forget_above(self, y: int) -> None:
        """Drop cached masks that end above level-0 row `y` minus the halo."""
        cut = y - self.imaging.halo
        for key in [k for k, m in self.masks.items() if m.box[2] <= cut]:
            del self.masks[key]

    def _defects_in(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        w = self._windows
        hit = (w[:, 0] < y1) & (w[:, 2] > y0) & (w[:, 1] < x1) & (w[:, 3] > x0)
        return np.flatnonzero(hit)

    def region(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (plan dtype) and instance labels (uint32, 0 = background) of
        level-0 [y0:y0+h, x0:x0+w]."""
        pixels = np.empty((h, w), self.imaging.dtype)
        labels = np.zeros((h, w), np.uint32)
        for i in self._defects_in(y0, x0, y0 + h, x0 + w):
            dm = self.mask(int(i))
            by0, bx0, by1, bx1 = dm.box
            ya, yb, xa, xb = max(by0, y0), min(by1, y0 + h), max(bx0, x0), min(bx1, x0 + w)
            if ya < yb and xa < xb:
                m = dm.mask[ya - by0 : yb - by0, xa - bx0 : xb - bx0]
                labels[ya - y0 : yb - y0, xa - x0 : xb - x0][m] = dm.defect.instance_id
        halo = self.imaging.halo
        ry0, rx0 = y0 - halo, x0 - halo
        hh, ww = h + 2 * halo, w + 2 * halo
        fields = Fields(*(np.empty((hh, ww), np.float32) for _ in range(4)))
        step = max(8, BLOCK_PIXELS // ww)
        for sy in range(0, hh, step):
            part = self._fields(ry0 + sy, rx0, min(step, hh - sy), ww)
            for name in ("z", "reflect", "height", "tint"):
                getattr(fields, name)[sy : sy + step] = getattr(part, name)
            del part
        for i in self._defects_in(ry0, rx0, ry0 + hh, rx0 + ww):
            apply(self.mask(int(i)), fields, ry0, rx0)
        # instrument strips follow the noise blocks' rows, so each block is drawn once
        b = NOISE_BLOCK
        edges = [y0] + list(range((y0 // b + 1) * b, y0 + h, b)) + [y0 + h]
        for ya, yb in zip(edges[:-1], edges[1:]):
            rows = slice(ya - y0, yb - y0 + 2 * halo)
            signal = expected_signal(self.imaging, fields.z[rows], fields.reflect[rows], fields.height[rows],
                                     fields.tint[rows], ya, x0, halo)
            pixels[ya - y0 : yb - y0] = detect(self.imaging, signal, ya, x0)
        return pixels, labels

    def _fields(self, y0: int, x0: int, h: int, w: int) -> Fields:
        """The material's fields over level-0 [y0:y0+h, x0:x0+w], no halo."""
        rows = np.arange(y0, y0 + h)
        shift = self.imaging.row_shift(rows)
        s = self.scale
        # pixel centres, each row sampled where the scan put it, in material units
        y = ((rows + 0.5) * s).astype(np.float32)[:, None]
        x = ((np.arange(x0, x0 + w, dtype=np.float64)[None, :] + 0.5 + shift[:, None]) * s).astype(np.float32)
        return self.material.render(Grid(y, x, float(s), self.imaging.max_shift_px * s), self.material_seed)

    def all_truth(self) -> dict[int, tuple[tuple[int, int, int, int], int]]:
        """Box and area of every defect, rasterising those no region has touched."""
        for d in self.plan.defects:
            if d.instance_id not in self.truth:
                dm = rasterise(d, self.imaging)
                self.truth[d.instance_id] = (dm.box, dm.area)
        return self.truth
