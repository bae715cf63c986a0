"""What the ensemble says about one tile (`TileResult`) and its columnar form.

One output row per input tile, error rows included, so a batch of B tiles gives B rows
and a sink can record every tile in its ledger. Per-detection values are arrays of the
row's N detections (N may be 0), carried by Ray Data as variable-shaped tensor columns;
fixed-length per-tile vectors are 2-D arrays. Detection i of a row is element i of every
per-detection column, sorted by detector score (highest first).

Columns (`COLUMNS`, in this order; B rows):

=========================  ====================  ============================================
image_id                   str                   passed through
level                      int32                 passed through (pyramid level of the tile)
y, x                       int64                 passed through: level-0 pixel of the core's
                                                 top-left corner (the tile's key)
modality                   str                   passed through ("" when not given)
pixel_size_nm              float64               the tile's pixel size, nm (x axis)
error                      str or None           the read's error passed through, or
                                                 "<ExceptionType>: <message>" when a model
                                                 failed on this tile; None when all went well
n_defects                  int32                 N
boxes                      (N, 4) float64        xyxy in pixels of the tile as given (core +
                                                 halo), edge coordinates
boxes_level0               (N, 4) float64        xyxy in level-0 pixels (edge coordinates)
boxes_nm                   (N, 4) float64        boxes_level0 x level-0 pixel size: nm from
                                                 the image's top-left corner (as the
                                                 synth ground truth's *_nm columns)
scores                     (N,) float64          detector confidence
classes                    (N,) int64            index into `Ensemble.class_names`
mask_scores                (N,) float64          SAM's own IoU estimate; NaN: box mask
mask_from_box              (N,) bool             True: no segmenter (or an empty SAM mask),
                                                 the box itself was measured
area_nm2, area_um2         (N,) float64          mask area (`engine.pipeline.measure`)
equivalent_diameter_nm     (N,) float64
major_axis_nm,             (N,) float64          moment-ellipse axes
minor_axis_nm
aspect_ratio               (N,) float64          major / minor
orientation_deg            (N,) float64          [0, 180) from +x, counter-clockwise; NaN
                                                 when round
centroid_level0            (N, 2) float64        (y, x) level-0 edge coordinates
core_labels                (h, w) uint32         the tile's core: detection i is painted
                                                 i + 1 (higher scores on top), 0 elsewhere;
                                                 beneath them, foreign piece k (below) is
                                                 painted N + k + 1
core_classes               (h, w) uint8          the core by defect class + 1 (0 none),
                                                 painted from every detection seen in the
                                                 tile, owned or not, so that cores join
                                                 without gaps at their borders
core_area_mm2              float64               core area, mm² (adds up to the image's)
defect_density_per_mm2     float64               n_defects / core_area_mm2
material_probs             (B, M) float32        per tile; NaN rows: not classified
grade_probs                (B, G) float32        likewise (M, G: `Ensemble.materials/grades`)
material, grade            str                   argmax names ("" when not classified)
model_versions             str                   JSON {role: "name/version", ...}
foreign_boxes_level0       (K, 4) float64        detections whose box centre lies in another
                                                 tile's core but whose mask reaches into this
                                                 one's ("foreign pieces": the core's share of
                                                 an object another tile reports), level-0 xyxy
                                                 as this tile saw them, best score first
foreign_classes            (K,) int64            their classes
=========================  ====================  ============================================

Detections are those whose box centre lies in the tile's core (the rule of
`engine.tiling.stitch_boxes`), so each defect is reported by one tile; a defect a core
border cuts is reported in pieces that `stitch_boxes` merges. Measurements come from
the whole mask in the tile (core and halo), so a piece reaching into the halo is
measured whole as far as the tile sees it. An object's pixels in a neighbour's core are
painted by that neighbour as a foreign piece, so the cores' label images together hold
every object whole (the job's `finish_image` joins each foreign piece to its object). Error rows have N = 0, empty (0, 0) core
masks, NaN probabilities and densities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np

from engine.pipeline.measure import Measurements

MEASUREMENT_COLUMNS = ("area_nm2", "area_um2", "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm",
                       "aspect_ratio", "orientation_deg")
DETECTION_COLUMNS = ("boxes", "boxes_level0", "boxes_nm", "scores", "classes", "mask_scores", "mask_from_box",
                     *MEASUREMENT_COLUMNS, "centroid_level0")
COLUMNS = ("image_id", "level", "y", "x", "modality", "pixel_size_nm", "error", "n_defects", *DETECTION_COLUMNS,
           "core_labels", "core_classes", "core_area_mm2", "defect_density_per_mm2", "material_probs",
           "grade_probs", "material", "grade", "model_versions", "foreign_boxes_level0", "foreign_classes")

_DTYPES = {"boxes": np.float64, "boxes_level0": np.float64, "boxes_nm": np.float64, "scores": np.float64,
           "classes": np.int64, "mask_scores": np.float64, "mask_from_box": np.bool_,
           "centroid_level0": np.float64, **{c: np.float64 for c in MEASUREMENT_COLUMNS},
           "foreign_boxes_level0": np.float64, "foreign_classes": np.int64}
_WIDTH = {"boxes": 4, "boxes_level0": 4, "boxes_nm": 4, "centroid_level0": 2, "foreign_boxes_level0": 4}


@dataclass(frozen=True, eq=False)
class TileResult:
    """The ensemble's answer for one tile; fields as the columns in the module doc.

    `model_versions` is a dict here (JSON text in the columns).
    """

    image_id: str
    level: int
    y: int
    x: int
    modality: str
    pixel_size_nm: float
    error: str | None
    boxes: np.ndarray
    boxes_level0: np.ndarray
    boxes_nm: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    mask_scores: np.ndarray
    mask_from_box: np.ndarray
    area_nm2: np.ndarray
    area_um2: np.ndarray
    equivalent_diameter_nm: np.ndarray
    major_axis_nm: np.ndarray
    minor_axis_nm: np.ndarray
    aspect_ratio: np.ndarray
    orientation_deg: np.ndarray
    centroid_level0: np.ndarray
    core_labels: np.ndarray
    core_classes: np.ndarray
    core_area_mm2: float
    defect_density_per_mm2: float
    material_probs: np.ndarray
    grade_probs: np.ndarray
    material: str
    grade: str
    model_versions: dict[str, str]
    foreign_boxes_level0: np.ndarray = field(default_factory=lambda: _empty("foreign_boxes_level0"))
    foreign_classes: np.ndarray = field(default_factory=lambda: _empty("foreign_classes"))

    @property
    def n_defects(self) -> int:
        return int(len(self.scores))

    @property
    def ok(self) -> bool:
        return self.error is None

    def measurements(self) -> Measurements:
        """The per-detection measurements as a `Measurements` (centroid in level 0)."""
        return Measurements(
            area_px=np.full(self.n_defects, np.nan), area_nm2=self.area_nm2, area_um2=self.area_um2,
            equivalent_diameter_nm=self.equivalent_diameter_nm, major_axis_nm=self.major_axis_nm,
            minor_axis_nm=self.minor_axis_nm, aspect_ratio=self.aspect_ratio,
            orientation_deg=self.orientation_deg, centroid=self.centroid_level0,
        )

    @classmethod
    def failed(cls, *, image_id: str, level: int, y: int, x: int, modality: str, pixel_size_nm: float,
               error: str, n_materials: int, n_grades: int, model_versions: Mapping[str, str]) -> TileResult:
        """An error row: no detections, empty masks, NaN probabilities and density."""
        empty = {name: _empty(name) for name in DETECTION_COLUMNS}
        return cls(image_id=image_id, level=level, y=y, x=x, modality=modality, pixel_size_nm=pixel_size_nm,
                   error=error, **empty, core_labels=np.zeros((0, 0), np.uint32),
                   core_classes=np.zeros((0, 0), np.uint8), core_area_mm2=np.nan, defect_density_per_mm2=np.nan,
                   material_probs=np.full(n_materials, np.nan, np.float32),
                   grade_probs=np.full(n_grades, np.nan, np.float32), material="", grade="",
                   model_versions=dict(model_versions))

    def row(self) -> dict[str, Any]:
        """This result as one row: column name -> value (the types of the module doc)."""
        out = {}
        for name in COLUMNS:
            if name == "n_defects":
                out[name] = np.int32(self.n_defects)
            elif name == "model_versions":
                out[name] = json.dumps(self.model_versions, sort_keys=True)
            else:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TileResult:
        """Back from a row (e.g. one of `Dataset.take()`); inverse of `row`."""
        kwargs = {}
        for f in fields(cls):
            v = row[f.name]
            if f.name == "model_versions":
                v = json.loads(v) if isinstance(v, str) else dict(v)
            elif f.name in _DTYPES:
                v = np.asarray(v, dtype=_DTYPES[f.name]).reshape((-1, _WIDTH[f.name]) if f.name in _WIDTH else (-1,))
            elif f.name in ("material_probs", "grade_probs"):
                v = np.asarray(v, dtype=np.float32)
            elif f.name in ("core_labels", "core_classes"):
                v = np.asarray(v, dtype=np.uint32 if f.name == "core_labels" else np.uint8)
            elif f.name in ("level", "y", "x"):
                v = int(v)
            elif f.name in ("pixel_size_nm", "core_area_mm2", "defect_density_per_mm2"):
                v = float(v)
            kwargs[f.name] = v
        return cls(**kwargs)


def error_text(value: Any) -> str | None:
    """A row's error message, or None. Ray Data and Arrow hand an all-null string column
    over as None, or as NaN of any float type (Python or numpy) when it went through a
    float array: all of those mean "no error"."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return str(value)


def _empty(name: str) -> np.ndarray:
    shape = (0, _WIDTH[name]) if name in _WIDTH else (0,)
    return np.zeros(shape, _DTYPES[name])


def _object_column(values: Sequence[np.ndarray]) -> np.ndarray:
    col = np.empty(len(values), dtype=object)
    col[:] = [np.asarray(v) for v in values] if values else []
    return col


def to_columns(results: Sequence[TileResult], *, n_materials: int, n_grades: int) -> dict[str, np.ndarray]:
    """B results -> the columnar batch of the module doc (what `Ensemble.__call__` returns).

    Per-detection and mask columns are object arrays of per-row arrays (Ray Data stores
    them as variable-shaped tensors); probabilities are (B, M) and (B, G) float32.
    """
    rows = [r.row() for r in results]
    out: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        values = [r[name] for r in rows]
        if name in _DTYPES:
            out[name] = _object_column([np.asarray(v, dtype=_DTYPES[name]) for v in values])
        elif name in ("core_labels", "core_classes"):
            out[name] = _object_column(values)
        elif name == "material_probs":
            out[name] = np.stack(values).astype(np.float32) if values else np.zeros((0, n_materials), np.float32)
        elif name == "grade_probs":
            out[name] = np.stack(values).astype(np.float32) if values else np.zeros((0, n_grades), np.float32)
        elif name == "level":
            out[name] = np.asarray(values, dtype=np.int32)
        elif name in ("y", "x"):
            out[name] = np.asarray(values, dtype=np.int64)
        elif name == "n_defects":
            out[name] = np.asarray(values, dtype=np.int32)
        elif name in ("pixel_size_nm", "core_area_mm2", "defect_density_per_mm2"):
            out[name] = np.asarray(values, dtype=np.float64)
        else:  # strings, and error (str or None)
            out[name] = np.asarray(values, dtype=object)
    return out


def from_columns(batch: Mapping[str, np.ndarray]) -> list[TileResult]:
    """A columnar batch (`to_columns`, or a batch Ray Data hands back) -> TileResults."""
    n = len(batch["image_id"])
    return [TileResult.from_row({name: batch[name][i] for name in COLUMNS if name != "n_defects"}) for i in range(n)]
