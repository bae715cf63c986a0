"""The model deployments: one per ensemble stage, each running `Ensemble`'s own stage.

    Preprocess  pixels -> tiles (the batch job's tiling and preprocessing fit,
                `engine.serving.prepare`) -> `Ensemble.start(..., warm=True)`
    Detector    `Ensemble.detect`      (@serve.batch across requests)
    Segmenter   `Ensemble.segment`     (@serve.batch)
    Classifier  `Ensemble.classify` then `Ensemble.finish` (measurements) (@serve.batch)

A request names the fixed bundle version that answers it ("name/version", chosen by the
ingress from the aliases); each replica keeps the ensembles of the versions it has been
asked for (those the aliases point at are loaded on `reconfigure`, so a promotion or
rollback finds them ready; others are loaded on first use). Every replica loads the
whole bundle through the registry (sha256-checked) and runs only its stage; the
`EnsemblePass` carries tiles between stages, so the answer is `Ensemble.analyze`'s.

Batching: requests for the same version that arrive together are merged into one pass,
so the ensemble groups their tiles by shape, `ensemble.max_batch` tiles per model call
(`max_batch=1`: bit-identical to one request at a time; see engine.pipeline.ensemble).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Any

from ray import serve

from engine.serving.config import ServeConfig

MAX_CACHED_VERSIONS = 4


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
        for name in ("detect", "segment", "classify"):
            method = getattr(self, name, None)
            if method is not None and hasattr(method, "set_max_batch_size"):
                method.set_max_batch_size(settings.max_batch_size)
                method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the ensembles the split's aliases point at now (`engine.serving.versions`)."""
        from engine.serving.versions import resolve_arms

        arms = resolve_arms(self._registry, self.config.bundle, user_config.get("split", self.config.split))
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

    async def _batched(self, items: list[tuple[str, Any]], step: str) -> list[Any]:
        """Run `step` over requests grouped by version: one merged pass per version."""
        from engine.pipeline.ensemble import EnsemblePass

        def work():
            out: list[Any] = [None] * len(items)
            by_ref: dict[str, list[int]] = {}
            for i, (ref, _) in enumerate(items):
                by_ref.setdefault(ref, []).append(i)
            for ref, idx in by_ref.items():
                ens = self.ensemble(ref)
                passes = [items[i][1] for i in idx]
                merged = getattr(ens, step)(EnsemblePass.merge(passes))
                for i, p in zip(idx, merged.split([len(p) for p in passes])):
                    out[i] = p
            return out

        return await asyncio.to_thread(work)


@serve.deployment(name="preprocess")
class Preprocess(_Stage):
    role = "preprocess"

    async def __call__(self, ref: str, pixels, modality: str, pixel_size_nm: float):
        """Raw (H, W) pixels -> (EnsemblePass with warm inputs, tile scales, level, pixel size nm, ms)."""
        from engine.serving.prepare import TilingSettings, prepare_image

        def work():
            t0 = time.perf_counter()
            ens = self.ensemble(ref)
            c = self.config
            settings = TilingSettings(chunk=c.chunk, tile_size=c.tile_size, halo=c.halo,
                                      target_pixel_size_nm=c.target_pixel_size_nm or ens.pixel_size_nm)
            prepared = prepare_image(pixels, modality=modality, pixel_size_nm=pixel_size_nm, settings=settings,
                                     fit="image" in ens.inputs.values())
            p = ens.start(prepared.tiles, params=lambda _id: prepared.params, warm=True)
            return p, [t.scale for t in prepared.tiles], prepared.level, prepared.pixel_size_nm, \
                (time.perf_counter() - t0) * 1e3

        return await asyncio.to_thread(work)


@serve.deployment(name="detector")
class Detector(_Stage):
    role = "detector"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def detect(self, items: list[tuple[str, Any]]) -> list[Any]:
        """(bundle ref, EnsemblePass) per request -> the passes with boxes."""
        return await self._batched(items, "detect")


@serve.deployment(name="segmenter")
class Segmenter(_Stage):
    role = "segmenter"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def segment(self, items: list[tuple[str, Any]]) -> list[Any]:
        """(bundle ref, EnsemblePass) per request -> the passes with masks."""
        return await self._batched(items, "segment")


@serve.deployment(name="classifier")
class Classifier(_Stage):
    role = "classifier"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def classify(self, items: list[tuple[str, Any]]) -> list[Any]:
        """(bundle ref, EnsemblePass) per request -> its TileResults (classified, measured)."""
        passes = await self._batched(items, "classify")

        def finish():
            return [self.ensemble(ref).finish(p) for (ref, _), p in zip(items, passes)]

        return await asyncio.to_thread(finish)

    def labels(self, ref: str) -> dict[str, list[str]]:
        """Class, material and grade names of a version (for the response)."""
        ens = self.ensemble(ref)
        return {"class_names": list(ens.class_names), "materials": list(ens.materials), "grades": list(ens.grades)}
