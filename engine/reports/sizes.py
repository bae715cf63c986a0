"""Defect size distributions of a run, counted image by image into fixed bins.

Each stitched defect's equivalent diameter (nm) is counted into fixed log-spaced bins
(`EDGES_NM`: `BINS_PER_DECADE` per decade from 0.1 nm to 10 mm, sizes outside counted
in the end bins) per class, one batch of images' objects at a time. What is kept is a
few thousand counts per class, plus the diameters themselves while a class has at most
`EXACT_MAX` (80 kB), whatever the number of objects: a run over millions of defects
costs the same memory as one over ten thousand. Percentiles are exact (numpy's linear
interpolation) up to `EXACT_MAX` defects of a class, and read from the bins beyond
(log-interpolated within one, so within one bin width: 2.3 % at 100 per decade);
count, mean, minimum and maximum are always exact.

Defects without a measured size (NaN diameter: no mask was measured) are counted per
class as `missing`, so the report can say how many it does not show.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from engine.data.sinks import OBJECTS, read_output
from engine.reports.run import Run

BINS_PER_DECADE = 100
_LOG_LO, _LOG_HI = -1, 7  # 10^-1 nm .. 10^7 nm (10 mm): any defect a micrograph shows
EDGES_NM = 10.0 ** (np.arange(_LOG_LO * BINS_PER_DECADE, _LOG_HI * BINS_PER_DECADE + 1) / BINS_PER_DECADE)
"""(801,) float64 bin edges in nm, shared by every run, so histograms add up."""

EXACT_MAX = 10_000
_READ_THREADS = 8  # object-store reads are latency-bound
_BATCH = 32  # images whose objects are in memory at once


@dataclass
class ClassSizes:
    """One class's equivalent diameters, binned.

    counts: (len(EDGES_NM) - 1,) int64 defects per bin. measured: defects with a finite
    diameter (counts' sum); missing: defects with none (NaN). sum_nm, min_nm, max_nm:
    over the measured ones, in nm. exact: the measured diameters while there are at
    most `EXACT_MAX` of them (then None).
    """

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(EDGES_NM) - 1, np.int64))
    measured: int = 0
    missing: int = 0
    sum_nm: float = 0.0
    min_nm: float = math.inf
    max_nm: float = -math.inf
    exact: list[np.ndarray] | None = field(default_factory=list)

    def add(self, diameters_nm: np.ndarray) -> None:
        """Count one image's diameters ((N,) float, nm; NaN/inf for an unmeasured defect)."""
        d = np.asarray(diameters_nm, np.float64)
        ok = np.isfinite(d)
        self.missing += int((~ok).sum())
        d = d[ok]
        if not d.size:
            return
        self.measured += int(d.size)
        if self.exact is not None:
            self.exact = self.exact + [d] if self.measured <= EXACT_MAX else None
        self.sum_nm += float(d.sum())
        self.min_nm = min(self.min_nm, float(d.min()))
        self.max_nm = max(self.max_nm, float(d.max()))
        # bin i holds [EDGES_NM[i], EDGES_NM[i + 1]); outside the range: the end bins
        i = np.searchsorted(EDGES_NM, d, side="right") - 1
        self.counts += np.bincount(np.clip(i, 0, len(self.counts) - 1), minlength=len(self.counts))

    @property
    def total(self) -> int:
        return self.measured + self.missing

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the measured diameters in nm: exact while they are
        kept, else from the bins (log-interpolated within the bin, clamped to the exact
        min and max); NaN if none."""
        if not self.measured:
            return math.nan
        if self.exact is not None:
            return float(np.quantile(np.concatenate(self.exact), q))
        cum = np.cumsum(self.counts)
        rank = q * self.measured
        i = int(np.searchsorted(cum, rank, side="left"))
        i = min(i, len(self.counts) - 1)
        before = float(cum[i - 1]) if i else 0.0
        frac = (rank - before) / self.counts[i] if self.counts[i] else 0.0
        lo, hi = math.log(EDGES_NM[i]), math.log(EDGES_NM[i + 1])
        return float(min(max(math.exp(lo + frac * (hi - lo)), self.min_nm), self.max_nm))

    @property
    def mean_nm(self) -> float:
        return self.sum_nm / self.measured if self.measured else math.nan


@dataclass
class SizeDistributions:
    """Per class (in the report's class order, then any others by name), its binned sizes."""

    classes: dict[str, ClassSizes]

    def statistics(self) -> pd.DataFrame:
        """Per class with a measured defect: count (measured), no_size (defects without a
        measured size), p10_nm, median_nm, p90_nm (from the bins), mean_nm (exact)."""
        rows = {name: {"count": c.measured, "no_size": c.missing, "p10_nm": c.quantile(0.1),
                       "median_nm": c.quantile(0.5), "p90_nm": c.quantile(0.9), "mean_nm": c.mean_nm}
                for name, c in self.classes.items() if c.measured}
        return pd.DataFrame.from_dict(rows, orient="index",
                                      columns=["count", "no_size", "p10_nm", "median_nm", "p90_nm", "mean_nm"])

    def missing(self) -> dict[str, tuple[int, int]]:
        """Class -> (defects without a measured size, defects) for classes with any missing."""
        return {name: (c.missing, c.total) for name, c in self.classes.items() if c.missing}

    @property
    def measured(self) -> int:
        return sum(c.measured for c in self.classes.values())

    def median_nm(self) -> float:
        """The median over all classes (for choosing nm or µm)."""
        merged = ClassSizes(exact=None)
        for c in self.classes.values():
            merged.counts += c.counts
            merged.measured += c.measured
            merged.min_nm, merged.max_nm = min(merged.min_nm, c.min_nm), max(merged.max_nm, c.max_nm)
        return merged.quantile(0.5)


def size_distributions(run: Run, classes: Sequence[str] = ()) -> SizeDistributions:
    """Bin every stitched defect's equivalent diameter of the run, per class, reading
    the objects of `_BATCH` images at a time (images whose summary counts no defect are
    not read). classes: the order of the result's classes (others follow by name)."""
    found: dict[str, ClassSizes] = {name: ClassSizes() for name in classes}

    def read(image_id: str):
        return read_output(run.out, OBJECTS, image_id=image_id, columns=["class_name", "equivalent_diameter_nm"])

    ids = [i for i, n in zip(run.summary["image_id"], run.summary["n_defects"]) if n > 0]
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for start in range(0, len(ids), _BATCH):
            for t in pool.map(read, ids[start:start + _BATCH]):
                names = pc.fill_null(t["class_name"], "")
                diameters = pc.fill_null(t["equivalent_diameter_nm"], math.nan)
                for name in pc.unique(names).to_pylist():
                    d = pc.filter(diameters, pc.equal(names, name))
                    found.setdefault(str(name), ClassSizes()).add(d.to_numpy(zero_copy_only=False))
    ordered = {n: found[n] for n in classes if found[n].total}
    ordered.update({n: found[n] for n in sorted(set(found) - set(classes)) if found[n].total})
    return SizeDistributions(ordered)


__all__ = ["BINS_PER_DECADE", "ClassSizes", "EDGES_NM", "EXACT_MAX", "SizeDistributions", "size_distributions"]
