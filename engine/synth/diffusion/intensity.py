"""The intensity scale of generated samples: where real crops sit in their dtype's range.

The diffusion model learns crops normalised per crop (training_samples.normalise_tile:
the crop's 1st-99th percentile mapped onto [0, 1]), so what it generates is in [0, 1]
with no memory of the stored grey levels. Real micrographs use part of their dtype's
range (SEM p1-p99 about 0.2-0.7 of the uint16 maximum) and the detector scales stored
pixels by the dtype maximum (engine.training.detector.pixels.to_uint8), so writing
[0, 1] onto the full range would make every synthetic tile look unlike a real one.

At diffusion training time `crop_intensity` measures, per crop, the p1 and p99 that
normalise_tile uses, and records their medians per condition in the model's config
(`intensity_range`). Writing a sample (output.write_sample) maps x in [0, 1] back to
p1 + x * (p99 - p1): a generated crop gets the grey levels of a typical real crop of
its condition.

Units: fractions of the stored dtype's full scale (raw / dtype max for integer images;
float images as stored, which the detector takes as [0, 1]). Fractions, not raw values,
so the range carries over when the synthetic dtype (output.DTYPES) is not the real one.

Keys, most specific first (`range_for` takes the first present): the condition's key
(`pore.ferritic_steel.SEM`), `<material>.<modality>`, `<modality>`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from engine.synth.diffusion.conditions import Condition, lookup

MAX_CROPS_PER_CONDITION = 32  # the medians settle long before; the driver reads these


def _full_scale(dtype: np.dtype) -> float:
    """What one unit of the stored dtype is worth as a fraction of its range."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def crop_percentiles(crop: np.ndarray) -> tuple[float, float]:
    """(p1, p99) of a stored crop as fractions of its dtype's full scale, the
    percentiles normalise_tile maps onto 0 and 1."""
    from engine.data.training_samples import HIGH_PERCENTILE, LOW_PERCENTILE

    lo, hi = np.percentile(np.asarray(crop, dtype=np.float64), [LOW_PERCENTILE, HIGH_PERCENTILE])
    scale = _full_scale(crop.dtype)
    return float(lo) / scale, float(hi) / scale


def crop_intensity(specs: Sequence, defect_classes: Sequence[str], *,
                   max_per_condition: int = MAX_CROPS_PER_CONDITION, seed: int = 0) -> dict[str, list[float]]:
    """{key: [p1, p99]} (module doc) of the crops `specs` describe (SampleSpecs of the
    diffusion layout, one defect each; instance_classes 1-based into `defect_classes`):
    the median over crops of each crop's percentiles, from a seeded subset of at most
    `max_per_condition` crops per (class, material, modality). Reads the crops' pixels.
    """
    from engine.data.training_samples import read_window
    from engine.stores.image import open_image

    groups: dict[tuple[str, str, str], list] = {}
    for s in specs:
        if not s.instance_classes:
            continue
        cls = defect_classes[int(s.instance_classes[0]) - 1]
        groups.setdefault((cls, s.material or "", s.modality), []).append(s)
    images: dict[str, object] = {}
    per_key: dict[str, list[tuple[float, float]]] = {}
    rng = np.random.default_rng(seed)
    for (cls, material, modality), group in sorted(groups.items()):
        if len(group) > max_per_condition:
            group = [group[i] for i in np.sort(rng.choice(len(group), max_per_condition, replace=False))]
        for s in group:
            if s.image_uri not in images:
                images[s.image_uri] = open_image(s.image_uri)
            p = crop_percentiles(read_window(images[s.image_uri], s.level, s.y, s.x, s.tile, s.tile))
            # crops without a material teach no condition (the model is conditioned on
            # it) but still tell what their modality looks like
            keys = Condition(cls, material, modality).lookup_keys() if material else (modality,)
            for key in keys:
                per_key.setdefault(key, []).append(p)
    return {k: [float(np.median([p[0] for p in v])), float(np.median([p[1] for p in v]))]
            for k, v in sorted(per_key.items())}


def range_for(intensity: Mapping[str, Sequence[float]] | None, condition: Condition) -> tuple[float, float] | None:
    """(p1, p99) as fractions of full scale for `condition`: its own, else its
    (material, modality)'s, else its modality's (conditions.lookup); None when the model
    recorded none (a model trained before intensity ranges were recorded)."""
    found = lookup(intensity, condition)
    if found is None:
        return None
    lo, hi = (float(v) for v in found)
    return lo, hi
