"""The plan of a synthesis run: which samples, with which seeds, in which batches.

Plain values only (they travel to Ray tasks). A sample's seed comes from the run seed,
its condition and its index, so the same request always plans the same samples; its id
names all three, so a rerun finds the samples an earlier run already wrote.

Batches are fixed windows of sample indices, [k * batch_size, (k + 1) * batch_size) of
one condition, whatever the number of samples asked for: a sample's bits depend on the
batch it is computed in (float sums in a batched convolution, engine.synth.diffusion
.sampler), so the batch must not depend on n. The last batch of a run whose n is not a
multiple of batch_size still computes its whole window (`SampleBatch.window`) and
writes only the samples below n (`SampleBatch.samples`); asking for more samples later
computes the same windows and so keeps every pixel already written.
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
    """Samples generated together in one Ray task.

    window: every sample of the batch's fixed index window, all computed together (it
    fixes the pixels); samples: those of them to write (the ones below the run's n, less
    any an earlier run already wrote), in window order.
    """

    batch_id: str
    samples: tuple[PlannedSample, ...]
    window: tuple[PlannedSample, ...] = ()

    def __post_init__(self):
        if not self.window:  # a batch that writes all it computes
            object.__setattr__(self, "window", tuple(self.samples))
        stray = [s.sample_id for s in self.samples if s not in self.window]
        if stray:
            raise ValueError(f"batch {self.batch_id}: samples {stray[:3]} lie outside its window")


def sample_seed(run_seed: int, condition: Condition, index: int) -> int:
    """A stable 31-bit noise seed per (run seed, condition, index), the same everywhere."""
    return zlib.crc32(f"{int(run_seed)}/{condition.key()}/{int(index)}".encode()) & 0x7FFFFFFF


def sample_id(run_seed: int, condition: Condition, index: int) -> str:
    """`syn-<class>-<material>-<modality>-s<run seed>-<index>`: an image id safe in paths."""
    c = condition
    return f"syn-{c.defect_class}-{c.material}-{c.modality}-s{int(run_seed)}-{int(index):05d}"


def plan_synthesis(conditions: Sequence[Condition], n_per_condition: int, *, seed: int,
                   batch_size: int) -> list[SampleBatch]:
    """`n_per_condition` samples of every condition, in fixed windows of `batch_size`
    indices (module doc): batch k of a condition computes indices [k * batch_size,
    (k + 1) * batch_size) and writes those below n_per_condition."""
    if not isinstance(n_per_condition, int) or n_per_condition < 1:
        raise ValueError(f"samples per condition must be an integer >= 1, got {n_per_condition!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    batches = []
    for c in conditions:
        for start in range(0, n_per_condition, batch_size):
            window = tuple(PlannedSample(sample_id(seed, c, i), c, i, sample_seed(seed, c, i))
                           for i in range(start, start + batch_size))
            batches.append(SampleBatch(f"{c.key()}/s{seed}/{start // batch_size:05d}",
                                       tuple(s for s in window if s.index < n_per_condition), window))
    return batches
