"""What the benchmarks share: the machine's load, a working folder, the environment their
child processes run in, a child run that prints one JSON record, stdout kept for the JSON,
and the parent's part of a run (`run_parent`).

Each variant runs in a fresh child process (`python <script> <flag> '<cfg json>'`) so no
variant inherits another's Ray, threads or caches; the child's last stdout line is its
record.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2)}


def machine(load_start: dict) -> dict:
    """The report's machine entry: cores, platform, the load when the run started
    (`load_average()` then) and now."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), **load_start,
            "load_1m_end": load_average()["load_1m"]}


def work_folder(workdir: Path | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """(the benchmark's working folder, made if missing; the temporary folder to clean up
    at the end when none was given)."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        workdir = Path(tmp.name)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return work, tmp


def child_environment(work: Path, threads: int, niceness: int) -> dict:
    """Entry-point settings, set here and inherited by child processes and Ray's workers
    alike: T torch/BLAS threads, Ray's worker niceness (its default is 15, the children's
    is ours), Ultralytics' config folder in `work`. Returns the children's environment
    (the repository on PYTHONPATH)."""
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "RAY_worker_niceness": str(niceness), "YOLO_CONFIG_DIR": str(work / "ultralytics")})
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def run_child(script: str | Path, flag: str, cfg: dict, env: dict, label: str) -> dict:
    """Run `script flag '<cfg>'` in the repository root; its last stdout line (JSON) with
    the load before and the process's wall seconds added. Its stderr passes through."""
    load = load_average()["load_1m"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), flag, json.dumps(cfg)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} run exited with {proc.returncode}")
    record = {"load_1m_before": load, **json.loads(proc.stdout.strip().splitlines()[-1]),
              "process_s": round(time.perf_counter() - started, 1)}
    print(f"{label}: {json.dumps(record)}", file=sys.stderr, flush=True)
    return record


def command_line(argv: list[str] | None) -> str:
    """How this run was started, for the report: the command, or the `main(argv)` call."""
    return " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv!r})"


@contextlib.contextmanager
def json_stdout():
    """Within: file descriptor 1 (this process's and its children's) goes to stderr, so
    libraries' logs (Ray, Ultralytics, torchrun) stay off stdout, which then carries only
    the benchmark's JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@dataclass(frozen=True)
class ParentRun:
    """The parent process of a benchmark run: its working folder, its children's
    environment, when it started (perf_counter) and the machine's load then."""

    work: Path
    env: dict
    started: float
    load_start: dict

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def run_parent(workdir: Path | None, prefix: str, *, threads: int, niceness: int | None,
               measure: Callable[[ParentRun], dict]) -> dict:
    """The parent's part of a benchmark: offline entry-point settings, the working folder
    (`work_folder`; a temporary one is removed at the end), the children's environment
    (`child_environment`; niceness None: Ray's workers at 0 and this process's niceness
    left alone, else this process takes it and its children inherit it), then
    `measure(run)` with the libraries' output on stderr. Prints the report `measure`
    returns as JSON on stdout and returns it."""
    from engine.runtime import configure_offline

    configure_offline()
    work, tmp = work_folder(workdir, prefix)
    try:
        run = ParentRun(work, child_environment(work, threads, niceness or 0), time.perf_counter(), load_average())
        with json_stdout():
            if niceness is not None:
                os.nice(niceness - os.nice(0))  # root may lower it too
            report = measure(run)
        print(json.dumps(report, indent=2))
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()
