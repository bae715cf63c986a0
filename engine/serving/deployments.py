"""The model deployments: one per ensemble stage, each running `Ensemble`'s own stage.

    Preprocess  pixels -> tiles (the batch job's tiling and preprocessing fit,
                `engine.serving.prepare`) -> `Ensemble.start(..., warm=True)`
    Classifier  `Ensemble.classify`    (@serve.batch across requests) -> a `Classification`
    Detector    `Ensemble.detect`      (@serve.batch)
    Segmenter   `Ensemble.segment` (@serve.batch); then, per request, the classifier's
                probabilities taken in (`EnsemblePass.with_classification`),
                `Ensemble.finish` (measurements) and the answer's analysis
                (`engine.serving.response.analysis`) -> a `StagesAnswer`

The ingress sends the calls without waiting between them: each stage's
DeploymentResponse is the next call's argument, so the `EnsemblePass` goes from one
replica to the next through the object store, never back through the ingress (which
waits for the segmenter's small answer only). The classifier needs nothing the detector
or segmenter make, so it runs beside them: preprocess -> (classifier | detector ->
segmenter), and on a lone request the answer takes max(classify, detect + segment) where
a chain took their sum (the segmenter gets the classification as an ObjectRef, awaited
after segmenting). The classifier sends on only its probabilities (a
`Classification`, a few hundred bytes a tile), so the segmenter's masks and the tile
results (MBs of label images) never leave the replica that makes them; the detector
drops the normalised inputs the segmenter does not read (`EnsemblePass.keep_inputs`). A
hop costs 8-10 ms on two cores, mostly fixed (benchmarks/RESULTS.md).

A request names the fixed bundle version that answers it ("name/version", chosen by the
ingress from the aliases); each replica keeps the ensembles of the versions it has been
asked for (those the aliases point at are loaded on `reconfigure`, so a promotion or
rollback finds them ready; others are loaded on first use). Every replica loads the
whole bundle through the registry (sha256-checked) and runs only its stage; the
`EnsemblePass` carries tiles between stages, so the answer is `Ensemble.analyze`'s.
Each stage adds its compute time to the pass's ``timings_ms`` and the number of requests
it batched the pass with to its ``batch_sizes``.

Batching: requests for the same version that arrive together are merged into one pass
(a request waits for others only while the replica has others of its stage in flight),
so the ensemble groups their tiles by shape, `ensemble.max_batch` tiles per model call
(`max_batch=1`: bit-identical to one request at a time; see engine.pipeline.ensemble).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray import serve

from engine.errors import GrainflowError
from engine.serving.config import ServeConfig

MAX_CACHED_VERSIONS = 4
# a replica's logs: Serve writes the "ray.serve" logger to the replica's log file
_log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class StagesAnswer:
    """What the last stage returns for one request: analysis: the answer's parts made
    from the tile results (`engine.serving.response.analysis`); level,
    level_pixel_size_nm, level_pixel_size_y_nm: the pyramid level the tiles were read
    at and its pixel size along x and y (nm); timings_ms: compute milliseconds per
    stage; batch_sizes: requests per model stage's batch, this one included."""

    analysis: dict[str, Any]
    level: int
    level_pixel_size_nm: float
    level_pixel_size_y_nm: float
    timings_ms: dict[str, float]
    batch_sizes: dict[str, int]


class _Stage:
    """Ensembles by bundle version, loaded from the registry (module doc)."""

    role = ""

    def __init__(self, config: dict[str, Any]):
        import torch

        from engine.runtime import configure_offline

        configure_offline()
        self.config = ServeConfig(**config)
        # one intra-op thread per CPU granted: replicas share the machine's cores
        torch.set_num_threads(max(1, int(round(self.config.settings(self.role).num_cpus))))
        self._registry = self.config.registry()
        self._ensembles: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        settings = self.config.settings(self.role)
        self._batch_wait_s = settings.batch_wait_timeout_s
        self._in_flight = 0  # requests of this stage inside this replica (event loop only)
        for name in ("_detect", "_segment", "_classify"):
            method = getattr(self, name, None)
            if method is not None and hasattr(method, "set_max_batch_size"):
                method.set_max_batch_size(settings.max_batch_size)
                method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the ensembles the split's aliases point at now (`engine.serving.versions`).
        Live settings the startup checks would refuse (`ServeConfig.with_live_settings`)
        are logged and not taken: the replica loads for the split in force, as the
        ingress, which refuses them too, goes on routing by it."""
        from engine.serving.versions import resolve_arms

        try:
            self.config = self.config.with_live_settings(user_config)
        except GrainflowError as exc:
            _log.error("%s: live settings refused: %s; still serving with split %s", self.role, exc,
                       self.config.split)
        arms = resolve_arms(self._registry, self.config.bundle, self.config.split)
        for ref in arms.refs.values():
            self.ensemble(ref)

    def ensemble(self, ref: str):
        """The ensemble of bundle version `ref` ("name/version"), loaded once."""
        with self._lock:
            if ref in self._ensembles:
                self._ensembles.move_to_end(ref)
                return self._ensembles[ref]
        from engine.pipeline.ensemble import Ensemble

        ens = Ensemble.from_registry(ref, self._registry, config=self.config.ensemble_config(),
                                     cache_dir=self.config.cache_dir)
        with self._lock:
            self._ensembles[ref] = ens
            while len(self._ensembles) > MAX_CACHED_VERSIONS:
                self._ensembles.popitem(last=False)
        return ens

    def check_health(self) -> None:
        if not self._ensembles:
            raise RuntimeError(f"{self.role}: no ensemble loaded")

    def versions(self) -> list[str]:
        return list(self._ensembles)

    async def _through_batch(self, batched, ref: str, *args: Any) -> Any:
        """One request through the stage's @serve.batch queue. It waits up to
        batch_wait_timeout_s for others to share its batch only while other requests of
        this stage are in the replica: a lone request would wait out the whole timeout
        for company that is not coming (three stages: 15 ms of a lone request's latency
        at the default 5 ms)."""
        self._in_flight += 1
        try:
            batched.set_batch_wait_timeout_s(self._batch_wait_s if self._in_flight > 1 else 0.0)
            return await batched(ref, *args)
        finally:
            self._in_flight -= 1

    async def _batched(self, refs: list[str], passes: list[Any], step: str, then: tuple[str, ...] = ()) -> list[Any]:
        """Run `step` over requests grouped by version: one merged pass per version; each
        request's pass comes back with the merged pass's compute time under `step`,
        keeping only the inputs that the roles `then` (the later stages) read."""
        from engine.pipeline.ensemble import EnsemblePass

        def work():
            out: list[Any] = [None] * len(passes)
            by_ref: dict[str, list[int]] = {}
            for i, ref in enumerate(refs):
                by_ref.setdefault(ref, []).append(i)
            for ref, idx in by_ref.items():
                t0 = time.perf_counter()
                ens = self.ensemble(ref)
                mine = [passes[i] for i in idx]
                merged = getattr(ens, step)(EnsemblePass.merge(mine)).keep_inputs(ens.input_modes(then))
                ms = (time.perf_counter() - t0) * 1e3
                for i, before, p in zip(idx, mine, merged.split([len(p) for p in mine])):
                    p.timings_ms = {**before.timings_ms, step: ms}
                    p.batch_sizes = {**before.batch_sizes, step: len(idx)}
                    out[i] = p
            return out

        return await asyncio.to_thread(work)


@serve.deployment(name="preprocess")
class Preprocess(_Stage):
    role = "preprocess"

    async def __call__(self, ref: str, pixels, modality: str, pixel_size_nm: float | tuple[float, float]):
        """Raw (H, W) pixels -> the EnsemblePass of their tiles, inputs warm.
        pixel_size_nm: nm per pixel, one number (square) or (y, x)."""
        from engine.serving.prepare import TilingSettings, prepare_image

        def work():
            t0 = time.perf_counter()
            ens = self.ensemble(ref)
            c = self.config
            settings = TilingSettings(chunk=c.chunk, tile_size=c.tile_size, halo=c.halo,
                                      target_pixel_size_nm=c.target_pixel_size_nm or ens.pixel_size_nm,
                                      max_pixels=c.max_pixels)
            prepared = prepare_image(pixels, modality=modality, pixel_size_nm=pixel_size_nm, settings=settings,
                                     fit="image" in ens.inputs.values())
            p = ens.start(prepared.tiles, params=lambda _id: prepared.params, warm=True)
            p.timings_ms = {"preprocess": (time.perf_counter() - t0) * 1e3}
            return p

        return await asyncio.to_thread(work)


@serve.deployment(name="classifier")
class Classifier(_Stage):
    role = "classifier"

    async def classify(self, ref: str, p: Any) -> Any:
        """A bundle ref and an EnsemblePass -> its tiles' material and grade
        probabilities, a `Classification` (no pixels: they travel to the segmenter)."""
        return await self._through_batch(self._classify, ref, p)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _classify(self, refs: list[str], passes: list[Any]) -> list[Any]:
        return [p.classification() for p in await self._batched(refs, passes, "classify")]

    def labels(self, ref: str) -> dict[str, list[str]]:
        """Class, material and grade names of a version (for /v1/models)."""
        ens = self.ensemble(ref)
        return {"class_names": list(ens.class_names), "materials": list(ens.materials), "grades": list(ens.grades)}


@serve.deployment(name="detector")
class Detector(_Stage):
    role = "detector"

    async def detect(self, ref: str, p: Any) -> Any:
        """A bundle ref and an EnsemblePass -> the pass with boxes."""
        return await self._through_batch(self._detect, ref, p)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _detect(self, refs: list[str], passes: list[Any]) -> list[Any]:
        return await self._batched(refs, passes, "detect", then=("segmenter",))


@serve.deployment(name="segmenter")
class Segmenter(_Stage):
    role = "segmenter"

    async def segment(self, ref: str, p: Any, classified: list) -> StagesAnswer:
        """A bundle ref, the detector's EnsemblePass and [an ObjectRef of the classifier's
        Classification of the same tiles] -> its StagesAnswer (segmented, classified,
        measured). The classification is awaited once the tiles are segmented, per
        request: a classifier that failed one request fails that request only."""
        p = await self._through_batch(self._segment, ref, p)
        c = await classified[0]
        return await asyncio.to_thread(self._finish, ref, p, c)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _segment(self, refs: list[str], passes: list[Any]) -> list[Any]:
        return await self._batched(refs, passes, "segment")

    def _finish(self, ref: str, p: Any, c: Any) -> StagesAnswer:
        from engine.serving.response import analysis

        t0 = time.perf_counter()
        ens = self.ensemble(ref)
        p = p.with_classification(c)  # after segment, as Ensemble.analyze classifies last
        analysed = analysis(ens.finish(p), p.tiles, class_names=ens.class_names,
                            materials=ens.materials, grades=ens.grades)
        timings = {**p.timings_ms, "measure": (time.perf_counter() - t0) * 1e3}
        first = p.tiles[0]
        size_y = first.pixel_size_nm if first.pixel_size_y_nm is None else first.pixel_size_y_nm
        return StagesAnswer(analysed, int(first.level), float(first.pixel_size_nm), float(size_y), timings,
                            dict(p.batch_sizes))
