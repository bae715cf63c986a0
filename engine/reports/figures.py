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


def size_histograms(sizes: pd.DataFrame, classes: Sequence[str], *, bins: int = 30) -> bytes:
    """Equivalent-diameter histograms, one panel per defect class present, shared bins.

    sizes: `engine.reports.tables.defect_sizes` rows. Bins are log-spaced when the
    diameters span more than a decade (defect sizes are closer to log-normal than to
    normal), linear otherwise.
    """
    d_nm = sizes["equivalent_diameter_nm"].to_numpy(np.float64)
    unit, factor = length_unit(d_nm)
    d = d_nm * factor
    present = [c for c in classes if (sizes["class_name"] == c).any()]
    present += sorted(set(sizes["class_name"]) - set(present))
    lo, hi = float(d.min()), float(d.max())
    log = lo > 0 and hi / lo > 10
    if hi <= lo:
        lo, hi = lo * 0.9 if lo > 0 else lo - 1, hi * 1.1 if hi > 0 else hi + 1
    edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = _figure(3.6 * ncols, 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(present):]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), present):
        values = d[(sizes["class_name"] == name).to_numpy()]
        ax.hist(values, bins=edges, color=class_colour(name, classes), alpha=0.85)
        if log:
            ax.set_xscale("log")
        ax.set_title(_plain(f"{name} (n = {len(values)})"), fontsize=10)
        ax.set_xlabel(f"equivalent diameter ({unit})")
        ax.set_ylabel("defects")
    return _png(fig)


def density_maps(tiles: dict[str, pd.DataFrame], extents_um: dict[str, tuple[float, float] | None],
                 pixel_um: dict[str, tuple[float, float] | None]) -> bytes:
    """Per-tile defect density heat maps, one panel per image, laid out by tile position.

    tiles: image_id -> its tiles table (`engine.data.sinks.TILE_SCHEMA` rows: key y, x in
    level-0 pixels, status, defect_density_per_mm2). extents_um: image_id -> (height,
    width) of level 0 in µm, or None (then axes are in level-0 pixels up to the last
    core's end). pixel_um: image_id -> level-0 (y, x) pixel size in µm, or None. One
    colour scale for all panels, so images compare; failed tiles are grey and crossed.
    """
    from matplotlib.colors import Normalize

    ids = list(tiles)
    values = np.concatenate([t["defect_density_per_mm2"].to_numpy(np.float64) for t in tiles.values()])
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
        t = tiles[image_id]
        ys, xs = np.unique(t["y"].to_numpy()), np.unique(t["x"].to_numpy())
        px = pixel_um.get(image_id)
        if extents_um.get(image_id) is not None and px is not None:
            h, w = extents_um[image_id][0] / px[0], extents_um[image_id][1] / px[1]
            sy, sx, unit = px[0], px[1], "µm"
        else:
            h = max(float(np.nanmax(t["core_y1"])) if t["core_y1"].notna().any() else 0, ys[-1] + 1)
            w = max(float(np.nanmax(t["core_x1"])) if t["core_x1"].notna().any() else 0, xs[-1] + 1)
            sy = sx = 1.0
            unit = "px"
        grid = np.full((len(ys), len(xs)), np.nan)
        failed = np.zeros_like(grid, bool)
        r = np.searchsorted(ys, t["y"].to_numpy())
        c = np.searchsorted(xs, t["x"].to_numpy())
        grid[r, c] = t["defect_density_per_mm2"].to_numpy(np.float64)
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
        ax.set_title(_plain(image_id), fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label="defects per mm² (tile detections)", shrink=0.8)
    return _png(fig)


def overlay_figure(overlay: Overlay, classes: Sequence[str]) -> bytes:
    """The coarse level in grey, label outlines in cyan, stitched boxes coloured by class."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    h, w = overlay.image.shape
    side = 6.0
    fig = _figure(side, side * h / w + 0.6 if w else side)
    ax = fig.add_subplot()
    rgb = np.repeat(overlay.image[..., None], 3, axis=2)
    if overlay.outlines is not None:
        # blended, so the defect under a dense outline stays visible
        rgb[overlay.outlines] = 0.35 * rgb[overlay.outlines] + 0.65 * np.array([0.0, 1.0, 1.0])
    ax.imshow(rgb, interpolation="nearest")
    for (x0, y0, x1, y1), name in zip(overlay.boxes, overlay.classes):
        # boxes are edge coordinates; imshow puts pixel i's centre at i
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2,
                               edgecolor=class_colour(name, classes)))
    shown = [c for c in classes if c in set(overlay.classes)] + sorted(set(overlay.classes) - set(classes))
    handles = [Line2D([], [], color=class_colour(c, classes), lw=2, label=_plain(c)) for c in shown]
    if overlay.outlines is not None:
        handles.append(Line2D([], [], color="cyan", lw=2, label="label outlines"))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.7)
    ax.set_axis_off()
    return _png(fig)


__all__ = ["class_colour", "density_maps", "length_unit", "overlay_figure", "size_histograms"]
