"""ModelRegistry: versioned model artifacts on MLflow's model registry.

    reg = ModelRegistry()                       # embedded SQLite, or $MLFLOW_TRACKING_URI
    v = reg.register("sam-tiny", Path("sam.safetensors"), family="segmenter",
                     config={"arch": "sam_tiny", "img_size": 256}, metrics={"iou": 0.87})
    reg.promote("sam-tiny", v.version)          # sam-tiny@production -> v
    files = reg.fetch("sam-tiny@production")    # {"sam.safetensors": Path}, sha256 checked
    reg.rollback("sam-tiny")                    # production back to the version before

See `schema.py` for how a version is laid out on MLflow's runs and registered models,
`aliases.py` for the alias history behind `rollback`, `bundle.py` for ensembles,
`relocation.py` for a SQLite registry copied or moved to another folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platformdirs

from engine.registry import aliases, backend, bundle, relocation, schema
from engine.registry.digest import sha256_file
from engine.registry.errors import ArtifactIntegrityError, RegistryError
from engine.registry.refs import DEFAULT_ALIAS, ModelRef, check_alias, check_name, parse_ref
from engine.registry.version import ModelVersion, from_mlflow, not_by_grainflow_error

EXPERIMENT = "grainflow-registry"
_PAGE = 100
_AWAIT_READY_S = 300.0
_BATCH = 100  # MLflow takes at most 100 params or tags per log_batch call

logger = logging.getLogger(__name__)


class ModelRegistry:
    """Register, alias, fetch and bundle model versions.

    `tracking_uri` wins over `MLFLOW_TRACKING_URI`, which wins over the embedded SQLite
    file in the user's data dir (see `backend.py`). `artifact_location` is where new
    versions' files go; by default beside a SQLite database, else the server's choice.
    An instance pickles as its URIs, so it can be handed to Ray tasks and actors; an
    unpickled one connects on its first query (`fetch` of files already in the cache
    makes none).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        registry_uri: str | None = None,
        artifact_location: str | None = None,
    ):
        self.tracking_uri, self.registry_uri = backend.resolve_uris(tracking_uri, registry_uri)
        self.artifact_location = artifact_location or backend.default_artifact_location(self.tracking_uri)
        self._reset()
        self._connect()  # here, so that an unreachable server is refused at construction

    def _reset(self) -> None:
        self._mlflow: Any = None
        self._experiment_id: str | None = None
        self._home_checked = False  # relocation.check_artifact_home passed for this registry

    def _connect(self) -> Any:
        if self._mlflow is None:
            self._mlflow = backend.make_client(self.tracking_uri, self.registry_uri)
        return self._mlflow

    @property
    def _client(self) -> Any:
        """The MlflowClient, made on first use in a process that unpickled this registry."""
        return self._connect()

    def __repr__(self) -> str:
        return f"ModelRegistry(tracking_uri={self.tracking_uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The MlflowClient holds a database engine, which must not cross processes.
        return {"tracking_uri": self.tracking_uri, "registry_uri": self.registry_uri,
                "artifact_location": self.artifact_location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # No client yet: a Ray actor that finds its files in the fetch cache never needs one
        # (importing MLflow and opening its store costs ~2 CPU-s per process).
        self.tracking_uri, self.registry_uri = state["tracking_uri"], state["registry_uri"]
        self.artifact_location = state["artifact_location"]
        self._reset()

    # ------------------------------------------------------------------ registration

    def register(
        self,
        name: str,
        artifact_path: Path | str | Mapping[str, Path | str],
        *,
        family: str,
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        reuse_identical: bool = False,
    ) -> ModelVersion:
        """Register a new version of `name` and return it (versions count up from 1).

        `artifact_path` is one file (stored under its own name) or {stored name: file}.
        The files are logged in a new MLflow run with `config` as params and `metrics` as
        metrics; each file's sha256 is recorded as a run param. No alias is moved: a new
        version reaches `production` only through `promote`.

        reuse_identical: when the latest version of `name` is of this family and holds
        the same files (names and sha256), return it instead of registering the same
        bytes again (a training run started again after it finished); logged at INFO.
        """
        check_name(name)
        if not isinstance(family, str) or not family.strip():
            raise RegistryError(f"register {name!r}: family must be a non-empty string")
        if family == schema.BUNDLE_FAMILY:
            raise RegistryError(f"register {name!r}: family 'bundle' is reserved; use register_bundle")
        files = self._artifact_files(name, artifact_path)
        digests = {file_name: sha256_file(path) for file_name, path in files.items()}
        if reuse_identical:
            latest = self._latest_version(name)
            if latest is not None and latest.family == family and latest.sha256 == digests:
                logger.info("%s: not registered again: the latest version, %s, holds the same files (sha256 %s)",
                            name, latest.ref, ", ".join(f"{f} {d[:12]}" for f, d in sorted(digests.items())))
                return latest
        return self._register(name, files, family=family, kind=schema.KIND_MODEL, config=config, metrics=metrics,
                              tags=tags, digests=digests)

    def _latest_version(self, name: str) -> ModelVersion | None:
        """The highest-numbered version of `name` (family None if grainflow did not
        register it), or None when it has none."""
        with self._mlflow_errors(f"register {name!r}"):
            page = self._client.search_model_versions(f"name='{name}'", max_results=1,
                                                      order_by=["version_number DESC"])
        if not page:
            return None
        rm = self._registered_model(name, ref=name)
        return self._read_version(rm, int(page[0].version), ref=f"{name}/{page[0].version}", strict=False)

    def _register(
        self,
        name: str,
        files: dict[str, Path],
        *,
        family: str,
        kind: str,
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None,
        tags: Mapping[str, str] | None,
        digests: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        # Validate everything before the first write, so bad input leaves no half-made run.
        params = {schema.PARAM_FAMILY: family,
                  schema.PARAM_CONFIG: schema.canonical_config(config, model=name),
                  **schema.flatten_config(config, model=name)}
        metric_values = schema.check_metrics(metrics or {}, model=name)
        user_tags = schema.check_user_tags(tags or {}, model=name)
        for file_name, path in files.items():
            params[schema.PARAM_SHA256 + file_name] = digests[file_name] if digests else sha256_file(path)

        with self._mlflow_errors(f"register {name!r}"):
            self._experiment()  # a registry copied away from its artifacts is refused before any write
            self._ensure_registered_model(name, kind)
            run_id = self._log_run(name, files, params, metric_values, user_tags)
            mv = self._client.create_model_version(
                name, source=f"runs:/{run_id}/{schema.ARTIFACT_DIR}", run_id=run_id,
                tags={schema.TAG_FAMILY: family, **user_tags}, await_creation_for=0,
            )
            self._await_ready(mv)
        return self.get(f"{name}/{mv.version}")

    def _await_ready(self, mv: Any) -> None:
        """Wait for a version some registries create asynchronously (MLflow's own wait logs
        at INFO on every call, even when the version is READY at once, as it is with SQLite
        and MLflow's server)."""
        deadline = time.monotonic() + _AWAIT_READY_S
        while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
            time.sleep(1.0)
            mv = self._client.get_model_version(mv.name, mv.version)
        if mv.status != "READY":
            raise RegistryError(f"{mv.name}/{mv.version}: version is {mv.status}, not READY "
                                f"({mv.status_message})")

    def _artifact_files(self, name: str, artifact_path: Any) -> dict[str, Path]:
        if isinstance(artifact_path, Mapping):
            files = {str(k): Path(v) for k, v in artifact_path.items()}
        else:
            path = Path(artifact_path)
            files = {path.name: path}
        if not files:
            raise RegistryError(f"register {name!r}: no artifact files given")
        for file_name, path in files.items():
            schema.check_file_name(file_name)
            if not path.is_file():
                raise RegistryError(f"register {name!r}: artifact {file_name!r}: {path} is not a file")
        return files

    def _log_run(
        self,
        name: str,
        files: dict[str, Path],
        params: dict[str, str],
        metrics: dict[str, float],
        tags: dict[str, str],
    ) -> str:
        from mlflow.entities import Metric, Param

        run = self._client.create_run(
            self._experiment(), run_name=f"register-{name}",
            tags={"grainflow.model": name, **tags},
        )
        run_id = run.info.run_id
        try:
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), _BATCH):
                self._client.log_batch(run_id, params=items[i:i + _BATCH])
            if metrics:
                stamp = run.info.start_time
                self._client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()])
            self._log_files(run_id, files)
        except BaseException:
            self._client.set_terminated(run_id, "FAILED")
            raise
        self._client.set_terminated(run_id, "FINISHED")
        return run_id

    def _log_files(self, run_id: str, files: dict[str, Path]) -> None:
        """Upload each file under `files/<stored name>`."""
        for file_name, path in files.items():
            if path.name == file_name:
                self._client.log_artifact(run_id, str(path), schema.ARTIFACT_DIR)
                continue
            # MLflow stores a file under its own basename; renaming needs a staged copy
            # (a hard link where the filesystem allows, so big checkpoints are not copied).
            with tempfile.TemporaryDirectory(prefix="grainflow-stage-") as tmp:
                staged = Path(tmp) / file_name
                try:
                    os.link(path, staged)
                except OSError:
                    shutil.copyfile(path, staged)
                self._client.log_artifact(run_id, str(staged), schema.ARTIFACT_DIR)

    def _experiment(self) -> str:
        """Id of the experiment that holds registration runs (created on first use)."""
        if self._experiment_id is None:
            exp = self._client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                try:
                    self._experiment_id = self._client.create_experiment(
                        EXPERIMENT, artifact_location=self.artifact_location)
                except Exception as exc:
                    if not _is_code(exc, "RESOURCE_ALREADY_EXISTS"):
                        raise
                    # Another process created it between our lookup and create.
                    self._experiment_id = self._client.get_experiment_by_name(EXPERIMENT).experiment_id
            else:
                self._check_artifact_home(exp)
                if exp.lifecycle_stage == "deleted":
                    self._client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _check_artifact_home(self, exp: Any = None) -> None:
        """Refuse a SQLite registry copied or moved away from its recorded artifact folder
        (relocation.py), before the first artifact read or write of this instance. `exp`
        is the registry experiment when already looked up."""
        if self._home_checked:
            return
        if exp is None:
            exp = self._client.get_experiment_by_name(EXPERIMENT)
        recorded = None if exp is None else (exp.artifact_location or "").rstrip("/")
        # a location given to this instance explicitly, and recorded so, is the user's choice
        if recorded and recorded != (self.artifact_location or "").rstrip("/"):
            relocation.check_artifact_home(self.tracking_uri, recorded)
        self._home_checked = True

    def _ensure_registered_model(self, name: str, kind: str) -> None:
        try:
            rm = self._client.get_registered_model(name)
        except Exception as exc:
            if not _is_code(exc, "RESOURCE_DOES_NOT_EXIST"):
                raise
            try:
                self._client.create_registered_model(name, tags={schema.TAG_KIND: kind})
                return
            except Exception as exc2:
                if not _is_code(exc2, "RESOURCE_ALREADY_EXISTS"):
                    raise
                rm = self._client.get_registered_model(name)
        existing = rm.tags.get(schema.TAG_KIND)
        if existing is None:
            self._client.set_registered_model_tag(name, schema.TAG_KIND, kind)
        elif existing != kind:
            raise RegistryError(
                f"register {name!r}: {name!r} is registered as a {existing}, not a {kind}; "
                "models and bundles need different names"
            )

    # ------------------------------------------------------------------ reading

    def get(self, ref: str | ModelRef) -> ModelVersion:
        """The version a ref names: `name@alias`, `name/version` or `name` (= `name@production`)."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        rm = self._registered_model(r.name, ref=str(r))
        version = r.version if r.version is not None else self._alias_version(rm, r.alias, ref=str(r))
        return self._read_version(rm, version, ref=str(r))

    def versions(self, name: str) -> list[ModelVersion]:
        """All versions of `name`, oldest first; a version grainflow did not register (one
        added through MLflow on a shared server) is listed with `family` None."""
        rm = self._registered_model(check_name(name), ref=name)
        numbers: list[int] = []
        token = None
        while True:
            page = self._client.search_model_versions(f"name='{name}'", max_results=_PAGE, page_token=token)
            numbers += [int(mv.version) for mv in page]
            token = page.token
            if not token:
                break
        return [self._read_version(rm, v, ref=f"{name}/{v}", strict=False) for v in sorted(numbers)]

    def list_models(self) -> list[str]:
        """Names of all registered models and bundles, sorted."""
        names: list[str] = []
        token = None
        while True:
            page = self._client.search_registered_models(max_results=_PAGE, page_token=token)
            names += [rm.name for rm in page]
            token = page.token
            if not token:
                break
        return sorted(names)

    def fetch(self, ref: str | ModelRef | ModelVersion, dest_dir: Path | str | None = None) -> dict[str, Path]:
        """Download a version's files and verify each against its recorded sha256.

        Returns {stored name: local path}. Files go to `dest_dir`, by default
        `<user cache dir>/registry/<name>/<version>-<digest of its files' sha256>`: two
        registries that both hold a "name/version" (a laptop's and a cluster's) never share
        a folder. A file already there with the right digest is reused. Downloads land in a
        temporary folder inside `dest_dir` and move into place (atomically, over a stale
        copy) only after every file has matched, so a file that fails the check is never
        returned nor left where a loader could pick it up: ArtifactIntegrityError names it
        and both digests. Processes fetching into one folder at once (the replicas or
        actors of one node) each place the same verified bytes; none removes a copy
        another has just placed.
        """
        mv = ref if isinstance(ref, ModelVersion) else self.get(ref)
        if not mv.registered_by_grainflow:  # e.g. one listed by `versions`
            raise not_by_grainflow_error(mv.ref, mv.run_id)
        dest = Path(dest_dir) if dest_dir is not None else default_fetch_dir(mv)
        dest.mkdir(parents=True, exist_ok=True)

        out: dict[str, Path] = {}
        todo: list[str] = []
        for file_name, expected in sorted(mv.sha256.items()):
            target = dest / file_name
            if target.is_file() and sha256_file(target) == expected:
                out[file_name] = target
            else:
                todo.append(file_name)
        if not todo:
            return out

        with self._mlflow_errors(mv.ref):
            self._check_artifact_home()
        with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
            try:
                downloaded = {f: self._download_checked(mv, f, Path(tmp)) for f in todo}
            except ArtifactIntegrityError:
                # stale or damaged copies must not outlive a refusal (a peer's good copy may)
                for file_name in todo:
                    target = dest / file_name
                    if target.is_file() and sha256_file(target) != mv.sha256[file_name]:
                        target.unlink(missing_ok=True)
                raise
            for file_name, local in downloaded.items():
                os.replace(local, dest / file_name)
                out[file_name] = dest / file_name
        return dict(sorted(out.items()))

    def _download_checked(self, mv: ModelVersion, file_name: str, tmp: Path) -> Path:
        expected = mv.sha256[file_name]
        where = f"{mv.source}/{file_name}"
        part = tmp / file_name
        part.mkdir()  # one folder per file: MLflow names the download after the artifact
        try:
            local = Path(self._client.download_artifacts(mv.run_id, f"{schema.ARTIFACT_DIR}/{file_name}", str(part)))
        except Exception as exc:
            if not _is_mlflow_error(exc) and not isinstance(exc, OSError):
                raise
            raise ArtifactIntegrityError(
                f"{mv.ref}: artifact {file_name!r} cannot be read from {where}: {exc}",
                ref=mv.ref, file=file_name, expected=expected, actual=None,
            ) from exc
        actual = sha256_file(local)
        if actual != expected:
            raise ArtifactIntegrityError(
                f"{mv.ref}: artifact {file_name!r} ({where}) has sha256 {actual}, but the registry "
                f"recorded {expected} when it was registered; refusing it (the stored file was "
                "changed or damaged)",
                ref=mv.ref, file=file_name, expected=expected, actual=actual,
            )
        return local

    def _registered_model(self, name: str, *, ref: str) -> Any:
        try:
            return self._client.get_registered_model(name)
        except Exception as exc:
            if not _is_code(exc, "RESOURCE_DOES_NOT_EXIST"):
                raise
        known = self.list_models()
        listing = ", ".join(known) if known else "none yet"
        raise RegistryError(f"{ref}: no registered model {name!r} (registered: {listing})") from None

    def _alias_version(self, rm: Any, alias: str, *, ref: str) -> int:
        current = rm.aliases.get(alias)
        if current is None:
            have = ", ".join(f"{a} -> {v}" for a, v in sorted(rm.aliases.items())) or "none"
            raise RegistryError(f"{ref}: model {rm.name!r} has no alias {alias!r} (aliases: {have})")
        return int(current)

    def _read_version(self, rm: Any, version: int, *, ref: str, strict: bool = True) -> ModelVersion:
        """One version; `strict=False` (listings) reads a version grainflow did not
        register, or one that is not READY, as what MLflow knows of it instead of refusing."""
        try:
            mv = self._client.get_model_version(rm.name, str(version))
        except Exception as exc:
            if not _is_code(exc, "RESOURCE_DOES_NOT_EXIST"):
                raise
            raise RegistryError(f"{ref}: model {rm.name!r} has no version {version}") from None
        if mv.status != "READY" and strict:
            raise RegistryError(f"{ref}: version is {mv.status}, not READY ({mv.status_message})")
        run = None
        if mv.run_id:
            try:
                run = self._client.get_run(mv.run_id)
            except Exception as exc:
                if not _is_code(exc, "RESOURCE_DOES_NOT_EXIST"):
                    raise
                if strict:
                    raise RegistryError(f"{ref}: its run {mv.run_id} no longer exists") from None
        return from_mlflow(mv, run, aliases=rm.aliases, ref=ref, strict=strict)

    def _version_exists(self, name: str, version: int) -> bool:
        try:
            self._client.get_model_version(name, str(version))
        except Exception as exc:
            if _is_code(exc, "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise
        return True

    # ------------------------------------------------------------------ aliases

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point `name@alias` at `version` and record the move in the alias history."""
        check_name(name)
        check_alias(alias)
        version = _check_version(version, name)
        rm = self._registered_model(name, ref=f"{name}/{version}")
        self._read_version(rm, version, ref=f"{name}/{version}")  # exists, READY, grainflow-made
        current = rm.aliases.get(alias)
        history = aliases.moved(aliases.decode(rm.tags.get(aliases.tag_key(alias))),
                                None if current is None else int(current), version)
        # Alias first, then history: if the second write fails, the history lacks the new
        # version and a later rollback still lands on the version before it.
        with self._mlflow_errors(f"{name}@{alias}"):
            self._client.set_registered_model_alias(name, alias, str(version))
            self._client.set_registered_model_tag(name, aliases.tag_key(alias), aliases.encode(history))
        return self.get(f"{name}/{version}")

    def promote(self, name: str, version: int, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Make `version` the one `name@alias` (by default `name@production`) serves."""
        return self.set_alias(name, alias, version)

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> ModelVersion:
        """Move `name@alias` back to the version it pointed at before its latest move.

        Versions deleted since, and the current version itself, are skipped. Rolling back
        again goes one step further back. An alias that MLflow dropped (deleting the version
        it pointed at drops its aliases) or that was removed outside grainflow is rolled back
        from its history: its latest recorded move is undone, so it lands on the newest
        earlier version that still exists.
        Raises RegistryError when the alias was never set or has no earlier version.
        """
        check_name(name)
        check_alias(alias)
        ref = f"{name}@{alias}"
        rm = self._registered_model(name, ref=ref)
        recorded = aliases.decode(rm.tags.get(aliases.tag_key(alias)))
        if alias in rm.aliases or not recorded:
            current = self._alias_version(rm, alias, ref=ref)
            pointing = f"it points at version {current}"
        else:
            current = recorded[-1]  # where the alias was last moved, gone with its version
            pointing = f"it is unset; it last pointed at version {current}"
        history = aliases.popped(recorded, current)
        # deleted versions, and the one it points at now (1 -> 2 -> 1, then 2 deleted), are no step back
        while history and (history[-1] == current or not self._version_exists(name, history[-1])):
            history.pop()
        if not history:
            raise RegistryError(f"{ref}: nothing to roll back to; no earlier version of this alias is recorded "
                                f"that still exists ({pointing})")
        target = history[-1]
        # History first, then alias: if the second write fails, the alias is unchanged and
        # its history still ends at the rollback target, so retrying does the same step.
        with self._mlflow_errors(ref):
            self._client.set_registered_model_tag(name, aliases.tag_key(alias), aliases.encode(history))
            self._client.set_registered_model_alias(name, alias, str(target))
        return self.get(f"{name}/{target}")

    def alias_history(self, name: str, alias: str = DEFAULT_ALIAS) -> list[int]:
        """Versions `name@alias` was moved to, oldest first (the last is normally current)."""
        rm = self._registered_model(check_name(name), ref=f"{name}@{check_alias(alias)}")
        return aliases.decode(rm.tags.get(aliases.tag_key(alias)))

    # ------------------------------------------------------------------ bundles

    def register_bundle(
        self,
        name: str,
        members: Mapping[str, str],
        *,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        """Register a new version of the bundle `name`: role -> member ref.

        Each member ref (`model@alias`, `model/version`, `model`) is resolved now and the
        bundle records the fixed version and its file digests (see `bundle.py`).
        """
        check_name(name)
        if not members:
            raise RegistryError(f"register_bundle {name!r}: no members given")
        resolved: dict[str, bundle.Member] = {}
        for role, ref in members.items():
            schema.check_file_name(role, "bundle role")
            mv = self.get(ref)
            if mv.family == schema.BUNDLE_FAMILY:
                raise RegistryError(f"register_bundle {name!r}: member {role!r} ({ref}) is a bundle, not a model")
            resolved[role] = bundle.Member(mv.name, mv.version, mv.family, dict(mv.sha256))
        with tempfile.TemporaryDirectory(prefix="grainflow-bundle-") as tmp:
            path = Path(tmp) / bundle.FILE_NAME
            path.write_text(bundle.encode(resolved), encoding="utf-8")
            return self._register(name, {bundle.FILE_NAME: path}, family=schema.BUNDLE_FAMILY,
                                  kind=schema.KIND_BUNDLE, config=bundle.as_config(resolved),
                                  metrics=metrics, tags=tags)

    def get_bundle(self, ref: str | ModelRef) -> dict[str, ModelVersion]:
        """The members of a bundle version as role -> ModelVersion (fixed versions).

        The bundle file is fetched and verified like any artifact; each member's recorded
        digests must still match the member version's, or RegistryError names the member.
        """
        mv = self.get(ref)
        if mv.family != schema.BUNDLE_FAMILY:
            raise RegistryError(f"{ref}: {mv.ref} is a {mv.family} model, not a bundle")
        with tempfile.TemporaryDirectory(prefix="grainflow-bundle-") as tmp:
            text = self.fetch(mv, tmp)[bundle.FILE_NAME].read_text(encoding="utf-8")
        out: dict[str, ModelVersion] = {}
        for role, member in sorted(bundle.decode(text, ref=mv.ref).items()):
            try:
                got = self.get(member.ref)
            except RegistryError as exc:  # the member version was deleted (or its model)
                given = str(parse_ref(ref) if isinstance(ref, str) else ref)  # "ens" as "ens@production"
                bundle_ref = mv.ref if given == mv.ref else f"{given} ({mv.ref})"
                raise RegistryError(
                    f"bundle {bundle_ref}: member {role!r} ({member.ref}) cannot be read: {exc}. A bundle pins "
                    f"fixed versions of its members; register and promote a new bundle version whose {role!r} "
                    f"is an existing {member.name} version"
                ) from None
            if got.sha256 != member.sha256:
                raise RegistryError(
                    f"{ref}: member {role!r} {member.ref} no longer has the files the bundle pinned "
                    f"(bundle: {member.sha256}, registry: {got.sha256}); was the model deleted "
                    "and registered again?"
                )
            out[role] = got
        return out

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _mlflow_errors(self, what: str) -> Iterator[None]:
        """MLflow's own errors (refused values, an unreachable server) as RegistryError."""
        try:
            yield
        except Exception as exc:
            if not _is_mlflow_error(exc):
                raise
            raise RegistryError(f"{what}: {getattr(exc, 'message', exc)}") from exc


def fetch_subdir(mv: ModelVersion) -> Path:
    """`<name>/<version>-<12 hex digits>`: the digits hash the version's {file: sha256}
    record, so a cache folder names the bytes, not just the ref (two registries that
    both hold a "name/version" never share one)."""
    import hashlib
    import json

    content = hashlib.sha256(json.dumps(sorted(mv.sha256.items())).encode()).hexdigest()[:12]
    return Path(mv.name) / f"{mv.version}-{content}"


def default_fetch_dir(mv: ModelVersion) -> Path:
    """`<user cache dir>/registry/` + `fetch_subdir(mv)`."""
    return Path(platformdirs.user_cache_dir(backend.APP_NAME)) / "registry" / fetch_subdir(mv)


def _check_version(version: Any, name: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"{name}: version must be a positive integer, got {version!r}")
    return version


def _is_mlflow_error(exc: BaseException) -> bool:
    # Imported here, not at module top, to keep mlflow out of `import engine.registry`
    # (see backend.py); by the time an error is raised the client has imported it anyway.
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException)


def _is_code(exc: BaseException, code: str) -> bool:
    return _is_mlflow_error(exc) and getattr(exc, "error_code", None) == code
