"""Where the registry lives, and the MLflow client that talks to it.

Resolution, first match wins:

1. an explicit `tracking_uri` argument (tests pass a `sqlite:///<tmp>/mlflow.db`);
2. `MLFLOW_TRACKING_URI` (a server such as `http://mlflow:5000`, or a database);
3. the embedded default: `sqlite:///<user data dir>/mlflow.db`, with artifacts in
   `<user data dir>/artifacts` (platformdirs: `~/.local/share/grainflow` on Linux).

The registry URI is the tracking URI unless `registry_uri` is given or, when the tracking
URI came from the environment, `MLFLOW_REGISTRY_URI` is set.

MLflow is imported here lazily, inside `make_client`, never when `engine.registry` is
imported: importing mlflow starts its telemetry client and takes about a second, and every
Ray worker imports `engine`. Before that first import `quiet_mlflow()` sets these defaults
for this process (only where the user has not set them):

- `MLFLOW_DISABLE_TELEMETRY=true`: no usage reports (and no network) from the engine;
- `MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false`: no tqdm bars in batch job logs;
- `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true`: with a server, MLflow prints each run's
  URL to stdout when the run ends, which would corrupt the JSON that jobs and benchmarks
  print there;
- `MLFLOW_HTTP_REQUEST_MAX_RETRIES=2` and `MLFLOW_HTTP_REQUEST_TIMEOUT=30` (seconds):
  MLflow's own defaults (7 retries with exponential backoff, 120 s per request) keep a
  command silent for about four minutes before it reports a server that is down. Two
  retries still ride out a brief server restart; set the variables to wait longer.

With a tracking server (an http(s) URI), `make_client` also asks the server's `/health`
once per process and URI (`check_reachable`, a few seconds at most): a server that is
down or a mistyped host is a RegistryError naming the URI at once, before any work (or a
Ray cluster) is started. Any HTTP answer counts as reachable; what it means is left to
MLflow's own calls.

A SQLite registry copied or moved to another folder: see `relocation.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

if TYPE_CHECKING:
    from mlflow import MlflowClient

APP_NAME = "grainflow"
DB_FILE = "mlflow.db"
ARTIFACT_DIR_NAME = "artifacts"

_QUIET_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# The /health probe's (connect, read) timeouts in seconds; a live server answers in ms.
PROBE_TIMEOUT_S = (5.0, 15.0)
# URIs whose server answered in this process: asked once, not before every client.
_reachable: set[str] = set()


def default_tracking_uri() -> str:
    """The embedded store: a SQLite file in the user's data dir (created on first use)."""
    return sqlite_uri(Path(platformdirs.user_data_dir(APP_NAME)) / DB_FILE)


def sqlite_uri(path: Path) -> str:
    """`sqlite:////abs/path.db` for a database file."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def resolve_uris(tracking_uri: str | None, registry_uri: str | None) -> tuple[str, str]:
    """(tracking URI, registry URI) by the rules in this module's docstring."""
    if tracking_uri:
        return tracking_uri, registry_uri or tracking_uri
    env_tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if env_tracking:
        return env_tracking, registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or env_tracking
    default = default_tracking_uri()
    return default, registry_uri or default


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, or None for any other store (or in-memory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix:
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def check_existing(tracking_uri: str | None) -> None:
    """For a command that only reads models: the registry named by `tracking_uri` (or
    MLFLOW_TRACKING_URI) must exist. Opening a SQLite URI creates an empty registry, so
    a mistyped path would otherwise answer "no such model"; a bare file path (MLflow
    takes it for a file store) gets the sqlite:/// form to use. The default registry in
    the user data dir may be empty and is not checked."""
    from engine.registry.errors import RegistryError

    where = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not where:
        return
    if "://" not in where and where.endswith((".db", ".sqlite")):
        raise RegistryError(f"registry {where!r}: a SQLite registry is named by a URI: "
                            f"sqlite:///{Path(where).expanduser().resolve()}")
    db = sqlite_path(where)
    if db is not None and not db.expanduser().is_file():
        raise RegistryError(f"no registry at {where} ({db} does not exist); --tracking-uri names another")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite database; None lets a server (or the DB's default) decide.

    Without this MLflow would put a SQLite store's artifacts in `./mlruns` of whatever
    directory the process happens to run in.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.expanduser().resolve().parent / ARTIFACT_DIR_NAME).as_uri()


def quiet_mlflow() -> None:
    """Set MLflow's telemetry, progress-bar, retry and timeout defaults for this process
    (see module doc)."""
    changed = False
    for key, value in _QUIET_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            changed = True
    if changed and "mlflow" in sys.modules:
        # mlflow was imported before us (e.g. by training code) and started telemetry then;
        # its own re-initialiser reads the variable again and drops the client.
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()


def make_client(tracking_uri: str, registry_uri: str) -> MlflowClient:
    """An MlflowClient bound to these URIs; no global MLflow state is touched. A tracking
    server that does not answer is a RegistryError here (`check_reachable`)."""
    quiet_mlflow()
    for uri in {tracking_uri, registry_uri}:
        db = sqlite_path(uri)
        if db is not None:
            # SQLite creates the file but not its directory.
            db.expanduser().parent.mkdir(parents=True, exist_ok=True)
    for uri in dict.fromkeys((tracking_uri, registry_uri)):
        check_reachable(uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


def check_reachable(uri: str) -> None:
    """For an http(s) tracking or registry URI: RegistryError naming it when nothing
    answers there (connection refused, unknown host, no answer within PROBE_TIMEOUT_S).
    Other URIs (SQLite, Databricks, ...) are not probed. A server that answered once in
    this process is not asked again."""
    if not uri.startswith(("http://", "https://")) or uri in _reachable:
        return
    import requests

    from engine.registry.errors import RegistryError

    try:
        # requests, not MLflow's client: that one retries for minutes, which is what this avoids
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S, allow_redirects=False)
    except requests.exceptions.SSLError:
        pass  # something speaks TLS there; certificate settings are MLflow's to apply and report
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise RegistryError(
            f"MLflow tracking server {redact(uri)} is not reachable ({_network_reason(exc)}); start it, or "
            "name a reachable one with --tracking-uri or MLFLOW_TRACKING_URI"
        ) from None
    _reachable.add(uri)


def redact(uri: str) -> str:
    """`uri` without its password (`http://user:secret@host` -> `http://user:***@host`)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _network_reason(exc: BaseException) -> str:
    """The socket error inside a requests exception ("Connection refused"), not its chain of reprs."""
    import re

    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no connection within {PROBE_TIMEOUT_S[0]:g} s"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {PROBE_TIMEOUT_S[1]:g} s"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__

