"""The read side of a degraded halo: tiles beside an undecodable chunk say why their
halo is smaller than planned (`halo_reduced`), so the job can keep them out of the
ledger (the whole job: tests/pipeline/test_job.py TestFailures).

Read with the datasource's own read function in this process (no Ray).
"""

from __future__ import annotations

import pyarrow as pa

from engine.data.datasource import ZarrTileDatasource
from engine.data.tile_read import read_tiles
from engine.synth.archive import generate_archive


def _blocks(archive, pixel_size_nm: float, **kwargs) -> list[pa.Table]:
    ds = ZarrTileDatasource(str(archive), target_pixel_size_nm=pixel_size_nm, **kwargs)
    return [b for spec in ds.read_specs() for b in read_tiles(spec)]


def test_neighbours_of_a_bad_chunk_name_the_sides_they_lost(tmp_path):
    """A 4 x 4 grid of one-chunk tiles, chunk (1, 2) undecodable: its owner is the error
    row; the 8 tiles around it lose the side facing it and say so; the others, and a
    run with no halo to lose, report nothing."""
    archive = tmp_path / "a"
    catalog = generate_archive(archive, n_images=1, seed=3, size=256, chunk=64)
    image_id, pixel = catalog["image_id"][0], float(catalog["pixel_size_x"][0])
    clean = _blocks(archive, pixel, halo=8)
    assert all(b.schema.field("halo_reduced").type == pa.string() for b in clean)  # typed even when all null
    assert all(b["halo_reduced"].null_count == b.num_rows for b in clean)

    (archive / "images" / f"{image_id}.ome.zarr" / "0" / "c" / "1" / "2").write_bytes(b"\x00not zstd" * 5)
    rows = pa.concat_tables(_blocks(archive, pixel, halo=8, target_bytes=10**9)).to_pylist()
    reduced = {(r["y"], r["x"]): r["halo_reduced"].split(":")[0] for r in rows if r["halo_reduced"] is not None}
    # top and bottom strips span the corners; left and right only the core's rows
    assert reduced == {(0, 64): "bottom", (0, 128): "bottom", (0, 192): "bottom",
                       (64, 64): "right", (64, 192): "left",
                       (128, 64): "top", (128, 128): "top", (128, 192): "top"}
    assert all("CorruptChunkError" in r["halo_reduced"] and "0/c/1/2" in r["halo_reduced"]
               for r in rows if r["halo_reduced"] is not None)
    owner = next(r for r in rows if (r["y"], r["x"]) == (64, 128))
    assert owner["error"].startswith("CorruptChunkError") and owner["halo_reduced"] is None
    by_key = {(r["y"], r["x"]): r for r in rows}
    assert list(by_key[(128, 128)]["halo"]) == [0, 8, 8, 8]

    no_halo = pa.concat_tables(_blocks(archive, pixel, halo=0)).to_pylist()
    assert all(r["halo_reduced"] is None for r in no_halo)
