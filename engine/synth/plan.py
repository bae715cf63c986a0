"""Plans: what each synthetic image will show, decided from the seed before any pixel.

A plan is a small frozen value (material, modality, pixel size, instrument settings,
quality grade, defects); rendering reads only the plan, so a plan can be shipped to a
worker and rendered there, chunk by chunk.

Coverage: materials are cycled in a seeded order; each image takes, among the
modalities its material allows, one not yet used in the archive if there is one, else
the one this material has used least; the first five images carry a defect of each
class in turn. So a modest archive (a dozen or two images) holds every
material, modality and defect class that was asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from engine.stores.catalog import MODALITIES
from engine.synth.defects import DEFECT_CLASSES, Defect, plan_defects
from engine.synth.errors import SynthArgumentError
from engine.synth.materials import MATERIALS, get_material
from engine.synth.modality import DTYPES, Imaging, pixel_range, plan_imaging

QUALITY_GRADES = ("A", "B", "C", "D")
# grade -> (probability, expected defects per 512x512 pixels, defect size factor)
_GRADES = {"A": (0.3, 0.4, 0.9), "B": (0.3, 1.5, 1.0), "C": (0.25, 4.0, 1.1), "D": (0.15, 9.0, 1.3)}


@dataclass(frozen=True)
class ImagePlan:
    """One synthetic image. Lengths in level-0 pixels; `pixel_size_nm` in nanometres."""

    image_id: str
    index: int
    material: str
    modality: str
    pixel_size_nm: float
    shape: tuple[int, int]
    chunk: int
    quality_grade: str
    seed: int
    imaging: Imaging
    defects: tuple[Defect, ...]

    @property
    def n_chunks(self) -> int:
        h, w = self.shape
        return math.ceil(h / self.chunk) * math.ceil(w / self.chunk)

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.modality]

    @property
    def instrument(self) -> str:
        return f"synthetic-{self.modality}"

    @property
    def attributes(self) -> dict:
        """What the image's metadata carries under the `grainflow` key."""
        return {"modality": self.modality, "material": self.material, "quality_grade": self.quality_grade,
                "seed": self.seed, "instrument": self.instrument, "source": "engine.synth",
                "defects": len(self.defects)}


def pixel_size_range(material: str, modality: str) -> tuple[float, float]:
    """Pixel sizes (nm) at which `modality` shows `material`'s characteristic length at
    the material's `feature_px`; empty (lo > hi) if the instrument cannot."""
    m = get_material(material)
    lo, hi = pixel_range(modality)
    return max(lo, m.length_nm / m.feature_px[1]), min(hi, m.length_nm / m.feature_px[0])


def _check_names(kind: str, names: Iterable[str] | None, valid: Sequence[str]) -> tuple[str, ...]:
    if names is None:
        return tuple(valid)
    if isinstance(names, str):
        names = [names]
    names = tuple(names)
    kinds = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"  # modality -> modalities
    bad = [n for n in names if n not in valid]
    if bad:
        raise SynthArgumentError(f"unknown {kind} {', '.join(map(repr, bad))}; valid {kinds}: {', '.join(valid)}")
    if not names:
        raise SynthArgumentError(f"no {kinds} given; valid {kinds}: {', '.join(valid)}")
    return tuple(dict.fromkeys(names))


def _integer(name: str, value, minimum: int) -> int:
    """`value` as an int >= minimum; anything else (1.5, "x", True) is refused by name."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SynthArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _shape(size) -> tuple[int, int]:
    try:
        h, w = (size, size) if np.isscalar(size) else tuple(size)
        return _integer("height", h, 1), _integer("width", w, 1)
    except (SynthArgumentError, TypeError, ValueError):
        raise SynthArgumentError(f"size {size!r} must be a positive int or a (height, width) pair of them") from None


def plan_archive(*, n_images: int, seed: int, size: int | tuple[int, int] = 512, chunk: int = 512,
                 materials: Iterable[str] | None = None,
                 modalities: Iterable[str] | None = None) -> tuple[ImagePlan, ...]:
    """Plans of an archive's images, in order. Image i's plan depends only on the seed,
    the arguments, and images before it (an archive is a prefix of a larger one).

    Unknown material or modality names raise SynthArgumentError (a ValueError) listing the
    valid ones, as does a material none of whose instruments was asked for.
    """
    n_images = _integer("n_images", n_images, 0)
    seed = _integer("seed", seed, 0)
    chunk = _integer("chunk", chunk, 16)
    shape = _shape(size)
    mats = _check_names("material", materials, MATERIALS)
    mods = _check_names("modality", modalities, MODALITIES)
    allowed = {m: tuple(x for x in get_material(m).modalities if x in mods) for m in mats}
    orphans = [m for m, a in allowed.items() if not a]
    if orphans:
        raise SynthArgumentError(
            f"material(s) {', '.join(orphans)} cannot be imaged with {', '.join(mods)}; "
            + "; ".join(f"{m}: {', '.join(get_material(m).modalities)}" for m in orphans))
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(mats))
    rarity = {x: sum(x in a for a in allowed.values()) for x in mods}
    used = dict.fromkeys(mods, 0)
    used_by = {m: dict.fromkeys(allowed[m], 0) for m in mats}
    plans = []
    for i in range(int(n_images)):
        rng = np.random.default_rng([int(seed), i])
        material = mats[order[i % len(mats)]]
        tiebreak = rng.random(len(allowed[material]))
        modality = min(zip(allowed[material], tiebreak),
                       key=lambda mt: (used[mt[0]] > 0, used_by[material][mt[0]], rarity[mt[0]], mt[1]))[0]
        used[modality] += 1
        used_by[material][modality] += 1
        plans.append(plan_image(i, material, modality, shape, int(chunk), rng,
                                first_class=DEFECT_CLASSES[i % len(DEFECT_CLASSES)], covering=i < len(DEFECT_CLASSES)))
    return tuple(plans)


def plan_image(index: int, material: str, modality: str, shape: tuple[int, int], chunk: int,
               rng: np.random.Generator, *, first_class: str | None = None, covering: bool = False) -> ImagePlan:
    """Plan one image from `rng`. `covering` forces a grade with defects so that the
    image's first defect (of `first_class`) exists."""
    lo, hi = pixel_size_range(material, modality)
    if lo > hi:
        raise SynthArgumentError(f"{modality} cannot image {material}: its pixel sizes miss the material's scale")
    image_seed = int(rng.integers(0, 2**62))
    pixel = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    grades = QUALITY_GRADES[1:] if covering else QUALITY_GRADES
    p = np.array([_GRADES[g][0] for g in grades])
    grade = str(rng.choice(grades, p=p / p.sum()))
    imaging = plan_imaging(modality, pixel, shape, image_seed, rng)
    _, rate, scale = _GRADES[grade]
    defects = plan_defects(rate, scale, shape, imaging, rng, first_class=first_class, at_least_one=grade != "A")
    return ImagePlan(
        image_id=f"synth-{index:05d}", index=index, material=material, modality=modality, pixel_size_nm=pixel,
        shape=shape, chunk=chunk, quality_grade=grade, seed=image_seed, imaging=imaging, defects=defects,
    )


def total_chunks(plans: Iterable[ImagePlan]) -> int:
    """Chunks `generate_archive` will render for these plans (the progress total)."""
    return sum(p.n_chunks for p in plans)
