"""Generate labelled rare-defect samples with a diffusion model as Ray tasks; prints a JSON
summary as its last line.

    python -m jobs.synthesize --model diffusion.safetensors --out s3://lab/synthetic \\
        -n 200 --class crack --class void --material ferritic_steel --modality SEM \\
        --gate-real s3://lab/real
    python -m jobs.synthesize --gate-only --out s3://lab/synthetic --gate-real s3://lab/real

--model is a checkpoint file (with its .sha256 beside it) or a registry ref (name,
name@alias, name/version). --class/--material/--modality may repeat; left out, every
value the model knows is used. Every requested value is checked against the model
before any work starts. Each batch is a Ray task with --num-cpus CPUs and, when the
cluster has GPUs (or --num-gpus is given), that fraction of a GPU. Rerunning with the
same arguments resumes: samples already in the archive are skipped, the rest are
identical to what an uninterrupted run writes; a larger -n adds samples and keeps the
ones written. --gate-real runs the quality gate after generating; --gate-only gates an
archive without generating (training takes only gated archives, and only when the gate
judged every sample, so gate again after adding samples). Exit status: 0 done, 2 bad
input (the message names it), 1 batches failed (listed in the summary) or anything else.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.synthesize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusion checkpoint (.safetensors) or registry ref")
    p.add_argument("--out", required=True, help="archive URI to write (local path, file://, s3://)")
    p.add_argument("-n", "--samples", type=int, default=None, help="samples per (class, material, modality)")
    p.add_argument("--class", dest="classes", action="append", default=None, help="defect class (repeatable)")
    p.add_argument("--material", dest="materials", action="append", default=None, help="material (repeatable)")
    p.add_argument("--modality", dest="modalities", action="append", default=None, help="modality (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="run seed; per-sample seeds derive from it")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--sampler", default="ddim", help="ddim or dpm (DPM-Solver++)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per Ray task")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPU fraction per task (default: 0.25 when the cluster has GPUs, else 0)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per task")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per task (default: the task's whole CPUs); recorded, a resume must match")
    p.add_argument("--gate-real", default=None, metavar="ARCHIVE",
                   help="run the quality gate against this real archive after generating")
    p.add_argument("--gate-only", action="store_true",
                   help="gate the archive --out against --gate-real without generating")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for registry refs")
    args = p.parse_args(argv)
    if args.gate_only:
        if not args.gate_real:
            p.error("--gate-only needs --gate-real ARCHIVE (the real archive to compare with)")
    elif args.model is None or args.samples is None:
        p.error("--model and -n/--samples are required (unless --gate-only)")
    return args


def run(args: argparse.Namespace) -> dict:
    """The work of main, raising GrainflowError on bad input (shared with `grainflow synthesize`)."""
    from engine.runtime import configure_offline
    from engine.synth.diffusion.job import synthesize

    configure_offline()
    if args.gate_only:
        from engine.synth.diffusion.gate import gate_archive

        return {"archive": args.out, "gate": gate_archive(args.out, args.gate_real, seed=args.seed).to_dict()}
    summary = synthesize(
        args.model, args.out, n_per_condition=args.samples, defect_classes=args.classes,
        materials=args.materials, modalities=args.modalities, seed=args.seed, steps=args.steps,
        sampler=args.sampler, batch_size=args.batch_size, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
        tracking_uri=args.tracking_uri, threads=args.threads,
    ).to_dict()
    if args.gate_real:
        from engine.synth.diffusion.gate import gate_archive

        summary["gate"] = gate_archive(args.out, args.gate_real, seed=args.seed).to_dict()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ray

    from engine.errors import exit_code_for

    connected = ray.is_initialized()  # a Ray the caller connected stays connected
    try:
        from engine.stores.uri import durable
        from engine.tenants import enforce_job_uris

        enforce_job_uris("synthesize", args)  # the tenant's prefixes, checked again in the job
        durable(args.out, "--out")  # samples are written by Ray tasks in other processes
        summary = run(args)
    except Exception as exc:
        return exit_code_for(exc, "synthesize")  # a user's error: one line, exit 2; a bug: its traceback
    finally:
        if ray.is_initialized() and not connected:
            ray.shutdown()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 1 if summary.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
