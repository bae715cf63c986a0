"""Mixing a synthetic archive (engine.synth.diffusion) into a training set.

`ratio` is synthetic samples per real training sample: 0.5 adds one synthetic sample for
every two real ones (as many as the synthetic archive has, at most: fewer than asked
warns with MixingWarning). The mixed list is a seeded permutation of real and synthetic
together: training reads specs in order through a small shuffle buffer
(engine.training.loop), so synthetic samples appended at the end would arrive as one
block at the end of every epoch.

Only samples the quality gate accepted join, and only from an archive the gate has
judged whole: an archive never gated, or holding samples the gate never saw (added or
rewritten after it ran), is refused with the command that gates it. `ungated(archive)`
is the explicit opt-out (for experiments measuring what the gate is worth). Synthetic
samples join training only, never validation, so validation still measures real data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np

from engine.errors import GrainflowError

T = TypeVar("T")

GATE_COMMAND = "grainflow synthesize --gate-only --out {archive} --gate-real REAL_ARCHIVE"


class MixingError(GrainflowError, ValueError):
    """A synthetic archive or ratio that cannot be mixed in."""


class MixingWarning(UserWarning):
    """Fewer synthetic samples mixed in than the ratio asked for."""


@dataclass(frozen=True)
class Ungated:
    """A synthetic archive to mix in whole, without the quality gate's verdict (its
    rejects are ignored too). Made by `ungated`; pass it where a synthetic archive is
    expected. str() says so, so run parameters record it."""

    archive: str

    def __str__(self) -> str:
        return f"ungated:{self.archive}"


def ungated(archive) -> Ungated:
    """`archive` marked to be mixed in without its gate (module doc)."""
    from engine.stores.uri import resolve

    return Ungated(resolve(archive).uri)


def _location(archive):
    """(StoreLocation, gated) of a synthetic archive argument (a URI, a location, or Ungated)."""
    from engine.stores.uri import resolve

    if isinstance(archive, Ungated):
        return resolve(archive.archive), False
    return resolve(archive), True


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 0:
        raise MixingError(f"synthetic ratio must be a finite number >= 0 (synthetic per real sample), got {ratio}")
    return ratio


def accepted_image_ids(archive, *, gated: bool = True) -> list[str]:
    """Catalog image ids of a synthetic archive that its quality gate accepted.

    MixingError, naming the command to run, when the gate never ran on the archive or
    did not judge every sample now in its catalog (by image id and checksum).
    gated=False (or an `Ungated` archive): every catalog image, the gate not consulted.
    """
    from engine.stores.catalog import read_catalog
    from engine.synth.diffusion.output import read_gate_record, read_rejects

    location, marked = _location(archive)
    catalog = read_catalog(location)
    ids = [str(i) for i in catalog["image_id"]]
    if not (gated and marked):
        return ids
    command = GATE_COMMAND.format(archive=location.uri)
    record = read_gate_record(location)
    if record is None:
        raise MixingError(f"{location}: the quality gate never ran on this synthetic archive; gate it first "
                          f"(`{command}`), or mix it in ungated on purpose (engine.training.mixing.ungated)")
    judged = record["judged"]
    unjudged = [i for i, c in zip(ids, catalog["checksum"]) if judged.get(i) != str(c)]
    if unjudged:
        raise MixingError(f"{location}: {len(unjudged)} of its {len(ids)} samples were added or rewritten after the "
                          f"quality gate ran (e.g. {', '.join(unjudged[:3])}); gate it again (`{command}`)")
    rejected = set(read_rejects(location)["image_id"])
    accepted = set(record["accepted"])
    return [i for i in ids if i in accepted and i not in rejected]


def mix_in(real: Sequence[T], synthetic: Sequence[T], ratio: float, *, seed: int, what: str = "samples") -> list[T]:
    """`real` and a seeded choice of round(ratio * len(real)) of `synthetic` (all of them,
    with a MixingWarning, when there are fewer), in one seeded permutation (module doc).
    ratio 0 gives `real` unchanged. The same seed gives the same list."""
    ratio = check_ratio(ratio)
    if ratio == 0:
        return list(real)
    if not synthetic:
        raise MixingError(f"the synthetic archive gives no {what} to mix in: its quality gate rejected every "
                          "sample, or no sample labels a defect")
    asked = round(ratio * len(real))
    k = min(len(synthetic), asked)
    if k < asked:
        warnings.warn(MixingWarning(
            f"the synthetic archive has {len(synthetic)} {what} to mix in, {asked} asked for (ratio {ratio:g} of "
            f"{len(real)} real): mixing {k}, an achieved ratio of {k / max(1, len(real)):.3g}"), stacklevel=2)
    rng = np.random.default_rng([int(seed), 0x5E7])
    pick = np.sort(rng.choice(len(synthetic), k, replace=False))
    mixed = [*real, *(synthetic[i] for i in pick)]
    return [mixed[i] for i in rng.permutation(len(mixed))]


def synthetic_specs(archive, layout, *, seed: int, **orders) -> list:
    """Training specs (engine.data.sample_plan.SampleSpec) of a synthetic archive's
    accepted samples under `layout`. MixingError naming the sizes when its samples are
    smaller than the layout's tile (a Ray Train model with a larger input, e.g. fusion):
    no tile fits in them."""
    from engine.data.sample_plan import plan_samples
    from engine.stores.catalog import read_catalog

    location, gated = _location(archive)
    ids = accepted_image_ids(location, gated=gated)
    specs = plan_samples(location, layout, seed=seed, image_ids=ids, **orders)
    if not specs and ids:
        catalog = read_catalog(location)
        sides = catalog[catalog["image_id"].isin(ids)][["height", "width"]].min(axis=1)
        if (sides < layout.tile).all():
            raise MixingError(
                f"{location}: its samples are {int(sides.max())} px at most and the model's training tile is "
                f"{layout.tile} px, so none holds a tile; generate samples of at least {layout.tile} px (a "
                f"diffusion model with sample_size >= {layout.tile}) or train with a tile size of "
                f"{int(sides.max())} px or less")
    return specs


def synthetic_count(specs: Sequence, archive) -> int:
    """How many of `specs` (SampleSpecs) read from the synthetic archive `archive`."""
    location, _ = _location(archive)
    prefix = location.uri.rstrip("/") + "/"
    return sum(1 for s in specs if str(s.image_uri).startswith(prefix))


def synthetic_detector_tiles(archive, class_names: Sequence[str], tile: int) -> list:
    """Detector tiles (engine.training.detector.tiles.TrainingTile) of a synthetic
    archive's accepted samples that hold a labelled defect (a sample is one tile: its
    side is below a detector tile's). `archive` may be `ungated(...)`."""
    from engine.training.detector.tiles import plan_tiles

    location, gated = _location(archive)
    tiles = plan_tiles(location, list(class_names), tile=tile, image_ids=accepted_image_ids(location, gated=gated))
    return [t for t in tiles if not t.is_background]
