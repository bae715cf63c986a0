"""Measurements of defects from their instance masks, in physical units.

Conventions:

- Pixel sizes are in nanometres, per axis ``(y, x)`` (one number: square pixels). A
  mask pixel is a ``py x px`` nm rectangle, so a mask of ``n`` pixels has area
  ``n * py * px`` nm². 1 µm² = 10**6 nm², 1 mm² = 10**12 nm².
- Shape comes from second moments (numpy for one mask, `skimage.measure.regionprops`
  with ``spacing`` for a label image: the same quantities): the covariance of the pixel
  centres, plus ``p**2 / 12`` per axis, which is the
  variance of a uniform pixel square: a mask is measured as the union of its pixel
  squares, not as a cloud of points. So a one-pixel-wide line has a width of one
  pixel rather than zero, and a disc of radius r measures 2r across.
  The axes are those of the ellipse with the same second moments: length
  ``4 * sqrt(eigenvalue)``.
- Orientation: the major axis's angle from the image's +x axis (columns, rightwards),
  counter-clockwise as the image is displayed (row 0 at the top), in degrees in
  ``[0, 180)`` (an axis has no direction). NaN when the moment ellipse is round within
  digitisation noise: when the relative difference of its two eigenvalues,
  ``(major_var - minor_var) / major_var``, is below ``ROUND_WITHIN / sqrt(n)`` for a
  mask of ``n`` pixels (a digitised disc has no orientation, though its pixels never
  make it exactly round). So a shape needs to be less round the fewer pixels it has:
  an ellipse of aspect ``a`` keeps its orientation from ``(ROUND_WITHIN / (1 - 1 / a**2))**2``
  pixels on, digitisation aside (about 25 for aspect 1.3, 460 for 1.05); a straight
  line from 5 pixels.
- Moments: every measurement comes from a mask's pixel count, the mean of its pixel
  centres and the sums of their squared deviations from it (`measure_moments`), so
  moments of disjoint pieces of a mask summed (`pool_moments`, the parallel-axis rule)
  measure the whole mask: that is how an object cut by tile borders is measured whole.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

NM2_PER_UM2 = 1e6
NM2_PER_MM2 = 1e12
# No orientation when (major_var - minor_var) / major_var < ROUND_WITHIN / sqrt(n_px).
# Digitising a disc at a sub-pixel centre makes that difference up to about 1.7 / sqrt(n)
# (some 30 000 discs of radius 0.5 to 40 px at random centres, square or 2:1 pixels: at
# most 1.68, at radius 2 to 4; it falls with the radius), while an ellipse of aspect 1.3
# with semi-minor axis >= 7.7 px gives at least 5.9 / sqrt(n) at any angle: 2 lies
# between, above every disc and a factor 3 below those ellipses.
ROUND_WITHIN = 2.0


class Measurements(NamedTuple):
    """Per-object measurements, N each, float64, in mask order.

    area_px: pixels in the mask. area_nm2 / area_um2: area in nm² / µm².
    equivalent_diameter_nm: diameter of the disc of the same area, nm.
    major_axis_nm / minor_axis_nm: axes of the ellipse with the same second moments, nm.
    aspect_ratio: major / minor (>= 1). orientation_deg: see the module doc, [0, 180) or NaN.
    centroid: N x 2 (y, x), in pixels of the mask's array, pixel-centre coordinates
    (pixel (i, j) has its centre at (i, j)).
    An empty mask gives zeros for area and NaN for the rest.
    """

    area_px: np.ndarray
    area_nm2: np.ndarray
    area_um2: np.ndarray
    equivalent_diameter_nm: np.ndarray
    major_axis_nm: np.ndarray
    minor_axis_nm: np.ndarray
    aspect_ratio: np.ndarray
    orientation_deg: np.ndarray
    centroid: np.ndarray

    @classmethod
    def empty(cls, n: int = 0) -> Measurements:
        nan = np.full(n, np.nan)
        return cls(np.zeros(n), np.zeros(n), np.zeros(n), nan.copy(), nan.copy(), nan.copy(), nan.copy(),
                   nan.copy(), np.full((n, 2), np.nan))


def pixel_size_yx(pixel_size_nm) -> tuple[float, float]:
    """(y, x) pixel size in nm from one number or a pair; positive and finite, else ValueError."""
    p = np.broadcast_to(np.asarray(pixel_size_nm, dtype=np.float64).reshape(-1), (2,))
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"pixel_size_nm must be positive and finite, got {pixel_size_nm!r}")
    return float(p[0]), float(p[1])


def measure_mask(mask: np.ndarray, pixel_size_nm) -> Measurements:
    """Measurements of one (H, W) boolean mask (all its pixels are one object, connected or not)."""
    return measure_masks(np.asarray(mask, dtype=bool)[None], pixel_size_nm)


def measure_masks(masks: np.ndarray, pixel_size_nm) -> Measurements:
    """Measurements of N possibly overlapping objects.

    masks: N x H x W bool (e.g. one SAM mask per box); pixel_size_nm: nm per pixel, one
    number or (y, x). Each mask is measured on its own bounding crop.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected N x H x W, got shape {masks.shape}")
    py, px = pixel_size_yx(pixel_size_nm)
    out = Measurements.empty(len(masks))
    for i, mask in enumerate(masks):
        rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
        if not rows.any():
            continue
        y0, y1 = np.flatnonzero(rows)[[0, -1]]
        x0, x1 = np.flatnonzero(cols)[[0, -1]]
        _fill(out, i, mask[y0 : y1 + 1, x0 : x1 + 1].astype(np.uint8), (y0, x0), py, px)
    return out


def measure_labels(labels: np.ndarray, pixel_size_nm) -> tuple[np.ndarray, Measurements]:
    """(label values, measurements) of every object in an (H, W) integer label image
    (0 = background), in increasing label order."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ValueError(f"labels: expected an (H, W) integer array, got {labels.dtype} {labels.shape}")
    # here, not at the top: the tile sinks and finishing tasks import this module for its
    # types and moments, and scikit-image's import costs ~0.4 CPU-s per worker process
    from skimage.measure import regionprops

    py, px = pixel_size_yx(pixel_size_nm)
    props = regionprops(labels, spacing=(py, px))
    out = Measurements.empty(len(props))
    values = np.array([p.label for p in props], dtype=np.int64)
    for i, p in enumerate(props):
        _from_props(out, i, p, (0, 0), py, px)
    return values, out


def measure_moments(count, centroid, m2, pixel_size_nm) -> Measurements:
    """Measurements of N masks from their pixel moments (`label_moments`, `pool_moments`).

    count: (N,) pixels in each mask; centroid: (N, 2) (y, x) mean of its pixel centres, in
    any coordinates (passed through as the measurements' centroid); m2: (N, 3) float64
    sums over its pixels of (y - ȳ)², (x - x̄)² and (y - ȳ)(x - x̄), in pixels² of pixels
    of `pixel_size_nm` ((y, x) nm, or one number). A mask of 0 pixels: an empty row.
    """
    count = np.asarray(count, np.float64).reshape(-1)
    centroid = np.asarray(centroid, np.float64).reshape(-1, 2)
    m2 = np.asarray(m2, np.float64).reshape(-1, 3)
    if not len(count) == len(centroid) == len(m2):
        raise ValueError(f"moments: {len(count)} counts, {len(centroid)} centroids, {len(m2)} m2 rows")
    py, px = pixel_size_yx(pixel_size_nm)
    out = Measurements.empty(len(count))
    for i in np.flatnonzero(count > 0):
        _set_moments(out, i, count[i], m2[i], centroid[i], py, px)
    return out


def label_moments(labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel moments of labels 1..n_labels of an (H, W) integer label image (0 and ids
    above n_labels ignored): (count (n,) int64, centroid (n, 2) float64 (y, x) mean pixel
    centre, pixel (i, j) having its centre at (i, j), NaN for an absent label;
    m2 (n, 3) float64 as `measure_moments`, in pixels²)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ValueError(f"labels: expected an (H, W) integer array, got {labels.dtype} {labels.shape}")
    flat = labels.ravel()
    at = np.flatnonzero((flat > 0) & (flat <= n_labels))
    ids = flat[at].astype(np.intp)
    ys, xs = np.divmod(at, labels.shape[1])
    n = np.bincount(ids, minlength=n_labels + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(ids, ys, minlength=n_labels + 1) / n
        cx = np.bincount(ids, xs, minlength=n_labels + 1) / n
    # deviations from each label's own mean: no cancellation of large sums
    dy, dx = ys - cy[ids], xs - cx[ids]
    m2 = np.stack([np.bincount(ids, dy * dy, minlength=n_labels + 1), np.bincount(ids, dx * dx, minlength=n_labels + 1),
                   np.bincount(ids, dy * dx, minlength=n_labels + 1)], axis=1)
    return n[1:].astype(np.int64), np.stack([cy, cx], axis=1)[1:], m2[1:].astype(np.float64)


def pool_moments(count, centroid, m2) -> tuple[float, np.ndarray, np.ndarray]:
    """The moments (count, centroid (2,), m2 (3,)) of the union of disjoint pixel sets
    from theirs (count (K,), centroid (K, 2), m2 (K, 3), all in the same coordinates):
    each set's m2 about its own centroid plus its count times its centroid's squared
    offset from the union's (the parallel-axis rule). Sets of 0 pixels add nothing."""
    count = np.asarray(count, np.float64).reshape(-1)
    centroid = np.asarray(centroid, np.float64).reshape(-1, 2)
    m2 = np.asarray(m2, np.float64).reshape(-1, 3)
    keep = count > 0
    count, centroid, m2 = count[keep], centroid[keep], m2[keep]
    n = float(count.sum())
    if n == 0:
        return 0.0, np.full(2, np.nan), np.zeros(3)
    mean = (count[:, None] * centroid).sum(axis=0) / n
    d = centroid - mean
    shift = np.stack([d[:, 0] * d[:, 0], d[:, 1] * d[:, 1], d[:, 0] * d[:, 1]], axis=1)
    return n, mean, (m2 + count[:, None] * shift).sum(axis=0)


def _fill(out: Measurements, i: int, crop: np.ndarray, offset, py: float, px: float) -> None:
    """One mask's moments with numpy: the same quantities as regionprops' (see
    `_from_props`), about 2x faster on the large masks of objects stitched across tiles."""
    ys, xs = np.nonzero(crop)
    cy, cx = ys.mean(), xs.mean()
    dy, dx = ys - cy, xs - cx
    _set_moments(out, i, len(ys), (dy @ dy, dx @ dx, dy @ dx), (offset[0] + cy, offset[1] + cx), py, px)


def _from_props(out: Measurements, i: int, p, offset, py: float, px: float) -> None:
    # regionprops' 2-D inertia tensor is [[var_x, -cov_xy], [-cov_xy, var_y]] of the
    # pixel centres in physical units; its centroid is physical, from pixel (0, 0)'s centre.
    t = p.inertia_tensor
    cy, cx = p.centroid
    _set(out, i, float(p.num_pixels), t[1, 1], t[0, 0], -t[0, 1], (offset[0] + cy / py, offset[1] + cx / px), py, px)


def _set_moments(out: Measurements, i: int, n: float, m2, centroid, py: float, px: float) -> None:
    """Row i of `out` from a mask's pixel count, m2 (pixels², as `measure_moments`) and centroid."""
    syy, sxx, syx = m2
    _set(out, i, n, syy / n * py * py, sxx / n * px * px, syx / n * py * px, centroid, py, px)


def _set(out: Measurements, i: int, n: float, var_y: float, var_x: float, cov_yx: float, centroid, py: float,
         px: float) -> None:
    """Row i of `out` from a mask's pixel count, the (physical) variances and covariance
    of its pixel centres and its centroid (pixels of the measured array)."""
    area = n * py * px
    # each pixel square's own variance added to its centre's
    cov = np.array([[var_y + py * py / 12.0, cov_yx], [cov_yx, var_x + px * px / 12.0]])
    evals, evecs = np.linalg.eigh(cov)  # ascending
    minor_var, major_var = max(evals[0], 0.0), max(evals[1], 0.0)
    major, minor = 4.0 * np.sqrt(major_var), 4.0 * np.sqrt(minor_var)
    vy, vx = evecs[:, 1]
    if major_var - minor_var < ROUND_WITHIN / np.sqrt(n) * major_var:
        angle = np.nan  # round within what digitising a disc gives (ROUND_WITHIN)
    else:
        # rows grow downwards on screen, so "up" is -y
        angle = float(np.degrees(np.arctan2(-vy, vx))) % 180.0
        if angle >= 180.0 - 1e-9:
            angle = 0.0
    out.area_px[i] = n
    out.area_nm2[i] = area
    out.area_um2[i] = area / NM2_PER_UM2
    out.equivalent_diameter_nm[i] = np.sqrt(4.0 * area / np.pi)
    out.major_axis_nm[i] = major
    out.minor_axis_nm[i] = minor
    out.aspect_ratio[i] = major / minor if minor > 0 else np.inf
    out.orientation_deg[i] = angle
    out.centroid[i] = centroid


def area_mm2(shape_or_pixels, pixel_size_nm) -> float:
    """Imaged area in mm² of an (H, W) shape, or of a pixel count, at `pixel_size_nm`."""
    py, px = pixel_size_yx(pixel_size_nm)
    n = float(np.prod(shape_or_pixels)) if np.ndim(shape_or_pixels) else float(shape_or_pixels)
    if n < 0:
        raise ValueError(f"pixel count must be >= 0, got {shape_or_pixels!r}")
    return n * py * px / NM2_PER_MM2


def defect_density_per_mm2(count, area_mm2_value) -> float | np.ndarray:
    """Defects per mm²: count / imaged area (mm²). NaN where the area is 0.

    Per image: sum the per-tile counts and the per-tile core areas first (cores partition
    the image, so the areas add up to the image's), then divide.
    """
    count = np.asarray(count, dtype=np.float64)
    area = np.asarray(area_mm2_value, dtype=np.float64)
    if np.any(count < 0) or np.any(area < 0):
        raise ValueError(f"count and area must be >= 0, got {count!r}, {area!r}")
    out = np.divide(count, area, out=np.full(np.broadcast(count, area).shape, np.nan), where=area > 0)
    return float(out) if out.ndim == 0 else out
