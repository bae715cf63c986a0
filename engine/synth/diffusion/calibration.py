"""What diffusion training records of its crops per condition, besides grey levels
(engine.synth.diffusion.intensity): which conditions it saw, and their pixel size.

Crops are read at the finest pyramid level where their defect fits the patch
(engine.data.sample_plan, anchor="instances"), so a class of large defects is learnt
from coarse levels and a class of small ones from level 0: one pixel size per modality
would put a generated crack at the scale of a pore. Each generated sample is written
with the median pixel size of the real crops of its condition (`pixel_size_for`).

Keys, as intensity's (conditions.Condition.lookup_keys, most specific first): the
condition's key (`pore.ferritic_steel.SEM`), `<material>.<modality>`, `<modality>`.
Models trained before pixel sizes were recorded per condition hold modality keys only,
and are read through the same fallbacks.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from engine.synth.diffusion.conditions import Condition, lookup


def _crop_condition(spec, defect_classes: Sequence[str]) -> tuple[str, str | None, str] | None:
    """(class, material or None, modality) of a diffusion-layout crop; None without a defect."""
    if not spec.instance_classes:
        return None
    return defect_classes[int(spec.instance_classes[0]) - 1], spec.material or None, spec.modality


def trained_conditions(specs: Sequence, defect_classes: Sequence[str]) -> list[str]:
    """Sorted keys of the conditions training teaches: those of the crops `specs`
    describe (SampleSpecs of the diffusion layout; instance_classes 1-based into
    `defect_classes`) that have a material, since crops without one are dropped
    (engine.training.collate.DiffusionCollate). Reads no pixels."""
    keys = {Condition(cls, material, modality).key()
            for cls, material, modality in filter(None, (_crop_condition(s, defect_classes) for s in specs))
            if material}
    return sorted(keys)


def crop_pixel_sizes(specs: Sequence, defect_classes: Sequence[str]) -> dict[str, float]:
    """{key: median pixel size in nm} (module doc) of the crops `specs` describe, each at
    the level it is read at (SampleSpec.pixel_size_nm). Crops without a material count
    for their modality's key only. Reads no pixels."""
    sizes: dict[str, list[float]] = {}
    for s in specs:
        found = _crop_condition(s, defect_classes)
        if found is None:
            continue
        cls, material, modality = found
        keys = Condition(cls, material, modality).lookup_keys() if material else (modality,)
        for key in keys:
            sizes.setdefault(key, []).append(float(s.pixel_size_nm))
    return {k: float(np.median(v)) for k, v in sorted(sizes.items())}


def pixel_size_for(pixel_size_nm: Mapping[str, float] | None, condition: Condition) -> float | None:
    """Pixel size (nm) to write a sample of `condition` with: its own crops' median, else
    its (material, modality)'s, else its modality's; None when the model has none."""
    found = lookup(pixel_size_nm, condition)
    return None if found is None else float(found)
