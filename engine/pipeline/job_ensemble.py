"""The job's ensemble actor: `JobEnsemble`, the class Ray Data builds in each actor.

Apart from `engine.pipeline.job` because it imports torch and the models' stack (through
`engine.pipeline.ensemble`): the job's per-image Ray tasks (preparing, finishing) import
that module, and a worker that runs one of them need not import torch (~1.5 CPU-s and
~0.4 GiB per worker process).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from engine.errors import GrainflowError
from engine.pipeline.ensemble import Ensemble
from engine.pipeline.ensemble_config import EnsembleConfig
from engine.pipeline.results import error_text


class JobEnsemble(Ensemble):
    """The ensemble as the job's map_batches UDF.

    Adds to `Ensemble.__call__`: tiles go in with their image's own dtype (the
    datasource delivers one dtype for the whole dataset, uint16 for a mix of uint8 and
    uint16 images, and the "raw" input mode scales by the dtype's maximum, so a uint8
    image must arrive as uint8 to get the answer the online endpoint gives), and the
    datasource's placement columns (origin, scale, halo) and its ``halo_reduced`` pass
    through to the sink (which must not ledger a tile read with a reduced halo).

    dtypes: image_id -> stored dtype. expect: the description the driver planned with
    (`engine.pipeline.bundle.describe_bundle`, from registry metadata); an actor whose
    loaded members describe themselves otherwise refuses to start (GrainflowError naming
    the difference), so no tile is written under the wrong class names. Other arguments
    as `Ensemble`. In a Ray actor, torch gets as many threads as the actor has CPUs
    (`engine.runtime.use_assigned_cpus`).
    """

    def __init__(self, *, dtypes: Mapping[str, str] | None = None, expect: Mapping[str, Any] | None = None,
                 **kwargs):
        from engine.runtime import use_assigned_cpus

        use_assigned_cpus()  # the actor's CPUs, not whatever OMP_NUM_THREADS says
        super().__init__(**kwargs)
        self._dtypes = {k: np.dtype(v) for k, v in (dtypes or {}).items()}
        if expect is not None:
            actual = self.describe()
            differ = sorted(k for k in expect if actual.get(k) != expect[k])
            if differ:
                raise GrainflowError(
                    f"{actual['model_versions'].get('bundle', 'bundle')}: the members' files disagree with their "
                    f"registered configs on {', '.join(differ)}: "
                    + "; ".join(f"{k}: registered {expect[k]!r}, loaded {actual.get(k)!r}" for k in differ))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        if self._dtypes:
            tiles = [np.asarray(t) for t in batch["tile"]]
            cast = [t.astype(self._dtypes.get(str(i), t.dtype), copy=False) for t, i in zip(tiles, batch["image_id"])]
            col = np.empty(len(cast), dtype=object)
            col[:] = cast
            batch["tile"] = col
        out = super().__call__(batch)
        for name in ("origin", "scale", "halo"):
            out[name] = np.asarray(batch[name])
        if "halo_reduced" in batch:  # null (None, or NaN through a float array) or why
            reduced = np.empty(len(batch["halo_reduced"]), dtype=object)
            reduced[:] = [error_text(v) for v in batch["halo_reduced"]]
            out["halo_reduced"] = reduced
        return out


def describe_loaded_bundle(ref, registry, config: EnsembleConfig) -> dict[str, Any]:
    """The bundle's description from its loaded members (classes, materials, grades, input
    modes), for a bundle whose registry metadata does not record them; device left out."""
    described = Ensemble(bundle=ref, registry=registry, config=config, device="cpu").describe()
    return {k: v for k, v in described.items() if k != "device"}


__all__ = ["JobEnsemble", "describe_loaded_bundle"]
