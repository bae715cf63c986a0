"""From pixels of one pyramid level to level-0 pixels and physical units.

Conventions (used by every module in engine.tiling and by the datasource):

- *Edge coordinates*: pixel ``i`` of an array covers the interval ``[i, i + 1)``; a box
  ``(x0, y0, x1, y1)`` in edge coordinates covers pixels ``x0 .. x1 - 1`` when integral.
  Detectors (Ultralytics, SAM) report boxes this way.
- *Level k to level 0*: ``u0 = u_k * factor + shift`` per axis, in edge coordinates.
  For grainflow's mean pyramids (`engine.stores.ngff.multiscales_v05`, level k is 2**k
  coarser, translation ``p * (2**k - 1) / 2``) ``factor = 2**k`` and ``shift = 0``: level-k
  pixel ``i`` covers level-0 pixels ``[i * 2**k, (i + 1) * 2**k)`` and its centre
  ``i + 0.5`` maps to level-0 edge ``(i + 0.5) * 2**k``, i.e. level-0 *centre* index
  ``i * 2**k + (2**k - 1) / 2``: exactly what the NGFF translation says.
  Pyramids written elsewhere (no translation, other factors) get the ``factor`` and
  ``shift`` their NGFF transforms imply (`LevelTransform.from_image`).
- *Physical*: NGFF places the centre of level-0 pixel ``i`` at ``i * p0 + t0``, so
  level-0 edge ``u0`` is at ``(u0 - 0.5) * p0 + t0`` nanometres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.stores.ngff import to_nanometres


@dataclass(frozen=True, slots=True)
class LevelTransform:
    """Affine map of one level's edge coordinates to level 0 and to nanometres.

    factor: (y, x) level-0 pixels per level pixel (2**k for grainflow pyramids).
    shift: (y, x) level-0 offset in pixels (0 for grainflow pyramids).
    pixel_size_nm: (y, x) level-0 pixel size in nm.
    translation_nm: (y, x) NGFF translation of level 0 in nm (the centre of pixel 0).
    """

    factor: tuple[float, float] = (1.0, 1.0)
    shift: tuple[float, float] = (0.0, 0.0)
    pixel_size_nm: tuple[float, float] = (1.0, 1.0)
    translation_nm: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_image(cls, image, level: int) -> LevelTransform:
        """The transform of `level` of a `MultiscaleImage`, from its NGFF metadata only."""
        ms = image.multiscale
        iy, ix = ms.axis_index("y"), ms.axis_index("x")
        s0, sk = ms.levels[0].scale, ms.levels[level].scale
        t0 = ms.levels[0].translation or (0.0,) * len(s0)
        tk = ms.levels[level].translation or (0.0,) * len(sk)
        factor = (sk[iy] / s0[iy], sk[ix] / s0[ix])
        # centre of level pixel i: physical i*sk + tk = level-0 centre index (.. - t0) / s0;
        # in edge coordinates both sides gain 0.5 pixel.
        shift = tuple(0.5 - 0.5 * f + (tk[i] - t0[i]) / s0[i] for f, i in zip(factor, (iy, ix)))
        # Exact powers of two stay exact: round off float noise from the division.
        factor = tuple(float(round(f)) if abs(f - round(f)) < 1e-9 else f for f in factor)
        shift = tuple(0.0 if abs(s) < 1e-9 else s for s in shift)
        unit = image.unit
        return cls(
            factor=factor, shift=shift,
            pixel_size_nm=(to_nanometres(s0[iy], unit), to_nanometres(s0[ix], unit)),
            translation_nm=(to_nanometres(t0[iy], unit), to_nanometres(t0[ix], unit)),
        )

    @property
    def level_pixel_size_nm(self) -> tuple[float, float]:
        """(y, x) size of one pixel of this level in nm."""
        return (self.pixel_size_nm[0] * self.factor[0], self.pixel_size_nm[1] * self.factor[1])

    def to_level0(self, y: float, x: float) -> tuple[float, float]:
        """Level edge coordinates (y, x) -> level-0 edge coordinates."""
        return (y * self.factor[0] + self.shift[0], x * self.factor[1] + self.shift[1])

    def from_level0(self, y0: float, x0: float) -> tuple[float, float]:
        """Level-0 edge coordinates -> this level's edge coordinates."""
        return ((y0 - self.shift[0]) / self.factor[0], (x0 - self.shift[1]) / self.factor[1])

    def level0_origin(self, y: int, x: int) -> tuple[int, int]:
        """Integer level-0 pixel of a level pixel's top-left corner (exact for 2**k pyramids).

        Used for keys (ledger, skip sets); rounding only matters for foreign pyramids
        with non-integer factors, where distinct tiles still get distinct keys.
        """
        y0, x0 = self.to_level0(y, x)
        return (int(round(y0)), int(round(x0)))

    def to_physical(self, y0: float, x0: float) -> tuple[float, float]:
        """Level-0 edge coordinates -> physical (y, x) in nm (NGFF pixel-centre convention)."""
        return ((y0 - 0.5) * self.pixel_size_nm[0] + self.translation_nm[0],
                (x0 - 0.5) * self.pixel_size_nm[1] + self.translation_nm[1])

    def boxes_to_level0(self, boxes: np.ndarray) -> np.ndarray:
        """N x 4 xyxy boxes in this level's edge coordinates -> N x 4 float64 level-0 xyxy."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        fy, fx = self.factor
        sy, sx = self.shift
        return b * np.array([fx, fy, fx, fy]) + np.array([sx, sy, sx, sy])
