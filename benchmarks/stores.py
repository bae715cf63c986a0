"""Tile read throughput of engine.stores against zarr-python and tensorstore; S3 vs local.

    python benchmarks/stores.py [--gib 4] [--tiles 256] [--tile 1024] [--workdir DIR]

Writes (once, reused) a uint16 OME-Zarr image of about --gib GiB with 512-px chunks,
then reads the same random chunk-aligned tiles with each reader and prints JSON:
decoded MB/s per reader (best of --repeats) and ratios against the faster peer. The
page cache is warm for every reader alike (the image was just written or read).
The S3 part copies a 128 MiB image into moto's server on 127.0.0.1 and reports the
engine's S3 throughput as a ratio to the same reads from local disk. The synth part
reports `grainflow synth`'s megapixels per second on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.stores.image import open_image  # noqa: E402
from engine.stores.writer import ImageWriter  # noqa: E402

CHUNK = 512


def make_image(path: Path, side: int, seed: int = 0) -> None:
    """A micrograph-like uint16 image (smooth texture + noise), written one chunk row at a time."""
    if (path / "zarr.json").exists() and open_image(path).shape == (side, side):
        return
    rng = np.random.default_rng(seed)
    xs = np.arange(side, dtype=np.float32)
    with ImageWriter(path, shape=(side, side), dtype="uint16", pixel_size=2.0, chunk=CHUNK) as writer:
        for y in range(0, side, CHUNK):
            ys = np.arange(y, min(y + CHUNK, side), dtype=np.float32)[:, None]
            row = 20000 + 8000 * np.sin(xs / 37.0) * np.cos(ys / 53.0) + rng.normal(0, 600, (len(ys), side))
            row = np.clip(row, 0, 65535).astype(np.uint16)
            for x in range(0, side, CHUNK):
                writer.write_tile(y, x, row[:, x:x + CHUNK])


def tile_regions(side: int, tile: int, n: int, seed: int = 1) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    grid = side // tile
    picks = rng.choice(grid * grid, size=min(n, grid * grid), replace=False)
    return [(int(i // grid) * tile, int(i // grid) * tile + tile, int(i % grid) * tile, int(i % grid) * tile + tile) for i in picks]


def best_rate(fn, nbytes: int, repeats: int) -> float:
    """Decoded MB/s of the fastest of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e6


def interleaved_rates(fns: dict, nbytes: int, repeats: int) -> dict[str, float]:
    """Best decoded MB/s per reader, the readers taking turns so that load from other
    processes falls on all of them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: round(nbytes / t / 1e6, 1) for name, t in best.items()}


def readers(path: Path, regions, batch: int):
    import tensorstore as ts
    import zarr

    image = open_image(path)
    arr = zarr.open_array(str(path / "0"), mode="r")
    tstore = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/0/"}}, read=True).result()
    image.read_region(0, *regions[0])  # open the engine's reader outside the timing, as the peers' are

    def engine_batched():
        for i in range(0, len(regions), batch):
            image.read_regions(0, regions[i:i + batch])

    return {
        "engine_read_regions": engine_batched,
        "engine_read_region_loop": lambda: [image.read_region(0, *r) for r in regions],
        "zarr_python_loop": lambda: [arr[y0:y1, x0:x1] for y0, y1, x0, x1 in regions],
        "tensorstore_loop": lambda: [tstore[y0:y1, x0:x1].read().result() for y0, y1, x0, x1 in regions],
        "tensorstore_async": lambda: [f.result() for f in [tstore[y0:y1, x0:x1].read() for y0, y1, x0, x1 in regions]],
    }


def s3_ratio(workdir: Path, tile: int, n_tiles: int, batch: int, repeats: int) -> dict:
    import s3fs
    from moto.server import ThreadedMotoServer

    side = 8192
    local = workdir / "s3-source.ome.zarr"
    make_image(local, side, seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        fs = s3fs.S3FileSystem()
        fs.call_s3("create_bucket", Bucket="grainflow-bench")
        fs.put(str(local), "grainflow-bench/a.ome.zarr", recursive=True)
        regions = tile_regions(side, tile, n_tiles, seed=2)
        nbytes = sum((y1 - y0) * (x1 - x0) * 2 for y0, y1, x0, x1 in regions)
        out = {"image": f"{side}x{side} uint16 ({side * side * 2 / 2**20:.0f} MiB)", "tiles": len(regions)}
        for name, uri in (("local", local), ("s3", "s3://grainflow-bench/a.ome.zarr")):
            image = open_image(uri)
            out[f"{name}_MBps"] = round(best_rate(
                lambda: [image.read_regions(0, regions[i:i + batch]) for i in range(0, len(regions), batch)],
                nbytes, repeats), 1)
        out["s3_over_local"] = round(out["s3_MBps"] / out["local_MBps"], 3)
        return out
    finally:
        server.stop()


def synth_rate(workdir: Path, size: int, n_images: int) -> dict:
    """Megapixels per second of `grainflow synth` pinned to one core (one image per material).

    Runs in a child process restricted to CPU 0 with single-threaded BLAS, and counts
    that process's CPU time, so other load on the machine does not inflate the figure.
    """
    import subprocess

    code = f"""
import json, os, time
os.sched_setaffinity(0, {{0}})
from engine.synth.archive import generate_archive
t0, c0 = time.perf_counter(), time.process_time()
cat = generate_archive({str(workdir / 'synth-rate')!r}, n_images={n_images}, seed=3, size={size}, chunk=512)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({{"wall_s": wall, "cpu_s": cpu, "mpix": float((cat.height * cat.width).sum()) / 1e6}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "images": f"{n_images} x {size}x{size} (one per material, written as OME-Zarr with labels and pyramid)",
        "megapixels": round(r["mpix"], 1),
        "mpix_per_cpu_s": round(r["mpix"] / r["cpu_s"], 2),
        "mpix_per_wall_s": round(r["mpix"] / r["wall_s"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="size of the local image in GiB")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="tiles per engine read_regions call (one 128 MiB read task of 1024^2 uint16 tiles)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grainflow-bench"))
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--synth-size", type=int, default=2048)
    parser.add_argument("--skip-synth", action="store_true")
    args = parser.parse_args()

    side = int(np.sqrt(args.gib * 2**30 / 2)) // CHUNK * CHUNK
    path = args.workdir / f"image-{side}.ome.zarr"
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_image(path, side)
    setup_s = time.perf_counter() - t0
    regions = tile_regions(side, args.tile, args.tiles)
    nbytes = len(regions) * args.tile * args.tile * 2
    rates = interleaved_rates(readers(path, regions, args.batch), nbytes, args.repeats)
    faster_peer = max(("zarr_python_loop", "tensorstore_loop", "tensorstore_async"), key=rates.get)
    result = {
        "benchmark": "stores.tile_read",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cpu {platform.machine()}",
        "image": f"{side}x{side} uint16, chunk {CHUNK}, {side * side * 2 / 2**30:.2f} GiB, zstd",
        "tiles": f"{len(regions)} x {args.tile}x{args.tile} ({nbytes / 1e6:.0f} MB decoded), warm page cache",
        "setup_s": round(setup_s, 1),
        "MBps": rates,
        "faster_peer": faster_peer,
        "engine_over_faster_peer": round(rates["engine_read_regions"] / rates[faster_peer], 3),
    }
    if not args.skip_s3:
        result["s3"] = s3_ratio(args.workdir, args.tile, args.tiles, args.batch, args.repeats)
    if not args.skip_synth:
        result["synth_one_core"] = synth_rate(args.workdir, args.synth_size, n_images=12)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
