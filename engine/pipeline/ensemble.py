"""The ensemble: detect defects, segment each box, classify the tile, measure.

    ens = Ensemble(EnsembleModels(detector, segmenter, classifier))     # model objects
    ens = Ensemble.from_registry("grainflow-demo@production", registry)  # a registered bundle
    out = ens(batch)              # datasource columns in, one result row per tile out
    res = analyze_tile(pixels, "SEM", 12.5, ensemble=ens)               # one tile -> TileResult

One class serves the batch job (a class-based `map_batches` UDF: Ray Data builds it in
each actor from `fn_constructor_kwargs`, e.g. ``{"bundle": ref, "registry": registry}``)
and the online endpoint; nothing here knows about Ray. Both go through
`Ensemble.analyze`, so a tile gets the same answer whichever way it comes.

Steps per batch of tiles (`engine.data.tile_read` columns; see `results` for the output):

1. Inputs: each member gets the tile on the intensity scale it was trained on
   (`engine.pipeline.inputs`: "raw", "tile" or "image"; per-image `PreprocessParams`
   are given as ``params``, a mapping or function image_id -> params; an image without
   any falls back to a per-tile percentile stretch).
2. Detect: YOLO on the whole tile (core + halo), `conf`, `iou`, `max_det`.
3. Segment: SAM with every detected box as a prompt, one encoder pass per tile. A mask
   is cut to its box (SAM's box-prompted masks can bleed past the box); an empty mask
   falls back to the box itself (flagged `mask_from_box`).
4. Classify: the classifier on the tile's core; the fusion model on the core (detail)
   and a context view. Material and grade probabilities are the mean of the members'
   softmax outputs. Images are graded later, from their tiles' rows.
5. Measure: detections whose box centre lies in the core (`engine.tiling.owned`) are
   kept and measured from their masks in physical units (`engine.pipeline.measure`).

Batching: tiles of one shape go through a model together, `max_batch` at a time. A
batched matrix product may round differently from a single one, so outputs can differ
in the last bits between batch compositions (detections agree; scores to ~1e-7);
``max_batch=1`` makes every tile's computation the same whatever the batch, bit for bit.
A model failing on a group is retried tile by tile, and a tile it still fails on becomes
an error row naming the member; the other tiles go on.

Fusion's context view (a tile two pyramid levels coarser, centred on the detail tile,
as engine.training feeds it) is taken from a `context` column when the batch has one;
otherwise it is made from the tile itself: the tile (core + halo) block-averaged by
2**offset and mirrored outward where the context reaches past it. That sees less
surroundings than training did; the datasource does not deliver context tiles yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from engine.models.layout import prefer_channels_last
from engine.pipeline import inputs as inp
from engine.pipeline.ensemble_config import EnsembleConfig
from engine.pipeline.measure import area_mm2, defect_density_per_mm2, measure_masks
from engine.pipeline.results import TileResult, error_text, to_columns
from engine.tiling.stitch import owned, tile_boxes_to_level0, tile_core_level0

ROLES = ("detector", "segmenter", "classifier", "fusion")
_FAMILY_OF = {"detector": "Detector", "segmenter": "Segmenter", "classifier": "Classifier", "fusion": "FusionModel"}
MIN_CLASSIFY_PX = 32  # smallest side the timm backbones take (stride 32): smaller inputs are mirrored out


@dataclass
class EnsembleModels:
    """The members (engine.models objects). The detector is required; a missing segmenter
    means box masks; missing classifier and fusion mean no material or grade.

    versions: role -> "name/version" for registered members (plus "bundle"); members
    without an entry are named "<config name> (unregistered)".
    """

    detector: torch.nn.Module
    segmenter: torch.nn.Module | None = None
    classifier: torch.nn.Module | None = None
    fusion: torch.nn.Module | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def members(self) -> dict[str, torch.nn.Module]:
        return {role: m for role in ROLES if (m := getattr(self, role)) is not None}


@dataclass
class TileInput:
    """One tile as the ensemble takes it (one datasource row).

    tile: (H, W) raw pixels (core + halo); halo: (top, bottom, left, right) pixels;
    origin: level-0 (y, x) of tile[0, 0]'s corner; scale: level-0 pixels per tile pixel
    (y, x); pixel_size_nm: the tile's pixel size (x axis), nm; pixel_size_y_nm: its y
    pixel size, nm (None: the image's pixels are square); context: optional raw
    context tile for fusion (see module doc); error: the read's error, passed through;
    extent0: (height, width) of the image's level 0, px (None: the core area is the
    core's pixels; given, it ends at the image's edge).
    """

    image_id: str
    tile: np.ndarray
    pixel_size_nm: float
    level: int = 0
    y: int = 0
    x: int = 0
    halo: tuple[int, int, int, int] = (0, 0, 0, 0)
    origin: tuple[float, float] | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    modality: str = ""
    error: str | None = None
    context: np.ndarray | None = None
    pixel_size_y_nm: float | None = None
    extent0: tuple[int, int] | None = None

    def __post_init__(self):
        self.halo = tuple(int(v) for v in np.asarray(self.halo).reshape(4))
        self.scale = tuple(float(v) for v in np.asarray(self.scale, dtype=np.float64).reshape(2))
        if self.origin is None:  # (y, x) is the core's corner; the halo lies before it
            self.origin = (self.y - self.halo[0] * self.scale[0], self.x - self.halo[2] * self.scale[1])
        self.origin = tuple(float(v) for v in np.asarray(self.origin, dtype=np.float64).reshape(2))

    @property
    def level0_pixel_size_nm(self) -> tuple[float, float]:
        """(y, x) size of a level-0 pixel of the tile's image, nm."""
        p0x = float(self.pixel_size_nm) / self.scale[1]
        return (p0x if self.pixel_size_y_nm is None else float(self.pixel_size_y_nm) / self.scale[0]), p0x


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None -> cuda when this process sees a GPU, else cpu (decided per actor)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Ensemble:
    """Detector -> segmenter -> classifier/fusion -> measurements, on batches of tiles.

    models: an `EnsembleModels`; or bundle (+ registry): a registered bundle ref (or an
    `engine.pipeline.bundle.PinnedBundle`), fetched, sha256-verified and loaded in this
    process (`engine.pipeline.bundle`). cache_dir: where fetched files go (default the
    registry's cache). params: image_id -> `PreprocessParams` (mapping or function) for
    members in "image" input mode. device: None picks cuda when present, else cpu.
    """

    def __init__(self, models: EnsembleModels | None = None, *, bundle=None, registry=None,
                 config: EnsembleConfig | None = None, params=None, device: str | torch.device | None = None,
                 cache_dir=None):
        from engine.runtime import configure_offline

        configure_offline()  # an actor may be the first to touch Ultralytics in its process
        if (models is None) == (bundle is None):
            raise ValueError("Ensemble: give either models (EnsembleModels) or bundle (a registry ref), not both")
        config = config or EnsembleConfig()
        bundle_inputs: dict[str, str] = {}
        self.pixel_size_nm: float | None = None
        if bundle is not None:
            from engine.pipeline.bundle import load_bundle

            loaded = load_bundle(bundle, registry, cache_dir=cache_dir)
            models, bundle_inputs, self.pixel_size_nm = loaded.models, loaded.inputs, loaded.pixel_size_nm
        if not isinstance(models, EnsembleModels):
            raise TypeError(f"models: expected EnsembleModels, got {type(models).__name__}")
        self.config = config
        self.inputs = inp.check_inputs(config.inputs if config.inputs is not None else bundle_inputs)
        self._params = inp.params_lookup(params)
        self.device = resolve_device(device)
        for role, model in models.members().items():
            if type(model).__name__ != _FAMILY_OF[role]:
                raise TypeError(f"models.{role}: expected a {_FAMILY_OF[role]}, got {type(model).__name__}")
            prefer_channels_last(model.to(self.device).eval(), role)  # roles are family names
        self.models = models
        self.class_names: tuple[str, ...] = tuple(models.detector.names)
        self.materials, self.grades = self._label_sets(models)
        self.model_versions = self._versions(models)

    @classmethod
    def from_registry(cls, ref, registry, **kwargs) -> Ensemble:
        """The ensemble a registered bundle names (a ref, or a `PinnedBundle`;
        `ModelRegistry.get_bundle`): members fetched, checked against their recorded
        sha256, loaded from safetensors."""
        return cls(bundle=ref, registry=registry, **kwargs)

    # ------------------------------------------------------------------ describing

    @staticmethod
    def _label_sets(models: EnsembleModels) -> tuple[tuple[str, ...], tuple[str, ...]]:
        sets = {role: (tuple(m.materials), tuple(m.grades))
                for role in ("classifier", "fusion") if (m := getattr(models, role)) is not None}
        if len(set(sets.values())) > 1:
            raise ValueError(f"classifier and fusion disagree on their material/grade classes: {sets}")
        return next(iter(sets.values())) if sets else ((), ())

    @staticmethod
    def _versions(models: EnsembleModels) -> dict[str, str]:
        out = dict(models.versions)
        for role, model in models.members().items():
            if role not in out:
                config = getattr(model, "config", None)
                out[role] = f"{getattr(config, 'name', type(model).__name__)} (unregistered)"
        return dict(sorted(out.items()))

    def describe(self) -> dict[str, Any]:
        """What a run records beside its outputs: versions, label sets, inputs, config."""
        return description(model_versions=self.model_versions, class_names=self.class_names,
                           materials=self.materials, grades=self.grades, inputs=self.inputs,
                           pixel_size_nm=self.pixel_size_nm, config=self.config) | {"device": str(self.device)}

    # ------------------------------------------------------------------ entry points

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of datasource rows (dict of columns) -> one result row per tile
        (`engine.pipeline.results` columns)."""
        return to_columns(self.analyze(tiles_from_batch(batch)), n_materials=len(self.materials),
                          n_grades=len(self.grades))

    def analyze_tile(self, pixels: np.ndarray, modality: str, pixel_size_nm: float, **kwargs) -> TileResult:
        """One tile; see `analyze_tile`."""
        return analyze_tile(pixels, modality, pixel_size_nm, ensemble=self, **kwargs)

    def analyze(self, tiles: Sequence[TileInput], *, params=None) -> list[TileResult]:
        """The ensemble on a list of tiles (module doc), one TileResult each, in order.

        params: image_id -> PreprocessParams for this call (default: the constructor's).
        """
        return self.finish(self.classify(self.segment(self.detect(self.start(tiles, params=params)))))

    # ------------------------------------------------------------------ stages
    # `analyze` is start -> detect -> segment -> classify -> finish. The stages are public
    # so that a server can run each in its own process (engine.serving: one deployment per
    # member); an `EnsemblePass` carries the tiles between them and pickles. Classify needs
    # nothing detect or segment make, so a server may run it beside them on its own copy
    # of the started pass and join its `classification()` in (`with_classification`).

    def start(self, tiles: Sequence[TileInput], *, params=None, warm: bool = False) -> EnsemblePass:
        """Check each tile and bind its preprocessing parameters (a bad tile becomes an
        error). warm: compute every member's normalised input now (a preprocessing
        stage), rather than when each member first needs it."""
        lookup = self._params if params is None else inp.params_lookup(params)
        p = EnsemblePass(list(tiles))
        for i, t in enumerate(p.tiles):
            if t.error is not None:
                p.errors[i] = str(t.error)
                continue
            try:
                p.work[i] = _Work.of(t, lookup(t.image_id) if "image" in self.inputs.values() else None)
                if warm:
                    for role in self.models.members():
                        p.work[i].normalised(self.inputs[role])
            except Exception as exc:
                p.errors[i] = f"{type(exc).__name__}: {exc}"
        return p

    def input_modes(self, roles: Iterable[str]) -> set[str]:
        """The normalised inputs (`engine.pipeline.inputs` modes) the members in `roles` read."""
        return {self.inputs[r] for r in roles}

    def detect(self, p: EnsemblePass) -> EnsemblePass:
        """Detector boxes for every live tile of the pass (in place; returns it)."""
        self._detect(p.work, p.errors)
        return p

    def segment(self, p: EnsemblePass) -> EnsemblePass:
        """Segmenter masks for the detected boxes (box masks without a segmenter)."""
        self._segment(p.work, p.errors)
        return p

    def classify(self, p: EnsemblePass) -> EnsemblePass:
        """Material and grade probabilities (classifier and fusion)."""
        self._classify(p.work, p.errors)
        return p

    def finish(self, p: EnsemblePass) -> list[TileResult]:
        """Measurements and one TileResult per tile of the pass, in order."""
        work, errors = p.work, dict(p.errors)
        results: dict[int, TileResult] = {}
        for i, w in work.items():
            try:
                results[i] = self._result(w)
            except Exception as exc:  # a measurement failing on one tile fails that tile only
                errors[i] = f"{type(exc).__name__}: measure: {exc}"
        out = []
        for i, t in enumerate(p.tiles):
            if i in errors:
                out.append(TileResult.failed(
                    image_id=str(t.image_id), level=int(t.level), y=int(t.y), x=int(t.x),
                    modality=str(t.modality or ""), pixel_size_nm=float(t.pixel_size_nm), error=errors[i],
                    n_materials=len(self.materials), n_grades=len(self.grades), model_versions=self.model_versions))
            else:
                out.append(results[i])
        return out

    # ------------------------------------------------------------------ steps

    def _run(self, role: str, inputs: dict[int, Any], key: Callable[[Any], Any], fn: Callable[[list], list],
             errors: dict[int, str]) -> dict[int, Any]:
        """fn over inputs grouped by `key` (tiles of one shape), max_batch at a time; a
        failing group is retried one by one and the tiles still failing become errors."""
        groups: dict[Any, list[int]] = {}
        for i, v in inputs.items():
            groups.setdefault(key(v), []).append(i)
        out: dict[int, Any] = {}
        step = self.config.max_batch
        for idx in groups.values():
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                try:
                    out.update(zip(chunk, fn([inputs[i] for i in chunk]), strict=True))
                except Exception as exc:
                    if len(chunk) == 1:
                        errors[chunk[0]] = f"{type(exc).__name__}: {role}: {exc}"
                        continue
                    for i in chunk:
                        try:
                            out[i] = fn([inputs[i]])[0]
                        except Exception as exc1:
                            errors[i] = f"{type(exc1).__name__}: {role}: {exc1}"
        return out

    def _input(self, w: _Work, role: str) -> np.ndarray:
        return w.normalised(self.inputs[role])

    def _detect(self, work: dict[int, _Work], errors: dict[int, str]) -> None:
        det, c = self.models.detector, self.config
        inputs = {i: self._input(w, "detector") for i, w in work.items()}
        found = self._run("detector", inputs, lambda a: a.shape,
                          lambda xs: det.predict(np.stack(xs), conf=c.conf, iou=c.iou, max_det=c.max_det), errors)
        for i in list(work):
            if i in errors:
                del work[i]
            else:
                d = found[i]
                work[i].boxes = np.asarray(d.boxes, np.float64).reshape(-1, 4)
                work[i].scores = np.asarray(d.scores, np.float64).reshape(-1)
                work[i].classes = np.asarray(d.classes, np.int64).reshape(-1)

    def _segment(self, work: dict[int, _Work], errors: dict[int, str]) -> None:
        sam = self.models.segmenter
        for w in work.values():
            w.masks, w.mask_scores = _box_masks(w.boxes, w.shape), np.full(len(w.boxes), np.nan)
        if sam is None:
            return
        todo = {i: (self._input(w, "segmenter"), w.boxes.astype(np.float32)) for i, w in work.items() if len(w.boxes)}

        def run(items):
            segs = sam.segment(np.stack([a for a, _ in items]), [b for _, b in items])
            return [(s.masks, s.iou) for s in segs]

        got = self._run("segmenter", todo, lambda v: v[0].shape, run, errors)
        for i in list(work):
            if i in errors:
                del work[i]
            elif i in got:
                w = work[i]
                masks, iou = got[i]
                masks = np.asarray(masks, bool)
                if self.config.mask_to_box:
                    masks = masks & w.masks  # w.masks holds the box masks here
                empty = ~masks.reshape(len(masks), -1).any(axis=1)
                masks[empty] = w.masks[empty]
                w.masks = masks
                w.mask_scores = np.where(empty, np.nan, np.asarray(iou, np.float64))

    def _classify(self, work: dict[int, _Work], errors: dict[int, str]) -> None:
        probs: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        clf, fus = self.models.classifier, self.models.fusion
        if clf is not None:
            x = {i: (_at_least(w.core_input(self.inputs["classifier"]), MIN_CLASSIFY_PX), float(w.tile.pixel_size_nm))
                 for i, w in work.items()}
            probs.append(self._run("classifier", x, lambda v: v[0].shape,
                                   lambda xs: self._softmax(clf, [a for a, _ in xs], pixel_sizes=[p for _, p in xs]),
                                   errors))
        if fus is not None:
            offset = int(fus.context_level_offset)
            x = {i: (*(_at_least(a, MIN_CLASSIFY_PX) for a in w.fusion_inputs(self.inputs["fusion"], offset)),
                     float(w.tile.pixel_size_nm)) for i, w in work.items()}
            probs.append(self._run("fusion", x, lambda v: (v[0].shape, v[1].shape),
                                   lambda xs: self._softmax(fus, [a for a, _, _ in xs], [b for _, b, _ in xs],
                                                            pixel_sizes=[p for _, _, p in xs]), errors))
        for i in list(work):
            if i in errors:
                del work[i]
                continue
            w = work[i]
            if probs:
                w.material_probs = np.mean([p[i][0] for p in probs], axis=0).astype(np.float32)
                w.grade_probs = np.mean([p[i][1] for p in probs], axis=0).astype(np.float32)
            else:
                w.material_probs = np.zeros(0, np.float32)
                w.grade_probs = np.zeros(0, np.float32)

    @torch.inference_mode()
    def _softmax(self, model, xs: list[np.ndarray], contexts: list[np.ndarray] | None = None,
                 pixel_sizes: list[float] | None = None) -> list:
        """xs: tiles (H x W float32); contexts: the fusion model's context tiles;
        pixel_sizes: the tiles' pixel sizes (nm), for a model that reads them."""
        t = torch.from_numpy(np.stack(xs)[:, None]).to(self.device)
        views = [t] if contexts is None else [t, torch.from_numpy(np.stack(contexts)[:, None]).to(self.device)]
        kwargs = {}
        if getattr(model, "pixel_size_input", False):
            kwargs["pixel_size_nm"] = torch.tensor(pixel_sizes, dtype=torch.float32, device=self.device)
        out = model(*views, **kwargs)
        m = torch.softmax(out["material"].float(), dim=1).cpu().numpy()
        g = torch.softmax(out["grade"].float(), dim=1).cpu().numpy()
        return list(zip(m, g))

    def _result(self, w: _Work) -> TileResult:
        t = w.tile
        core = tile_core_level0(t.origin, t.scale, t.halo, w.shape)
        level0 = tile_boxes_to_level0(w.boxes, t.origin, t.scale)
        keep = owned(level0, core) if len(level0) else np.zeros(0, bool)
        px = float(t.pixel_size_nm)  # tile pixel, x, nm
        p0y, p0x = t.level0_pixel_size_nm
        py = p0y * t.scale[0]  # tile pixel, y, nm
        masks = w.masks[keep]
        m = measure_masks(masks, (py, px))
        centroid = np.asarray(t.origin) + (m.centroid + 0.5) * np.asarray(t.scale)
        top, bottom, left, right = t.halo
        h, wdt = w.shape
        core_slice = (slice(top, h - bottom), slice(left, wdt - right))
        # Foreign pieces: objects other tiles own, whose pixels in this core only this
        # tile writes. Painted beneath the tile's own detections.
        n = int(keep.sum())
        foreign = [j for j in np.flatnonzero(~keep) if w.masks[j][core_slice].any()]
        labels = np.zeros(w.shape, np.uint32)
        for k in range(len(foreign) - 1, -1, -1):  # lowest score first: the best ends on top
            labels[w.masks[foreign[k]]] = n + k + 1
        for j in range(len(masks) - 1, -1, -1):
            labels[masks[j]] = j + 1
        classes = np.zeros(w.shape, np.uint8)
        for j in range(len(w.masks) - 1, -1, -1):
            classes[w.masks[j]] = w.classes[j] + 1
        if t.extent0 is None:
            core_area = area_mm2((h - top - bottom, wdt - left - right), (py, px))
        else:  # the core's level-0 box inside the image: its last pixels may reach past the edge
            x0, y0, x1, y1 = core
            inside = (max(0.0, min(x1, t.extent0[1]) - max(x0, 0.0)), max(0.0, min(y1, t.extent0[0]) - max(y0, 0.0)))
            core_area = area_mm2(inside[0] * inside[1], (p0y, p0x))
        if len(w.material_probs):
            material = self.materials[int(np.argmax(w.material_probs))]
            grade = self.grades[int(np.argmax(w.grade_probs))]
        else:
            material = grade = ""
        return TileResult(
            image_id=str(t.image_id), level=int(t.level), y=int(t.y), x=int(t.x), modality=str(t.modality or ""),
            pixel_size_nm=px, error=None, boxes=w.boxes[keep], boxes_level0=level0[keep],
            boxes_nm=level0[keep] * np.array([p0x, p0y, p0x, p0y]), scores=w.scores[keep], classes=w.classes[keep],
            mask_scores=w.mask_scores[keep], mask_from_box=np.isnan(w.mask_scores[keep]),
            area_nm2=m.area_nm2, area_um2=m.area_um2, equivalent_diameter_nm=m.equivalent_diameter_nm,
            major_axis_nm=m.major_axis_nm, minor_axis_nm=m.minor_axis_nm, aspect_ratio=m.aspect_ratio,
            orientation_deg=m.orientation_deg, centroid_level0=centroid.reshape(-1, 2),
            core_labels=np.ascontiguousarray(labels[core_slice]),
            core_classes=np.ascontiguousarray(classes[core_slice]),
            core_area_mm2=core_area, defect_density_per_mm2=float(defect_density_per_mm2(n, core_area)),
            material_probs=_or_nan(w.material_probs, len(self.materials)),
            grade_probs=_or_nan(w.grade_probs, len(self.grades)),
            material=material, grade=grade, model_versions=dict(self.model_versions),
            foreign_boxes_level0=level0[foreign].reshape(-1, 4), foreign_classes=w.classes[foreign].astype(np.int64),
        )


@dataclass
class _Work:
    """One tile on its way through the steps."""

    tile: TileInput
    raw: np.ndarray
    params: Any
    shape: tuple[int, int]
    core: tuple[slice, slice]
    cache: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None
    classes: np.ndarray | None = None
    masks: np.ndarray | None = None
    mask_scores: np.ndarray | None = None
    material_probs: np.ndarray | None = None
    grade_probs: np.ndarray | None = None

    @classmethod
    def of(cls, t: TileInput, params) -> _Work:
        raw = np.asarray(t.tile)
        if raw.ndim != 2 or raw.size == 0:
            raise ValueError(f"tile of {t.image_id} at (level {t.level}, y {t.y}, x {t.x}): expected a non-empty "
                             f"(H, W) array, got shape {raw.shape}")
        if raw.dtype.kind not in "uif":
            raise TypeError(f"tile of {t.image_id}: expected integer or float pixels, got dtype {raw.dtype}")
        if not (np.isfinite(t.pixel_size_nm) and t.pixel_size_nm > 0):
            raise ValueError(f"tile of {t.image_id}: pixel_size_nm must be positive, got {t.pixel_size_nm}")
        h, w = raw.shape
        top, bottom, left, right = t.halo
        if min(t.halo) < 0 or top + bottom >= h or left + right >= w:
            raise ValueError(f"tile of {t.image_id}: halo {t.halo} leaves no core in a {h} x {w} tile")
        return cls(t, raw, params, (h, w), (slice(top, h - bottom), slice(left, w - right)))

    def normalised(self, mode: str) -> np.ndarray:
        """The whole tile, float32 [0, 1], in `mode` (cached per mode)."""
        if mode not in self.cache:
            self.cache[mode] = inp.normalise(self.raw, mode, params=self.params, origin=self.tile.origin,
                                             scale=self.tile.scale)
        return self.cache[mode]

    def core_input(self, mode: str) -> np.ndarray:
        """The core on `mode`'s scale; "tile" stretches the core by its own percentiles,
        as the classifier's training stretched each training tile."""
        if mode == "tile":
            return inp.tile_stretch(self.raw[self.core])
        return np.ascontiguousarray(self.normalised(mode)[self.core])

    def fusion_inputs(self, mode: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """(detail, context) for the fusion model: the core, and a view 2**offset coarser
        of the same size centred on it (the batch's own `context` when given)."""
        s = 2**offset
        top, _, left, _ = self.tile.halo
        if mode == "tile":
            context = (np.asarray(self.tile.context, np.float64) if self.tile.context is not None
                       else _context_view(self.raw.astype(np.float64), self.core, s))
            # as in training: both views stretched by the context's percentiles
            return inp.tile_stretch(self.raw[self.core], reference=context), inp.tile_stretch(context)
        full = self.normalised(mode)
        if self.tile.context is not None:
            raw = np.asarray(self.tile.context)
            scale = tuple(v * s for v in self.tile.scale)
            context = inp.normalise(raw, mode, params=self.params, origin=self._context_origin(raw.shape, scale),
                                    scale=scale)
        else:
            context = _context_view(full.astype(np.float64), self.core, s).astype(np.float32)
        return np.ascontiguousarray(full[self.core]), context

    def _context_origin(self, shape: tuple[int, ...], scale: tuple[float, float]) -> tuple[float, float]:
        """Level-0 (y, x) of the top-left corner of a context tile of `shape` (pixels of
        `scale` level-0 pixels each) centred on the core: it lies elsewhere than the
        detail tile's origin, and image-mode flattening evaluates the illumination there."""
        (oy, ox), (sy, sx) = self.tile.origin, self.tile.scale
        cy = oy + (self.core[0].start + self.core[0].stop) / 2 * sy
        cx = ox + (self.core[1].start + self.core[1].stop) / 2 * sx
        return cy - shape[-2] / 2 * scale[0], cx - shape[-1] / 2 * scale[1]


@dataclass
class EnsemblePass:
    """Tiles on their way through the ensemble's stages (`Ensemble.start` ... `finish`).

    tiles: the pass's tiles, in order; work: index -> the live tile's state; errors:
    index -> error message of a tile that failed (it leaves `work`). timings_ms: stage
    name -> milliseconds that stage computed on this pass; batch_sizes: stage name -> how
    many passes (requests) it was merged with, itself included: for whoever runs the
    stages to fill and report (the online endpoint does; `merge` and `split` leave them
    empty). Picklable, so a pass can go from one server process to the next.
    """

    tiles: list[TileInput]
    work: dict[int, _Work] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tiles)

    @staticmethod
    def merge(passes: Sequence[EnsemblePass]) -> EnsemblePass:
        """One pass of all the tiles of `passes` (in order), e.g. several requests batched."""
        out = EnsemblePass([])
        for p in passes:
            base = len(out.tiles)
            out.tiles += p.tiles
            out.work.update({base + i: w for i, w in p.work.items()})
            out.errors.update({base + i: e for i, e in p.errors.items()})
        return out

    def split(self, sizes: Sequence[int]) -> list[EnsemblePass]:
        """The inverse of `merge`: passes of `sizes` tiles each."""
        if sum(sizes) != len(self.tiles):
            raise ValueError(f"split: sizes {list(sizes)} do not add up to the pass's {len(self.tiles)} tiles")
        out, base = [], 0
        for n in sizes:
            out.append(EnsemblePass(self.tiles[base : base + n],
                                    {i - base: w for i, w in self.work.items() if base <= i < base + n},
                                    {i - base: e for i, e in self.errors.items() if base <= i < base + n}))
            base += n
        return out

    def classification(self) -> Classification:
        """What `Ensemble.classify` added to this pass, without the tiles: for a server
        that runs the classifier beside the detector and sends only the probabilities on
        (a few hundred bytes a tile where the pass carries its pixels)."""
        return Classification({i: (w.material_probs, w.grade_probs) for i, w in self.work.items()},
                              dict(self.errors), dict(self.timings_ms), dict(self.batch_sizes))

    def with_classification(self, c: Classification) -> EnsemblePass:
        """Take `c`'s probabilities into this pass's live tiles (in place; returns the
        pass), as if `Ensemble.classify` had run on it last, as `Ensemble.analyze` runs
        it: a tile this pass already failed keeps its own error; a live tile `c` failed
        becomes `c`'s error. Timings and batch sizes are joined (this pass's win a tie)."""
        if set(c.probs) | set(c.errors) != set(range(len(self.tiles))):
            raise ValueError(f"with_classification: the classification's tiles ({len(c.probs)} classified, "
                             f"{len(c.errors)} failed) are not this pass's {len(self.tiles)}")
        for i in list(self.work):
            if i in c.errors:
                self.errors[i] = c.errors[i]
                del self.work[i]
            else:
                self.work[i].material_probs, self.work[i].grade_probs = c.probs[i]
        self.timings_ms = {**c.timings_ms, **self.timings_ms}
        self.batch_sizes = {**c.batch_sizes, **self.batch_sizes}
        return self

    def keep_inputs(self, modes: Iterable[str]) -> EnsemblePass:
        """Drop the tiles' normalised inputs other than `modes` (in place; returns the
        pass): what no later step reads need not travel to the next server process. A
        step that asks for a dropped input again recomputes it from the raw tile."""
        keep = set(modes)
        for w in self.work.values():
            w.cache = {mode: a for mode, a in w.cache.items() if mode in keep}
        return self


@dataclass
class Classification:
    """The classify stage's results for one pass's tiles, without the tiles
    (`EnsemblePass.classification`). probs: tile index -> (material probabilities
    (n_materials,), grade probabilities (n_grades,)), float32, each summing to 1 (empty
    arrays for an ensemble with no classifying member); errors: index -> error message
    of a tile that failed before or in classify; timings_ms, batch_sizes: as the pass's."""

    probs: dict[int, tuple[np.ndarray, np.ndarray]]
    errors: dict[int, str]
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)


def description(*, model_versions: Mapping[str, str], class_names: Sequence[str], materials: Sequence[str],
                grades: Sequence[str], inputs: Mapping[str, str], pixel_size_nm: float | None,
                config: EnsembleConfig) -> dict[str, Any]:
    """An ensemble's description as plain JSON data (`Ensemble.describe` less the device;
    `engine.pipeline.bundle.describe_bundle` builds the same from registry metadata)."""
    return {"model_versions": dict(sorted(model_versions.items())), "class_names": list(class_names),
            "materials": list(materials), "grades": list(grades), "inputs": dict(inputs),
            "pixel_size_nm": pixel_size_nm,
            "config": {"conf": config.conf, "iou": config.iou, "max_det": config.max_det,
                       "max_batch": config.max_batch, "mask_to_box": config.mask_to_box}}


def _or_nan(probs: np.ndarray, n: int) -> np.ndarray:
    """Probabilities, or n NaNs when no member classified (no classifier, no fusion)."""
    return probs if len(probs) else np.full(n, np.nan, np.float32)


def _box_masks(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """N x H x W bool: the pixels each xyxy box (edge coordinates) overlaps."""
    h, w = shape
    out = np.zeros((len(boxes), h, w), bool)
    for j, (x0, y0, x1, y1) in enumerate(boxes):
        # at least one pixel: a degenerate box still marks where the detector looked
        r0 = int(np.clip(np.floor(y0), 0, h - 1))
        c0 = int(np.clip(np.floor(x0), 0, w - 1))
        out[j, r0 : int(np.clip(np.ceil(y1), r0 + 1, h)), c0 : int(np.clip(np.ceil(x1), c0 + 1, w))] = True
    return out


def _at_least(a: np.ndarray, n: int) -> np.ndarray:
    """`a` mirrored out at the bottom/right to at least n x n (small edge cores)."""
    ph, pw = max(0, n - a.shape[0]), max(0, n - a.shape[1])
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw)), mode="symmetric")
    return np.ascontiguousarray(a, dtype=np.float32)


def _context_view(tile: np.ndarray, core: tuple[slice, slice], s: int) -> np.ndarray:
    """A (h, w) view s times coarser than `tile`, centred on its core (h, w the core's
    shape): the tile block-averaged by s (blocks aligned to the core's corner), mirrored
    outward where the view reaches past the tile."""
    h, w = core[0].stop - core[0].start, core[1].stop - core[1].start
    oy, ox = core[0].start % s, core[1].start % s
    ny, nx = (tile.shape[0] - oy) // s, (tile.shape[1] - ox) // s
    if ny < 1 or nx < 1:
        coarse = np.full((1, 1), float(tile.mean()))
        cy, cx = 0.5, 0.5
    else:
        coarse = tile[oy : oy + ny * s, ox : ox + nx * s].reshape(ny, s, nx, s).mean(axis=(1, 3))
        # the core's centre in coarse pixels
        cy = (core[0].start - oy + h / 2) / s
        cx = (core[1].start - ox + w / 2) / s
    y0, x0 = int(round(cy - h / 2)), int(round(cx - w / 2))
    pad_y = (max(0, -y0), max(0, y0 + h - coarse.shape[0]))
    pad_x = (max(0, -x0), max(0, x0 + w - coarse.shape[1]))
    padded = np.pad(coarse, (pad_y, pad_x), mode="symmetric")
    y0, x0 = y0 + pad_y[0], x0 + pad_x[0]
    return padded[y0 : y0 + h, x0 : x0 + w]


def _column(batch: Mapping[str, Any], name: str, n: int, default=None):
    if name in batch:
        col = batch[name]
        if len(col) != n:
            raise ValueError(f"batch column {name!r} has {len(col)} rows, the batch {n}")
        return col
    return [default] * n


def tiles_from_batch(batch: Mapping[str, Any]) -> list[TileInput]:
    """Datasource rows (a dict of columns, `engine.data.tile_read`) -> TileInputs.

    Needed: image_id, tile, pixel_size (or pixel_size_nm). Optional: pixel_size_y, level,
    y, x, halo, origin, scale, modality, error, context, extent0. `tile` may be one (B, H, W) array or B
    arrays of their own shapes.
    """
    for name in ("image_id", "tile"):
        if name not in batch:
            raise KeyError(f"batch: missing column {name!r} (columns: {sorted(batch)})")
    size_col = "pixel_size" if "pixel_size" in batch else "pixel_size_nm"
    if size_col not in batch:
        raise KeyError(f"batch: missing column 'pixel_size' (nm per tile pixel; columns: {sorted(batch)})")
    n = len(batch["image_id"])
    cols = {name: _column(batch, name, n, default) for name, default in (
        ("tile", None), (size_col, None), ("level", 0), ("y", 0), ("x", 0), ("halo", (0, 0, 0, 0)),
        ("origin", None), ("scale", (1.0, 1.0)), ("modality", ""), ("error", None), ("context", None),
        ("pixel_size_y", None), ("extent0", None))}
    out = []
    for i in range(n):
        error = cols["error"][i]
        out.append(TileInput(
            image_id=str(batch["image_id"][i]), tile=cols["tile"][i], pixel_size_nm=float(cols[size_col][i]),
            level=int(cols["level"][i]), y=int(cols["y"][i]), x=int(cols["x"][i]), halo=cols["halo"][i],
            origin=cols["origin"][i], scale=cols["scale"][i], modality=str(cols["modality"][i] or ""),
            error=error_text(error), context=cols["context"][i],
            pixel_size_y_nm=None if cols["pixel_size_y"][i] is None else float(cols["pixel_size_y"][i]),
            extent0=None if cols["extent0"][i] is None else tuple(int(v) for v in cols["extent0"][i])))
    return out


def analyze_tile(pixels: np.ndarray, modality: str, pixel_size_nm: float, *, ensemble: Ensemble, params=None,
                 image_id: str = "", level: int = 0, y: int = 0, x: int = 0, halo=(0, 0, 0, 0), origin=None,
                 scale=(1.0, 1.0), context: np.ndarray | None = None) -> TileResult:
    """The ensemble on one tile: what the online endpoint calls.

    pixels: (H, W) raw pixels (uint8/uint16 as stored, or float in [0, 1]); modality:
    "SEM", "TEM", "optical", ...; pixel_size_nm: nm per pixel (x). params: this image's
    `PreprocessParams` for members in "image" input mode (None: per-tile stretch).
    The rest places the tile as a datasource row does (defaults: a whole image at
    level 0, no halo). Same code path as `Ensemble.__call__`, so the same pixels give
    the same answer (see the module doc on batching).
    """
    tile = TileInput(image_id=image_id, tile=np.asarray(pixels), pixel_size_nm=float(pixel_size_nm), level=level,
                     y=y, x=x, halo=halo, origin=origin, scale=scale, modality=modality, context=context)
    return ensemble.analyze([tile], params=None if params is None else (lambda _image_id: params))[0]


__all__ = ["Ensemble", "EnsembleConfig", "EnsembleModels", "EnsemblePass", "TileInput", "analyze_tile", "resolve_device",
           "tiles_from_batch"]
