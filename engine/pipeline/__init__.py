"""The ensemble and measurements: tiles in, detections, masks, classes and sizes out.

- `ensemble`: `Ensemble` (detect -> segment -> classify -> measure; a map_batches UDF
  and the online endpoint's model), `analyze_tile`, `EnsembleModels`;
- `ensemble_config`: `EnsembleConfig` (no torch: the job's driver and tasks carry it);
- `results`: `TileResult` and the output columns (one row per tile);
- `measure`: areas, diameters, axes, orientation, defect density in physical units;
- `inputs`: each member's input intensity scale;
- `bundle`: ensembles in the model registry (register, load with sha256 checks);
- `job`, `job_ensemble`: the reprocessing job, and its actor class (`JobEnsemble`);
- `demo_models`: tiny models for tests and the demo (random or quickly trained).

Names are imported on first use, so `import engine.pipeline` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Ensemble": "engine.pipeline.ensemble",
    "EnsembleConfig": "engine.pipeline.ensemble_config",
    "EnsembleModels": "engine.pipeline.ensemble",
    "TileInput": "engine.pipeline.ensemble",
    "analyze_tile": "engine.pipeline.ensemble",
    "TileResult": "engine.pipeline.results",
    "COLUMNS": "engine.pipeline.results",
    "Measurements": "engine.pipeline.measure",
    "measure_masks": "engine.pipeline.measure",
    "measure_labels": "engine.pipeline.measure",
    "defect_density_per_mm2": "engine.pipeline.measure",
    "load_bundle": "engine.pipeline.bundle",
    "register_ensemble": "engine.pipeline.bundle",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
