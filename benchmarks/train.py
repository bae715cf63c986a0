"""Training throughput: Ray Train (2 workers) against a plain `torchrun` DDP loop.

    python benchmarks/train.py [--samples 256] [--batch-size 16] [--epochs 5] [--rounds 2]
        [--workers 2] [--threads 1] [--model fusion_tiny] [--engine] [--workdir DIR]

Same model (fusion_tiny, engine.models.create_fusion), same step (engine.training.tasks
FusionTask.step, AdamW, gradient clipping at 1.0: what engine.training.loop does), same
batch size per worker, same threads per worker (OMP_NUM_THREADS and
torch.set_num_threads), DDP over gloo in both, same seed (so the two see the same
batches in the same order and their losses agree). The tiles are read once from a small
synthetic archive (engine.synth.archive.generate_archive) through the engine's own
reader and normalisation (engine.data.training_samples.ReadSamples), without
augmentation, and saved as arrays; every variant trains on those same arrays. Reading
Zarr is left out of the comparison on purpose: it is not what distinguishes the two
launchers, and a torchrun loop has no Ray Data to read it with in parallel, so a
comparison through the natural data paths would mostly measure the readers.

Variants, in alternating order (torchrun, ray_train, ray_data; then ray_data, ray_train,
torchrun; ...) to even out drift in the machine's load; the two Ray variants share one
Ray session per round, and no Ray runs while torchrun does:

- torchrun: `python -m torch.distributed.run --standalone --nproc_per_node W`, each rank
  loads the arrays and takes a seeded per-epoch permutation's share (rank::W), as a
  DistributedSampler would; no Ray running at the time.
- ray_train: TorchTrainer, W workers (ScalingConfig, 1 CPU each), the same loop and the
  same in-memory arrays in each worker: what Ray Train itself costs (worker group,
  process group set-up by Ray, prepare_model's DDP).
- ray_data: the same TorchTrainer, fed the way engine.training feeds it: a materialised
  Ray Dataset of the same rows, each worker iterating its shard with
  iter_torch_batches(collate_fn=engine's FusionCollate, prefetch_batches=2,
  local_shuffle_buffer_size=64): Ray Train plus Ray Data ingest. This is the headline
  ratio, since it is how the project trains.
- engine (with --engine): engine.training.train("fusion", ...) on the archive itself,
  augmentation off, no validation: reads Zarr in Ray Data tasks during training and
  writes a checkpoint per epoch (outside the timed part). Its ratio to torchrun on
  preloaded arrays is a lower bound for the engine, not a launcher comparison.

Samples/s per epoch = all workers' samples / the slowest worker's epoch seconds (the
engine's train_samples_per_s); each epoch starts at a barrier. Steady state = the
epochs after the first. Per variant: the median over its runs' steady epochs; ratios of
Ray to torchrun both per round (paired, same load) and of the medians ("ratio", the
figure for the goal >= 0.9). On a shared machine the wall clock swings with other
users' load, so each epoch also counts the CPU seconds of the whole process tree the
variant started (torchrun and its ranks; Ray's GCS, raylet, workers and actors):
"samples_per_cpu_s" and "cpu_ratio" say what Ray costs in CPU per sample, which on a
machine whose cores the workers fill is what bounds throughput. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.harness import json_stdout, load_average, work_folder  # noqa: E402
FAMILY = "fusion"
VARIANTS = ("torchrun", "ray_train", "ray_data")
SOURCES = {"ray_train": "tensors", "ray_data": "dataset"}
# The preloaded samples' columns (what the engine's FusionCollate reads) and their dtypes.
SAMPLE_DTYPES = {"image": "float32", "context": "float32", "mask": "uint8", "material_index": "int64",
                 "grade_index": "int64", "pixel_size_nm": "float64"}
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 1e-4, 1.0  # engine.training.loop's defaults
SHUFFLE_BUFFER, PREFETCH = 64, 2  # engine.training.loop's iter_torch_batches settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256, help="training tiles (all workers together)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per worker per step")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run; the first is warm-up")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, order alternating")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per worker")
    p.add_argument("--model", default="fusion_tiny")
    p.add_argument("--images", type=int, default=8, help="images in the synthetic archive")
    p.add_argument("--engine", action="store_true", help="also run engine.training.train on the archive")
    p.add_argument("--workdir", type=Path, default=None, help="archive, arrays, runs (default: temporary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--niceness", type=int, default=0,
                   help="niceness of the training processes of every variant (Ray's own default is 15)")
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)  # torchrun ranks
    return p.parse_args(argv)


# ---------------------------------------------------------------- data, once, on the driver

def plan(args, archive: Path):
    from engine.training.trainer import plan_training

    per_image = -(-args.samples // args.images)
    layout, specs, _ = plan_training(FAMILY, args.model, str(archive), val_fraction=0.0,
                                     max_samples_per_image=per_image, num_workers=args.workers, seed=args.seed)
    return layout, specs


def prepare_data(args, work: Path) -> tuple[Path, dict]:
    """Archive (generated once) -> `args.samples` fusion samples -> arrays.npz; with a description."""
    import numpy as np

    from engine.data.training_samples import ReadSamples
    from engine.synth.archive import generate_archive

    archive = work / "archive"
    spec = {"n_images": args.images, "size": 512, "chunk": 256, "seed": args.seed}
    marker = archive / "benchmark-spec.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        generate_archive(archive, **spec)
        marker.write_text(json.dumps(spec))
    layout, specs = plan(args, archive)
    if len(specs) < args.samples:
        raise SystemExit(f"the archive gives {len(specs)} samples, fewer than --samples {args.samples}")
    specs = specs[:args.samples]
    reader = ReadSamples(layout.mask)
    rows = [reader.read(s) for s in specs]
    arrays = {k: np.stack([np.asarray(r[k]) for r in rows]).astype(dtype) for k, dtype in SAMPLE_DTYPES.items()}
    path = work / "arrays.npz"
    np.savez(path, **arrays)
    return path, {"archive": str(archive), **spec, "samples": len(rows), "tile": layout.tile,
                  "context_tile": layout.context_tile, "levels_used": sorted({s.level for s in specs}),
                  "bytes_per_sample": int(sum(a[0].nbytes for a in arrays.values()))}


# ---------------------------------------------------------------- the loop both launchers run

def _tensor_batches(arrays, rank: int, world: int, batch_size: int, seed: int, epoch: int):
    """This rank's batches of one epoch: a seeded permutation, every world-th row from rank
    (DistributedSampler's split), as the dict engine's FusionCollate makes."""
    import torch

    n = arrays["image"].shape[0]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    mine = torch.randperm(n, generator=g)[rank::world]
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        yield {"image": arrays["image"][idx].unsqueeze(1), "context": arrays["context"][idx].unsqueeze(1),
               "mask": arrays["mask"][idx], "material": arrays["material"][idx], "grade": arrays["grade"][idx],
               "pixel_size_nm": arrays["pixel_size_nm"][idx]}


def _load_arrays(path: str):
    """arrays.npz -> the tensors FusionCollate would give (float32 images, int64 labels)."""
    import numpy as np
    import torch

    with np.load(path) as z:
        return {"image": torch.from_numpy(z["image"]), "context": torch.from_numpy(z["context"]),
                "mask": torch.from_numpy(z["mask"].astype(np.int64)),
                "material": torch.from_numpy(z["material_index"]), "grade": torch.from_numpy(z["grade_index"]),
                "pixel_size_nm": torch.from_numpy(z["pixel_size_nm"].astype(np.float32))}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and all its live descendants.

    The benchmark's own process is the root of everything a variant starts: torchrun
    and its ranks; or Ray's GCS, raylet, workers, actors (SplitCoordinator, the train
    controller) and the driver. Other users' processes are not in it, so CPU seconds
    per sample barely depend on the machine's load, unlike wall seconds.
    """
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_loop(cfg: dict, rank: int, world: int, wrap, epoch_batches) -> dict | None:
    """Build, wrap (DDP) and train the model; time each epoch. Returns rank 0's record.

    wrap(model) -> the DDP model; epoch_batches(epoch) -> an iterable of batch dicts.
    Each epoch starts and ends at a barrier; rank 0 reads the wall clock and the CPU
    seconds of the benchmark's whole process tree (cfg["root_pid"]) at both.
    """
    import torch
    import torch.distributed as dist

    from engine.models import create_model
    from engine.models.layout import prefer_channels_last
    from engine.training.tasks import make_task

    torch.set_num_threads(cfg["threads"])
    task = make_task(FAMILY)
    torch.manual_seed(cfg["seed"])
    model = wrap(prefer_channels_last(create_model(FAMILY, cfg["model"]), FAMILY))  # as engine.training.loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    epochs = []
    for epoch in range(cfg["epochs"]):
        model.train()
        dist.barrier()
        start = time.perf_counter()
        cpu0 = tree_cpu_seconds(cfg["root_pid"]) if rank == 0 else 0.0
        n = steps = 0
        loss_sum = torch.zeros(())
        for batch in epoch_batches(epoch):
            loss, stats = task.step(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            loss_sum += stats["loss"]
            n += batch["image"].shape[0]
            steps += 1
        seconds = time.perf_counter() - start
        dist.barrier()
        wall = time.perf_counter() - start
        cpu = tree_cpu_seconds(cfg["root_pid"]) - cpu0 if rank == 0 else 0.0
        gathered = [None] * world
        dist.all_gather_object(gathered, (n, steps, seconds, float(loss_sum)))
        total = sum(g[0] for g in gathered)
        slowest = max(g[2] for g in gathered)
        epochs.append({"epoch": epoch + 1, "samples": total, "steps_per_worker": [g[1] for g in gathered],
                       "seconds": round(slowest, 4), "samples_per_s": round(total / slowest, 3),
                       "loss": round(sum(g[3] for g in gathered) / max(total, 1), 5),
                       "wall_seconds": round(wall, 4), "tree_cpu_seconds": round(cpu, 3),
                       "samples_per_cpu_s": round(total / cpu, 3) if cpu > 0 else None})
    if rank != 0:
        return None
    return {"epochs": epochs, "torch_threads": torch.get_num_threads(), "niceness": os.nice(0),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "world": world}


def _write(record: dict | None, path: str) -> None:
    if record is not None:
        Path(path).write_text(json.dumps(record))


# ---------------------------------------------------------------- torchrun

def torchrun_worker(cfg: dict) -> None:
    """One torchrun rank (this file run with --worker-config)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    arrays = _load_arrays(cfg["arrays"])
    record = run_loop(cfg, rank, world, DistributedDataParallel,
                      lambda e: _tensor_batches(arrays, rank, world, cfg["batch_size"], cfg["seed"], e))
    _write(record, cfg["out"])
    dist.destroy_process_group()


def run_torchrun(cfg: dict, env: dict) -> dict:
    started = time.perf_counter()
    cmd = ["nice", "-n", str(cfg["niceness"] - os.nice(0)), sys.executable, "-m", "torch.distributed.run",
           "--standalone", f"--nproc_per_node={cfg['workers']}", str(Path(__file__).resolve()),
           "--worker-config", json.dumps(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun exited with {proc.returncode}")
    record = json.loads(Path(cfg["out"]).read_text())
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


# ---------------------------------------------------------------- Ray Train

def ray_worker(cfg: dict) -> None:
    """Per-worker function of the TorchTrainer (Ray Train sets up the gloo group)."""
    import ray.train
    import ray.train.torch

    from engine.training.collate import FusionCollate

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg["source"] == "tensors":
        arrays = _load_arrays(cfg["arrays"])

        def epoch_batches(e):
            return _tensor_batches(arrays, rank, world, cfg["batch_size"], cfg["seed"], e)
    else:
        shard = ray.train.get_dataset_shard("train")
        collate = FusionCollate(None, context_offset=2)

        def epoch_batches(e):
            return shard.iter_torch_batches(batch_size=cfg["batch_size"], collate_fn=collate,
                                            prefetch_batches=PREFETCH, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                            local_shuffle_seed=cfg["seed"] * 100_003 + e * 101 + rank)
    record = run_loop(cfg, rank, world, ray.train.torch.prepare_model, epoch_batches)
    _write(record, cfg["out"])


class _Rows:
    """map_batches callable: row ids -> the rows of arrays.npz (FusionCollate's input columns)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, batch):
        import numpy as np

        ids = np.asarray(batch["id"])
        with np.load(self.path) as z:
            return {k: z[k][ids] for k in SAMPLE_DTYPES}


def _ray_init(cpus: int) -> None:
    import ray

    # The engine's rule (engine.training.trainer.ensure_ray): a slot per worker and two
    # for Ray Data's tasks. Logical slots only: the machine has what it has.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def run_ray(cfgs: dict[str, dict]) -> dict[str, dict]:
    """The Ray variants (name -> its cfg), one after the other in one Ray session."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    records = {}
    started = time.perf_counter()
    _ray_init(next(iter(cfgs.values()))["workers"] + 2)
    try:
        for variant, cfg in cfgs.items():
            source = SOURCES[variant]
            load = load_average()["load_1m"]
            datasets = None
            if source == "dataset":
                n = cfg["samples"]
                ds = ray.data.range(n, override_num_blocks=max(1, n // 16)).map_batches(
                    _Rows(cfg["arrays"]), batch_format="numpy", batch_size=16)
                datasets = {"train": ds.materialize()}  # in the object store before the clock starts
            trainer = TorchTrainer(
                ray_worker, train_loop_config={**cfg, "source": source},
                scaling_config=ScalingConfig(num_workers=cfg["workers"], use_gpu=False,
                                             resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"bench-{variant}-{int(time.time() * 1000)}", storage_path=cfg["storage"]),
                datasets=datasets,
            )
            result = trainer.fit()
            if getattr(result, "error", None) is not None:
                raise SystemExit(f"Ray Train run failed: {result.error}")
            records[variant] = json.loads(Path(cfg["out"]).read_text())
            records[variant]["wall_seconds"] = round(time.perf_counter() - started, 1)  # incl. ray.init for the first
            records[variant]["load_1m_before"] = load
            started = time.perf_counter()
    finally:
        ray.shutdown()
    return records


def run_engine(args, work: Path) -> dict:
    """engine.training.train on the archive (Zarr read in Ray Data tasks), no augmentation."""
    from engine.training import train

    started = time.perf_counter()
    _ray_init(args.workers + 2)
    try:
        per_image = -(-args.samples // args.images)
        result = train(FAMILY, args.model, str(work / "archive"), storage_path=work / "runs", epochs=args.epochs,
                       num_workers=args.workers, batch_size=args.batch_size, augment=False, val_fraction=0.0,
                       max_samples_per_image=per_image, seed=args.seed, keep_checkpoints=1,
                       tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    finally:
        import ray

        ray.shutdown()
    return {"epochs": [{"epoch": h["epoch"], "samples_per_s": round(h["train_samples_per_s"], 3),
                        "loss": round(h["train_loss"], 5)} for h in result.history],
            "train_samples": result.train_samples, "wall_seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- orchestration

def steady(record: dict, key: str = "samples_per_s") -> list[float]:
    return [e[key] for e in record["epochs"][1:]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker_config is not None:
        torchrun_worker(json.loads(args.worker_config))
        return {}
    if args.samples % (args.workers * args.batch_size):
        raise SystemExit("--samples must be a multiple of --workers x --batch-size (equal full batches on every "
                         "worker, in every variant)")
    from engine.runtime import configure_offline

    configure_offline()
    # Entry point settings, inherited by torchrun's ranks and Ray's workers alike.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    # Ray starts its workers at niceness 15 (RayConfig worker_niceness), torchrun's ranks
    # run at the caller's. On a dedicated machine that changes nothing; on a shared one
    # the niced workers yield to everyone else's processes and the wall-clock comparison
    # measures the neighbours. Equal priority for both (the raylet reads RAY_<config>).
    os.environ["RAY_worker_niceness"] = str(args.niceness)
    work, tmp = work_folder(args.workdir, "grainflow-train-bench-")
    with json_stdout():  # Ray's and torchrun's logs to stderr; stdout carries only the JSON
        report = run(args, work)
    print(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return report


def run(args, work: Path) -> dict:
    started = time.perf_counter()
    load_start = load_average()
    arrays, data = prepare_data(args, work)
    base = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
            "workers": args.workers, "seed": args.seed, "samples": args.samples, "arrays": str(arrays),
            "root_pid": os.getpid(), "niceness": args.niceness,
            "storage": str(work / "ray-runs")}
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    rounds = []
    for r in range(args.rounds):
        # torchrun first in even rounds, last in odd ones; the Ray variants share one
        # Ray session per round (Ray is down while torchrun runs) and swap order too.
        ray_order = ["ray_train", "ray_data"] if r % 2 == 0 else ["ray_data", "ray_train"]
        order = ["torchrun", *ray_order] if r % 2 == 0 else [*ray_order, "torchrun"]
        cfgs = {v: {**base, "out": str(work / f"{v}-{r}.json")} for v in order}
        for part in (["torchrun"], ray_order) if r % 2 == 0 else (ray_order, ["torchrun"]):
            if part == ["torchrun"]:
                load = load_average()["load_1m"]
                runs["torchrun"].append({**run_torchrun(cfgs["torchrun"], env), "load_1m_before": load})
            else:
                for variant, record in run_ray({v: cfgs[v] for v in part}).items():
                    runs[variant].append(record)
        this = {v: statistics.median(steady(runs[v][-1])) for v in order}
        cpu = {v: statistics.median(steady(runs[v][-1], "samples_per_cpu_s")) for v in order}
        rounds.append({"order": order, "steady_samples_per_s": {k: round(v, 2) for k, v in this.items()},
                       "ratio_ray_train": round(this["ray_train"] / this["torchrun"], 3),
                       "ratio_ray_data": round(this["ray_data"] / this["torchrun"], 3),
                       "steady_samples_per_cpu_s": {k: round(v, 2) for k, v in cpu.items()}})
    med = {v: statistics.median([x for rec in runs[v] for x in steady(rec)]) for v in VARIANTS}
    med_cpu = {v: statistics.median([x for rec in runs[v] for x in steady(rec, "samples_per_cpu_s")])
               for v in VARIANTS}
    report = {
        "benchmark": "train", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **load_start},
        "setup": {"model": f"{FAMILY}/{args.model}", "batch_size_per_worker": args.batch_size,
                  "workers": args.workers, "threads_per_worker": args.threads, "epochs_per_run": args.epochs,
                  "niceness": args.niceness,
                  "steady_epochs": "2..", "data": data, "backend": "gloo"},
        "samples_per_s": {v: round(m, 2) for v, m in med.items()},
        "ratio": round(med["ray_data"] / med["torchrun"], 3),
        "ratio_ray_train_tensors": round(med["ray_train"] / med["torchrun"], 3),
        "goal": 0.9,
        "paired_ratios": {"ray_data": [r["ratio_ray_data"] for r in rounds],
                          "ray_train": [r["ratio_ray_train"] for r in rounds]},
        # load-insensitive view: samples per CPU second of everything the variant ran
        "samples_per_cpu_s": {v: round(m, 2) for v, m in med_cpu.items()},
        "cpu_ratio": round(med_cpu["ray_data"] / med_cpu["torchrun"], 3),
        "cpu_ratio_ray_train_tensors": round(med_cpu["ray_train"] / med_cpu["torchrun"], 3),
        "rounds": rounds,
        "runs": runs,
    }
    if args.engine:
        load = load_average()["load_1m"]
        record = run_engine(args, work)
        record["load_1m_before"] = load
        eng = statistics.median(steady(record))
        report["engine"] = {"steady_samples_per_s": round(eng, 2), "ratio_to_torchrun_preloaded":
                            round(eng / med["torchrun"], 3), **record}
    report["machine"]["load_1m_end"] = load_average()["load_1m"]
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    return report


if __name__ == "__main__":
    main()
