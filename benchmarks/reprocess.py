"""Reprocessing efficiency: the job end to end against the same ensemble in a bare loop.

    python benchmarks/reprocess.py [--preset tiny small] [--images N] [--size PX] [--rounds 2]
        [--workers 2] [--threads 1] [--batch-size 4] [--conf 0.001] [--max-det N] [--workdir DIR]

Goal (issue 4): the job's tiles/s >= 0.9 x a bare loop's over tiles already in memory,
same CPU budget (the model should be the limit, not the engine).

Per preset, once: a synthetic archive (engine.synth.archive.generate_archive, chunks of
the tile size), the preset's members with seeded random weights registered as a bundle
in a throwaway SQLite MLflow registry (engine.pipeline.bundle.register_ensemble), and
every tile the job will plan read through the datasource's own read function
(engine.data.tile_read.read_tiles, no Ray) and cast to its image's stored dtype (what
JobEnsemble does), saved as a pickle of batches of --batch-size tiles.

Presets (untrained weights: throughput does not depend on what the weights learned):

- tiny: yolov8n_tiny + sam_tiny + resnet10t, 128-px tiles, halo 16, max_det 8.
- small: yolov8n + sam_tiny + resnet18, 512-px tiles, halo 32, max_det 32: the model
  dominates, as on a real archive. (SAM vit_b is far too slow on a 2-core CPU.)

Random weights score low and flat, so the detector keeps max_det boxes at conf 0.001:
max_det sets how many boxes SAM segments per tile; the JSON gives the measured mean
(boxes per tile into SAM, and detections per tile kept after core ownership).

Variants, each round in a fresh child process, alternating (job, loop; loop, job; ...)
to even out drift in a shared machine's load:

- job: ray.init(num_cpus=W x T + 2) (T slots per ensemble actor, two for Ray Data's read
  and sink tasks: logical slots, the machine has what it has), then
  engine.pipeline.job.reprocess(concurrency=W, cpus_per_actor=T, batch_size=B) from plan to
  summary, writing every output (Parquet tables, label images, ledger). Timed: the whole call
  (a cluster already up, as when a job is submitted to one); its stage_seconds say
  where the time went. The describe task, actor start-up and model loading are in it.
- loop: W spawned processes, each loads the same bundle (Ensemble.from_registry) and
  the pickled tiles, waits at a barrier, then takes batches from a shared counter until
  none are left and runs the ensemble's stages on each (start -> detect -> segment ->
  classify -> finish -> to_columns: exactly `Ensemble.__call__`, split only to count
  SAM's boxes). Timed from the barrier to the last batch; results are not written.

Same CPU budget: W model processes (actors or loop workers) with T torch threads each
in both (OMP_NUM_THREADS / MKL_NUM_THREADS = T and torch.set_num_threads in the loop;
Ray's workers inherit the variables, checked by a Ray task), at the same niceness (Ray
would start its workers at 15; RAY_worker_niceness sets them to the loop's), on the
same machine cores.

Figures: tiles/s per run ("ratio" = median job / median loop, the goal's figure; also
"ratio_tile_stage" over the job's tile stage alone) and, because the wall clock on a
shared machine measures the neighbours too, the CPU seconds per tile of each variant's
whole process tree (`TreeCpuMeter`: the child, Ray's GCS, raylet, agents, workers and
actors, or the loop's workers, sampled every 0.2 s so that actors Ray ends before
`reprocess` returns still count): "cpu_ratio" = loop's CPU seconds per tile / job's,
the robust figure under load. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
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
    ParentRun, load_average, machine, run_child, run_parent,
)

PRESETS = {
    "tiny": {"detector": "yolov8n_tiny", "segmenter": "sam_tiny", "classifier": "resnet10t", "tile": 128, "halo": 16,
             "max_det": 8, "images": 4, "size": 1024},
    "small": {"detector": "yolov8n", "segmenter": "sam_tiny", "classifier": "resnet18", "tile": 512, "halo": 32,
              "max_det": 32, "images": 4, "size": 2048},
}
BUNDLE = "bench"
VARIANTS = ("job", "loop")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["tiny", "small"])
    p.add_argument("--images", type=int, default=None, help="images in the archive (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="image edge in pixels (default: the preset's)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, order alternating")
    p.add_argument("--workers", type=int, default=2, help="ensemble actors / loop processes (W)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per model process (T)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per ensemble call, both variants")
    p.add_argument("--conf", type=float, default=0.001, help="detector score threshold")
    p.add_argument("--max-det", type=int, default=None, help="boxes per tile (default: the preset's)")
    p.add_argument("--niceness", type=int, default=0, help="niceness of every model process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="archives, registry, outputs (default: temporary)")
    p.add_argument("--run-variant", default=None, help=argparse.SUPPRESS)  # child process: one run
    return p.parse_args(argv)


# ---------------------------------------------------------------- measuring

class TreeCpuMeter:
    """CPU seconds (user + system) used by process `pid` and all its descendants between
    `start()` and `stop()`, other users' processes not included, so CPU seconds per
    tile barely depend on the machine's load, unlike wall seconds.

    The tree is sampled every `interval` seconds (psutil) and each process (pid and
    start time) counts from its first reading (0 for one born after `start`) to its
    last. The sampling thread runs in the measured process, so its own CPU (a few ms a
    sample, more with more processes: it would weigh on a tree of 15 Ray processes more
    than on a bare loop's 3) is kept small by the 1-s default and reported
    (`own_cpu_s`). Sampling, rather than reading the tree at the ends as
    benchmarks/train.py does, because Ray Data ends the actors before `reprocess`
    returns and the raylet reaps them without accounting (their time never reaches its
    children times). A process's time after its last sample is lost: at most `interval`
    per exit.
    `by_title()`: the same seconds by process title (Ray names a worker after the task
    or actor it runs: "ray::MapWorker(MapBatches(JobEnsemble))", "ray::_finish", ...),
    each interval's time given to the title the process had at its end.
    """

    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval = pid, interval
        self.own_cpu_s = 0.0  # the sampling thread's CPU seconds, after stop()
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._titles: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, born_before: bool) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                t = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                title = _title(proc)
            except psutil.NoSuchProcess:
                continue
            now = t.user + t.system
            before = self._last.get(key, self._first.setdefault(key, now if born_before else 0.0))
            self._titles[title] = self._titles.get(title, 0.0) + now - before
            self._last[key] = now

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self._sample(False)
        self.own_cpu_s = time.thread_time()

    def start(self) -> TreeCpuMeter:
        self._sample(True)
        self._thread.start()
        return self

    def stop(self) -> float:
        """CPU seconds since start()."""
        self._done.set()
        self._thread.join()
        self._sample(False)
        return sum(self._last[k] - self._first[k] for k in self._last)

    def by_title(self) -> dict[str, float]:
        """CPU seconds by process title, largest first (after stop())."""
        return {k: round(v, 2) for k, v in sorted(self._titles.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    @property
    def processes(self) -> int:
        """Processes seen."""
        return len(self._last)


def _title(proc) -> str:
    """A process's title, shortened: Ray workers' "ray::<task or actor>", else the program
    (and module or script) it runs."""
    import psutil

    try:
        cmd = proc.cmdline()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        cmd = []
    if not cmd:
        return proc.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0][:60]
    words = [Path(cmd[0]).name] + [Path(w).name for w in cmd[1:3] if not w.startswith("-") or w == "-m"]
    return " ".join(words)[:60]


# ---------------------------------------------------------------- set-up, once per preset

def build_models(preset: dict, seed: int):
    """The preset's members with weights drawn from `seed`."""
    import torch

    from engine.models import create_classifier, create_detector, create_segmenter
    from engine.pipeline import EnsembleModels

    torch.manual_seed(seed)
    return EnsembleModels(detector=create_detector(preset["detector"]), segmenter=create_segmenter(preset["segmenter"]),
                          classifier=create_classifier(preset["classifier"]))


def job_pixel_size(archive: Path) -> float:
    """The job's target pixel size for a bundle without a ``pixel_size_nm`` tag: the finest
    level-0 size, each image read at its own level 0 (engine.pipeline.job)."""
    from engine.stores.catalog import read_catalog
    from engine.stores.ngff import to_nanometres

    catalog = read_catalog(str(archive))
    return min(to_nanometres(float(p), str(u)) for p, u in zip(catalog["pixel_size_x"], catalog["unit"]))


def load_tiles(archive: Path, preset: dict, batch_size: int) -> tuple[list[dict], int]:
    """Every tile the job plans, read in this process by the datasource's own reader, each
    cast to its image's stored dtype; as batches of `batch_size` rows. Returns (batches, tiles)."""
    import math

    import numpy as np
    from ray.data.block import BlockAccessor

    from engine.data.datasource import ZarrTileDatasource
    from engine.data.tile_read import read_tiles
    from engine.stores.catalog import read_catalog

    catalog = read_catalog(str(archive))
    stored = dict(zip(catalog["image_id"], catalog["dtype"]))
    source = ZarrTileDatasource(str(archive), target_pixel_size_nm=job_pixel_size(archive), tile_size=preset["tile"],
                                halo=preset["halo"], tolerance=math.inf)
    rows: dict[str, list] = {}
    for spec in source.read_specs():
        for block in read_tiles(spec):
            batch = BlockAccessor.for_block(block).to_batch_format("numpy")
            for name, col in batch.items():
                rows.setdefault(name, []).extend(col)
    rows["tile"] = [np.asarray(t).astype(stored[str(i)], copy=False) for t, i in zip(rows["tile"], rows["image_id"])]
    n = len(rows["tile"])
    batches = []
    for start in range(0, n, batch_size):
        batch = {}
        for name, values in rows.items():
            part = values[start : start + batch_size]
            if name == "tile":
                col = np.empty(len(part), object)
                col[:] = part
            else:
                col = np.asarray(part, dtype=object if isinstance(part[0], (str, type(None))) else None)
            batch[name] = col
        batches.append(batch)
    return batches, n


def prepare(args, name: str, work: Path) -> dict:
    """Archive, registry with the bundle, tiles pickle for one preset; the children's config."""
    from engine.pipeline.bundle import register_ensemble
    from engine.registry import ModelRegistry
    from engine.synth.archive import generate_archive

    preset = dict(PRESETS[name])
    images = args.images or preset["images"]
    size = args.size or preset["size"]
    max_det = args.max_det or preset["max_det"]
    root = work / name
    archive = root / "archive"
    spec = {"n_images": images, "size": size, "chunk": preset["tile"], "seed": args.seed}
    marker = root / "archive-spec.json"
    t0 = time.perf_counter()
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        shutil.rmtree(archive, ignore_errors=True)
        generate_archive(archive, **spec)
        marker.write_text(json.dumps(spec))
    archive_s = time.perf_counter() - t0
    shutil.rmtree(root / "registry", ignore_errors=True)
    registry = ModelRegistry(tracking_uri=f"sqlite:///{root / 'registry' / 'm.db'}")
    (root / "registry").mkdir(parents=True, exist_ok=True)
    bundle = register_ensemble(registry, build_models(preset, args.seed), BUNDLE, workdir=root / "registry" / "w")
    batches, n_tiles = load_tiles(archive, preset, args.batch_size)
    tiles_path = root / "tiles.pkl"
    tiles_path.write_bytes(pickle.dumps(batches, protocol=pickle.HIGHEST_PROTOCOL))
    return {
        "preset": name, "archive": str(archive), "out": str(root / "out"), "tiles_path": str(tiles_path),
        "tracking_uri": registry.tracking_uri, "bundle": bundle.ref, "tile": preset["tile"], "halo": preset["halo"],
        "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads, "conf": args.conf,
        "max_det": max_det, "n_tiles": n_tiles, "seed": args.seed,
        "describe": {"models": {r: preset[r] for r in ("detector", "segmenter", "classifier")},
                     "archive": {**spec, "generated_s": round(archive_s, 1)}, "tiles": n_tiles,
                     "tile_px": preset["tile"], "halo_px": preset["halo"], "batch_size": args.batch_size,
                     "conf": args.conf, "max_det": max_det, "weights": "untrained, seeded"},
    }


# ---------------------------------------------------------------- the variants (child processes)

def _registry(cfg: dict):
    from engine.registry import ModelRegistry

    return ModelRegistry(tracking_uri=cfg["tracking_uri"])


def _config(cfg: dict):
    from engine.pipeline import EnsembleConfig

    return EnsembleConfig(conf=cfg["conf"], max_det=cfg["max_det"])


def ray_logical_cpus(workers: int, threads: int) -> int:
    """The job variant's Ray CPU slots: `threads` per ensemble actor, two for Ray Data's
    read and sink tasks (logical slots: the machine has what it has)."""
    return workers * threads + 2


def run_job(cfg: dict) -> dict:
    """One run of the job on a fresh local Ray of W x T + 2 logical CPUs (T per actor)."""
    import ray

    from engine.pipeline.job import reprocess
    from engine.pipeline.job_ensemble import JobEnsemble  # noqa: F401  before the clock, as the peers import it

    temp_dir = tempfile.mkdtemp(prefix="gf", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(address="local", num_cpus=ray_logical_cpus(cfg["workers"], cfg["threads"]), include_dashboard=False,
             log_to_driver=False, _temp_dir=temp_dir)
    try:
        threads = ray.get(ray.remote(num_cpus=1)(_torch_threads).remote())
        registry = _registry(cfg)
        pid = os.getpid()
        meter, t0 = TreeCpuMeter(pid).start(), time.perf_counter()
        result = reprocess(cfg["archive"], cfg["out"], cfg["bundle"], registry=registry, tile_size=cfg["tile"],
                           halo=cfg["halo"], batch_size=cfg["batch_size"], concurrency=cfg["workers"], num_gpus=0,
                           cpus_per_actor=cfg["threads"], resume=False, config=_config(cfg))
        wall, cpu = time.perf_counter() - t0, meter.stop()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    n = result.tiles_done + result.errors
    if result.errors or n != cfg["n_tiles"]:
        raise SystemExit(f"job: {result.errors} tile errors, {n} tiles of {cfg['n_tiles']}")
    return {"tiles": n, "wall_s": round(wall, 2), "tiles_per_s": round(n / wall, 3),
            "tile_stage_tiles_per_s": round(result.tiles_per_s, 3), "tree_cpu_s": round(cpu, 2),
            "tree_processes": meter.processes, "cpu_s_per_tile": round(cpu / n, 4),
            "job_seconds": round(result.seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
            "objects": result.objects, "ray_worker_torch_threads": threads, "cpu_s_by_process": meter.by_title(),
            "meter_cpu_s": round(meter.own_cpu_s, 2)}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _loop_worker(cfg: dict, counter, start, results, leave) -> None:
    """One loop process: load the bundle and the tiles, wait at `start`, run batches from
    the shared `counter` until none are left, report, stay alive until `leave` is set (so
    the parent can still read this process's CPU time)."""
    import numpy as np
    import torch

    from engine.pipeline import Ensemble
    from engine.pipeline.ensemble import tiles_from_batch
    from engine.pipeline.results import to_columns

    torch.set_num_threads(cfg["threads"])
    ens = Ensemble.from_registry(cfg["bundle"], _registry(cfg), config=_config(cfg), device="cpu")
    with open(cfg["tiles_path"], "rb") as f:
        batches = pickle.load(f)
    start.wait()
    tiles = boxes = kept = 0
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(batches):
            break
        p = ens.detect(ens.start(tiles_from_batch(batches[i])))
        boxes += sum(len(w.boxes) for w in p.work.values())
        out = to_columns(ens.finish(ens.classify(ens.segment(p))), n_materials=len(ens.materials),
                         n_grades=len(ens.grades))
        if any(e is not None for e in out["error"]):
            raise SystemExit(f"loop: tile errors: {[e for e in out['error'] if e is not None][:3]}")
        tiles += len(out["error"])
        kept += int(np.sum(out["n_defects"]))
    results.put({"tiles": tiles, "boxes": boxes, "kept": kept, "torch_threads": torch.get_num_threads()})
    leave.wait()


def run_loop(cfg: dict) -> dict:
    """One run of the bare loop: W spawned processes over the in-memory tiles."""
    ctx = mp.get_context("spawn")
    counter, start, results, leave = ctx.Value("i", 0), ctx.Barrier(cfg["workers"] + 1), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_loop_worker, args=(cfg, counter, start, results, leave))
             for _ in range(cfg["workers"])]
    for p in procs:
        p.start()
    pid = os.getpid()
    try:
        start.wait(timeout=600)
        meter, t0 = TreeCpuMeter(pid).start(), time.perf_counter()
        got = [results.get(timeout=3600) for _ in procs]
        wall, cpu = time.perf_counter() - t0, meter.stop()
    finally:
        leave.set()
        for p in procs:
            p.join(timeout=60)
    n = sum(g["tiles"] for g in got)
    if n != cfg["n_tiles"]:
        raise SystemExit(f"loop: {n} tiles of {cfg['n_tiles']}")
    return {"tiles": n, "wall_s": round(wall, 2), "tiles_per_s": round(n / wall, 3), "tree_cpu_s": round(cpu, 2),
            "tree_processes": meter.processes, "cpu_s_per_tile": round(cpu / n, 4),
            "tiles_per_worker": [g["tiles"] for g in got],
            "boxes_per_tile": round(sum(g["boxes"] for g in got) / n, 2),
            "kept_detections_per_tile": round(sum(g["kept"] for g in got) / n, 2),
            "worker_torch_threads": [g["torch_threads"] for g in got], "cpu_s_by_process": meter.by_title(),
            "meter_cpu_s": round(meter.own_cpu_s, 2)}


def child(cfg: dict) -> None:
    """--run-variant: one run, its record as JSON on the last line of stdout."""
    from engine.runtime import configure_offline

    configure_offline()
    record = run_job(cfg) if cfg["variant"] == "job" else run_loop(cfg)
    record["load_1m_after"] = load_average()["load_1m"]
    sys.stdout.write("\n" + json.dumps(record) + "\n")


# ---------------------------------------------------------------- orchestration

def run_variant(cfg: dict, variant: str, env: dict) -> dict:
    return run_child(__file__, "--run-variant", {**cfg, "variant": variant}, env,
                     f"reprocess benchmark: {cfg['preset']} {variant}")


def bench_preset(args, name: str, work: Path, env: dict) -> dict:
    cfg = prepare(args, name, work)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    rounds = []
    for r in range(args.rounds):
        order = ["job", "loop"] if r % 2 == 0 else ["loop", "job"]
        for variant in order:
            runs[variant].append(run_variant(cfg, variant, env))
        job, loop = runs["job"][-1], runs["loop"][-1]
        rounds.append({"order": order, "job_tiles_per_s": job["tiles_per_s"], "loop_tiles_per_s": loop["tiles_per_s"],
                       "ratio": round(job["tiles_per_s"] / loop["tiles_per_s"], 3),
                       "ratio_tile_stage": round(job["tile_stage_tiles_per_s"] / loop["tiles_per_s"], 3),
                       "cpu_ratio": round(loop["cpu_s_per_tile"] / job["cpu_s_per_tile"], 3)})

    def med(variant: str, key: str) -> float:
        return round(statistics.median(rec[key] for rec in runs[variant]), 4)

    stages = {k: round(statistics.median(rec["stage_seconds"][k] for rec in runs["job"]), 2)
              for k in runs["job"][0]["stage_seconds"]}
    return {
        "setup": cfg["describe"],
        "tiles_per_s": {"job": med("job", "tiles_per_s"), "job_tile_stage": med("job", "tile_stage_tiles_per_s"),
                        "loop": med("loop", "tiles_per_s")},
        "ratio": round(med("job", "tiles_per_s") / med("loop", "tiles_per_s"), 3),
        "ratio_tile_stage": round(med("job", "tile_stage_tiles_per_s") / med("loop", "tiles_per_s"), 3),
        "cpu_s_per_tile": {"job": med("job", "cpu_s_per_tile"), "loop": med("loop", "cpu_s_per_tile")},
        "cpu_ratio": round(med("loop", "cpu_s_per_tile") / med("job", "cpu_s_per_tile"), 3),
        "goal": 0.9,
        "boxes_per_tile_into_sam": med("loop", "boxes_per_tile"),
        "kept_detections_per_tile": med("loop", "kept_detections_per_tile"),
        "job_stage_seconds_median": stages,
        "rounds": rounds,
        "runs": runs,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_variant is not None:
        child(json.loads(args.run_variant))
        return {}

    def measure(run: ParentRun) -> dict:  # the loop's processes inherit run_parent's niceness
        presets = {name: bench_preset(args, name, run.work, run.env) for name in args.preset}
        return {
            "benchmark": "reprocess", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(run.load_start),
            # cores_beside_models: what the machine has beyond the model processes' threads,
            # where Ray's processes and the job's own tasks run without taking the model's
            # time (as on a GPU node); 0 means they take it from the models
            "budget": {"model_processes": args.workers, "torch_threads_each": args.threads,
                       "ray_logical_cpus": ray_logical_cpus(args.workers, args.threads), "niceness": args.niceness,
                       "cores_beside_models": max(0, (os.cpu_count() or 1) - args.workers * args.threads)},
            "rounds": args.rounds, "presets": presets, "total_seconds": run.seconds(),
        }

    return run_parent(args.workdir, "gf-reprocess-bench-", threads=args.threads, niceness=args.niceness,
                      measure=measure)


if __name__ == "__main__":
    main()
