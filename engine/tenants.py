"""Tenants of batch jobs: which store prefixes each tenant may read and write.

A tenants file (TOML) grants prefixes:

    [tenants.lab-a]
    prefixes = ["s3://lab-a/", "/data/lab-a"]

    [tenants.lab-b]
    prefixes = ["s3://shared/lab-b/"]

A job's store URIs (--archive, --out, --storage, ..., a local --tracking-uri registry,
synthesize's --model checkpoint: `job_uris`) are checked twice: by the submitter
(`grainflow submit`, before the job exists) and inside the job (`enforce_job_uris`,
first thing in its entrypoint), from GRAINFLOW_TENANT and GRAINFLOW_TENANTS_FILE, which
the submitter puts in the job's runtime_env. Both refusals and acceptances go to the
audit log (`engine.audit`).

Matching is by path segments on normalised locations (`engine.stores.uri.resolve`):
``s3://lab-a/x`` grants ``s3://lab-a/x/y`` but not ``s3://lab-a/xy`` or ``s3://lab-ab/``;
``..`` is collapsed first, ``file:///p`` and ``/p`` are the same place, and local paths
are compared after resolving symlinks (a link inside a grant may point out of it).

What this is not: a sandbox. Whoever holds the cluster token can run any command as a
job; the in-job check stops jobs submitted around `grainflow submit` by honest mistake
or by tools that forget the check, and records them. Bucket policies and credentials
scoped per tenant are what bound a hostile job.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from engine.errors import GrainflowError
from engine.stores.uri import StoreLocation, resolve

TENANT_ENV = "GRAINFLOW_TENANT"
TENANTS_FILE_ENV = "GRAINFLOW_TENANTS_FILE"
# The submitter's own tenants file, sent apart from TENANTS_FILE_ENV so that it never
# overrides the file a cluster's nodes name: the cluster's file rules inside the job.
SUBMITTER_TENANTS_FILE_ENV = "GRAINFLOW_SUBMITTER_TENANTS_FILE"
SUBMISSION_ID_ENV = "GRAINFLOW_SUBMISSION_ID"  # set by the submitter, for the audit log

# The store-URI arguments of each job entrypoint (argparse dest names).
JOB_URI_ARGS: dict[str, tuple[str, ...]] = {
    "reprocess": ("archive", "out"),
    "train": ("archive", "storage", "val_archive", "synthetic", "init_weights"),
    "synthesize": ("out", "gate_real"),
}


class TenantRefused(GrainflowError):
    """A job names a store location outside its tenant's prefixes (or no/unknown tenant)."""


def _canonical(uri: str | os.PathLike | StoreLocation) -> StoreLocation:
    location = resolve(uri)
    if location.scheme == "file":
        location = StoreLocation("file", os.path.realpath(location.path), location.storage_options)
    return location


@dataclass(frozen=True)
class Tenants:
    """tenant name -> granted prefixes (normalised locations)."""

    grants: Mapping[str, tuple[StoreLocation, ...]]
    source: str = "<memory>"

    @classmethod
    def from_mapping(cls, tenants: Mapping[str, Iterable[str]], source: str = "<memory>") -> Tenants:
        grants = {}
        for name, prefixes in tenants.items():
            if isinstance(prefixes, (str, bytes)):
                raise GrainflowError(f"{source}: tenant {name!r}: prefixes must be a list of URIs")
            try:
                grants[name] = tuple(_canonical(p) for p in prefixes)
            except GrainflowError as exc:
                raise GrainflowError(f"{source}: tenant {name!r}: {exc}") from None
        return cls(grants, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tenants:
        """Read a tenants TOML file (module doc for the format)."""
        path = Path(path).expanduser()
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise GrainflowError(f"{path}: tenants file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise GrainflowError(f"{path}: not a valid TOML tenants file: {exc}") from None
        table = data.get("tenants")
        if not isinstance(table, dict):
            raise GrainflowError(f"{path}: needs a [tenants.<name>] table with prefixes = [...]")
        bad = [n for n, t in table.items() if not isinstance(t, dict) or "prefixes" not in t]
        if bad:
            raise GrainflowError(f"{path}: tenant(s) {', '.join(bad)} have no prefixes = [...]")
        return cls.from_mapping({n: t["prefixes"] for n, t in table.items()}, str(path))

    def allows(self, tenant: str, uri: str | os.PathLike | StoreLocation) -> bool:
        location = _canonical(uri)
        return any(location.is_within(prefix) for prefix in self.grants.get(tenant, ()))

    def check(self, tenant: str | None, uris: Mapping[str, str]) -> None:
        """Raise TenantRefused unless every URI (argument name -> URI) lies in a prefix
        granted to `tenant`. The message names the tenant and each URI at fault."""
        if not tenant:
            raise TenantRefused(f"no tenant given ({TENANT_ENV} / --tenant) and {self.source} requires one")
        if tenant not in self.grants:
            raise TenantRefused(f"unknown tenant {tenant!r} (known in {self.source}: {', '.join(sorted(self.grants))})")
        outside = []
        for name, uri in uris.items():
            try:
                ok = self.allows(tenant, uri)
            except GrainflowError as exc:  # an unparsable URI is refused, and says why
                outside.append(f"--{name.replace('_', '-')} {uri} ({exc})")
                continue
            if not ok:
                outside.append(f"--{name.replace('_', '-')} {uri}")
        if outside:
            granted = ", ".join(p.uri for p in self.grants[tenant]) or "nothing"
            raise TenantRefused(f"tenant {tenant!r} may not use {'; '.join(outside)} (granted: {granted})")


def tracking_store(uri: str) -> str | None:
    """The local place an MLflow tracking URI reads and writes (a SQLite database file,
    a file store), or None where it names a server (whose own access control applies)."""
    from engine.registry.backend import sqlite_path

    if (db := sqlite_path(uri)) is not None:
        return str(db)
    if uri.startswith("file:") or "://" not in uri:
        return uri
    return None


def job_uris(job: str, args) -> dict[str, str]:
    """The store locations a parsed job namespace names: argument name -> URI (unset ones
    left out). Besides the store arguments (JOB_URI_ARGS): a `--tracking-uri` that is a
    local store (a job registers and promotes into it), and synthesize's `--model` when
    it is a checkpoint path rather than a registry ref (the rule of its model_source)."""
    names = JOB_URI_ARGS.get(job)
    if names is None:
        raise GrainflowError(f"unknown job {job!r}; known: {', '.join(JOB_URI_ARGS)}")
    out = {n: str(getattr(args, n)) for n in names if getattr(args, n, None) not in (None, "")}
    tracking = getattr(args, "tracking_uri", None)
    if tracking and (store := tracking_store(str(tracking))) is not None:
        out["tracking_uri"] = store
    model = getattr(args, "model", None)
    if job == "synthesize" and model:
        from engine.synth.diffusion.model_source import is_checkpoint_path

        if is_checkpoint_path(str(model)):
            out["model"] = str(Path(model).expanduser())
    return out


def check_job(job: str, args, *, tenant: str | None, tenants: Tenants, where: str, audit=None,
              extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """Check a job's URIs for `tenant`; audit the decision (refused or accepted).

    where: "submit" or "job" (which check decided). Returns the checked URIs; raises
    TenantRefused after writing the refusal.
    """
    from engine.audit import AuditLog

    uris = job_uris(job, args)
    log = audit if audit is not None else AuditLog.default()
    entry = {"kind": "job", "job": job, "tenant": tenant, "uris": uris, "where": where, **(extra or {})}
    try:
        tenants.check(tenant, uris)
    except TenantRefused as exc:
        log.append({**entry, "decision": "refused", "reason": str(exc)})
        raise
    log.append({**entry, "decision": "accepted"})
    return uris


def enforce_job_uris(job: str, args) -> None:
    """The in-job check: with a tenants file named, the job's URIs must lie in
    GRAINFLOW_TENANT's prefixes; raises TenantRefused (a GrainflowError: exit 2).

    The file is the cluster's (GRAINFLOW_TENANTS_FILE in the nodes' environment: cluster/aws,
    cluster/kuberay) or else the submitter's (GRAINFLOW_SUBMITTER_TENANTS_FILE, which
    `grainflow submit --tenants-file` sets: a local head shares the submitter's disk).
    Without either (a laptop run) there is nothing to enforce."""
    path = os.environ.get(TENANTS_FILE_ENV) or os.environ.get(SUBMITTER_TENANTS_FILE_ENV)
    if not path:
        return
    sid = os.environ.get(SUBMISSION_ID_ENV)
    extra = {"submission_id": sid} if sid else None
    check_job(job, args, tenant=os.environ.get(TENANT_ENV), tenants=Tenants.load(path), where="job", extra=extra)


__all__ = ["JOB_URI_ARGS", "SUBMITTER_TENANTS_FILE_ENV", "TENANTS_FILE_ENV", "TENANT_ENV", "TenantRefused", "Tenants", "check_job",
           "enforce_job_uris", "job_uris"]
