"""Diffusion synthesis benchmarks; prints one JSON object as its last line.

    python benchmarks/synthesis.py throughput [--samples 32 --batch 4 --steps 10]
    python benchmarks/synthesis.py rare [--pool 24 --size 512 --diffusion-epochs 15 --detector-epochs 15]
    python benchmarks/synthesis.py all

throughput: samples/s of `engine.synth.diffusion.job.synthesize` (ddpm_tiny, 32 px) with
one synthesis task in flight (one CPU worker) and with two; scaling efficiency =
rate(2) / (2 * rate(1)). Both on one local Ray of 2 CPUs, after a warm-up batch that
starts the workers and loads the model, so start-up is not counted.

rare: the rare-class experiment. A pool of procedural images is cut to a training
archive where the rare class (default `void`) is at most `--rare-share` (2%) of the
defect instances: every image without it, plus the fewest images with it. The diffusion
model trains on that archive's defect crops (Ray Train), generates rare-class samples
for the archive's materials and modalities, the quality gate filters them, and the
detector (yolov8n_tiny) trains with the same seed on: real tiles only; real plus the
gate-accepted synthetic tiles (`--ratio` synthetic per real tile; skipped when the gate
accepts none); real plus all synthetic tiles, ungated (engine.training.mixing.ungated:
the explicit opt-out of the gate that training otherwise requires). Outputs already in --work are
reused, so an interrupted run continues. Recall of the rare class (IoU 0.5,
confidence >= --recall-conf) and mAP50 are measured on a held-out archive generated with another
seed; recall is per class, so the held-out class counts (reported) set only how precise
each recall figure is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ray(num_cpus: int = 2):
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tempfile.mkdtemp(prefix="gf", dir="/tmp"),
                 include_dashboard=False)


# What the throughput runs ask for: one condition of an untrained model.
THROUGHPUT_CONDITION = {"defect_classes": ["void"], "materials": ["ferritic_steel"], "modalities": ["SEM"]}


def untrained_model(path: Path) -> Path:
    """A seeded, untrained ddpm_tiny checkpoint at `path` that synthesis accepts: speed does
    not depend on the weights, but synthesis asks a model for the pixel size its training
    crops had per modality and for the conditions it learnt, which this one is given."""
    import torch

    from engine.models import create_diffusion, save_checkpoint
    from engine.synth.diffusion.conditions import Condition

    (defect_class,), (material,), (modality,) = (THROUGHPUT_CONDITION[k] for k in
                                                 ("defect_classes", "materials", "modalities"))
    torch.manual_seed(0)
    save_checkpoint(create_diffusion("ddpm_tiny", pixel_size_nm={modality: 5.0},
                                     trained_conditions=[Condition(defect_class, material, modality).key()]), path)
    return path


def throughput(args, work: Path) -> dict:
    from engine.synth.diffusion.job import synthesize

    _ray(2)
    ckpt = untrained_model(work / "ddpm_tiny.safetensors")
    common = dict(**THROUGHPUT_CONDITION, steps=args.steps, batch_size=args.batch)
    # warm-up: both workers started and holding the model
    synthesize(str(ckpt), work / "warm", n_per_condition=2 * args.batch, max_in_flight=2, seed=99, **common)
    rates = {}
    for workers in (1, 2):
        s = synthesize(str(ckpt), work / f"w{workers}", n_per_condition=args.samples, max_in_flight=workers,
                       seed=workers, **common)
        rates[workers] = s.written / s.seconds
    return {"samples": args.samples, "batch": args.batch, "steps": args.steps, "patch_px": 32,
            "samples_per_s_1_worker": round(rates[1], 3), "samples_per_s_2_workers": round(rates[2], 3),
            "scaling_efficiency_1_to_2": round(rates[2] / (2 * rates[1]), 3), "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 1)}


def _cut_to_rare(archive: Path, rare: str, share: float) -> dict:
    """Keep every image without `rare` plus the fewest with it so its share <= `share`."""
    import pandas as pd

    from engine.stores.catalog import read_catalog, write_catalog, CatalogRow, read_table, write_table
    from engine.stores.uri import resolve
    from engine.synth.truth import TRUTH_FILE

    cat = read_catalog(archive)
    truth = pd.read_parquet(archive / TRUTH_FILE)
    per_image = truth.groupby("image_id")["defect_class"].apply(list).to_dict()
    without = [i for i in cat["image_id"] if rare not in per_image.get(i, [])]
    with_rare = sorted((i for i in cat["image_id"] if rare in per_image.get(i, [])),
                       key=lambda i: per_image[i].count(rare))
    keep = list(without)
    n_other = sum(len(per_image.get(i, [])) for i in without)
    n_rare = 0
    for i in with_rare:  # add images while the share stays within bounds (at least one instance)
        r = per_image[i].count(rare)
        o = len(per_image[i]) - r
        if n_rare and (n_rare + r) / (n_rare + r + n_other + o) > share:
            continue
        keep.append(i)
        n_rare, n_other = n_rare + r, n_other + o
    rows = [CatalogRow(**{k: (None if (not isinstance(v, str) and pd.isna(v)) else v) for k, v in r.items()})
            for r in cat[cat["image_id"].isin(keep)].to_dict("records")]
    write_catalog(archive, rows)
    write_table(resolve(archive).join(TRUTH_FILE), read_table(resolve(archive).join(TRUTH_FILE)).filter(
        np.isin(truth["image_id"].to_numpy(), keep)))
    return {"images": len(keep), "rare_instances": n_rare, "other_instances": n_other,
            "rare_share": round(n_rare / max(1, n_rare + n_other), 4)}


def _class_counts(archive: Path) -> dict:
    """Ground-truth instances per defect class."""
    import pandas as pd

    from engine.synth.truth import TRUTH_FILE

    truth = pd.read_parquet(archive / TRUTH_FILE)
    return truth["defect_class"].value_counts().to_dict()


def _recall(detector, archive: Path, cls: str, conf: float = 0.25) -> dict:
    from engine.training.detector.evaluate import ImageCache, match_predictions, predict_image
    from engine.training.detector.tiles import image_entries, image_truth, read_ground_truth, truth_by_image

    from engine.stores.uri import resolve

    archive = resolve(archive)
    names = tuple(detector.names)
    index = {n: i for i, n in enumerate(names)}
    truth = truth_by_image(read_ground_truth(archive))
    reader = ImageCache()
    found = {n: 0 for n in names}
    total = {n: 0 for n in names}
    for entry in image_entries(archive):
        gt = image_truth(truth, entry, index)
        boxes, scores, classes = predict_image(detector, reader, entry.image_id, entry.image, entry.level, tile=1024,
                                               halo=64, batch=4, conf=conf, iou=0.7, max_det=300)
        tp = match_predictions(boxes, classes, gt.boxes, gt.classes)[:, 0]  # IoU 0.5
        for c in range(len(names)):
            total[names[c]] += int((gt.classes == c).sum())
            found[names[c]] += int(tp[classes == c].sum())
    recall = {n: (found[n] / total[n] if total[n] else float("nan")) for n in names}
    return {"rare_recall": recall[cls], "per_class_recall": recall, "targets": total}


def rare(args, work: Path) -> dict:
    import torch

    from engine.models import load_model
    from engine.stores.catalog import read_catalog
    from engine.synth.archive import generate_archive
    from engine.synth.diffusion.gate import gate_archive
    from engine.synth.diffusion.job import synthesize
    from engine.training import train
    from engine.training.detector.train import train_detector
    from engine.training.detector.evaluate import evaluate_detector
    from engine.training.mixing import ungated

    # 2 training workers hold a CPU slot each for the whole run and Ray Data's read tasks
    # need slots of their own (engine.training.trainer.ensure_ray): 4 logical CPUs.
    _ray(4)
    t0 = time.perf_counter()
    timings = {}
    train_archive, held_out = work / "rare_train", work / "held_out"
    # Steps whose outputs are in --work already are reused (a rerun after an interruption).
    if not (held_out / "catalog.parquet").exists():
        generate_archive(train_archive, n_images=args.pool, seed=11, size=args.size, chunk=256)
        cut = _cut_to_rare(train_archive, args.rare, args.rare_share)
        (work / "cut.json").write_text(json.dumps(cut))
        generate_archive(held_out, n_images=args.held_out, seed=12, size=args.size, chunk=256)
    cut = json.loads((work / "cut.json").read_text())
    held_counts = _class_counts(held_out)
    timings["archives_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    done = work / "diffusion.json"
    if not done.exists():
        result = train("diffusion", "ddpm_tiny", str(train_archive), storage_path=str(work / "runs"),
                       epochs=args.diffusion_epochs, num_workers=2, batch_size=16, lr=2e-3, val_fraction=0.0,
                       tracking_uri=f"sqlite:///{work}/mlflow.db")
        done.write_text(json.dumps({"checkpoint": result.checkpoint_path, "loss": result.history[-1]["train_loss"]}))
    diffusion = json.loads(done.read_text())
    ckpt = Path(diffusion["checkpoint"]) / "model.safetensors"
    timings["diffusion_train_s"] = time.perf_counter() - t

    cat = read_catalog(train_archive)
    mats, mods = sorted(set(cat["material"])), sorted(set(cat["modality"]))
    n_per = max(1, int(np.ceil(args.synthetic / (len(mats) * len(mods)))))
    t = time.perf_counter()
    syn = work / "synthetic"
    summary = synthesize(str(ckpt), syn, n_per_condition=n_per, defect_classes=[args.rare], materials=mats,
                         modalities=mods, steps=args.steps, batch_size=8)
    timings["synthesize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gate = gate_archive(syn, train_archive, seed=0).to_dict()
    timings["gate_s"] = time.perf_counter() - t

    # The same samples without the gate's verdict: what mixing them in would do (and the
    # only synthetic arm there is when the gate refuses every sample).
    arms = [("real_only", {}), ("with_synthetic_ungated", {"synthetic_archive": ungated(syn),
                                                           "synthetic_ratio": args.ratio})]
    if gate["accepted"]:
        arms.append(("with_synthetic", {"synthetic_archive": str(syn), "synthetic_ratio": args.ratio}))
    torch.set_num_threads(os.cpu_count() or 1)  # the driver's detector training; Ray's init leaves it at 1
    runs = {}
    for name, extra in arms:
        t = time.perf_counter()
        result_file = work / name / "result.json"
        if not result_file.exists():
            train_detector(train_archive, out_dir=work / name, model="yolov8n_tiny", epochs=args.detector_epochs,
                           imgsz=args.imgsz, batch=16, seed=0, device="cpu", workers=0, evaluate=False,
                           background_ratio=0.5, **extra)
        r = json.loads(result_file.read_text())
        det = load_model(r["checkpoint"], expected_sha256=r["sha256"])
        ev = evaluate_detector(det, held_out)
        runs[name] = {**_recall(det, held_out, args.rare, conf=args.recall_conf), "mAP50": ev.map50, "train_tiles": r["train_tiles"],
                      "seconds": round(time.perf_counter() - t, 1)}
    gated = runs.get("with_synthetic")
    gain = (gated or runs["with_synthetic_ungated"])["rare_recall"] - runs["real_only"]["rare_recall"]
    return {"rare_class": args.rare, "train_archive": cut, "held_out_targets": held_counts,
            "synthesis": {"written": summary.written + summary.skipped, "per_condition": n_per, "conditions": summary.conditions},
            "gate": gate, "diffusion_final_loss": diffusion["loss"],
            "detector_epochs": args.detector_epochs, "diffusion_epochs": args.diffusion_epochs,
            **runs, "gain_from": "with_synthetic" if gated else "with_synthetic_ungated (the gate accepted none)",
            "rare_recall_gain_points": round(100 * gain, 1), "goal_points": 10.0, "recall_conf": args.recall_conf,
            "timings_s": {k: round(v, 1) for k, v in timings.items()}, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("throughput", "rare", "all"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pool", type=int, default=24)
    p.add_argument("--held-out", type=int, default=12)
    p.add_argument("--size", type=int, default=512, help="image side of the procedural archives, px")
    p.add_argument("--imgsz", type=int, default=128, help="detector tile side, px")
    p.add_argument("--rare", default="void")
    p.add_argument("--rare-share", type=float, default=0.02)
    p.add_argument("--synthetic", type=int, default=48, help="rare-class samples to generate in all")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--recall-conf", type=float, default=0.05,
                   help="detection confidence recall is counted at (small detectors trained briefly score low)")
    p.add_argument("--diffusion-epochs", type=int, default=15)
    p.add_argument("--detector-epochs", type=int, default=15)
    p.add_argument("--work", default=None)
    args = p.parse_args(argv)
    from engine.runtime import configure_offline

    configure_offline()
    work = Path(args.work or tempfile.mkdtemp(prefix="gf-synth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    try:
        if args.part in ("throughput", "all"):
            out["throughput"] = throughput(args, work)
            print(json.dumps(out["throughput"]), flush=True)
        if args.part in ("rare", "all"):
            out["rare"] = rare(args, work)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print(json.dumps(out, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
