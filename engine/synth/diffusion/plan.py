"""The plan of a synthesis run: which samples, with which seeds, in which batches.

Plain values only (they travel to Ray tasks). A sample's seed comes from the run seed,
its condition and its index, so the same request always plans the same samples; its id
names all three, so a rerun finds the samples an earlier run already wrote. Batches are
fixed by the plan too (`batch_size` samples of one condition), since a sample's bits
may depend on the batch it is computed in (engine.synth.diffusion.sampler).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

from engine.synth.diffusion.conditions import Condition


@dataclass(frozen=True)
class PlannedSample:
    """One sample to generate: id (also its image id in the archive), condition,
    index within its condition (0-based), and the seed of its initial noise."""

    sample_id: str
    condition: Condition
    index: int
    seed: int


@dataclass(frozen=True)
class SampleBatch:
    """Samples generated together in one Ray task."""

    batch_id: str
    samples: tuple[PlannedSample, ...]


def sample_seed(run_seed: int, condition: Condition, index: int) -> int:
    """A stable 31-bit noise seed per (run seed, condition, index), the same everywhere."""
    return zlib.crc32(f"{int(run_seed)}/{condition.key()}/{int(index)}".encode()) & 0x7FFFFFFF


def sample_id(run_seed: int, condition: Condition, index: int) -> str:
    """`syn-<class>-<material>-<modality>-s<run seed>-<index>`: an image id safe in paths."""
    c = condition
    return f"syn-{c.defect_class}-{c.material}-{c.modality}-s{int(run_seed)}-{int(index):05d}"


def plan_synthesis(conditions: Sequence[Condition], n_per_condition: int, *, seed: int,
                   batch_size: int) -> list[SampleBatch]:
    """`n_per_condition` samples of every condition, cut into batches of `batch_size`."""
    if not isinstance(n_per_condition, int) or n_per_condition < 1:
        raise ValueError(f"samples per condition must be an integer >= 1, got {n_per_condition!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    batches = []
    for c in conditions:
        samples = [PlannedSample(sample_id(seed, c, i), c, i, sample_seed(seed, c, i)) for i in range(n_per_condition)]
        for start in range(0, n_per_condition, batch_size):
            part = tuple(samples[start:start + batch_size])
            batches.append(SampleBatch(f"{c.key()}/s{seed}/{start // batch_size:05d}", part))
    return batches
