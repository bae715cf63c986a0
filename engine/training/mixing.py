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
Whatever is passed, gated or not, must be a synthetic archive: one whose catalog carries
the diffusion provenance columns (engine.synth.diffusion.output); a real archive passed
by mistake is refused, never mixed in as if it were synthetic.

Detector tiles (`synthetic_detector_tiles`) are read at the real training tiles' scale, so
a defect has the same size in pixels in both: a synthetic sample is stored at the pixel
size its diffusion model was calibrated to for its condition (engine.synth.diffusion.
calibration), which need not be the detector's. With a model pixel size every sample is
resampled to exactly that size; without one (real images read at their own level 0) to
the median level-0 pixel size of the real training images of its modality. A sample
within EXACT_SCALE of the target is read as stored. Unlike real images (which the
detector meets at inference as the batch job reads them: as stored within its 1.5x
tolerance) a synthetic sample has no inference-time reading to match, so it gets the
target scale itself. Synthetic samples of a modality no real training image has are
refused: the detector would learn that modality from synthetic samples alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np

from engine.errors import GrainflowError

T = TypeVar("T")

GATE_COMMAND = "grainflow synthesize --gate-only --out {archive} --gate-real REAL_ARCHIVE"
# A synthetic sample whose pixel size is within this fraction of the target on both axes
# is read as stored: resampling it would only blur it.
EXACT_SCALE = 0.01


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


def _resolve(archive):
    """(StoreLocation, gated) of a synthetic archive argument (a URI, a location, or Ungated)."""
    from engine.stores.uri import resolve

    if isinstance(archive, Ungated):
        return resolve(archive.archive), False
    return resolve(archive), True


def _location(archive):
    """`_resolve`, after checking that the archive is a synthetic one (`check_synthetic`)."""
    location, gated = _resolve(archive)
    check_synthetic(location)
    return location, gated


def check_synthetic(archive) -> None:
    """MixingError unless `archive` (a URI or location) is a synthetic archive: its catalog
    has the diffusion provenance columns engine.synth.diffusion writes. A missing or
    unreadable catalog is named by engine.stores.catalog (MetadataError). Reads the
    catalog only; the gate is not consulted (`accepted_image_ids` does that)."""
    from engine.stores.catalog import CATALOG_FILE, read_catalog, read_table
    from engine.stores.uri import resolve
    from engine.synth.diffusion.output import OPTIONAL_PROVENANCE, PROVENANCE_COLUMNS

    location = resolve(archive)
    read_catalog(location)  # no catalog, or one no job can read: named there
    columns = set(read_table(location.join(CATALOG_FILE)).column_names)
    if not set(PROVENANCE_COLUMNS) - set(OPTIONAL_PROVENANCE) <= columns:
        raise MixingError(f"{location}: not a synthetic archive (its catalog has no diffusion provenance); pass a "
                          "`grainflow synthesize` output")


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
    Either way MixingError when `archive` is not a synthetic archive (`check_synthetic`).
    """
    location, marked = _location(archive)
    return _accepted(location, gated and marked)


def _accepted(location, gated: bool) -> list[str]:
    """`accepted_image_ids` of a location `check_synthetic` has passed."""
    from engine.stores.catalog import read_catalog
    from engine.synth.diffusion.output import read_gate_record, read_rejects

    catalog = read_catalog(location)
    ids = [str(i) for i in catalog["image_id"]]
    if not gated:
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
    ids = _accepted(location, gated)
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
    location, _ = _resolve(archive)
    prefix = location.uri.rstrip("/") + "/"
    return sum(1 for s in specs if str(s.image_uri).startswith(prefix))


def synthetic_detector_tiles(archive, class_names: Sequence[str], tile: int, *, real_archive,
                             real_image_ids: Sequence[str] | None = None, pixel_size_nm: float | None = None,
                             overlap: int = 0) -> list:
    """Detector tiles (engine.training.detector.tiles.TrainingTile) of a synthetic
    archive's accepted samples that hold a labelled defect, at the real training tiles'
    scale (module doc). `archive` may be `ungated(...)`.

    real_archive, real_image_ids: the real training images (all of the archive's when
    None); pixel_size_nm: the detector's (None: real images read at their level 0).
    Each sample is read at `pixel_size_nm`, or at the median level-0 pixel size of the
    real training images of its modality (engine.data.sample_plan.level_grid's native
    size: the finer one where pixels are not square), resampled on the square grid of
    that size where it is stored more than EXACT_SCALE off it; tiles of side `tile`
    overlapping by `overlap` pixels cover a sample larger than a tile once resampled.
    MixingError naming the modalities of accepted samples no real training image has.
    """
    import pandas as pd

    from engine.stores.catalog import read_catalog
    from engine.training.detector.tiles import entry_tiles, image_truth, read_ground_truth, truth_by_image

    location, gated = _location(archive)
    ids = _accepted(location, gated)
    catalog = read_catalog(location).set_index("image_id", drop=False).loc[ids]
    targets = _real_pixel_sizes(real_archive, real_image_ids) if pixel_size_nm is None else None
    real_modalities = set(targets) if targets is not None else _real_modalities(real_archive, real_image_ids)
    foreign = sorted(set(catalog["modality"]) - real_modalities)
    if foreign:
        raise MixingError(
            f"{location}: it has samples of modalities {foreign} and the real training images are "
            f"{sorted(real_modalities)}: the detector would learn {'/'.join(foreign)} from synthetic samples alone; "
            f"synthesize only the real images' modalities (`grainflow synthesize --modality M`)")
    truth = truth_by_image(read_ground_truth(location))
    class_index = {name: i for i, name in enumerate(class_names)}
    tiles = []
    for row in catalog.itertuples(index=False):
        target_nm = float(pixel_size_nm) if targets is None else targets[row.modality]
        material = None if pd.isna(row.material) else str(row.material)
        entry = _entry_at(row, location.join(row.uri), material, target_nm)
        tiles += entry_tiles(entry, image_truth(truth, entry, class_index), tile=tile, overlap=overlap)
    return [t for t in tiles if not t.is_background]


def _real_catalog(real_archive, real_image_ids):
    from engine.stores.catalog import read_catalog

    real = read_catalog(real_archive)
    if real_image_ids is not None:
        real = real[real["image_id"].isin(set(real_image_ids))]
    return real


def _real_modalities(real_archive, real_image_ids) -> set[str]:
    return set(_real_catalog(real_archive, real_image_ids)["modality"])


def _native_nm(row) -> tuple[float, tuple[float, float]]:
    """(nm of a pixel as level 0 is read natively, (y, x) nm of level 0) of a catalog row."""
    from engine.data.sample_plan import level_grid
    from engine.stores.ngff import to_nanometres

    size_yx = (to_nanometres(float(row.pixel_size_y), str(row.unit)),
               to_nanometres(float(row.pixel_size_x), str(row.unit)))
    return level_grid(int(row.height), int(row.width), size_yx, 0)[2], size_yx


def _real_pixel_sizes(real_archive, real_image_ids) -> dict[str, float]:
    """{modality: median nm of the real training images' native level-0 pixels}."""
    real = _real_catalog(real_archive, real_image_ids)
    sizes: dict[str, list[float]] = {}
    for row in real.itertuples(index=False):
        sizes.setdefault(str(row.modality), []).append(_native_nm(row)[0])
    return {modality: float(np.median(v)) for modality, v in sizes.items()}


def _entry_at(row, image, material: str | None, target_nm: float):
    """The ImageEntry (engine.training.detector.tiles) reading synthetic catalog row `row`
    at `target_nm`: level 0 as stored when within EXACT_SCALE of it on both axes, else
    level 0 resampled on the image's square OutputGrid of exactly `target_nm`."""
    from engine.preprocess.resample import OutputGrid
    from engine.training.detector.tiles import ImageEntry

    _, size_yx = _native_nm(row)
    shape = (int(row.height), int(row.width))
    if all(abs(s / target_nm - 1) <= EXACT_SCALE for s in size_yx):
        return ImageEntry(str(row.image_id), image, material, 0, shape, (1.0, 1.0))
    grid = OutputGrid.for_image(shape, size_yx, target_nm)
    return ImageEntry(str(row.image_id), image, material, 0, (int(grid.extent[0]), int(grid.extent[1])),
                      (float(grid.step[0]), float(grid.step[1])), resampled=True)
