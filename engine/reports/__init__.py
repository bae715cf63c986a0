"""Quality reports of reprocessing runs.

- `report`: `write_report(run_uri)` writes one self-contained HTML page (``<run>/report.html``
  by default), `run_summary(run_uri)` gives its per-material table as a DataFrame, `overlay_png` one example overlay;
- `run`: `load_run` reads a finished run's manifest, summary and its archive's catalog;
- `tables`: the report's numbers (header, per material, per image, errors, class order);
- `pixels`: the pixel sizes the models saw (per image: level, model pixel, resampling; the header's text);
- `sizes`: defect size distributions, binned image by image (memory independent of the run's size);
- `density`: stitched defects counted per tile core, for the density maps;
- `overlay`: coarse-level pixels, label outlines and boxes for example overlays;
- `figures`: the figures as PNG bytes (matplotlib's Agg canvas, no pyplot);
- `html`: the page's escaped building blocks;
- `cli`: `grainflow report`.

Names are imported on first use, so `import engine.reports` imports no plotting library.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "write_report": "engine.reports.report",
    "run_summary": "engine.reports.report",
    "render_report": "engine.reports.report",
    "overlay_png": "engine.reports.report",
    "load_run": "engine.reports.run",
    "NotARunError": "engine.reports.run",
    "MalformedRunError": "engine.reports.run",
    "Run": "engine.reports.run",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.reports' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
