"""Reprocessing against its peers: the job, Ray's own read_zarr, and a dask pipeline.

    python benchmarks/reprocess_peers.py [--preset tiny] [--images 4] [--size 1024] [--rounds 2]
        [--workers 2] [--threads 1] [--batch-size 4] [--variants grainflow ray_read_zarr dask]
        [--zarr2-site DIR] [--workdir DIR]

Goal (issue 4): the job's end-to-end tiles/s >= 1.2 x the faster of two peers on the same
archive, the same models and the same CPU budget.

Set-up, once (`benchmarks.reprocess.prepare`, as the efficiency benchmark does): a
synthetic archive (OME-Zarr v0.5, chunks of the tile size), the preset's members with
seeded random weights registered as a bundle, and every tile the job plans read by the
datasource's own reader. The bundle has no pixel-size tag, so the job reads every
image at its level 0 (checked here: every planned tile is level 0). Then:

- a Zarr v2 copy of each image's level 0 for read_zarr (written by zarr 3 as
  ``zarr_format=2``, same chunks, same codec: zstd level 0), one array per image in one
  store, with `halo` rows of zeros on top (why: see ray_read_zarr below);
- the peers' tiles are checked against the job's (the ray_read_zarr strips cut as its
  UDF cuts them, read from the copy; the dask blocks as `dask.array.overlap` makes
  them): same pixels, dtype, halo and origin for every tile, so the three variants feed
  the ensemble the same inputs.

Variants, each run in a fresh child process, order rotating from round to round:

- grainflow: `benchmarks.reprocess.run_job` (ray.init(num_cpus=W + 2), then
  engine.pipeline.job.reprocess(concurrency=W, batch_size=B) end to end: plan, describe,
  read, ensemble actors, every output written: per-tile detections, label images,
  ledger, stitched objects, label pyramids, summary).
- ray_read_zarr: the same Ray (W + 2 logical CPUs), then ``ray.data.read_zarr(copy,
  array_paths=<images of one height>, align_axis_0=True, chunk_shapes=[T],
  overlap=2 * halo)``: one row per strip of T rows, a column per image holding the strip
  at full width plus 2 * halo rows below (read_zarr has no 2-D halo: its overlap only
  extends axis 0 forward; the zero rows on top of the copy turn that forward overlap
  into a halo above and below the core). ``map_batches`` cuts each strip into the job's
  tiles (core T x T, halo clipped at the image's edge, the job's origin/scale/halo
  columns, tiles in the job's common dtype), then ``map_batches(JobEnsemble,
  ActorPoolStrategy(size=W), batch_size=B)`` (the job's own UDF class: the ensemble
  plus its per-image dtype cast; given the bundle resolved once on the driver,
  `engine.pipeline.bundle.pin_bundle`, as the job gives its actors), then
  ``write_parquet`` of every result row (detections, measurements, core label and class
  masks as tensor columns). ray.data.read_zarr needs
  zarr-python 2 (the venv has zarr 3): this variant's driver and its read tasks (through
  read_zarr's ``runtime_env``) get zarr 2.18 and numcodecs 0.15 first on their path from
  `--zarr2-site` (pip-installed there from PyPI on first use); the ensemble actors keep
  the venv's zarr 3, which the engine imports.
- dask: in the style of Cellpose's distributed segmentation (``distributed_eval``: a
  dask.distributed LocalCluster, a block per tile, overlap as the halo, each block runs
  the model and writes its segmentation to Zarr): LocalCluster(n_workers=W,
  threads_per_worker=1, processes), ``dask.array.from_zarr`` on each image's level 0
  (the archive itself, zarr 3), ``map_overlap(depth=halo, boundary="none", trim=False)``
  calling the same Ensemble on each block (one tile per call; Cellpose also runs one
  block at a time), each block writing its detections as a Parquet file, and
  ``da.store`` writing the core labels into a Zarr array per image. Unlike Cellpose,
  which builds its model in every block, each worker builds the ensemble once (cached
  in the worker, from the bundle resolved once on the client, as the job's actors
  are), which favours this peer. Without the `distributed` package the
  multiprocessing scheduler (W processes) runs the same graph.

Timing: each variant from its first call to its last output written; the cluster (Ray,
or dask's LocalCluster) is already up, as when a job is submitted to one; model loading
(actor start-up, or the first block on each dask worker) is inside. The peers write
less than the job (no stitching, objects table, label pyramid, ledger or summary),
which favours them.

Same CPU budget: W model processes (actors, dask workers) with T torch threads each,
OMP/MKL threads T, the same niceness (RAY_worker_niceness), the same cores.

Figures: tiles/s per run; "ratio" = median grainflow / median of the faster peer (the
goal's figure); and, because the wall clock of a shared machine also measures its
neighbours, CPU seconds per tile of each variant's process tree (`TreeCpuMeter`) with
"cpu_ratio" = the peer's / grainflow's (for the peer faster by wall clock). Detections
per tile are reported for each variant: equal counts show the same work was done.
One JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import (  # noqa: E402
    ParentRun, command_line, load_average, machine, run_child, run_parent,
)

from benchmarks.reprocess import PRESETS, TreeCpuMeter, _config, _registry, job_pixel_size  # noqa: E402

VARIANTS = ("grainflow", "ray_read_zarr", "dask")
GOAL = 1.2
COPY = "zarr_v2_copy.zarr"
# ray.data.read_zarr (Ray 2.60) refuses zarr >= 3; zarr 2.18 does not import with numcodecs >= 0.16.
ZARR2_PINS = ("zarr==2.18.7", "numcodecs==0.15.1", "asciitree", "fasteners")
# engine.data.tile_read.COLUMNS, not imported where zarr 2 is (that module imports zarr 3's API)
TILE_COLUMNS = ("image_id", "level", "y", "x", "tile", "halo", "origin", "scale", "pixel_size", "pixel_size_y",
                "modality", "error")
DEFAULT_ZARR2_SITE = Path.home() / ".cache" / "grainflow" / "bench-zarr2-site"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--images", type=int, default=None, help="images in the archive (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="image edge in pixels (default: the preset's)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, order rotating")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--workers", type=int, default=2, help="model processes: actors / dask workers (W)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per model process (T)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per ensemble call (job and ray_read_zarr)")
    p.add_argument("--conf", type=float, default=0.001, help="detector score threshold")
    p.add_argument("--max-det", type=int, default=None, help="boxes per tile (default: the preset's)")
    p.add_argument("--niceness", type=int, default=0, help="niceness of every model process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zarr2-site", type=Path, default=DEFAULT_ZARR2_SITE,
                   help="folder with zarr 2 for ray.data.read_zarr (pip-installed there when missing)")
    p.add_argument("--workdir", type=Path, default=None, help="archives, registry, outputs (default: temporary)")
    p.add_argument("--run-variant", default=None, help=argparse.SUPPRESS)  # child process: one run
    return p.parse_args(argv)


# ---------------------------------------------------------------- set-up

def zarr2_site(path: Path) -> Path:
    """A folder holding zarr 2 (and a numcodecs it imports with), to go first on the
    PYTHONPATH of the ray_read_zarr processes; installed from PyPI when missing."""
    path = path.expanduser().resolve()
    check = [sys.executable, "-c", "import zarr, sys; sys.exit(0 if zarr.__version__.startswith('2.') else 1)"]
    env = {**os.environ, "PYTHONPATH": str(path)}
    if subprocess.run(check, env=env, capture_output=True).returncode != 0:
        print(f"reprocess peers: installing {' '.join(ZARR2_PINS)} into {path} (for ray.data.read_zarr)",
              file=sys.stderr, flush=True)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                        str(path), *ZARR2_PINS], check=True, stdout=sys.stderr)
        subprocess.run(check, env=env, check=True)
    return path


def plan_images(archive: Path, tile: int, halo: int) -> list[dict]:
    """What the job plans, per image (the datasource, metadata only): the level-0 array,
    its shape and chunks, the stored and delivered dtypes, pixel size, modality, tiles."""
    import math

    from engine.data.datasource import ZarrTileDatasource
    from engine.stores.catalog import read_catalog

    catalog = read_catalog(str(archive))
    stored = dict(zip(catalog["image_id"], catalog["dtype"]))
    source = ZarrTileDatasource(str(archive), target_pixel_size_nm=job_pixel_size(archive), tile_size=tile,
                                halo=halo, tolerance=math.inf)
    images = []
    for im in source.images():
        g = im.grid
        if g.level != 0 or im.output is not None or tuple(g.tile) != (tile, tile):
            raise SystemExit(f"{im.image_id}: the job plans level {g.level}, tile {g.tile}, resampled "
                             f"{im.output is not None}; this benchmark compares level-0 tiles of {tile} px")
        images.append({"image_id": im.image_id, "array": str(Path(im.location.path) / "0"), "shape": list(g.shape),
                       "chunks": list(g.chunks), "dtype": str(stored[im.image_id]), "tile_dtype": im.tile_dtype,
                       "pixel_size_nm": float(im.pixel_size_nm), "modality": im.modality, "n_tiles": im.n_tiles})
    return images


def write_v2_copy(images: list[dict], path: Path, halo: int) -> float:
    """Each image's level 0 as array `<image_id>` of a Zarr v2 store: same chunks and
    codec, `halo` zero rows on top. Returns seconds taken."""
    import numcodecs
    import zarr

    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for im in images:
        src = zarr.open_array(im["array"], mode="r")
        (h, w), (ch, cw) = im["shape"], im["chunks"]
        dst = root.create_array(im["image_id"], shape=(h + halo, w), chunks=(ch, cw), dtype=im["dtype"],
                                fill_value=0, compressors=numcodecs.Zstd(level=0))
        for y in range(0, h, ch):
            dst[halo + y : halo + min(y + ch, h), :] = src[y : min(y + ch, h), :]
    return time.perf_counter() - t0


def strip_tiles(row: dict, *, images: dict[str, dict], tile: int, halo: int) -> list[dict]:
    """ray_read_zarr: one aligned read_zarr row (``t_start``, ``t_stop`` in
    rows of the padded copy; one strip per image column, rows [t_start, t_start + T +
    2 * halo) of the copy) -> the job's tile rows (`engine.data.tile_read` columns).

    Copy row r is image row r - halo, so strip k holds image rows [kT - halo, (k+1)T +
    halo): core row k of the job's grid with its halo (the zero rows cut off at the top).
    """
    import numpy as np

    t0 = int(row["t_start"])
    out = []
    for image_id, im in images.items():
        if image_id not in row:
            continue
        h, w = im["shape"]
        y = t0  # core's first image row (strip k starts at copy row kT = image row kT - halo)
        if y >= h:
            continue  # the copy's last strip holds only rows of the previous core's halo
        strip = np.asarray(row[image_id])
        top = min(halo, y)
        core_h = min(tile, h - y)
        bottom = min(halo, h - y - core_h)
        first = halo - top  # strip row of image row y - top
        band = strip[first : first + top + core_h + bottom]
        dtype = np.dtype(im["tile_dtype"])
        for x in range(0, w, tile):
            left = min(halo, x)
            core_w = min(tile, w - x)
            right = min(halo, w - x - core_w)
            out.append({
                "image_id": image_id, "level": np.int32(0), "y": np.int64(y), "x": np.int64(x),
                "tile": np.ascontiguousarray(band[:, x - left : x + core_w + right], dtype=dtype),
                "halo": np.asarray((top, bottom, left, right), np.int32),
                "origin": np.asarray((y - top, x - left), np.float64), "scale": np.ones(2, np.float64),
                "pixel_size": im["pixel_size_nm"], "pixel_size_y": im["pixel_size_nm"],  # square pixels
                "modality": im["modality"], "error": None,
            })
    return out


def strips_to_tiles(batch: dict, *, images: dict[str, dict], tile: int, halo: int):
    """ray_read_zarr's map_batches adapter: a batch of read_zarr rows -> a block of the
    job's tile rows (`strip_tiles` per row). A block, not flat_map's dicts, so that the
    all-null `error` column is typed string, as the job's datasource types it (left to
    Ray it becomes float32 NaN, which the ensemble takes for an error message)."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    rows = []
    for i in range(len(batch["t_start"])):
        rows += strip_tiles({k: v[i] for k, v in batch.items()}, images=images, tile=tile, halo=halo)
    table = BlockAccessor.batch_to_block({name: [r[name] for r in rows] for name in TILE_COLUMNS})
    return table.set_column(table.schema.get_field_index("error"), "error", pa.array([None] * len(rows), pa.string()))


def block_placement(block_id: tuple[int, int], block_shape: tuple[int, int], shape, tile: int, halo: int):
    """dask: where an overlapped block (boundary "none": no halo past the image's edge)
    lies. Returns (y, x) of the core's corner and its (top, bottom, left, right) halo."""
    i, j = block_id
    y, x = i * tile, j * tile
    top, left = min(halo, y), min(halo, x)
    core_h, core_w = min(tile, shape[0] - y), min(tile, shape[1] - x)
    return (y, x), (top, block_shape[0] - top - core_h, left, block_shape[1] - left - core_w)


def check_inputs(cfg: dict) -> dict:
    """Every peer tile equals the job's (pixels, dtype, halo, origin); raises otherwise."""
    import pickle

    import dask
    import dask.array as da
    import numpy as np
    import zarr

    want = {}
    with open(cfg["tiles_path"], "rb") as f:
        for batch in pickle.load(f):
            for i in range(len(batch["image_id"])):
                key = (str(batch["image_id"][i]), int(batch["y"][i]), int(batch["x"][i]))
                want[key] = (batch["tile"][i], tuple(int(v) for v in batch["halo"][i]),
                             tuple(float(v) for v in batch["origin"][i]))
    stored = {im["image_id"]: np.dtype(im["dtype"]) for im in cfg["images"]}
    tile, halo = cfg["tile"], cfg["halo"]

    def same(kind, key, pixels, h, origin):
        ref = want.get(key)
        if ref is None or not (ref[1] == tuple(h) and ref[2] == tuple(origin) and ref[0].dtype == pixels.dtype
                               and np.array_equal(ref[0], pixels)):
            raise SystemExit(f"{kind}: tile {key} differs from the job's (halo {tuple(h)} vs "
                             f"{None if ref is None else ref[1]})")

    # ray_read_zarr: strips as read_zarr builds them, from the copy (read here by zarr 3)
    root = zarr.open_group(cfg["copy"], mode="r")
    images = {im["image_id"]: im for im in cfg["images"]}
    n_ray = 0
    for image_id, im in images.items():
        arr = root[image_id]
        for t0 in range(0, arr.shape[0], tile):
            row = {"t_start": t0, "t_stop": min(t0 + tile, arr.shape[0]),
                   image_id: arr[t0 : min(t0 + tile + 2 * halo, arr.shape[0])]}
            for r in strip_tiles(row, images={image_id: im}, tile=tile, halo=halo):
                pixels = r["tile"].astype(stored[image_id], copy=False)  # as JobEnsemble casts
                same("ray_read_zarr", (image_id, int(r["y"]), int(r["x"])), pixels, r["halo"], r["origin"])
                n_ray += 1
    # dask: the overlapped blocks map_overlap hands to its function
    n_dask = 0
    with dask.config.set(scheduler="synchronous"):
        for im in cfg["images"]:
            arr = da.from_zarr(im["array"])
            over = da.overlap.overlap(arr, depth=halo, boundary="none")
            for i in range(over.numblocks[0]):
                for j in range(over.numblocks[1]):
                    block = over.blocks[i, j].compute()
                    (y, x), h = block_placement((i, j), block.shape, im["shape"], tile, halo)
                    same("dask", (im["image_id"], y, x), block, h, (y - h[0], x - h[2]))
                    n_dask += 1
    if not n_ray == n_dask == len(want):
        raise SystemExit(f"tiles: job {len(want)}, ray_read_zarr {n_ray}, dask {n_dask}")
    return {"tiles_compared": len(want), "identical": True}


def prepare(args, work: Path) -> dict:
    """The efficiency benchmark's set-up (archive, bundle, the job's tiles), the plan per
    image, the Zarr v2 copy, and the check that the peers' tiles are the job's."""
    from benchmarks.reprocess import prepare as prepare_job

    cfg = prepare_job(args, args.preset, work)
    images = plan_images(Path(cfg["archive"]), cfg["tile"], cfg["halo"])
    if sum(im["n_tiles"] for im in images) != cfg["n_tiles"]:
        raise SystemExit("plan and tiles disagree")
    root = work / args.preset
    copy = root / COPY
    copy_s = write_v2_copy(images, copy, cfg["halo"])
    cfg.update({"images": images, "copy": str(copy), "outputs_root": str(root / "outputs")})
    t0 = time.perf_counter()
    checked = check_inputs(cfg)
    cfg["describe"].update({
        "images": [{k: im[k] for k in ("image_id", "shape", "dtype", "modality", "pixel_size_nm", "n_tiles")}
                   for im in images],
        "level_read": 0,
        "zarr_v2_copy": {"chunks": images[0]["chunks"] if images else None, "codec": "zstd level 0",
                         "zero_rows_on_top": cfg["halo"], "written_s": round(copy_s, 2)},
        "inputs_check": {**checked, "seconds": round(time.perf_counter() - t0, 1)},
    })
    return cfg


# ---------------------------------------------------------------- the variants (child processes)

def run_grainflow(cfg: dict) -> dict:
    """`benchmarks.reprocess.run_job`, plus the detections it kept (per tile, before stitching)."""
    from benchmarks.reprocess import run_job
    from engine.data.sinks import DETECTIONS, read_output

    rec = run_job(cfg)
    rec["detections"] = read_output(cfg["out"], DETECTIONS).num_rows
    rec["detections_per_tile"] = round(rec["detections"] / rec["tiles"], 3)
    return rec


def run_ray_read_zarr(cfg: dict) -> dict:
    """One run of the read_zarr pipeline on a fresh local Ray of W + 2 logical CPUs."""
    import numpy as np
    import pyarrow.dataset as pds
    import ray

    # zarr 2 for read_zarr here (the driver plans the reads) and in the read tasks (their
    # runtime_env); the ensemble actors keep the venv's zarr 3, which the engine imports.
    sys.path.insert(0, cfg["zarr2_site"])
    import zarr

    if not zarr.__version__.startswith("2."):
        raise SystemExit(f"ray_read_zarr: needs zarr 2 from {cfg['zarr2_site']}, got zarr {zarr.__version__}")
    read_env = {"env_vars": {"PYTHONPATH": os.pathsep.join([cfg["zarr2_site"], os.environ.get("PYTHONPATH", "")])}}

    from benchmarks.reprocess import _torch_threads
    from engine.pipeline.bundle import pin_bundle
    from engine.pipeline.job_ensemble import JobEnsemble

    out = cfg["out"]
    shutil.rmtree(out, ignore_errors=True)
    temp_dir = tempfile.mkdtemp(prefix="gf", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(address="local", num_cpus=cfg["workers"] + 2, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir)
    try:
        threads = ray.get(ray.remote(num_cpus=1)(_torch_threads).remote())
        registry = _registry(cfg)
        images = {im["image_id"]: im for im in cfg["images"]}
        dtypes = {im["image_id"]: im["dtype"] for im in cfg["images"] if im["dtype"] != im["tile_dtype"]}
        by_height: dict[int, list[str]] = {}
        for im in cfg["images"]:
            by_height.setdefault(im["shape"][0], []).append(im["image_id"])
        meter, t0 = TreeCpuMeter(os.getpid()).start(), time.perf_counter()
        bundle = pin_bundle(cfg["bundle"], registry)  # as the job hands its actors the resolved bundle
        ds = None
        for ids in by_height.values():  # align_axis_0 needs arrays of one height
            part = ray.data.read_zarr(cfg["copy"], array_paths=ids, align_axis_0=True, chunk_shapes=[cfg["tile"]],
                                      overlap=2 * cfg["halo"], runtime_env=read_env)
            part = part.map_batches(strips_to_tiles, batch_size=None, batch_format="numpy", fn_kwargs={
                "images": {i: images[i] for i in ids}, "tile": cfg["tile"], "halo": cfg["halo"]})
            ds = part if ds is None else ds.union(part)
        ds = ds.map_batches(JobEnsemble, fn_constructor_kwargs={
            "bundle": bundle, "registry": registry, "config": _config(cfg), "dtypes": dtypes, "params": None},
            batch_size=cfg["batch_size"], batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg["workers"]),
            num_gpus=0)
        ds.write_parquet(out)
        wall, cpu = time.perf_counter() - t0, meter.stop()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    table = pds.dataset(out, format="parquet").to_table(columns=["error", "n_defects"])
    n = table.num_rows
    # an all-null error column comes back from Arrow as float NaN: no error
    errors = [e for e in table.column("error").to_pylist() if e is not None and not (isinstance(e, float) and e != e)]
    if errors or n != cfg["n_tiles"]:
        raise SystemExit(f"ray_read_zarr: {len(errors)} tile errors {errors[:2]}, {n} tiles of {cfg['n_tiles']}")
    det = int(np.sum(table.column("n_defects").to_numpy()))
    return {"tiles": n, "wall_s": round(wall, 2), "tiles_per_s": round(n / wall, 3), "tree_cpu_s": round(cpu, 2),
            "tree_processes": meter.processes, "cpu_s_per_tile": round(cpu / n, 4), "detections": det,
            "detections_per_tile": round(det / n, 3), "ray_worker_torch_threads": threads,
            "output_bytes": sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()),
            "cpu_s_by_process": meter.by_title()}


_ENSEMBLES: dict[str, object] = {}


def _worker_ensemble(cfg: dict):
    """The ensemble of this dask worker process, built on its first block."""
    key = cfg["bundle"]
    if key not in _ENSEMBLES:
        import torch

        from engine.pipeline import Ensemble

        torch.set_num_threads(cfg["threads"])
        _ENSEMBLES[key] = Ensemble.from_registry(cfg["pinned"], _registry(cfg), config=_config(cfg), device="cpu")
    return _ENSEMBLES[key]


def dask_block(block, *, image: dict, cfg: dict, out: str, block_id=None):
    """dask's map_overlap function: one overlapped block (a tile with its halo) through
    the ensemble; its detections to ``<out>/detections/<image>/<y>_<x>.parquet``; returns
    the core's label image (uint32, the core's shape), which `da.store` writes to Zarr."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.pipeline.ensemble import TileInput

    ens = _worker_ensemble(cfg)
    (y, x), halo = block_placement(block_id, block.shape, image["shape"], cfg["tile"], cfg["halo"])
    tile = TileInput(image_id=image["image_id"], tile=np.asarray(block), pixel_size_nm=image["pixel_size_nm"],
                     level=0, y=y, x=x, halo=halo, origin=(y - halo[0], x - halo[2]), scale=(1.0, 1.0),
                     modality=image["modality"])
    r = ens.analyze([tile])[0]
    if r.error is not None:
        raise RuntimeError(f"{image['image_id']} tile ({y}, {x}): {r.error}")
    b = r.boxes_level0.reshape(-1, 4)
    n = len(r.scores)
    table = pa.table({
        "image_id": [r.image_id] * n, "y": np.full(n, y, np.int64), "x": np.full(n, x, np.int64),
        "class": r.classes, "score": r.scores, "x0": b[:, 0], "y0": b[:, 1], "x1": b[:, 2], "y1": b[:, 3],
        "mask_score": r.mask_scores, "area_nm2": r.area_nm2, "equivalent_diameter_nm": r.equivalent_diameter_nm,
        "aspect_ratio": r.aspect_ratio, "orientation_deg": r.orientation_deg,
        "material": [r.material] * n, "grade": [r.grade] * n,
    })
    path = Path(out) / "detections" / image["image_id"]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / f"{y}_{x}.parquet")
    return np.ascontiguousarray(r.core_labels, np.uint32)


def _worker_torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_dask(cfg: dict) -> dict:
    """One run of the dask pipeline: a LocalCluster of W single-threaded worker
    processes (or the multiprocessing scheduler without `distributed`)."""
    import logging

    import dask
    import dask.array as da
    import numpy as np
    import pyarrow.dataset as pds
    import zarr

    import benchmarks.reprocess_peers as mod  # by reference, so the workers' ensemble cache is the module's
    from engine.pipeline.bundle import pin_bundle

    out = cfg["out"]
    shutil.rmtree(out, ignore_errors=True)
    Path(out).mkdir(parents=True)
    client = cluster = threads = None
    try:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=cfg["workers"], threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
        scheduler = f"distributed LocalCluster({cfg['workers']} worker processes x 1 thread)"
    except ImportError:
        dask.config.set(scheduler="processes", num_workers=cfg["workers"])
        scheduler = f"multiprocessing ({cfg['workers']} processes; distributed not installed)"
    try:
        meter, t0 = TreeCpuMeter(os.getpid()).start(), time.perf_counter()
        # the bundle resolved once, as the job hands it to its actors
        cfg = {**cfg, "pinned": pin_bundle(cfg["bundle"], _registry(cfg))}
        sources, targets = [], []
        for im in cfg["images"]:
            arr = da.from_zarr(im["array"])
            sources.append(da.map_overlap(mod.dask_block, arr, depth=cfg["halo"], boundary="none", trim=False,
                                          dtype=np.uint32, chunks=arr.chunks, meta=np.empty((0, 0), np.uint32),
                                          image=im, cfg=cfg, out=out))
            targets.append(zarr.create_array(str(Path(out) / "labels" / f"{im['image_id']}.zarr"),
                                             shape=tuple(im["shape"]), chunks=tuple(im["chunks"]), dtype="uint32",
                                             fill_value=0, zarr_format=3))
        da.store(sources, targets, lock=False)
        wall, cpu = time.perf_counter() - t0, meter.stop()
        if client is not None:
            threads = sorted(set(client.run(mod._worker_torch_threads).values()))
    finally:
        if client is not None:
            client.close()
            cluster.close()
    files = list((Path(out) / "detections").rglob("*.parquet"))
    n = len(files)
    if n != cfg["n_tiles"]:
        raise SystemExit(f"dask: {n} tiles of {cfg['n_tiles']}")
    det = pds.dataset([str(f) for f in files], format="parquet").count_rows()
    return {"tiles": n, "wall_s": round(wall, 2), "tiles_per_s": round(n / wall, 3), "tree_cpu_s": round(cpu, 2),
            "tree_processes": meter.processes, "cpu_s_per_tile": round(cpu / n, 4), "detections": det,
            "detections_per_tile": round(det / n, 3), "scheduler": scheduler, "worker_torch_threads": threads,
            "output_bytes": sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()),
            "cpu_s_by_process": meter.by_title()}


RUNNERS = {"grainflow": run_grainflow, "ray_read_zarr": run_ray_read_zarr, "dask": run_dask}


def child(cfg: dict) -> None:
    """--run-variant: one run, its record as JSON on the last line of stdout."""
    from engine.runtime import configure_offline

    configure_offline()
    record = RUNNERS[cfg["variant"]](cfg)
    record["load_1m_after"] = load_average()["load_1m"]
    sys.stdout.write("\n" + json.dumps(record) + "\n")


# ---------------------------------------------------------------- orchestration

def run_variant(cfg: dict, variant: str, env: dict, zarr2: Path) -> dict:
    cfg = {**cfg, "variant": variant, "out": str(Path(cfg["outputs_root"]) / variant), "zarr2_site": str(zarr2)}
    return run_child(__file__, "--run-variant", cfg, env, f"reprocess peers: {variant}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_variant is not None:
        child(json.loads(args.run_variant))
        return {}
    command = command_line(argv)
    variants = list(dict.fromkeys(args.variants))
    zarr2 = zarr2_site(args.zarr2_site) if "ray_read_zarr" in variants else args.zarr2_site
    return run_parent(args.workdir, "gf-reprocess-peers-", threads=args.threads, niceness=args.niceness,
                      measure=lambda run: measure(args, run, command, variants, zarr2))


def measure(args, run: ParentRun, command: str, variants: list[str], zarr2: Path) -> dict:
    """Every variant's runs, rounds rotating the order; the report."""
    cfg = prepare(args, run.work)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    rounds = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for variant in order:
            runs[variant].append(run_variant(cfg, variant, run.env, zarr2))
        rounds.append({"order": order, **{f"{v}_tiles_per_s": runs[v][-1]["tiles_per_s"] for v in variants}})

    def med(variant: str, key: str) -> float:
        return round(statistics.median(rec[key] for rec in runs[variant]), 4)

    report = {
        "benchmark": "reprocess_peers", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(run.load_start),
        "budget": {"model_processes": args.workers, "torch_threads_each": args.threads,
                   "ray_logical_cpus": args.workers + 2, "dask_threads_per_worker": 1, "niceness": args.niceness},
        "setup": {"preset": args.preset, **cfg["describe"]},
        "rounds": args.rounds,
        "tiles_per_s": {v: med(v, "tiles_per_s") for v in variants},
        "cpu_s_per_tile": {v: med(v, "cpu_s_per_tile") for v in variants},
        "detections_per_tile": {v: med(v, "detections_per_tile") for v in variants},
    }
    peers = [v for v in variants if v != "grainflow"]
    if "grainflow" in variants and peers:
        faster = max(peers, key=lambda v: report["tiles_per_s"][v])
        report.update({
            "faster_peer": faster, "goal": GOAL,
            "ratio": round(report["tiles_per_s"]["grainflow"] / report["tiles_per_s"][faster], 3),
            "cpu_ratio": round(report["cpu_s_per_tile"][faster] / report["cpu_s_per_tile"]["grainflow"], 3),
            "ratio_per_round": [round(rd["grainflow_tiles_per_s"] / max(rd[f"{p}_tiles_per_s"] for p in peers), 3)
                                for rd in rounds],
            "job_tile_stage_tiles_per_s": med("grainflow", "tile_stage_tiles_per_s"),
            "job_stage_seconds_median": {
                k: round(statistics.median(rec["stage_seconds"][k] for rec in runs["grainflow"]), 2)
                for k in runs["grainflow"][0]["stage_seconds"]},
        })
        report["met"] = report["ratio"] >= GOAL
    report.update({
        "outputs": {
            "grainflow": "everything the job writes: per-tile detections and label cores, ledger, stitched objects, "
                         "tiles table, label pyramids, summary",
            "ray_read_zarr": "one Parquet dataset of every result row (detections, measurements, core label and "
                             "class masks as tensor columns); no stitching, label image, ledger or summary",
            "dask": "per-tile detections Parquet and a Zarr label image (level 0 only) per image; no stitching, "
                    "class masks, ledger or summary"},
        "rounds_detail": rounds, "runs": runs, "total_seconds": run.seconds(),
    })
    return report


if __name__ == "__main__":
    main()
