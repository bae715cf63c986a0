"""Tiny synthetic scenes for augmentation tests, made here (no archive needed)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.augment import Sample, boxes_from_mask

# grey levels of three phases, dark to bright
PHASES = (0.2, 0.5, 0.8)


def make_scene(modality: str = "SEM", shape: tuple[int, int] = (96, 128), seed: int = 0,
               pixel_size_nm: float = 5.0, with_mask: bool = True, **kw) -> Sample:
    """Three-phase image with a few labelled objects (discs and rectangles) well inside.

    Objects stay >= 16 px from the border so geometric transforms never push one out.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    image = np.full(shape, PHASES[1], np.float32)
    image[:, : w // 3] = PHASES[0]
    mask = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:h, :w]
    n = 4
    k = 1
    while k <= n:
        cy, cx = rng.uniform(24, h - 24), rng.uniform(24, w - 24)
        if k % 2:
            r = rng.uniform(3, 7)
            obj = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            hh, ww = rng.uniform(2, 6, 2)
            obj = (np.abs(yy - cy) <= hh) & (np.abs(xx - cx) <= ww)
        if (mask[obj] != 0).any():  # objects do not overlap, so each stays solid
            continue
        mask[obj] = k
        image[obj] = PHASES[2]
        k += 1
    boxes, present = boxes_from_mask(mask, np.arange(1, n + 1))
    assert present.all()
    return Sample(image=image, modality=modality, pixel_size_nm=pixel_size_nm,
                  mask=mask if with_mask else None, boxes=boxes,
                  classes=np.arange(n, dtype=np.int64) % 3, **kw)


@pytest.fixture
def scene() -> Sample:
    return make_scene()
