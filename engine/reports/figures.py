"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on a `FigureCanvasAgg`, never
through pyplot: nothing here selects a global backend or keeps figures alive, so the
report draws the same in a notebook, a Ray worker or a headless CLI.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import pandas as pd

from engine.reports.overlay import Overlay
from engine.reports.sizes import BINS_PER_DECADE, EDGES_NM, SizeDistributions


def _plain(text: str) -> str:
    """Text shown as written: matplotlib reads what lies between two '$' as math."""
    return str(text).replace("$", r"\$")


DPI = 96
_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def class_colour(name: str, classes: Sequence[str]) -> str:
    i = list(classes).index(name) if name in classes else len(classes)
    return _COLOURS[i % len(_COLOURS)]


def length_unit(values_nm: np.ndarray) -> tuple[str, float]:
    """("nm" or "µm", the factor from nm) that keeps typical values readable."""
    finite = values_nm[np.isfinite(values_nm)]
    return ("µm", 1e-3) if finite.size and float(np.median(finite)) >= 1000 else ("nm", 1.0)


def size_histograms(sizes: SizeDistributions, classes: Sequence[str], *, max_bins: int = 40) -> bytes:
    """Equivalent-diameter histograms, one panel per defect class with a measured size.

    sizes: `engine.reports.sizes.size_distributions` of the run (fixed log bins in nm).
    Panels share their bins: the fixed bins merged in groups so that at most `max_bins`
    span the sizes present; the x axis is logarithmic when they span more than a decade
    (defect sizes are closer to log-normal than to normal).
    """
    present = [name for name in sizes.classes if sizes.classes[name].measured]
    unit, factor = length_unit(np.array([sizes.median_nm()]))
    counts = np.array([sizes.classes[name].counts for name in present])  # (classes, fine bins)
    used = np.flatnonzero(counts.sum(axis=0))
    first, last = int(used[0]), int(used[-1])
    # the coarsest grouping is a divisor of the bins per decade, so display edges stay
    # the same round values (10^(k/10), ...) in every report
    group = next(g for g in (1, 2, 4, 5, 10, 20, 25, 50, 100) if BINS_PER_DECADE % g == 0
                 and (last // g - first // g + 1) <= max_bins)
    # the fixed bins (100 per decade over 8 decades) are a whole number of groups
    lo, hi_fine = first // group * group, (last // group + 1) * group
    edges = EDGES_NM[lo:hi_fine + 1:group] * factor
    log = edges[-1] / edges[0] > 10
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = _figure(3.6 * ncols, 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(present):]:
        ax.set_visible(False)
    for ax, name, row in zip(axes.ravel(), present, counts):
        fine = row[lo:hi_fine]
        shown = np.add.reduceat(fine, np.arange(0, len(fine), group))
        ax.stairs(shown, edges, fill=True, color=class_colour(name, classes), alpha=0.85)
        if log:
            ax.set_xscale("log")
        c = sizes.classes[name]
        title = f"{name} (n = {c.measured})" + (f", {c.missing} without size" if c.missing else "")
        ax.set_title(_plain(title), fontsize=10)
        ax.set_xlabel(f"equivalent diameter ({unit})")
        ax.set_ylabel("defects")
    return _png(fig)


def draw_density_maps(counts: dict[str, pd.DataFrame], extents_um: dict[str, tuple[float, float] | None],
                      pixel_um: dict[str, tuple[float, float] | None]):
    """`density_maps` as a matplotlib Figure (for tests and notebooks)."""
    from matplotlib.colors import Normalize

    ids = list(counts)
    values = np.concatenate([t["object_density_per_mm2"].to_numpy(np.float64) for t in counts.values()])
    finite = values[np.isfinite(values)]
    norm = Normalize(0.0, float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    ncols = min(4, len(ids))
    nrows = math.ceil(len(ids) / ncols)
    fig = _figure(3.2 * ncols + 0.8, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(ids):]:
        ax.set_visible(False)
    mesh = None
    for ax, image_id in zip(axes.ravel(), ids):
        t = counts[image_id]
        ys, xs = np.unique(t["y"].to_numpy()), np.unique(t["x"].to_numpy())
        px = pixel_um.get(image_id)
        if extents_um.get(image_id) is not None and px is not None:
            h, w = extents_um[image_id][0] / px[0], extents_um[image_id][1] / px[1]
            sy, sx, unit = px[0], px[1], "µm"
        else:
            h = max(float(np.nanmax(t["core_y1"])) if t["core_y1"].notna().any() else 0, ys[-1] + 1)
            w = max(float(np.nanmax(t["core_x1"])) if t["core_x1"].notna().any() else 0, xs[-1] + 1)
            sy = sx = 1.0
            unit = "level-0 px"
        grid = np.full((len(ys), len(xs)), np.nan)
        failed = np.zeros_like(grid, bool)
        r = np.searchsorted(ys, t["y"].to_numpy())
        c = np.searchsorted(xs, t["x"].to_numpy())
        grid[r, c] = t["object_density_per_mm2"].to_numpy(np.float64)
        failed[r, c] = (t["status"] != "done").to_numpy()
        y_edges = np.append(ys, h) * sy
        x_edges = np.append(xs, w) * sx
        ax.set_facecolor("#bbbbbb")
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), norm=norm, cmap="viridis",
                             edgecolors="white", linewidth=0.3)
        for i, j in zip(*np.nonzero(failed)):
            ax.plot([x_edges[j], x_edges[j + 1]], [y_edges[i], y_edges[i + 1]], color="#d62728", lw=1)
            ax.plot([x_edges[j], x_edges[j + 1]], [y_edges[i + 1], y_edges[i]], color="#d62728", lw=1)
        ax.set_xlim(x_edges[0], x_edges[-1])
        ax.set_ylim(y_edges[-1], y_edges[0])  # image orientation: y down
        ax.set_aspect("equal")
        n = int(t["n_objects"].sum())
        ax.set_title(_plain(f"{image_id} ({n} defect{'' if n == 1 else 's'})"), fontsize=9)
        ax.set_xlabel(f"x ({unit})", fontsize=8)
        ax.set_ylabel(f"y ({unit})", fontsize=8)
        ax.tick_params(labelsize=7)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label="defects per mm² (stitched objects)", shrink=0.8)
    return fig


def density_maps(counts: dict[str, pd.DataFrame], extents_um: dict[str, tuple[float, float] | None],
                 pixel_um: dict[str, tuple[float, float] | None]) -> bytes:
    """Per-tile defect density heat maps, one panel per image, laid out by tile position.

    counts: image_id -> its tiles table with the stitched objects counted per tile
    (`engine.reports.density.TileCounts.tiles`: key y, x in level-0 pixels, status,
    n_objects, object_density_per_mm2). extents_um: image_id -> (height, width) of level
    0 in µm, or None (then axes are in level-0 pixels up to the last core's end).
    pixel_um: image_id -> level-0 (y, x) pixel size in µm, or None. One colour scale for
    all panels, so images compare; failed tiles are grey and crossed; each panel's title
    gives its defect count (the tables' count for the image).
    """
    return _png(draw_density_maps(counts, extents_um, pixel_um))


def scale_bar(width_px: int, pixel_nm: float, *, fraction: float = 0.2) -> tuple[float, str] | None:
    """(length in pixels, label) of a scale bar about `fraction` of an image `width_px`
    wide at `pixel_nm` nm per pixel: a round 1, 2 or 5 x 10^k nm, labelled in nm, µm or
    mm ("500 nm", "20 µm"); None when the pixel size is unknown (not finite, <= 0)."""
    if not (isinstance(pixel_nm, (int, float)) and math.isfinite(pixel_nm) and pixel_nm > 0) or width_px <= 0:
        return None
    target = width_px * pixel_nm * fraction
    k = math.floor(math.log10(target))
    length_nm = max(m * 10.0 ** k for m in (1, 2, 5) if m * 10.0 ** k <= target)
    for unit, per in (("mm", 1e6), ("µm", 1e3), ("nm", 1.0)):
        if length_nm >= per:
            value = length_nm / per
            break
    else:
        unit, value = "nm", length_nm
    text = f"{value:.0f}" if value >= 1 else f"{value:g}"
    return length_nm / pixel_nm, f"{text} {unit}"


# NaN/inf pixels: a colour no grey, outline or class colour takes
NONFINITE_RGB = (1.0, 0.0, 1.0)


def draw_overlay(overlay: Overlay, classes: Sequence[str]):
    """`overlay_figure` as a matplotlib Figure (for tests and notebooks)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    h, w = overlay.image.shape
    # Pixels are drawn with their physical shape: data coordinates stay pixels (boxes,
    # outlines and the scale bar are in them) and a pixel is drawn py/px times as tall as
    # wide, so an image of (200, 100) nm pixels is not squashed to half its height.
    py, px = overlay.pixel_size_nm
    aspect = py / px if all(math.isfinite(v) and v > 0 for v in (py, px)) else 1.0
    side = 6.0
    fig = _figure(side, side * h * aspect / w + 0.6 if w else side)
    ax = fig.add_subplot()
    rgb = np.repeat(overlay.image[..., None], 3, axis=2)
    if overlay.nonfinite is not None:
        rgb[overlay.nonfinite] = NONFINITE_RGB
    if overlay.outlines is not None:
        # blended, so the defect under a dense outline stays visible
        rgb[overlay.outlines] = 0.35 * rgb[overlay.outlines] + 0.65 * np.array([0.0, 1.0, 1.0])
    ax.imshow(rgb, interpolation="nearest", aspect=aspect)
    for (x0, y0, x1, y1), name in zip(overlay.boxes, overlay.classes):
        # boxes are edge coordinates; imshow puts pixel i's centre at i
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2,
                               edgecolor=class_colour(name, classes)))
    shown = [c for c in classes if c in set(overlay.classes)] + sorted(set(overlay.classes) - set(classes))
    handles = [Line2D([], [], color=class_colour(c, classes), lw=2, label=_plain(c)) for c in shown]
    if overlay.outlines is not None:
        handles.append(Line2D([], [], color="cyan", lw=2, label="label outlines"))
    if overlay.nonfinite is not None:
        handles.append(Patch(color=NONFINITE_RGB, label="no data (NaN/inf)"))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.7)
    bar = scale_bar(w, px)  # along x, in x pixels
    if bar is not None:
        length, label = bar
        # lower left, white on a dark box so it reads on any image
        x, y = 0.04 * w, h - 0.05 * h
        ax.add_patch(Rectangle((x - 0.01 * w, y - 0.075 * h), length + 0.02 * w, 0.1 * h, color="black",
                               alpha=0.55, lw=0))
        ax.plot([x, x + length], [y, y], color="white", lw=3, solid_capstyle="butt")
        ax.text(x + length / 2, y - 0.02 * h, label, color="white", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    return fig


def overlay_figure(overlay: Overlay, classes: Sequence[str]) -> bytes:
    """The coarse level in grey (NaN/inf pixels in magenta), label outlines in cyan,
    stitched boxes coloured by class, a scale bar from the level's pixel size; drawn
    with the pixels' physical aspect (y size / x size)."""
    return _png(draw_overlay(overlay, classes))


__all__ = ["NONFINITE_RGB", "class_colour", "density_maps", "draw_density_maps", "draw_overlay", "length_unit",
           "overlay_figure", "scale_bar", "size_histograms"]
