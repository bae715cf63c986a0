"""The reprocessing job: every tile of an archive through the ensemble, on Ray Data.

    result = reprocess("s3://lab/archive", "s3://lab/runs/r1", "grainflow-demo@production")

Steps (the driver holds metadata and counters only, never pixels):

1. Models: the ref is resolved once to a fixed version (``name/version``, with its
   members' versions: `engine.pipeline.bundle.pin_bundle`), so every actor loads the
   same members even if the alias moves during the job, and an actor whose node holds
   the member files already makes no registry query. The driver describes the bundle
   (classes, materials, grades, input modes) from registry metadata and each actor
   checks that description against the members it loads; where the metadata does not
   record the label sets, one Ray task loads the bundle to describe it.
2. Plan: `engine.data.datasource.ZarrTileDatasource` plans tiles from metadata at the
   model's pixel size (explicit, else the bundle's ``pixel_size_nm`` tag, else each
   image's level 0: models trained without a pixel size saw native pixels; an image of
   non-square pixels is resampled to square ones, `engine.data.tile_plan`).
3. Resume: the ledger's finished tiles (`engine.data.ledger`) become the datasource's
   skip set; `<out>/job.json` records the settings that shape the outputs and each
   image's pixel checksum, and a rerun with other settings, or over an image replaced
   since, is refused rather than mixing two runs' outputs. A rerun with ``resume=False``
   removes what the earlier run wrote there, and only that (`engine.pipeline.run_folder`): a user's own
   files beside the outputs stay. An ``out`` that holds names a run writes (``labels/``,
   ``tiles/``, ...) but no run's ``job.json`` is someone else's folder: the job refuses
   it before any work, resumed or not, so nothing there is written over or deleted.
4. Prepare, per image in Ray tasks: the label images' arrays (metadata only,
   `engine.data.sinks.create_label_arrays`) and, when a member takes its input in
   "image" mode, the image's preprocessing parameters (`engine.preprocess`), written to
   ``<out>/preprocess/<id>.json`` and read by the actors on first use.
5. Tiles: read tasks -> `engine.pipeline.job_ensemble.JobEnsemble` actors (an actor
   pool; GPUs when the cluster has them) -> `engine.data.sinks.WriteTileOutputs` tasks
   (outputs, then the ledger). Ray Data restarts a dead actor and retries its batch
   (``max_restarts``/``max_task_retries`` are -1 for actor pools in Ray 2.60); outputs
   are named by tile, so a redone tile overwrites its own files.
6. Finish, per image in a Ray task started as soon as the stream has reported the
   image's last tile (`engine.data.sinks.finish_image`): stitched objects, the tiles
   table, label pyramids and metadata; the driver writes ``summary.parquet`` from the
   small rows they return. Finishing overlaps the tile stage, so only the last images'
   finishing follows it.

Every step is idempotent: a rerun after an interruption at any point ends with the same
outputs as an uninterrupted run. See `engine.data.sinks` for the output layout.

A bad chunk fails the tile whose core holds it (an errors row) and trims the halo of the
tiles around it on that side (`engine.data.tile_read`). Those neighbours complete, and
their outputs are this run's, but the tiles table records the reduced halo
(``halo_reduced``), the summary counts them (``tiles_halo_reduced``; the image is not
``complete``) and they are not ledgered: a rerun redoes them with the failed tile, so
once the chunk is repaired the outputs equal a clean run's. While it stays bad, each
rerun redoes them again (with the same reduced halo) and fails the same tile.

Label images go beside each image by default (``labels="auto"``): the OME-Zarr
``labels/`` group is where NGFF viewers and the design look for them, and the label
image then travels with its image. When the archive cannot be written (a read-only
bucket, a Zarr v2 image) they go under ``<out>/labels/<id>.ome.zarr`` instead, and the
summary's ``labels_uri`` says where each image's are. Label images beside the images
are shared by every run over the archive: the last run to write a name wins, so give
runs that must coexist their own ``label_name`` (or ``labels="out"``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from engine.data.ledger import Ledger, put_file, table_bytes
from engine.data.tile_plan import DEFAULT_TOLERANCE
from engine.data.sinks import (
    DEFAULT_LABEL_NAME, LABELS_DIR, SUMMARY_FILE, LabelTarget, WriteTileOutputs, create_label_arrays, finish_image,
    label_dtype, summary_table, unplanned_summary_row, write_image_error,
)
from engine.errors import GrainflowError, error_message
from engine.pipeline.ensemble_config import EnsembleConfig
from engine.pipeline.run_folder import MANIFEST, PREPROCESS_DIR, clear_run, earlier_run
from engine.stores.id_names import id_file_stem
from engine.stores.uri import StoreLocation, resolve

LABEL_MODES = ("auto", "image", "out", "none")
_GROUP = 16  # images per prepare task
# The object-store bytes the tile stage may hold (tiles read ahead of the actors, their
# outputs not yet written): at least this, or 8 batches per actor where tiles are large.
# Ray Data's own budget is half the object store (GiBs), enough to read a large archive
# far ahead of the model, so the job's memory would grow with the archive; the model is
# the limit, and reads are fast, so a few batches ahead keep every actor busy.
_IN_FLIGHT_FLOOR = 256 * 2**20
_IN_FLIGHT_BATCHES_PER_ACTOR = 8
# What makes two runs' outputs differ: a resumed run must match the ledger's run on all of them.
_SETTINGS = ("archive", "bundle", "target_pixel_size_nm", "tolerance", "tile_size", "halo", "labels", "label_name",
             "config")


@dataclass(frozen=True)
class JobResult:
    """What a job did. tiles_total: tiles planned; tiles_done: finished by this run;
    tiles_skipped: finished by an earlier run (the ledger); errors: tiles that failed in
    this run (the errors table); seconds: the whole job; tiles_per_s: tiles this run
    processed (done + errors) per second of its tile stage; stage_seconds: per step;
    images: images planned and prepared; images_failed: images that could not be
    (unreadable metadata, a pixel size the models cannot be resampled to, preprocessing
    that cannot be fitted): an errors row each, with null level, y and x, and a summary
    row with no tiles. tiles_halo_reduced: of tiles_done, those read without part of
    their halo (a bad chunk beside them): not ledgered, a rerun redoes them."""

    tiles_total: int
    tiles_done: int
    tiles_skipped: int
    errors: int
    seconds: float
    tiles_per_s: float
    out: str
    images: int = 0
    images_failed: int = 0
    objects: int = 0
    bundle: str = ""
    target_pixel_size_nm: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tiles_halo_reduced: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ParamsFromStore:
    """image_id -> PreprocessParams read from ``<out>/preprocess/<id>.json`` on first use
    (None when an image has none); what the actors get as `Ensemble(params=...)`."""

    def __init__(self, out: str | StoreLocation):
        self.out = resolve(out)
        self._cache: dict[str, Any] = {}

    def __getstate__(self):
        return {"out": self.out, "_cache": {}}

    def __call__(self, image_id: str):
        if image_id not in self._cache:
            loc = _params_location(self.out, image_id)
            fs = loc.filesystem()
            self._cache[image_id] = params_from_json(fs.cat_file(loc.path)) if fs.exists(loc.path) else None
        return self._cache[image_id]


def params_to_json(params) -> bytes:
    return json.dumps(asdict(params), sort_keys=True).encode()


def params_from_json(data: bytes):
    from engine.preprocess.params import Background, PreprocessParams

    d = json.loads(data)
    bg = d.get("background")
    if bg is not None:
        d["background"] = Background(tuple(tuple(float(v) for v in row) for row in bg["values"]),
                                     tuple(bg["origin"]), tuple(bg["spacing"]))
    return PreprocessParams(**d)


def _params_location(out: StoreLocation, image_id: str) -> StoreLocation:
    return out.join(PREPROCESS_DIR, f"{id_file_stem(image_id)}.json")


# ---------------------------------------------------------------------------- Ray tasks


def _describe(bundle, registry, config: EnsembleConfig) -> dict[str, Any]:
    """The bundle's description: from registry metadata when it records the label sets
    (`describe_bundle`: no model loaded; the actors check it against their models), else
    from one Ray task that loads the bundle (a worker process importing torch, timm and
    Ultralytics and loading every member: ~3 CPU-s and a worker slot)."""
    import ray

    from engine.pipeline.bundle import describe_bundle
    from engine.pipeline.job_ensemble import describe_loaded_bundle

    described = describe_bundle(bundle, registry, config)
    if described is None:
        described = ray.get(ray.remote(num_cpus=1)(describe_loaded_bundle).remote(bundle, registry, config))
    return described


def _prepare_images(out: StoreLocation, plans: list, *, labels: str, label_name: str, id_stride: int,
                    overwrite: bool, fit: bool) -> tuple[list[LabelTarget], dict[str, GrainflowError]]:
    """Label arrays (and preprocessing parameters when `fit`) for a group of images:
    (targets, image_id -> why its parameters could not be fitted). An image that cannot
    be fitted (its pixels defeat the fit) is recorded and left out; the others go on."""
    targets, failed = [], {}
    for plan in plans:
        dtype = label_dtype(plan.n_tiles, id_stride)
        beside = LabelTarget(plan.image_id, plan.location, label_name, plan, id_stride, dtype, plan.location,
                             write=labels != "none")
        aside = LabelTarget(plan.image_id, out.join(LABELS_DIR, f"{id_file_stem(plan.image_id)}.ome.zarr"),
                            label_name, plan, id_stride, dtype, plan.location)
        if labels == "none":
            target = beside
        elif labels == "out":
            target = aside
            create_label_arrays(target, overwrite=overwrite)
        else:
            try:
                create_label_arrays(beside, overwrite=overwrite)
                target = beside
            except Exception as exc:  # read-only store, foreign (Zarr v2) image, no permission
                if labels == "image":
                    raise GrainflowError(f"{plan.location}: cannot write label images beside the image "
                                         f"({type(exc).__name__}: {exc}); use labels='out'") from None
                target = LabelTarget(**{**asdict_shallow(aside), "note": f"{type(exc).__name__}: {exc}"})
                create_label_arrays(target, overwrite=overwrite)
        if fit:
            loc = _params_location(out, plan.image_id)
            if overwrite or not loc.exists():
                from engine.preprocess import fit_preprocessing
                from engine.stores.image import open_image

                try:
                    params = fit_preprocessing(open_image(plan.location), plan.modality)
                except Exception as exc:  # noqa: BLE001 - any failure of this image's fit is this image's
                    failed[plan.image_id] = GrainflowError(
                        f"{plan.image_id}: preprocessing parameters could not be fitted: {type(exc).__name__}: "
                        f"{error_message(exc)}")
                    continue
                put_file(loc, params_to_json(params))
        targets.append(target)
    return targets, failed


def asdict_shallow(obj) -> dict[str, Any]:
    """A dataclass's fields as a dict, values as they are (dataclasses.asdict copies deeply)."""
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


def _finish(out: StoreLocation, plan, done, target, describe, provenance) -> dict[str, Any]:
    return finish_image(out, plan, done, label_target=target, class_names=describe["class_names"],
                        materials=describe["materials"], grades=describe["grades"], provenance=provenance)


# ---------------------------------------------------------------------------- the driver


def reprocess(archive: str | StoreLocation, out: str | StoreLocation, models_ref: str, *, registry=None,
              target_pixel_size_nm: float | None = None, tile_size: int | None = None, halo: int = 32,
              batch_size: int = 8, concurrency: int | None = None, num_gpus: float | None = None,
              cpus_per_actor: float = 1.0, resume: bool = True, labels: str = "auto",
              label_name: str = DEFAULT_LABEL_NAME, config: EnsembleConfig | None = None,
              tolerance: float = DEFAULT_TOLERANCE,
              target_bytes: int | None = None) -> JobResult:
    """Run the ensemble `models_ref` over every tile of `archive`, write results to `out`.

    archive, out: store URIs (local path, file://, s3://). models_ref: a registered
    bundle (`name@alias`, `name/version`, `name`); registry: a ModelRegistry (default the
    embedded one). target_pixel_size_nm: the model's pixel size (module doc for the
    default). tile_size: core edge in model pixels (rounded up to whole chunks; None: one
    chunk); halo: context pixels around each core. batch_size: tiles per ensemble call;
    concurrency: ensemble actors (default: one per GPU, else half the cluster's CPUs
    over cpus_per_actor); num_gpus: per actor (default: 1, or the share of the cluster's
    GPUs, when it has any; else 0; a share no node has and no autoscaler can add is
    refused); cpus_per_actor: CPUs each actor reserves, and torch's
    threads in it. resume: skip tiles an earlier run of the same settings finished;
    False first removes what the earlier run wrote to `out` (a user's own files there
    stay). An `out` that holds names a run writes (labels/, tiles/, ...) but no run's
    ``job.json`` is refused either way (GrainflowError), before any work. labels: where
    label images go: "auto" (beside each image, in its OME-Zarr ``labels/`` group, when
    the archive can be written; else under ``<out>/labels/``), "image", "out" or "none".
    config: how the ensemble runs (`EnsembleConfig`; max_det also sets the label ids
    reserved per tile). tolerance, target_bytes: as `ZarrTileDatasource`.

    Needs a connected Ray (`ray.init()`; the jobs.reprocess entrypoint connects).
    Raises GrainflowError (or a subclass) for bad input, before any tile runs.
    """
    import ray

    from engine.data.datasource import DEFAULT_TARGET_BYTES, ZarrTileDatasource
    from engine.pipeline.bundle import pin_bundle
    from engine.pipeline.job_ensemble import JobEnsemble  # torch: the driver's own import, not its tasks'
    from engine.stores.catalog import read_catalog, row_problems
    from engine.stores.ngff import to_nanometres

    if labels not in LABEL_MODES:
        raise ValueError(f"labels: expected one of {LABEL_MODES}, got {labels!r}")
    if batch_size < 1 or (concurrency is not None and concurrency < 1):
        raise ValueError(f"batch_size and concurrency must be >= 1, got {batch_size}, {concurrency}")
    if not cpus_per_actor > 0:
        raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
    if not ray.is_initialized():
        raise GrainflowError("reprocess needs a connected Ray: call ray.init() first (jobs.reprocess does)")
    actors, gpus = _resources(concurrency, num_gpus, cpus_per_actor)  # a GPU that never comes: before any task
    started = time.perf_counter()
    stages: dict[str, float] = {}
    archive, out = resolve(archive), resolve(out)
    earlier = earlier_run(out)  # the run whose outputs `out` holds, if any; not someone else's folder
    config = config or EnsembleConfig()
    if registry is None:
        from engine.registry import ModelRegistry

        registry = ModelRegistry()

    # 1. models: one fixed version for the whole job, resolved here once; the actors get
    # the resolved versions and load files from their node's cache without a registry query
    bundle = pin_bundle(models_ref, registry)
    pinned = bundle.ref
    describe = _describe(bundle, registry, config)

    # 2. plan (metadata only)
    catalog = read_catalog(archive)
    if target_pixel_size_nm is None:
        target_pixel_size_nm = describe.get("pixel_size_nm")
    if target_pixel_size_nm is None:  # native pixels: the finest level-0 size, read at each image's level 0
        usable = [r for r in catalog.to_dict("records") if not row_problems(r)]  # the others are recorded below
        target_pixel_size_nm = min((to_nanometres(float(r["pixel_size_x"]), str(r["unit"])) for r in usable),
                                   default=1.0)
        tolerance = math.inf
    settings = {"archive": archive.uri, "bundle": pinned, "target_pixel_size_nm": float(target_pixel_size_nm),
                "tolerance": float(tolerance) if math.isfinite(tolerance) else "inf", "tile_size": tile_size,
                "halo": int(halo), "labels": labels, "label_name": label_name,
                "config": {k: v for k, v in describe["config"].items()} | {"inputs": describe["inputs"]}}
    ledger = Ledger(out)
    done_before = ledger.keys() if resume else set()
    # Label arrays beside the images outlive a run's `out`: start them afresh unless this
    # run continues one (else chunks of tiles that fail now would keep an older run's ids).
    fresh = not done_before
    source = ZarrTileDatasource(archive, target_pixel_size_nm=target_pixel_size_nm, tile_size=tile_size, halo=halo,
                                tolerance=tolerance, skip=done_before,
                                target_bytes=target_bytes or DEFAULT_TARGET_BYTES, on_image_error="record")
    plans, failed = source.images(), source.failed()
    if failed and not plans:  # before anything in `out` is touched: an earlier run's outputs stay
        image_id, exc = next(iter(failed.items()))
        raise GrainflowError(f"{archive}: none of its {len(failed)} image(s) could be planned; the first, "
                             f"{image_id}: {type(exc).__name__}: {exc}")
    # 3. resume: same settings and the same pixels, or nothing
    manifest = out.join(MANIFEST)
    checksums = _checksums(catalog)
    if resume and earlier is not None:
        before = earlier["settings"]
        changed = sorted(k for k in _SETTINGS if before.get(k) != settings.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise GrainflowError(f"{out}: holds the outputs of a run with other settings ({diff}); resume=False "
                                 f"(--no-resume) replaces them, or write to another --out")
        # An image replaced in the archive (same id, other pixels) would keep the tiles
        # the ledger holds for its old pixels.
        old = earlier.get("checksums", {})
        replaced = sorted(i for i, c in checksums.items() if i in old and old[i] != c)
        if replaced:
            raise GrainflowError(
                f"{out}: {len(replaced)} image(s) of {archive} changed since the run there "
                f"({', '.join(replaced[:3])}{', ...' if len(replaced) > 3 else ''}: other pixel checksums); "
                f"resume=False (--no-resume) redoes the run, or write to another --out")
    if not resume and earlier is not None:  # else `out` holds no run's names (refused above)
        clear_run(out, earlier)
    put_file(manifest, json.dumps({"settings": settings, "checksums": checksums}, indent=1, sort_keys=True).encode())

    modalities = dict(zip(catalog["image_id"], catalog["modality"]))
    for image_id, exc in failed.items():  # recorded; the other images go on
        write_image_error(out, image_id, str(modalities[image_id]), exc)
    tiles_total = sum(im.n_tiles for im in plans)
    before: dict[str, list] = {im.image_id: [] for im in plans}
    for key in done_before:
        before.get(key[0], []).append(key)
    progress = {im.image_id: _ImageProgress(im, before[im.image_id]) for im in plans}
    skipped = sum(p.skipped for p in progress.values())
    stages["plan"] = time.perf_counter() - started

    # 4. prepare: label arrays, preprocessing parameters
    t0 = time.perf_counter()
    fit = "image" in describe["inputs"].values()
    prepare = ray.remote(num_cpus=1)(_prepare_images)
    groups = [plans[i : i + _GROUP] for i in range(0, len(plans), _GROUP)]
    prepared = ray.get([prepare.remote(out, g, labels=labels, label_name=label_name, id_stride=config.max_det,
                                       overwrite=fresh, fit=fit) for g in groups])
    targets = {t.image_id: t for g, _ in prepared for t in g}
    unfit = {image_id: exc for _, f in prepared for image_id, exc in f.items()}
    if unfit:  # recorded; the other images go on
        source.exclude(unfit)
        plans, failed = source.images(), source.failed()
        for image_id, exc in unfit.items():
            write_image_error(out, image_id, str(modalities[image_id]), exc)
            del progress[image_id]
        tiles_total = sum(im.n_tiles for im in plans)
        skipped = sum(p.skipped for p in progress.values())
        if not plans:
            image_id, exc = next(iter(unfit.items()))
            raise GrainflowError(f"{archive}: none of its images could be prepared (errors table in {out}); "
                                 f"the first, {exc}")
    stages["prepare"] = time.perf_counter() - t0

    # 5. tiles: read -> ensemble actors -> sink tasks; the driver counts small rows and
    # 6. finishes each image as soon as its last tile is in (a Ray task per image), so
    # finishing overlaps the tile stage instead of following it.
    t0 = time.perf_counter()
    finish = ray.remote(num_cpus=1)(_finish)
    provenance = {"job_out": out.uri, "bundle": pinned}
    finishing: dict[str, Any] = {}

    def finish_if_complete(image_id: str) -> None:
        p = progress[image_id]
        if image_id not in finishing and p.complete:
            finishing[image_id] = finish.remote(out, p.plan, p.done, targets.get(image_id), describe, provenance)

    for image_id in progress:
        finish_if_complete(image_id)
    late: set[str] = set()
    if len(finishing) < len(plans):
        stored = dict(zip(catalog["image_id"], catalog["dtype"]))
        dtypes = {im.image_id: str(stored[im.image_id]) for im in plans
                  if str(stored[im.image_id]) != im.tile_dtype}
        kwargs = {"bundle": bundle, "registry": registry, "config": config, "dtypes": dtypes,
                  "params": ParamsFromStore(out) if fit else None, "expect": describe}
        # Reads and sinks in flight are bounded by the actor count: the model is the limit,
        # and more of them only start more worker processes as the archive grows (each
        # holds ~0.5-1 GiB once torch is imported), so the job's memory would too.
        ds = ray.data.read_datasource(source, compute=ray.data.TaskPoolStrategy(size=actors))
        ds = ds.map_batches(JobEnsemble, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
                            num_cpus=cpus_per_actor)
        ds = ds.map_batches(WriteTileOutputs(out, labels=targets, class_names=describe["class_names"]),
                            batch_size=None, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=actors))
        limits = ds.context.execution_options.resource_limits  # a smaller one the caller set stays
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=min(
            limits.object_store_memory, _in_flight_bytes(plans, actors, batch_size)))
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for image_id, level, y, x, ok in zip(batch["image_id"], batch["level"], batch["y"], batch["x"],
                                                     batch["ok"]):
                    p = progress[str(image_id)]
                    before = len(p.done)
                    p.add((int(level), int(y), int(x)), bool(ok))
                    if str(image_id) in finishing and len(p.done) > before:
                        late.add(str(image_id))  # finished without a tile that Ray then ran again
                    finish_if_complete(str(image_id))
        except ray.exceptions.RayActorError as exc:
            if not exc.actor_init_failed:
                raise
            # A bad bundle (a refused file, labels that disagree with the plan) stops every
            # actor in its constructor; Ray keeps only the text of that error.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise GrainflowError(f"the ensemble actors could not start: {lines[-1] if lines else exc}") from None
    stages["tiles"] = time.perf_counter() - t0
    for image_id in sorted(late):  # once its first finishing is over (both write the same files)
        p = progress[image_id]
        ray.get(finishing[image_id])
        finishing[image_id] = finish.remote(out, p.plan, p.done, targets.get(image_id), describe, provenance)
    counts = [p.counts for p in progress.values()]
    done, errors = sum(c[0] for c in counts), sum(c[1] for c in counts)

    t0 = time.perf_counter()
    for image_id, p in progress.items():  # a tile the stream never reported stays unfinished in the tiles table
        if image_id not in finishing:
            finishing[image_id] = finish.remote(out, p.plan, p.done, targets.get(image_id), describe, provenance)
    rows = ray.get([finishing[im.image_id] for im in plans])
    rows += [unplanned_summary_row(image_id, str(modalities[image_id])) for image_id in failed]
    put_file(out.join(SUMMARY_FILE), table_bytes(summary_table(rows)))
    stages["finish"] = time.perf_counter() - t0

    seconds = time.perf_counter() - started
    result = JobResult(
        tiles_total=tiles_total, tiles_done=done, tiles_skipped=skipped, errors=errors, seconds=seconds,
        tiles_per_s=(done + errors) / stages["tiles"] if stages["tiles"] > 0 else 0.0, out=out.uri,
        images=len(plans), images_failed=len(failed), objects=int(sum(r["n_defects"] for r in rows)), bundle=pinned,
        target_pixel_size_nm=float(target_pixel_size_nm), stage_seconds=stages,
        # from the finished images' files: tiles an earlier run ledgered never have a reduced halo
        tiles_halo_reduced=int(sum(r["tiles_halo_reduced"] for r in rows)))
    # With the result (not the settings: a resume compares settings only): which member
    # versions answered and when the run ended (UTC), for reports and audits.
    record = result.to_dict() | {"model_versions": describe.get("model_versions", {}),
                                 "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    put_file(manifest, json.dumps({"settings": settings, "checksums": checksums, "result": record}, indent=1,
                                  sort_keys=True, default=str).encode())
    return result


def _checksums(catalog) -> dict[str, str | None]:
    """image_id -> the catalog's pixel checksum (None where it records none)."""
    return {str(i): (c if isinstance(c, str) and c else None) for i, c in zip(catalog["image_id"], catalog["checksum"])}


class _ImageProgress:
    """One image's tiles as the stream reports them: complete once every planned tile
    not finished by an earlier run has come back once (done or failed). done: the
    (level, y, x) of its finished tiles, earlier runs' included (what `finish_image`
    reads); skipped: how many planned tiles an earlier run finished. A tile reported
    twice counts once, and is done if either report says so (Ray may run a task again
    after a lost worker: a tile that failed the first time and was ledgered the second
    must be read, or finishing would delete the file the ledger lists)."""

    def __init__(self, plan, before):
        """before: the ledger keys (image_id, level, y, x) of this image from earlier runs."""
        self.plan = plan
        self.done = [(int(k[1]), int(k[2]), int(k[3])) for k in before]
        self.skipped = _count_planned(plan, before)
        self._expected = plan.n_tiles - self.skipped
        self._seen: set[tuple[int, int, int]] = set()
        self._ok: set[tuple[int, int, int]] = set()

    def add(self, key: tuple[int, int, int], ok: bool) -> bool:
        """Record a reported tile; False if it was reported before."""
        first = key not in self._seen
        self._seen.add(key)
        if ok and key not in self._ok:
            self._ok.add(key)
            self.done.append(key)
        return first

    @property
    def complete(self) -> bool:
        return len(self._seen) >= self._expected

    @property
    def counts(self) -> tuple[int, int]:
        """(tiles done, tiles failed) of those this run reported."""
        return len(self._ok), len(self._seen - self._ok)


def _count_planned(plan, keys) -> int:
    """How many of `keys` are tiles of `plan` (a ledger may hold keys of no planned tile)."""
    n = 0
    for key in keys:
        rc = plan.grid.index_of_key(tuple(key))
        n += rc is not None and rc[0] < plan.n_rows and rc[1] < plan.n_cols
    return n


def _in_flight_bytes(plans, actors: int, batch_size: int) -> int:
    """Object-store bytes the tile stage may hold: `_IN_FLIGHT_BATCHES_PER_ACTOR` batches
    of the largest tile (`ImageTiles.tile_bytes`) per actor, at least `_IN_FLIGHT_FLOOR`."""
    largest = max((im.tile_bytes for im in plans), default=0)
    return max(_IN_FLIGHT_FLOOR, actors * _IN_FLIGHT_BATCHES_PER_ACTOR * batch_size * largest)


def _resources(concurrency: int | None, num_gpus: float | None, cpus_per_actor: float = 1.0) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU by default, else half the CPUs
    (cpus_per_actor each). A GPU share that no node has and none can get
    (`engine.runtime.gpu_shortfall`) raises GrainflowError: the actors would wait for it
    forever. One actor's share is enough: Ray Data starts the pool's actors as GPUs
    free up, and the tiles go to those that run."""
    import ray

    from engine.runtime import cluster_gpus, refuse_unmet_gpus

    gpus, cpus = cluster_gpus(), float(ray.cluster_resources().get("CPU", 1))
    if concurrency is None:
        concurrency = max(1, int(gpus)) if gpus >= 1 else max(1, int(cpus / 2 / cpus_per_actor))
    if num_gpus is None:
        num_gpus = 0.0 if gpus == 0 else min(1.0, gpus / concurrency)
    refuse_unmet_gpus(num_gpus, f"num_gpus (--gpus-per-actor): each ensemble actor asks for {num_gpus:g} GPU",
                      "run on CPUs (num_gpus=0, --gpus-per-actor 0)")
    return concurrency, float(num_gpus)


__all__ = ["JobResult", "LABEL_MODES", "ParamsFromStore", "reprocess"]
