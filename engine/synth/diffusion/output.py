"""The synthetic archive: generated samples as labelled OME-Zarr, a catalog with provenance.

Layout (an ordinary grainflow archive, engine.stores.catalog, so training reads it as
it reads any other)::

    <archive>/images/<sample_id>.ome.zarr        image + labels/defects (instance 1)
    <archive>/catalog.parquet                    the catalog columns + PROVENANCE_COLUMNS
    <archive>/ground_truth.parquet               one row per non-empty generated mask
    <archive>/synthesis.json                     the settings that fix the pixels (resume check)
    <archive>/rejects.parquet                    samples the quality gate refused, with reasons
    <archive>/gate.json                          what the gate judged (GATE_FILE; training needs it)

Images are written before the catalog row that lists them, so a sample in the catalog is
complete; the catalog is the run's ledger.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from engine.errors import GrainflowError
from engine.stores.catalog import (
    CATALOG_FILE, SCHEMA as CATALOG_SCHEMA, CatalogRow, image_uri, read_table, relative_image_path, write_table,
)
from engine.stores.uri import StoreLocation, resolve
from engine.stores.writer import ImageWriter
from engine.synth.diffusion.plan import PlannedSample
from engine.synth.truth import TRUTH_FILE, TruthRow, truth_table

SETTINGS_FILE = "synthesis.json"
REJECTS_FILE = "rejects.parquet"
GATE_FILE = "gate.json"
LABELS = "defects"  # engine.synth.image.LABELS
SOURCE = "engine.synth.diffusion"
# uint8 for optical micrographs, uint16 for electron images, as engine.synth writes them
DTYPES = {"optical": np.dtype("uint8")}
DEFAULT_DTYPE = np.dtype("uint16")

PROVENANCE_SCHEMA = pa.schema([
    ("defect_class", pa.string()), ("model_ref", pa.string()), ("model_version", pa.int64()),
    ("model_sha256", pa.string()), ("sampler", pa.string()), ("steps", pa.int32()),
    ("condition_index", pa.int32()), ("run_seed", pa.int64()), ("sample_index", pa.int32()),
    ("mask_pixels", pa.int64()), ("torch_threads", pa.int32()),
])
PROVENANCE_COLUMNS = tuple(PROVENANCE_SCHEMA.names)
# torch's thread count on CPU fixes a sample's last bits (engine.synth.diffusion.job);
# recorded since 2026-12, so archives written before lack it
OPTIONAL_PROVENANCE = ("torch_threads",)
SCHEMA = pa.schema([*CATALOG_SCHEMA, *PROVENANCE_SCHEMA])
REJECTS_SCHEMA = pa.schema([("image_id", pa.string()), ("defect_class", pa.string()), ("reason", pa.string()),
                            ("predicted_class", pa.string()), ("class_probability", pa.float64()),
                            ("kid", pa.float64())])


class SettingsMismatchError(GrainflowError):
    """An archive written with other settings than a rerun asks for."""


def to_stored(image: np.ndarray, dtype: np.dtype, intensity: tuple[float, float] | None) -> np.ndarray:
    """S x S float32 in [0, 1] (the model's normalised crop) -> S x S `dtype` pixels.

    intensity: (p1, p99) of the real crops of the sample's condition as fractions of the
    dtype's full scale (engine.synth.diffusion.intensity): 0 and 1 map onto them, the
    inverse of the per-crop normalisation the model learnt, so a sample has the grey
    levels of a real crop. None (a model saved before intensity ranges were recorded):
    [0, 1] onto the dtype's full range, as those models' archives were written.
    """
    top = np.iinfo(dtype).max
    x = np.clip(np.asarray(image, np.float64), 0.0, 1.0)
    if intensity is None:
        return np.round(x * top).astype(dtype)
    lo, hi = intensity
    return np.round(np.clip((lo + x * (hi - lo)) * top, 0, top)).astype(dtype)


def instance_mask(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a generated mask (H x W bool in, H x W bool out;
    all False for an empty mask). 8-connected so a thin diagonal crack stays one part;
    among parts of equal size the first in raster order is kept (deterministic)."""
    from scipy import ndimage

    parts, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), bool))
    if n <= 1:
        return parts == 1
    sizes = np.bincount(parts.ravel())[1:]
    return parts == 1 + int(np.argmax(sizes))


def write_sample(archive: StoreLocation, sample: PlannedSample, image: np.ndarray, mask: np.ndarray, *,
                 pixel_size_nm: float, provenance: dict[str, Any],
                 intensity: tuple[float, float] | None = None) -> tuple[dict[str, Any], TruthRow | None]:
    """Write one generated patch and its mask; return its catalog record and truth row.

    image: S x S float32 in [0, 1]; mask: S x S bool. intensity: the grey levels 0 and 1
    map onto (`to_stored`). A sample is one defect: the label image holds instance 1 on
    the mask's largest connected part (`instance_mask`), and the truth row (box, area)
    is that part's; specks elsewhere in the generated mask are dropped from both, so one
    stray pixel does not stretch the box the detector learns. The record's
    `mask_pixels` counts the instance's pixels. The truth row is None when the mask is
    empty (nothing to label).
    """
    c = sample.condition
    dtype = DTYPES.get(c.modality, DEFAULT_DTYPE)
    pixels = to_stored(image, dtype, intensity)
    mask = instance_mask(mask)
    labels = mask.astype(np.uint32)
    location = image_uri(archive, sample.sample_id)
    s = pixels.shape[0]
    attributes = {"source": SOURCE, "defect_class": c.defect_class, "material": c.material, "modality": c.modality,
                  "seed": sample.seed, **{k: v for k, v in provenance.items() if k in ("model_ref", "model_sha256")}}
    with ImageWriter(location, shape=pixels.shape, dtype=dtype, pixel_size=pixel_size_nm, unit="nanometer",
                     chunk=s, name=sample.sample_id, attributes=attributes) as writer:
        lw = writer.add_labels(LABELS, dtype="uint32", properties=[{"label-value": 1, "class": c.defect_class}])
        writer.write_tile(0, 0, pixels)
        lw.write_tile(0, 0, labels)
    info = writer.info
    row = CatalogRow(
        image_id=sample.sample_id, uri=relative_image_path(sample.sample_id), modality=c.modality,
        pixel_size_y=info.pixel_size[0], pixel_size_x=info.pixel_size[1], unit=info.unit, height=s, width=s,
        dtype=info.dtype, levels=info.levels, chunk=info.chunk, checksum=info.checksum, material=c.material,
        source=SOURCE, seed=sample.seed,
    )
    n = int(mask.sum())
    record = {**asdict(row), **provenance, "defect_class": c.defect_class, "sample_index": sample.index,
              "mask_pixels": n}
    truth = None
    if n:
        ys, xs = np.nonzero(mask)
        truth = TruthRow.of(sample.sample_id, 1, c.defect_class, (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1),
                            n, pixel_size_nm)
    return record, truth


def write_index(archive: StoreLocation, records: Iterable[dict[str, Any]], truth: Iterable[TruthRow]) -> None:
    """Replace the catalog (with provenance) and the ground truth; ground truth first, so
    every catalog entry a reader sees has its truth rows."""
    records = sorted(records, key=lambda r: r["image_id"])
    write_table(archive.join(TRUTH_FILE), truth_table(truth))
    write_table(archive.join(CATALOG_FILE), pa.Table.from_pylist(
        [{k: r.get(k) for k in SCHEMA.names} for r in records], schema=SCHEMA))


def read_provenance(archive: str | StoreLocation) -> pd.DataFrame:
    """The synthetic archive's catalog with its provenance columns (empty when none yet)."""
    archive = resolve(archive)
    location = archive.join(CATALOG_FILE)
    if not location.exists():
        return SCHEMA.empty_table().to_pandas()
    table = read_table(location)
    missing = [n for n in PROVENANCE_COLUMNS if n not in table.column_names and n not in OPTIONAL_PROVENANCE]
    if missing:
        raise GrainflowError(f"{location}: not a synthetic archive's catalog (no columns {missing})")
    frame = table.to_pandas()
    for name in OPTIONAL_PROVENANCE:
        if name not in frame.columns:
            frame[name] = None
    return frame


def read_records(archive: StoreLocation) -> list[dict[str, Any]]:
    """The catalog's rows as plain dicts (None for nulls), [] when there is no catalog."""
    location = archive.join(CATALOG_FILE)
    if not location.exists():
        return []
    table = read_table(location)
    if "model_sha256" not in table.column_names:
        raise GrainflowError(f"{location}: not a synthetic archive's catalog; write synthetic samples to a new archive")
    return table.to_pylist()


def read_truth_rows(archive: StoreLocation) -> list[TruthRow]:
    location = archive.join(TRUTH_FILE)
    if not location.exists():
        return []
    return [TruthRow(**r) for r in read_table(location).to_pylist()]


def check_settings(archive: StoreLocation, settings: dict[str, Any]) -> bool:
    """Check a rerun's `settings` (what fixes the pixels: model digest, sampler, steps,
    batch size, patch size, torch threads, device) against those recorded at the
    archive; SettingsMismatchError naming each difference. Returns whether settings
    are recorded there (False: a new archive; `record_settings` once it is known to be
    one we may write to). Writes nothing."""
    location = archive.join(SETTINGS_FILE)
    if not location.exists():
        return False
    with location.filesystem().open(location.path, "r") as f:
        old = json.load(f)
    differ = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if differ:
        def there(k, a):
            return "not recorded there" if k not in old else f"{a!r} there"

        raise SettingsMismatchError(
            f"{archive}: written with other settings ({', '.join(f'{k}: {there(k, a)}, {b!r} now' for k, (a, b) in differ.items())}); "
            "write to a new archive, or rerun with the same settings to resume")
    return True


def record_settings(archive: StoreLocation, settings: dict[str, Any]) -> None:
    """Write `settings` as the archive's SETTINGS_FILE (a new archive; check_settings first)."""
    location = archive.join(SETTINGS_FILE)
    fs = location.filesystem()
    fs.makedirs(archive.path, exist_ok=True)
    with fs.open(location.path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)


def write_rejects(archive: StoreLocation, rows: list[dict[str, Any]]) -> None:
    """The gate's refusals: image_id, defect_class, reason, predicted_class, class_probability, kid."""
    write_table(archive.join(REJECTS_FILE), pa.Table.from_pylist(
        [{k: r.get(k) for k in REJECTS_SCHEMA.names} for r in rows], schema=REJECTS_SCHEMA))


def read_rejects(archive: str | StoreLocation) -> pd.DataFrame:
    """The gate's refusals (empty when the archive was not gated or nothing was refused)."""
    location = resolve(archive).join(REJECTS_FILE)
    if not location.exists():
        return REJECTS_SCHEMA.empty_table().to_pandas()
    return read_table(location).to_pandas()


def write_gate_record(archive: StoreLocation, *, judged: dict[str, str], accepted: Iterable[str], real: str,
                      kid_unchecked: dict[str, str] | None = None) -> None:
    """What the gate judged, for training to check (engine.training.mixing): judged
    {image_id: catalog checksum} (a sample rewritten since has another checksum), the
    accepted image ids, the real archive it compared with, and {class: why} for classes
    accepted without a KID check. Written after the rejects table, so a gate
    interrupted in between leaves the archive ungated."""
    location = archive.join(GATE_FILE)
    with location.filesystem().open(location.path, "w") as f:
        json.dump({"real_archive": str(real), "judged": dict(sorted(judged.items())), "accepted": sorted(accepted),
                   "kid_unchecked": dict(kid_unchecked or {})}, f, indent=2)


def read_gate_record(archive: str | StoreLocation) -> dict[str, Any] | None:
    """The gate's record (write_gate_record), None when the archive was never gated."""
    location = resolve(archive).join(GATE_FILE)
    if not location.exists():
        return None
    with location.filesystem().open(location.path, "r") as f:
        return json.load(f)
