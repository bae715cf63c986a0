"""Peak memory of the reprocessing job on a 1 GiB and an 8 GiB archive.

    python benchmarks/reprocess_memory.py [--small 2x16384] [--large 4x32768] [--level 2]
        [--chunk 512] [--halo 32] [--motif 2048] [--workers 2] [--batch-size 4] [--rounds 1]
        [--workdir DIR]

Goal (issue 4): the job's peak memory on archives of 1 GiB and 8 GiB (level-0 pixel
data) differs by < 20%: memory is bounded by the plan's tasks and blocks, not by the
archive's size.

Archives (IMAGESxEDGE: square uint16 images, so 2x16384 is exactly 1 GiB at level 0 and
4x32768 exactly 8 GiB: twice the images, four times the pixels each). Rendering 8 GiB of
procedural pixels would take about 18 CPU-minutes here (4 MP per CPU-second), so each
image is written from a rendered motif: `engine.synth` plans one image per archive image (SEM and TEM
materials, uint16) at the motif's size and renders it (`render_region`, `--motif` px
square, a multiple of the chunk); level 0 is that motif repeated over the whole image,
written with the engine's OME-Zarr writer (`engine.stores.writer.ImageWriter`: zstd
chunks of `--chunk` px, sha256 checksum), which then builds the real pyramid from the
written level 0; then the catalog (`engine.stores.catalog.write_catalog`). No ground
truth is written (the job does not read it). Every chunk is real, compressed, on disk.
Every image gets the same level-0 pixel size (`--pixel-size`, nm; the pixels were
rendered at the plan's own pixel size) so that one target pixel size selects one level
in all of them. Writing both takes about 2 minutes on 2 cores (an image per process);
archives are reused from `--workdir` when their spec matches.

The job reads pyramid level `--level` (target pixel size = level-0 size x 2**level, so
each image is read at exactly that level, no resampling): running the ensemble over
every level-0 tile of 8 GiB (16,384 tiles of 512 px) would take hours on 2 CPU cores.
At any level the large archive has 8x the small one's tiles and bytes (at level 2 with
the defaults: 1,024 tiles, 512 MiB, against 128 tiles, 64 MiB), so the comparison is
still of 8x the work, at a level where the job finishes in minutes (about 4 on the
large archive here).
Models: the `tiny` preset of benchmarks/reprocess.py (yolov8n_tiny + sam_tiny +
resnet10t, seeded random weights, conf 0.001, max_det 8), tiles of one chunk with a
32-px halo, batch 4, 2 actors.

Each run, in a fresh child process: a `TreeMemoryMeter` starts on the child before
ray.init and samples every `--interval` s the resident memory of the child and all its
descendants (Ray's GCS, raylet, agents, read/sink task workers, the ensemble actors):
the sum of RSS (counts shared pages once per process: torch's libraries and Ray's
object store pages in every process that maps them) and the sum of PSS (each shared
page divided among its sharers: the tree's real footprint, the goal's figure); then
ray.init(num_cpus=W + 2), then `engine.pipeline.job.reprocess` end to end (every
output written), then ray.shutdown. Reported: the peaks over the run, the tree's
memory just before `reprocess` (Ray and its idle workers) and the peak above it, the
driver's own peak RSS, the processes holding the most at the peak (PSS and count by
process title), when the peak came (seconds after `reprocess` was called; compare the
job's stage_seconds: plan, prepare, tiles, finish), about 40 points of the tree's PSS
over the run, tiles planned and done. A peak between two samples is missed (at most
`--interval` s long).

Prints one JSON object: "ratio" = large / small peak tree PSS (goal: within 1 +- 0.2),
also for RSS and for the peak above the pre-job baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import (  # noqa: E402
    ParentRun, command_line, load_average, machine, run_child, run_parent,
)

from benchmarks.reprocess import BUNDLE, PRESETS, TreeCpuMeter, _title, build_models  # noqa: E402

GOAL = 0.2  # |large / small - 1| below this
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", default="2x16384", help="IMAGESxEDGE of the small archive (uint16: 2x16384 = 1 GiB)")
    p.add_argument("--large", default="4x32768", help="IMAGESxEDGE of the large archive (uint16: 4x32768 = 8 GiB)")
    p.add_argument("--level", type=int, default=2, help="pyramid level the job reads")
    p.add_argument("--chunk", type=int, default=512, help="chunk edge in pixels (also the tile core)")
    p.add_argument("--halo", type=int, default=32)
    p.add_argument("--motif", type=int, default=2048, help="rendered motif edge (a multiple of --chunk)")
    p.add_argument("--pixel-size", type=float, default=10.0, help="level-0 pixel size of every image, nm")
    p.add_argument("--workers", type=int, default=2, help="ensemble actors (W)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per actor")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--max-det", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="runs per archive, small then large")
    p.add_argument("--object-store-gib", type=float, default=None,
                   help="Ray's object store size (default: Ray's, 30%% of RAM); its pages count in PSS once "
                        "the processes that map them have touched them")
    p.add_argument("--interval", type=float, default=0.25, help="memory sampling interval, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="archives, registry, outputs (default: temporary)")
    p.add_argument("--run-job", default=None, help=argparse.SUPPRESS)  # child process: one run
    return p.parse_args(argv)


def _shape(spec: str) -> tuple[int, int]:
    n, edge = (int(v) for v in spec.lower().split("x"))
    return n, edge


# ---------------------------------------------------------------- measuring

class TreeMemoryMeter(TreeCpuMeter):
    """`benchmarks.reprocess.TreeCpuMeter` (CPU seconds of a process tree) that also
    samples the tree's memory: at each sample the sums of RSS and PSS (psutil
    ``memory_full_info``: /proc/<pid>/smaps_rollup) over the process and its
    descendants, and the root's own RSS; keeps the peaks and, at the PSS peak, the PSS
    by process title."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(pid, interval)
        self.peak = {"tree_rss": 0, "tree_pss": 0, "root_rss": 0}
        self.peak_pss_by_title: dict[str, list[int]] = {}  # title -> [PSS bytes, processes]
        self.peak_processes = 0
        self.peak_at = 0.0
        self.series: list[tuple[float, int, int]] = []  # (seconds since start, tree PSS, processes)
        self.samples = 0
        self.last: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self._lock = threading.RLock()  # the sampling thread and now() both sample

    def _sample(self, born_before: bool) -> None:
        with self._lock:
            super()._sample(born_before)
            self._sample_memory()

    def _sample_memory(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = root_rss = 0
        by_title: dict[str, list[int]] = {}
        for proc in procs:
            try:
                m = proc.memory_full_info()
                title = _title(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += m.rss
            pss += m.pss
            entry = by_title.setdefault(title, [0, 0])
            entry[0] += m.pss
            entry[1] += 1
            if proc.pid == self.pid:
                root_rss = m.rss
        self.samples += 1
        t = time.perf_counter() - self._t0
        self.last = {"tree_rss": rss, "tree_pss": pss, "root_rss": root_rss, "processes": len(procs), "t": t}
        self.series.append((t, pss, len(procs)))
        if pss > self.peak["tree_pss"]:
            self.peak_pss_by_title = by_title
            self.peak_processes = len(procs)
            self.peak_at = t
        for key, value in (("tree_rss", rss), ("tree_pss", pss), ("root_rss", root_rss)):
            self.peak[key] = max(self.peak[key], value)

    def now(self) -> dict[str, int]:
        """A sample taken now (also counted in the peaks)."""
        with self._lock:
            self._sample(False)
            return dict(self.last)


def _gib(n: float) -> float:
    return round(n / GIB, 3)


# ---------------------------------------------------------------- archives

def _render_motif(args: tuple) -> tuple:
    """One image: plan (engine.synth) and render the motif, write level 0 as the motif
    repeated, build the pyramid; return its catalog row."""
    plan, uri, edge, motif, chunk, pixel_size = args
    from engine.stores.catalog import CatalogRow, relative_image_path
    from engine.stores.writer import ImageWriter
    from engine.synth.image import render_region

    t0 = time.process_time()
    pixels, _ = render_region(plan, 0, 0, motif, motif)
    render_cpu = time.process_time() - t0
    attrs = {**plan.attributes, "source": "benchmarks/reprocess_memory: engine.synth motif repeated",
             "motif_px": motif}
    with ImageWriter(uri, shape=(edge, edge), dtype=plan.dtype, pixel_size=pixel_size, unit="nanometer",
                     chunk=chunk, name=plan.image_id, attributes=attrs) as writer:
        for y in range(0, edge, motif):
            for x in range(0, edge, motif):
                writer.write_tile(y, x, pixels[: min(motif, edge - y), : min(motif, edge - x)])
    info = writer.info
    row = CatalogRow(
        image_id=plan.image_id, uri=relative_image_path(plan.image_id), modality=plan.modality,
        pixel_size_y=info.pixel_size[0], pixel_size_x=info.pixel_size[1], unit=info.unit, height=info.shape[0],
        width=info.shape[1], dtype=info.dtype, levels=info.levels, chunk=info.chunk, checksum=info.checksum,
        material=plan.material, quality_grade=plan.quality_grade, instrument=plan.instrument,
        source="benchmarks/reprocess_memory (motif)", seed=plan.seed)
    return row, render_cpu


def make_archive(path: Path, n_images: int, edge: int, args) -> dict:
    """The archive at `path` (module doc), reused when its spec marker matches."""
    from concurrent.futures import ProcessPoolExecutor

    from engine.stores.catalog import image_uri, write_catalog
    from engine.stores.uri import resolve
    from engine.synth.materials import MATERIALS, get_material
    from engine.synth.plan import plan_archive

    if args.motif % args.chunk:
        raise SystemExit(f"--motif {args.motif} must be a multiple of --chunk {args.chunk}")
    spec = {"n_images": n_images, "edge": edge, "chunk": args.chunk, "motif": args.motif,
            "pixel_size_nm": args.pixel_size, "seed": args.seed, "dtype": "uint16"}
    marker = path.parent / f"{path.name}-spec.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())
    shutil.rmtree(path, ignore_errors=True)
    marker.unlink(missing_ok=True)
    modalities = ("SEM", "TEM")  # uint16 both: the archive's bytes are exact
    materials = [m for m in MATERIALS if set(get_material(m).modalities) & set(modalities)]
    plans = plan_archive(n_images=n_images, seed=args.seed, size=args.motif, chunk=args.chunk, materials=materials,
                         modalities=modalities)
    archive = resolve(str(path))
    jobs = [(p, image_uri(archive, p.image_id), edge, args.motif, args.chunk, args.pixel_size) for p in plans]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        done = list(pool.map(_render_motif, jobs))
    write_catalog(archive, [row for row, _ in done])
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    record = {"spec": spec, "level0_bytes": n_images * edge * edge * 2, "level0_gib": _gib(n_images * edge * edge * 2),
              "bytes_on_disk": on_disk, "written_s": round(time.perf_counter() - t0, 1),
              "motif_render_cpu_s": round(sum(c for _, c in done), 1),
              "images": [{"image_id": r.image_id, "modality": r.modality, "material": r.material, "levels": r.levels}
                         for r, _ in done]}
    marker.write_text(json.dumps(record))
    return record


def register_bundle(root: Path, seed: int) -> tuple[str, str]:
    """The tiny preset's members (seeded random weights) as a bundle; (tracking_uri, ref)."""
    from engine.pipeline.bundle import register_ensemble
    from engine.registry import ModelRegistry

    shutil.rmtree(root / "registry", ignore_errors=True)
    (root / "registry").mkdir(parents=True)
    registry = ModelRegistry(tracking_uri=f"sqlite:///{root / 'registry' / 'm.db'}")
    bundle = register_ensemble(registry, build_models(PRESETS["tiny"], seed), BUNDLE, workdir=root / "registry" / "w")
    return registry.tracking_uri, bundle.ref


# ---------------------------------------------------------------- one run (child process)

def run_job(cfg: dict) -> dict:
    import ray

    from engine.pipeline import EnsembleConfig
    from engine.pipeline.job import reprocess
    from engine.registry import ModelRegistry

    meter = TreeMemoryMeter(os.getpid(), cfg["interval"]).start()
    temp_dir = tempfile.mkdtemp(prefix="gf", dir="/tmp")  # Ray's socket paths must stay short
    try:
        store = cfg.get("object_store_gib")
        ray.init(address="local", num_cpus=cfg["workers"] + 2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=temp_dir, object_store_memory=int(store * 2**30) if store else None)
        try:
            registry = ModelRegistry(tracking_uri=cfg["tracking_uri"])
            before = meter.now()
            t0 = time.perf_counter()
            result = reprocess(cfg["archive"], cfg["out"], cfg["bundle"], registry=registry,
                               target_pixel_size_nm=cfg["target_pixel_size_nm"], tile_size=cfg["chunk"],
                               halo=cfg["halo"], batch_size=cfg["batch_size"], concurrency=cfg["workers"],
                               num_gpus=0, resume=False,
                               config=EnsembleConfig(conf=cfg["conf"], max_det=cfg["max_det"]))
            wall = time.perf_counter() - t0
            after = meter.now()
        finally:
            ray.shutdown()
    finally:
        cpu = meter.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    n = result.tiles_done + result.errors
    if result.errors or n != result.tiles_total:
        raise SystemExit(f"job: {result.errors} tile errors, {n} tiles of {result.tiles_total}")
    levels = _levels_read(cfg["out"])
    if levels != {cfg["level"]}:
        raise SystemExit(f"job read levels {sorted(levels)}, not {cfg['level']}")
    top = sorted(meter.peak_pss_by_title.items(), key=lambda kv: -kv[1][0])[:8]
    start = before["t"]
    step = max(1, len(meter.series) // 40)  # about 40 points: when the memory came and went
    timeline = [[round(t - start, 1), _gib(pss), n] for t, pss, n in meter.series[::step]]
    return {
        "tiles_total": result.tiles_total, "tiles_done": result.tiles_done, "errors": result.errors,
        "level_read": cfg["level"], "wall_s": round(wall, 1), "tiles_per_s": round(n / wall, 3),
        "stage_seconds": {k: round(v, 1) for k, v in result.stage_seconds.items()},
        "peak_tree_pss_gib": _gib(meter.peak["tree_pss"]), "peak_tree_rss_gib": _gib(meter.peak["tree_rss"]),
        "peak_driver_rss_gib": _gib(meter.peak["root_rss"]),
        "before_job_tree_pss_gib": _gib(before["tree_pss"]), "after_job_tree_pss_gib": _gib(after["tree_pss"]),
        "peak_above_before_job_pss_gib": _gib(meter.peak["tree_pss"] - before["tree_pss"]),
        "peak_at_s_after_job_start": round(meter.peak_at - start, 1), "processes_at_peak": meter.peak_processes,
        "peak_pss_gib_by_process": {k: {"gib": _gib(v), "processes": c} for k, (v, c) in top},
        "timeline_s_pss_gib_processes": timeline,
        "samples": meter.samples, "tree_cpu_s": round(cpu, 1),
    }


def _levels_read(out: str) -> set[int]:
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(out) / "summary.parquet"), columns=["level"])
    return set(table.column("level").to_pylist())


def child(cfg: dict) -> None:
    from engine.runtime import configure_offline

    configure_offline()
    record = run_job(cfg)
    record["load_1m_after"] = load_average()["load_1m"]
    sys.stdout.write("\n" + json.dumps(record) + "\n")


# ---------------------------------------------------------------- orchestration

def run_job_child(cfg: dict, env: dict) -> dict:
    return run_child(__file__, "--run-job", cfg, env, f"reprocess memory: {cfg['name']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_job is not None:
        child(json.loads(args.run_job))
        return {}
    command = command_line(argv)
    return run_parent(args.workdir, "gf-reprocess-memory-", threads=args.threads, niceness=None,
                      measure=lambda run: measure(args, run, command))


def measure(args, run: ParentRun, command: str) -> dict:
    """Both archives (made or reused), the job on each, the report."""
    work = run.work
    archives = {}
    for name, spec in (("small", args.small), ("large", args.large)):
        n, edge = _shape(spec)
        print(f"reprocess memory: archive {name}: {n} x {edge}^2 uint16", file=sys.stderr, flush=True)
        archives[name] = make_archive(work / f"archive-{name}", n, edge, args)
        print(f"reprocess memory: archive {name}: {json.dumps(archives[name])}", file=sys.stderr, flush=True)
    tracking_uri, bundle = register_bundle(work, args.seed)
    base = {"bundle": bundle, "tracking_uri": tracking_uri, "level": args.level, "chunk": args.chunk,
            "halo": args.halo, "target_pixel_size_nm": args.pixel_size * 2**args.level,
            "batch_size": args.batch_size, "workers": args.workers, "conf": args.conf, "max_det": args.max_det,
            "interval": args.interval, "object_store_gib": args.object_store_gib}
    runs: dict[str, list[dict]] = {"small": [], "large": []}
    for _ in range(args.rounds):
        for name in ("small", "large"):
            runs[name].append(run_job_child({**base, "name": name, "archive": str(work / f"archive-{name}"),
                                             "out": str(work / f"out-{name}")}, run.env))

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 3)

    keys = ("peak_tree_pss_gib", "peak_tree_rss_gib", "peak_above_before_job_pss_gib", "peak_driver_rss_gib")
    peaks = {name: {k: med(name, k) for k in keys} for name in runs}
    ratio = round(peaks["large"]["peak_tree_pss_gib"] / peaks["small"]["peak_tree_pss_gib"], 3)
    report = {
        "benchmark": "reprocess_memory", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(run.load_start),
        "method": {
            "archives": "engine.synth motif (SEM/TEM materials, uint16) rendered once per image at --motif px and "
                        "repeated over level 0 by the engine's OME-Zarr writer, which builds the real pyramid; "
                        "one level-0 pixel size for all images; no ground truth",
            "job": f"engine.pipeline.job.reprocess at pyramid level {args.level} (target pixel size "
                   f"{args.pixel_size * 2 ** args.level:g} nm), tiles of {args.chunk} px + {args.halo} px halo, "
                   f"tiny preset models (random weights, conf {args.conf}, max_det {args.max_det}), "
                   f"batch {args.batch_size}, {args.workers} actors x {args.threads} thread(s), Ray of "
                   f"{args.workers + 2} logical CPUs, object store "
                   f"{f'{args.object_store_gib:g} GiB' if args.object_store_gib else 'Ray default'}, every output written",
            "memory": f"process tree of the child (driver + Ray daemons + workers + actors) sampled every "
                      f"{args.interval} s from before ray.init to after reprocess: sum of PSS (goal figure) "
                      f"and of RSS; peaks",
        },
        "archives": archives,
        "tiles": {name: runs[name][0]["tiles_total"] for name in runs},
        "peaks_gib": peaks,
        "ratio": ratio,
        "ratio_rss": round(peaks["large"]["peak_tree_rss_gib"] / peaks["small"]["peak_tree_rss_gib"], 3),
        "ratio_above_before_job": round(peaks["large"]["peak_above_before_job_pss_gib"]
                                        / peaks["small"]["peak_above_before_job_pss_gib"], 3),
        "goal": f"|ratio - 1| < {GOAL}",
        "met": abs(ratio - 1) < GOAL,
        "runs": runs,
        "total_seconds": run.seconds(),
    }
    return report


if __name__ == "__main__":
    main()
