"""The ground-truth table: one row per defect instance, in level-0 pixels and nanometres.

Boxes are half open: (y0, x0, y1, x1) covers rows y0..y1-1 and columns x0..x1-1 of
level 0, and every pixel of the instance mask (label value `instance_id` in the image's
`defects` label image) lies inside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import pyarrow as pa

TRUTH_FILE = "ground_truth.parquet"

SCHEMA = pa.schema([
    ("image_id", pa.string()), ("instance_id", pa.int32()), ("defect_class", pa.string()),
    ("y0", pa.int32()), ("x0", pa.int32()), ("y1", pa.int32()), ("x1", pa.int32()), ("area_px", pa.int64()),
    ("pixel_size_nm", pa.float64()),
    ("y0_nm", pa.float64()), ("x0_nm", pa.float64()), ("y1_nm", pa.float64()), ("x1_nm", pa.float64()),
    ("area_nm2", pa.float64()),
])


@dataclass(frozen=True)
class TruthRow:
    image_id: str
    instance_id: int
    defect_class: str
    y0: int
    x0: int
    y1: int
    x1: int
    area_px: int
    pixel_size_nm: float
    y0_nm: float
    x0_nm: float
    y1_nm: float
    x1_nm: float
    area_nm2: float

    @classmethod
    def of(cls, image_id: str, instance_id: int, defect_class: str, box, area_px: int, pixel_size_nm: float) -> TruthRow:
        y0, x0, y1, x1 = (int(v) for v in box)
        p = float(pixel_size_nm)
        return cls(image_id, int(instance_id), defect_class, y0, x0, y1, x1, int(area_px), p,
                   y0 * p, x0 * p, y1 * p, x1 * p, area_px * p * p)


assert [f.name for f in fields(TruthRow)] == SCHEMA.names


def truth_table(rows) -> pa.Table:
    """Rows sorted by (image_id, instance_id) as a Parquet-ready table."""
    records = sorted((asdict(r) for r in rows), key=lambda r: (r["image_id"], r["instance_id"]))
    return pa.Table.from_pylist(records, schema=SCHEMA)
