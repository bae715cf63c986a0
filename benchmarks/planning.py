"""Planning a sparse petabyte image: driver time and memory of ZarrTileDatasource.

    python benchmarks/planning.py [--shape 16777216 33554432] [--chunk 512] [--workdir DIR]

Writes (metadata only: no chunk is ever written) an OME-Zarr v0.5 image of --shape
uint16 pixels with --chunk-pixel chunks and its full 2x pyramid, plus a one-row
catalog, then plans every tile of it with `ZarrTileDatasource.get_read_tasks` at level
0's pixel size and prints JSON: planning wall time (best of --repeats, without
tracemalloc), peak Python allocations during planning (tracemalloc, a separate run)
and the process's RSS. The default shape is 2**24 x 2**25 pixels, 2**50 bytes (1 PiB),
2**31 tiles of 512 x 512. Goals: under 2 s and under 1 GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import zarr  # noqa: E402

from engine.data.datasource import DEFAULT_MAX_TASKS, DEFAULT_TARGET_BYTES, ZarrTileDatasource  # noqa: E402
from engine.stores.catalog import CatalogRow, image_uri, write_catalog  # noqa: E402
from engine.stores.ngff import multiscales_v05  # noqa: E402
from engine.stores.pyramid import n_levels_for  # noqa: E402
from engine.stores.uri import resolve  # noqa: E402

PIXEL_SIZE_NM = 1.0


def make_sparse_archive(root: Path, shape: tuple[int, int], chunk: int) -> None:
    """An archive whose one image has arrays and NGFF metadata but no chunks.

    zarr + NGFF attributes are written directly: `ImageWriter` would build the pyramid.
    """
    location = resolve(root)
    group = zarr.open_group(image_uri(location, "petabyte").zarr_store(read_only=False), mode="w", zarr_format=3)
    n = n_levels_for(shape, chunk)
    h, w = shape
    for k in range(n):
        group.create_array(str(k), shape=(h, w), chunks=(chunk, chunk), dtype="uint16", fill_value=0,
                           dimension_names=["y", "x"], overwrite=True)
        h, w = (h + 1) // 2, (w + 1) // 2
    ms = multiscales_v05(name="petabyte", unit="nanometer", pixel_size=(PIXEL_SIZE_NM, PIXEL_SIZE_NM), n_levels=n,
                         centre_shift=True)
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}, "grainflow": {"modality": "SEM"}})
    write_catalog(location, [CatalogRow(
        image_id="petabyte", uri="images/petabyte.ome.zarr", modality="SEM", pixel_size_y=PIXEL_SIZE_NM,
        pixel_size_x=PIXEL_SIZE_NM, unit="nanometer", height=shape[0], width=shape[1], dtype="uint16",
        levels=n, chunk=chunk, checksum="", source="benchmarks/planning.py",
    )])


def plan(archive: Path, args) -> tuple[ZarrTileDatasource, list]:
    ds = ZarrTileDatasource(str(archive), target_pixel_size_nm=PIXEL_SIZE_NM, halo=args.halo,
                            target_bytes=args.target_bytes, max_tasks=args.max_tasks)
    return ds, ds.get_read_tasks(200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[2**24, 2**25])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--halo", type=int, default=32)
    parser.add_argument("--target-bytes", type=int, default=DEFAULT_TARGET_BYTES)
    parser.add_argument("--max-tasks", type=int, default=DEFAULT_MAX_TASKS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", type=int, nargs="*", default=[2000, 20000, 200000],
                        help="also time planning with these task caps")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gf-planning-"))
    archive = workdir / "archive"
    shape = tuple(args.shape)
    start = time.perf_counter()
    make_sparse_archive(archive, shape, args.chunk)
    create_s = time.perf_counter() - start
    files = sum(len(f) for _, _, f in os.walk(archive))

    proc = psutil.Process()
    gc.collect()
    rss_before = proc.memory_info().rss
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ds, tasks = plan(archive, args)
        times.append(time.perf_counter() - start)
        rss_after = proc.memory_info().rss
        del ds, tasks
        gc.collect()
    tracemalloc.start()
    ds, tasks = plan(archive, args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    image = ds.images()[0]
    n_tiles = sum(t.metadata.num_rows for t in tasks)
    result = {
        "benchmark": "planning",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "command": " ".join(["python", *sys.argv]),
        "image": {"shape": list(shape), "chunk": args.chunk, "dtype": "uint16", "levels": n_levels_for(shape, args.chunk),
                  "logical_bytes": shape[0] * shape[1] * 2, "logical_pib": shape[0] * shape[1] * 2 / 2**50,
                  "chunks_written": 0, "files": files, "create_s": round(create_s, 3)},
        "plan": {"level": image.grid.level, "tile": list(image.grid.tile), "halo": image.grid.halo,
                 "tiles": n_tiles, "tasks": len(tasks), "tiles_per_task": round(n_tiles / len(tasks)),
                 "target_bytes": args.target_bytes, "max_tasks": args.max_tasks,
                 "estimated_bytes": ds.estimate_inmemory_data_size()},
        "planning_s": {"best": round(min(times), 3), "all": [round(t, 3) for t in times]},
        "memory": {"tracemalloc_peak_mib": round(peak / 2**20, 1),
                   "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
                   "rss_growth_mib": round((rss_after - rss_before) / 2**20, 1),
                   "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "goals": {"planning_under_2s": min(times) < 2.0, "memory_under_1gib": peak < 2**30 and rss_after < 2**30},
    }
    # Cost follows the number of tasks, not tiles: same image, other task caps.
    scaling = []
    for cap in args.scaling:
        start = time.perf_counter()
        n = len(ZarrTileDatasource(str(archive), target_pixel_size_nm=PIXEL_SIZE_NM, halo=args.halo,
                                   target_bytes=args.target_bytes, max_tasks=cap).get_read_tasks(200))
        scaling.append({"max_tasks": cap, "tasks": n, "planning_s": round(time.perf_counter() - start, 3)})
    result["scaling"] = scaling
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
