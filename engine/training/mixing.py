"""Mixing a synthetic archive (engine.synth.diffusion) into a training set.

`ratio` is synthetic samples per real training sample: 0.5 adds one synthetic sample for
every two real ones (as many as the synthetic archive has, at most). Only samples the
quality gate accepted join: images listed in the archive's rejects table are left out.
Synthetic samples join training only, never validation, so validation still measures
real data.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from engine.errors import GrainflowError

T = TypeVar("T")


class MixingError(GrainflowError, ValueError):
    """A synthetic archive or ratio that cannot be mixed in."""


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 0:
        raise MixingError(f"synthetic ratio must be a finite number >= 0 (synthetic per real sample), got {ratio}")
    return ratio


def accepted_image_ids(archive) -> list[str]:
    """Catalog image ids of a synthetic archive, less those its quality gate rejected."""
    from engine.stores.catalog import read_catalog
    from engine.synth.diffusion.output import read_rejects

    ids = [str(i) for i in read_catalog(archive)["image_id"]]
    rejected = set(read_rejects(archive)["image_id"])
    return [i for i in ids if i not in rejected]


def mix_in(real: Sequence[T], synthetic: Sequence[T], ratio: float, *, seed: int, what: str = "samples") -> list[T]:
    """`real` followed by a seeded choice of round(ratio * len(real)) of `synthetic`
    (all of them when there are fewer). ratio 0 gives `real` unchanged."""
    ratio = check_ratio(ratio)
    if ratio == 0:
        return list(real)
    if not synthetic:
        raise MixingError(f"the synthetic archive gives no {what} to mix in: its quality gate rejected every "
                          "sample, or no sample labels a defect")
    k = min(len(synthetic), round(ratio * len(real)))
    pick = np.sort(np.random.default_rng([int(seed), 0x5E7]).choice(len(synthetic), k, replace=False))
    return [*real, *(synthetic[i] for i in pick)]


def synthetic_detector_tiles(archive, class_names: Sequence[str], tile: int) -> list:
    """Detector tiles (engine.training.detector.tiles.TrainingTile) of a synthetic
    archive's accepted samples that hold a labelled defect (a sample is one tile: its
    side is below a detector tile's)."""
    from engine.stores.uri import resolve
    from engine.training.detector.tiles import plan_tiles

    archive = resolve(archive)
    tiles = plan_tiles(archive, list(class_names), tile=tile, image_ids=accepted_image_ids(archive))
    return [t for t in tiles if not t.is_background]
