"""Ensembles in the model registry: register members and a bundle; load a bundle.

A bundle (`engine.registry.bundle`) names one fixed version per role ("detector",
"segmenter", "classifier", "fusion"; a detector is required). Its version tags say
how the ensemble runs those members:

    input.<role>     the member's input mode ("raw", "tile", "image"; engine.pipeline.inputs)
    pixel_size_nm    the pixel size the members were trained at (the datasource's target)

Loading fetches each member through `ModelRegistry.fetch` (every file checked against
the sha256 recorded at registration; a changed file is refused with
ArtifactIntegrityError) and rebuilds it from safetensors with
`engine.models.checkpoint.load_model`, which checks the digest again as it reads, so a
file swapped between fetch and load is refused too. Ultralytics .pt detectors go through
`load_detector_checkpoint` (unpickled only after their digest matches).

A driver that starts many loaders (the job's actors) resolves the bundle once
(`pin_bundle`) and hands them the `PinnedBundle`: a loader whose node already holds the
member files (the registry's fetch cache) then loads them without a registry query, so
without MLflow's client in its process (~2 CPU-s of imports and set-up each).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from engine.pipeline.ensemble import ROLES, EnsembleConfig, EnsembleModels, description
from engine.pipeline.inputs import check_inputs
from engine.registry.errors import RegistryError
from engine.registry.registry import fetch_subdir
from engine.registry.version import ModelVersion

TAG_INPUT = "input."
TAG_PIXEL_SIZE = "pixel_size_nm"
_CLASS_OF = {"detector": "Detector", "segmenter": "Segmenter", "classifier": "Classifier", "fusion": "FusionModel"}


@dataclass(frozen=True)
class LoadedBundle:
    """Members loaded from a bundle, with the bundle's input modes and pixel size.

    models.versions holds each role's "name/version" and "bundle": the bundle's own.
    """

    ref: str
    models: EnsembleModels
    inputs: dict[str, str]
    pixel_size_nm: float | None


@dataclass(frozen=True)
class PinnedBundle:
    """A bundle version and its members' versions, as the registry gave them: refs,
    configs, tags and sha256 records (metadata; no files). Pickles small."""

    version: ModelVersion
    members: dict[str, ModelVersion]

    @property
    def ref(self) -> str:
        return self.version.ref


def pin_bundle(ref: str | PinnedBundle, registry) -> PinnedBundle:
    """The bundle `ref` names (`name`, `name@alias`, `name/version`) resolved once: an
    alias moved later does not change what the result loads. A PinnedBundle is returned
    as it is."""
    if isinstance(ref, PinnedBundle):
        return ref
    version = registry.get(ref)
    return PinnedBundle(version, registry.get_bundle(version.ref))


def bundle_tags(inputs: Mapping[str, str] | None = None, pixel_size_nm: float | None = None) -> dict[str, str]:
    """Version tags for `register_bundle` (module doc); modes are checked here."""
    tags = {f"{TAG_INPUT}{role}": mode for role, mode in check_inputs(inputs).items()}
    if pixel_size_nm is not None:
        if not float(pixel_size_nm) > 0:
            raise ValueError(f"pixel_size_nm must be positive, got {pixel_size_nm!r}")
        tags[TAG_PIXEL_SIZE] = repr(float(pixel_size_nm))
    return tags


def member_inputs(registry, members: Mapping[str, str]) -> dict[str, str]:
    """role -> the input mode its member was trained with (the version's TRAINED_INPUT_TAG,
    which engine.training records), for the members that record one; `bundle_tags` gives
    the others their role's default. members: role -> member ref."""
    from engine.pipeline.inputs import TRAINED_INPUT_TAG

    modes = {role: registry.get(ref).tags.get(TRAINED_INPUT_TAG) for role, ref in members.items()}
    return {role: mode for role, mode in modes.items() if mode is not None}


def load_bundle(ref: str | PinnedBundle, registry=None, *, cache_dir: str | Path | None = None,
                map_location: str = "cpu") -> LoadedBundle:
    """Fetch, verify and load the members of the bundle `ref` (`name`, `name@alias`,
    `name/version`, or a `PinnedBundle`). cache_dir: where member files go
    (`<cache_dir>/<name>/<version>`; default the registry's cache). registry: a
    ModelRegistry (default: the embedded one); with a PinnedBundle and member files
    already in the cache, it is not queried.
    """
    if registry is None:
        from engine.registry import ModelRegistry

        registry = ModelRegistry()
    pinned = pin_bundle(ref, registry)  # an alias resolved once: every member below is of this version
    version, members = pinned.version, pinned.members
    unknown = sorted(set(members) - set(ROLES))
    if unknown:
        raise RegistryError(f"{version.ref}: bundle roles {unknown} are not ensemble roles ({', '.join(ROLES)})")
    if "detector" not in members:
        raise RegistryError(f"{version.ref}: bundle has no 'detector' member (members: {sorted(members)})")
    loaded = {}
    for role, mv in members.items():
        dest = None if cache_dir is None else Path(cache_dir) / fetch_subdir(mv)
        files = registry.fetch(mv, dest)
        loaded[role] = load_member(role, mv, files, map_location=map_location)
    tags = version.tags
    inputs = {k[len(TAG_INPUT):]: v for k, v in tags.items() if k.startswith(TAG_INPUT)}
    try:
        inputs = check_inputs(inputs)
    except ValueError as exc:
        raise RegistryError(f"{version.ref}: bad input tag: {exc}") from None
    pixel_size = float(tags[TAG_PIXEL_SIZE]) if TAG_PIXEL_SIZE in tags else None
    versions = {role: mv.ref for role, mv in members.items()} | {"bundle": version.ref}
    return LoadedBundle(version.ref, EnsembleModels(**loaded, versions=versions), inputs, pixel_size)


def describe_bundle(ref: str | PinnedBundle, registry, config: EnsembleConfig | None = None
                    ) -> dict[str, Any] | None:
    """The bundle's `Ensemble.describe()` (less the device) from registry metadata alone:
    no file fetched, no model built, so a driver can plan a job in a fraction of a
    second. The label sets come from the member configs recorded at registration (a
    model config, or one under ``"model"`` as `engine.training` registers it: `build`
    records the resolved ``defect_classes``, ``materials`` and ``grades``).

    None when the metadata cannot say: a member registered without its label sets (an
    Ultralytics .pt with a hand-written config, say), registered as another family than
    its role, or classifier and fusion disagreeing (loading the bundle names those
    errors). Whoever loads the bundle should check its own description against this one
    (`engine.pipeline.job_ensemble.JobEnsemble` does): registered configs are what a person said,
    the files are what runs.
    """
    config = config or EnsembleConfig()
    pinned = pin_bundle(ref, registry)
    version, members = pinned.version, pinned.members
    if "detector" not in members or any(mv.family != role for role, mv in members.items()):
        return None  # load_bundle names what is wrong
    args = {role: _builder_args(mv.config) for role, mv in members.items()}
    if any(a is None for a in args.values()):
        return None
    class_names = args["detector"].get("defect_classes")
    labels = {(tuple(a.get("materials") or ()), tuple(a.get("grades") or ()))
              for role, a in args.items() if role in ("classifier", "fusion")}
    if not isinstance(class_names, list) or len(labels) > 1 or any(not m or not g for m, g in labels):
        return None
    materials, grades = next(iter(labels)) if labels else ((), ())
    tags = version.tags
    try:
        inputs = check_inputs(config.inputs if config.inputs is not None else
                              {k[len(TAG_INPUT):]: v for k, v in tags.items() if k.startswith(TAG_INPUT)})
    except ValueError:
        return None
    return description(model_versions={role: mv.ref for role, mv in members.items()} | {"bundle": version.ref},
                       class_names=class_names, materials=materials, grades=grades, inputs=inputs,
                       pixel_size_nm=float(tags[TAG_PIXEL_SIZE]) if TAG_PIXEL_SIZE in tags else None, config=config)


def _builder_args(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A registered config's builder args (module doc of `describe_bundle`), or None."""
    for candidate in (config, config.get("model")):
        if isinstance(candidate, Mapping) and isinstance(candidate.get("args"), Mapping) and "builder" in candidate:
            return candidate["args"]
    return None


def load_member(role: str, mv, files: Mapping[str, Path], *, map_location: str = "cpu"):
    """The model of one fetched member version (`files`: stored name -> local path)."""
    from engine.models.checkpoint import load_model
    from engine.models.detector import load_detector_checkpoint

    weights = {n: p for n, p in files.items() if n.endswith((".safetensors", ".pt"))}
    if len(weights) != 1:
        raise RegistryError(f"{mv.ref}: expected one .safetensors (or Ultralytics .pt) file, "
                            f"found {sorted(files)}")
    (name, path), = weights.items()
    digest = mv.sha256[name]
    if name.endswith(".pt"):
        if role != "detector":
            raise RegistryError(f"{mv.ref}: {name}: .pt files are accepted for detectors only; save "
                                f"{role} models as safetensors (engine.models.save_checkpoint)")
        model = load_detector_checkpoint(path, digest)
    else:
        model = load_model(path, expected_sha256=digest, map_location=map_location)
    if type(model).__name__ != _CLASS_OF[role]:
        raise RegistryError(f"{mv.ref}: bundle role {role!r} needs a {_CLASS_OF[role]}, but {name} holds a "
                            f"{type(model).__name__}")
    return model


def register_ensemble(registry, models: EnsembleModels, name: str, *, workdir: str | Path,
                      inputs: Mapping[str, str] | None = None, pixel_size_nm: float | None = None,
                      promote: bool = True, tags: Mapping[str, str] | None = None):
    """Save each member as safetensors under `workdir`, register it as `<name>-<role>`,
    then register the bundle `name` over those versions (promoted to production when
    `promote`). Returns the bundle's ModelVersion."""
    from engine.models import save_checkpoint

    workdir = Path(workdir)
    refs = {}
    for role, model in models.members().items():
        path = workdir / role / f"{role}.safetensors"
        save_checkpoint(model, path)
        mv = registry.register(f"{name}-{role}", path, family=role, config=model.config.to_dict(),
                               tags=dict(tags or {}))
        if promote:
            registry.promote(mv.name, mv.version)
        refs[role] = mv.ref
    bundle = registry.register_bundle(name, refs, tags={**dict(tags or {}), **bundle_tags(inputs, pixel_size_nm)})
    if promote:
        bundle = registry.promote(name, bundle.version)
    return bundle
