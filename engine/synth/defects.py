"""Defects with ground truth: planned from the seed, rasterised once on the pixel grid.

A `Defect` is a light, frozen description (class, centre, size, outline harmonics or a
polyline) planned per image. `rasterise` draws it on the level-0 pixel grid, sampling
the specimen where the instrument did (including the scan rows' x shifts), so the label
mask and the image agree pixel for pixel. The result is a tight mask and box; every mask
pixel lies inside its box, and planned windows of one image never overlap, so instance
masks are disjoint.

Sizes are in level-0 pixels (what a detector must find), not physical units.

Defects versus the microstructure's own holes and dark particles: a defect pore is
round, 10-32 px across, anywhere, and empty (black in SEM and light optical with the
SEM's bright rim; light in TEM); a ceramic's own pores sit only at grain triple
junctions, are concave-triangular and under ~0.2 grain diameters (<= ~12 px at the
ceramic's pixel sizes); graphite nodules and flakes are mid-dark grey (graphite, not
vacuum), and nodules carry a bright ferrite halo. Voids are larger (28-80 px) and
irregular, with a rough interior. The two can overlap in size at the extremes of
magnification; a class is defined by what was planted, as in a labelled archive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.synth.modality import Imaging

DEFECT_CLASSES = ("pore", "crack", "inclusion", "scratch", "void")
# RGBA per class for the label image's colours
CLASS_COLOURS = {
    "pore": (230, 25, 75, 255), "crack": (255, 225, 25, 255), "inclusion": (60, 180, 75, 255),
    "scratch": (0, 130, 200, 255), "void": (245, 130, 48, 255),
}
_CLASS_WEIGHTS = {"pore": 0.3, "crack": 0.17, "inclusion": 0.25, "scratch": 0.13, "void": 0.15}
_PAD = 3  # pixels kept free between the windows of two defects


@dataclass(frozen=True)
class Defect:
    """One planned defect. Coordinates are level-0 pixels (y, x), angles radians.

    Blobs (pore, void, inclusion): outline r(t) = radius * (1 + sum a cos(k t + phase))
    over `harmonics` (k, a, phase), stretched by `aspect` along `angle`.
    Lines (crack, scratch): `paths`, each a tuple of (y, x, full width) vertices.
    `value`: an inclusion's composition (z) in [0, 1]. `window`: (y0, x0, y1, x1), half
    open, a box that holds every pixel the defect can touch.
    """

    instance_id: int
    defect_class: str
    cy: float
    cx: float
    radius: float = 0.0
    aspect: float = 1.0
    angle: float = 0.0
    harmonics: tuple[tuple[int, float, float], ...] = ()
    paths: tuple[tuple[tuple[float, float, float], ...], ...] = ()
    value: float = 0.0
    window: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def is_line(self) -> bool:
        return bool(self.paths)


@dataclass(frozen=True)
class DefectMask:
    """A rasterised defect: bool `mask` of shape (y1-y0, x1-x0) at level-0 (y0, x0)."""

    defect: Defect
    y0: int
    x0: int
    mask: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        h, w = self.mask.shape
        return self.y0, self.x0, self.y0 + h, self.x0 + w

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _blob_reach(radius: float, aspect: float, harmonics) -> float:
    return radius * math.sqrt(aspect) * (1 + sum(abs(a) for _, a, _ in harmonics)) + 1.0


def _shape(cls: str, rng: np.random.Generator, limit: float, scale: float) -> dict:
    """Class-specific parameters relative to the centre; `limit` caps the extent (px)."""
    if cls in ("pore", "void", "inclusion"):
        if cls == "pore":
            radius, aspect = _logu(rng, 5, 16), float(rng.uniform(1.0, 1.25))
            harmonics = tuple((k, float(rng.uniform(0, 0.05)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3))
        elif cls == "void":
            radius, aspect = _logu(rng, 14, 40), float(rng.uniform(1.0, 1.8))
            harmonics = tuple((k, float(rng.uniform(0.04, 0.22) / math.sqrt(k - 1)), float(rng.uniform(0, 2 * math.pi)))
                              for k in range(2, 9))
        else:
            radius = _logu(rng, 4, 14)
            aspect = float(rng.uniform(2.0, 4.5)) if rng.random() < 0.4 else float(rng.uniform(1.0, 1.6))
            harmonics = tuple((k, float(rng.uniform(0.02, 0.1)), float(rng.uniform(0, 2 * math.pi))) for k in (3, 4, 5))
        radius *= scale
        reach = _blob_reach(radius, aspect, harmonics)
        if reach > limit:
            radius *= limit / reach
        value = float(rng.choice([rng.uniform(0.05, 0.25), rng.uniform(0.85, 1.0)])) if cls == "inclusion" else 0.0
        return dict(radius=radius, aspect=aspect, angle=float(rng.uniform(0, math.pi)), harmonics=harmonics, value=value)
    if cls == "crack":
        length = min(_logu(rng, 40, 260) * scale, 2 * limit)
        main = _crack_path(rng, length, float(rng.uniform(0, 2 * math.pi)), _logu(rng, 1.5, 4.5))
        paths = [main]
        if rng.random() < 0.5:  # a branch from part way along
            y, x, w = main[int(len(main) * rng.uniform(0.3, 0.7))]
            turn = float(rng.choice([-1, 1]) * rng.uniform(0.4, 0.9))
            heading = math.atan2(main[-1][0] - main[0][0], main[-1][1] - main[0][1]) + turn
            branch = _crack_path(rng, length * rng.uniform(0.2, 0.45), heading, w)
            paths.append(tuple((by + y, bx + x, bw) for by, bx, bw in branch))
        return dict(paths=_centre(_fit(tuple(paths), limit)))
    # scratch: a long, straight, constant-width groove with a faint bow
    length = min(float(rng.uniform(0.35, 0.9)) * 2 * limit, 768.0)
    width = float(rng.uniform(1.0, 2.6))
    angle = float(rng.uniform(0, math.pi))
    bow = float(rng.uniform(-0.02, 0.02)) * length
    n = 9
    pts = []
    for i in range(n):
        t = i / (n - 1) - 0.5
        along, across = t * length, bow * (1 - 4 * t * t)
        pts.append((along * math.sin(angle) + across * math.cos(angle),
                    along * math.cos(angle) - across * math.sin(angle), width))
    return dict(paths=_centre(_fit((tuple(pts),), limit)))


def _crack_path(rng: np.random.Generator, length: float, heading: float, wmax: float):
    """A jagged polyline from (0, 0): steps of 4-10 px, heading wandering about its mean;
    width tapers from `wmax` to the tips."""
    pts, y, x, theta, travelled = [], 0.0, 0.0, heading, 0.0
    steps = []
    while travelled < length:
        step = float(rng.uniform(4, 10))
        steps.append(step)
        travelled += step
    n = len(steps)
    pts.append((0.0, 0.0, 0.0))
    for step in steps:
        theta = heading + 0.55 * (theta - heading) + float(rng.normal(0, 0.4))
        y += step * math.sin(theta)
        x += step * math.cos(theta)
        pts.append((y, x, 0.0))
    out = []
    for i, (py, px, _) in enumerate(pts):
        t = i / max(n, 1)
        out.append((py, px, 0.8 + (wmax - 0.8) * math.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))))
    return tuple(out)


def _fit(paths, limit: float):
    """Scale paths about their centre so their half-extent is at most `limit`."""
    ys = [p[0] for path in paths for p in path]
    xs = [p[1] for path in paths for p in path]
    cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
    half = max(max(ys) - min(ys), max(xs) - min(xs)) / 2 + 3
    k = min(1.0, limit / half) if half > 0 else 1.0
    return tuple(tuple((cy + (y - cy) * k, cx + (x - cx) * k, w) for y, x, w in path) for path in paths)


def _centre(paths):
    ys = [p[0] for path in paths for p in path]
    xs = [p[1] for path in paths for p in path]
    cy, cx = (min(ys) + max(ys)) / 2, (min(xs) + max(xs)) / 2
    return tuple(tuple((y - cy, x - cx, w) for y, x, w in path) for path in paths)


def _extent(params: dict) -> tuple[float, float]:
    """Half extents (y, x) of a shape about its centre, in pixels."""
    if "paths" in params:
        pts = [p for path in params["paths"] for p in path]
        wmax = max(p[2] for p in pts) / 2 + 1
        return max(abs(p[0]) for p in pts) + wmax, max(abs(p[1]) for p in pts) + wmax
    r = _blob_reach(params["radius"], params["aspect"], params["harmonics"])
    return r, r


def plan_defects(grade_rate: float, size_scale: float, shape: tuple[int, int], imaging: Imaging,
                 rng: np.random.Generator, *, first_class: str | None, at_least_one: bool) -> tuple[Defect, ...]:
    """Defects of one image, placed without overlap.

    `grade_rate`: expected defects per 512x512 pixels; `first_class`: the class of the
    first defect (the archive planner uses it to cover every class); windows of two
    defects are kept `_PAD` pixels apart, and a defect that finds no free place after a
    few tries is dropped.
    """
    h, w = shape
    n = int(rng.poisson(grade_rate * h * w / 512**2))
    if at_least_one:
        n = max(n, 1)
    classes = list(_CLASS_WEIGHTS)
    weights = np.array(list(_CLASS_WEIGHTS.values()))
    shift = int(math.ceil(imaging.max_shift_px)) + 2
    limit = (min(h, w) - 2 * (shift + _PAD + 2)) / 2
    placed: list[Defect] = []
    if limit < 4:
        return ()
    for i in range(n):
        cls = first_class if (i == 0 and first_class) else str(rng.choice(classes, p=weights / weights.sum()))
        params = _shape(cls, rng, limit, size_scale)
        ey, ex = _extent(params)
        for _ in range(30):
            cy = float(rng.uniform(ey + 2, h - ey - 2))
            cx = float(rng.uniform(ex + shift, w - ex - shift))
            window = (int(math.floor(cy - ey)) - 1, int(math.floor(cx - ex)) - shift,
                      int(math.ceil(cy + ey)) + 2, int(math.ceil(cx + ex)) + shift + 1)
            window = (max(window[0], 0), max(window[1], 0), min(window[2], h), min(window[3], w))
            if all(_apart(window, d.window) for d in placed):
                if "paths" in params:
                    params = dict(paths=tuple(tuple((y + cy, x + cx, wd) for y, x, wd in p) for p in params["paths"]))
                placed.append(Defect(len(placed) + 1, cls, cy, cx, window=window, **params))
                break
    return tuple(placed)


def _apart(a, b) -> bool:
    return (a[2] + _PAD <= b[0] or b[2] + _PAD <= a[0] or a[3] + _PAD <= b[1] or b[3] + _PAD <= a[1])


def rasterise(defect: Defect, imaging: Imaging) -> DefectMask:
    """The defect's tight mask on the level-0 grid (never empty: at least its centre)."""
    y0, x0, y1, x1 = defect.window
    rows = np.arange(y0, y1)
    shift = imaging.row_shift(rows)
    yy = (rows + 0.5).astype(np.float32)[:, None]
    xx = (np.arange(x0, x1) + 0.5).astype(np.float32)[None, :] + shift[:, None]
    if defect.is_line:
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for path in defect.paths:
            for (ay, ax, aw), (by, bx, bw) in zip(path[:-1], path[1:]):
                _segment(mask, yy, xx, ay, ax, aw, by, bx, bw)
    else:
        mask = _blob(defect, yy - np.float32(defect.cy), xx - np.float32(defect.cx))
    if not mask.any():
        mask[min(int(defect.cy) - y0, mask.shape[0] - 1), min(int(defect.cx) - x0, mask.shape[1] - 1)] = True
    rr = np.flatnonzero(mask.any(axis=1))
    cc = np.flatnonzero(mask.any(axis=0))
    tight = mask[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1]
    return DefectMask(defect, y0 + int(rr[0]), x0 + int(cc[0]), np.ascontiguousarray(tight))


def _blob(d: Defect, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    c, s = np.float32(math.cos(d.angle)), np.float32(math.sin(d.angle))
    u = dx * c + dy * s
    v = dy * c - dx * s
    k = np.float32(math.sqrt(d.aspect))
    u /= k
    v *= k
    rho = np.sqrt(u * u + v * v)
    t = np.arctan2(v, u)
    r = np.ones_like(rho)
    for order, amp, phase in d.harmonics:
        r += np.float32(amp) * np.cos(t * np.float32(order) + np.float32(phase))
    r *= np.float32(d.radius)
    return rho < r


def _segment(mask, yy, xx, ay, ax, aw, by, bx, bw) -> None:
    """OR into `mask` the pixels within the (linearly varying) half width of segment a-b,
    evaluating only the segment's own small bounding window."""
    half = max(aw, bw) / 2
    reach = max(half, 0.6) + 1
    h, w = mask.shape
    r0 = max(0, int(math.floor(min(ay, by) - reach - yy[0, 0])))
    r1 = min(h, int(math.ceil(max(ay, by) + reach - yy[0, 0])) + 1)
    # xx holds each row's shifted samples; bound the columns by its smallest and largest shift
    lo = float(xx[r0:r1, 0].min() - xx[0, 0]) if r1 > r0 else 0.0
    hi = float(xx[r0:r1, 0].max() - xx[0, 0]) if r1 > r0 else 0.0
    c0 = max(0, int(math.floor(min(ax, bx) - reach - xx[0, 0] - hi)))
    c1 = min(w, int(math.ceil(max(ax, bx) + reach - xx[0, 0] - lo)) + 1)
    if r0 >= r1 or c0 >= c1:
        return
    py = yy[r0:r1] - np.float32(ay)
    px = xx[r0:r1, c0:c1] - np.float32(ax)
    vy, vx = by - ay, bx - ax
    L2 = vy * vy + vx * vx
    t = (py * np.float32(vy) + px * np.float32(vx)) * np.float32(1 / L2) if L2 > 0 else np.zeros_like(px)
    t = np.clip(t, 0, 1)
    dy = py - t * np.float32(vy)
    dx = px - t * np.float32(vx)
    dist2 = dy * dy + dx * dx
    halfw = np.maximum(np.float32(aw / 2) + t * np.float32((bw - aw) / 2), np.float32(0.6))
    mask[r0:r1, c0:c1] |= dist2 < halfw * halfw


def apply(dm: DefectMask, fields, y0: int, x0: int) -> None:
    """Change the specimen fields (arrays over level-0 pixels from (y0, x0)) where the
    defect is: holes are deep (dark in SEM and optical light, bright in TEM, where less
    mass is in the beam), a scratch is a shallow groove, an inclusion is a particle of
    another composition that polishes proud."""
    h, w = fields.z.shape
    by0, bx0, by1, bx1 = dm.box
    ya, yb, xa, xb = max(by0, y0), min(by1, y0 + h), max(bx0, x0), min(bx1, x0 + w)
    if ya >= yb or xa >= xb:
        return
    m = dm.mask[ya - by0 : yb - by0, xa - bx0 : xb - bx0]
    sl = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
    cls = dm.defect.defect_class
    if cls in ("pore", "crack"):
        fields.height[sl][m] = 1.0
    elif cls == "void":
        # shrinkage voids show a rough, dendritic inner surface
        rows = np.arange(ya, yb, dtype=np.float32)[:, None]
        cols = np.arange(xa, xb, dtype=np.float32)[None, :]
        texture = 0.5 + 0.5 * np.sin(rows * 0.9 + np.sin(cols * 0.7) * 2.0) * np.cos(cols * 0.8 + rows * 0.3)
        fields.height[sl][m] = (0.8 + 0.2 * texture[m]).astype(np.float32)
    elif cls == "scratch":
        fields.height[sl][m] = np.maximum(fields.height[sl][m], np.float32(0.45))
        fields.reflect[sl][m] *= np.float32(0.85)
    else:
        v = np.float32(dm.defect.value)
        fields.z[sl][m] = v
        fields.reflect[sl][m] = np.float32(0.25) + v * np.float32(0.25)
        fields.height[sl][m] = -0.12
        fields.tint[sl][m] = 0.0
