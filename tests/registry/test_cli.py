"""`grainflow registry list|promote|rollback|fetch` as a user runs it, on a SQLite registry in tmp_path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.registry.backend import sqlite_uri
from tests.registry.conftest import make_file


def grainflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def two_versions(registry, tmp_path):
    """`cls` with versions 1 and 2, production on 1."""
    for data in (b"weights-1", b"weights-2"):
        registry.register("cls", make_file(tmp_path, f"{data.decode()}.bin", data), family="classifier", config={})
    registry.promote("cls", 1)
    return registry


class TestRegistryCommand:
    def test_promote_then_rollback_moves_production(self, two_versions, db_uri):
        promoted = grainflow("registry", "promote", "cls", "2", "--tracking-uri", db_uri)
        assert promoted.returncode == 0, promoted.stderr
        assert "cls@production -> cls/2" in promoted.stdout
        assert two_versions.get("cls@production").version == 2

        rolled = grainflow("registry", "rollback", "cls", "--tracking-uri", db_uri)
        assert rolled.returncode == 0, rolled.stderr
        assert "cls@production -> cls/1" in rolled.stdout
        assert two_versions.get("cls@production").version == 1

    def test_canary_leaves_production_and_list_shows_both(self, two_versions, db_uri):
        canary = grainflow("registry", "promote", "cls", "2", "--alias", "canary", "--tracking-uri", db_uri)
        assert canary.returncode == 0, canary.stderr
        assert two_versions.get("cls@production").version == 1
        assert two_versions.get("cls@canary").version == 2

        listing = grainflow("registry", "list", "--tracking-uri", db_uri)
        assert listing.returncode == 0, listing.stderr
        rows = [line.split("│")[1:-1] for line in listing.stdout.splitlines() if line.startswith("│")]
        assert [[cell.strip() for cell in row] for row in rows] == [
            ["cls", "1", "classifier", "production"], ["cls", "2", "classifier", "canary"]]

    def test_list_shows_versions_registered_outside_grainflow(self, two_versions, db_uri, tmp_path):
        """On a shared MLflow server other tools register models too: listed, not fatal."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=db_uri)
        run = client.create_run(client.create_experiment("other", artifact_location=(tmp_path / "o").as_uri()))
        client.create_registered_model("plain")
        client.create_model_version("plain", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

        listing = grainflow("registry", "list", "--tracking-uri", db_uri)
        assert listing.returncode == 0, listing.stderr
        rows = [[cell.strip() for cell in line.split("│")[1:-1]]
                for line in listing.stdout.splitlines() if line.startswith("│")]
        assert [row[:2] for row in rows] == [["cls", "1"], ["cls", "2"], ["plain", "1"]]
        assert rows[0][2] == "classifier" and rows[2][2] not in ("classifier", "")

    def test_a_server_that_is_down_is_one_line_at_once(self, monkeypatch):
        import socket
        import time

        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_REGISTRY_URI"):
            monkeypatch.delenv(key, raising=False)
        start = time.monotonic()
        result = grainflow("registry", "list")
        assert time.monotonic() - start < 30  # MLflow's own retries took about four minutes
        assert_one_line_error(result, f"MLflow tracking server http://127.0.0.1:{port} is not reachable")

    def test_unknown_name_is_one_line(self, two_versions, db_uri):
        assert_one_line_error(grainflow("registry", "promote", "nope", "1", "--tracking-uri", db_uri),
                              "no registered model 'nope'", "registered: cls")
        assert_one_line_error(grainflow("registry", "rollback", "nope", "--tracking-uri", db_uri),
                              "no registered model 'nope'")

    def test_fetch_copies_the_aliased_version_checked(self, two_versions, db_uri, tmp_path):
        fetched = grainflow("registry", "fetch", "cls@production", "--dest", str(tmp_path / "prod"),
                            "--tracking-uri", db_uri)
        assert fetched.returncode == 0, fetched.stderr
        ((ref, digest, path),) = [line.split() for line in fetched.stdout.splitlines()]
        assert ref == "cls/1" and path == str(tmp_path / "prod" / "weights-1.bin")
        assert (tmp_path / "prod" / "weights-1.bin").read_bytes() == b"weights-1"
        assert digest == two_versions.get("cls/1").sha256["weights-1.bin"]
        assert_one_line_error(grainflow("registry", "fetch", "cls@canary", "--tracking-uri", db_uri), "canary")

    def test_nothing_to_roll_back_to(self, two_versions, db_uri):
        assert_one_line_error(grainflow("registry", "rollback", "cls", "--tracking-uri", db_uri),
                              "cls@production: nothing to roll back to")

    def test_a_missing_registry_is_refused_not_created(self, tmp_path):
        db = tmp_path / "typo" / "m.db"
        for args in (["list"], ["promote", "cls", "1"], ["rollback", "cls"]):
            assert_one_line_error(grainflow("registry", *args, "--tracking-uri", sqlite_uri(db)), "no registry at")
        assert not db.parent.exists()
