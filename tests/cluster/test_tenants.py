"""Tenants: store prefixes per tenant, checked before submission and inside the job,
refusals (and acceptances) in the audit log."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from engine.audit import read_audit
from engine.submit import prepare_submission
from engine.tenants import TenantRefused, Tenants, job_uris


@pytest.fixture
def tenants(tmp_path) -> Tenants:
    (tmp_path / "lab-a").mkdir()
    return Tenants.from_mapping({"lab-a": ["s3://lab-a/x/", str(tmp_path / "lab-a"), "s3://shared/"],
                                 "lab-b": ["s3://lab-b/"]})


class TestPrefixMatching:
    @pytest.mark.parametrize("uri", ["s3://lab-a/x", "s3://lab-a/x/", "s3://lab-a/x/run/1", "s3://lab-a/y/../x/z",
                                     "s3://shared/anything"])
    def test_granted(self, tenants, uri):
        assert tenants.allows("lab-a", uri)

    @pytest.mark.parametrize("uri", ["s3://lab-a/xy", "s3://lab-a/", "s3://lab-ab/x", "s3://lab-a/x/../y",
                                     "s3://lab-b/x", "memory://lab-a/x"])
    def test_refused(self, tenants, uri):
        assert not tenants.allows("lab-a", uri)

    def test_local_paths_file_uris_and_dotdot(self, tenants, tmp_path):
        root = tmp_path / "lab-a"
        assert tenants.allows("lab-a", root / "archive")
        assert tenants.allows("lab-a", f"file://{root}/runs/r1")
        assert tenants.allows("lab-a", f"{tmp_path}/other/../lab-a/x")
        assert not tenants.allows("lab-a", f"{root}/../lab-ab")
        assert not tenants.allows("lab-a", f"file://{root}/../other")
        assert not tenants.allows("lab-a", f"{root}x/archive")  # a sibling whose name starts alike

    def test_a_symlink_out_of_a_grant_is_refused(self, tenants, tmp_path):
        (tmp_path / "outside").mkdir()
        (tmp_path / "lab-a" / "link").symlink_to(tmp_path / "outside")
        assert not tenants.allows("lab-a", tmp_path / "lab-a" / "link" / "data")

    def test_an_s3_uri_climbing_out_of_its_bucket_is_refused(self, tenants):
        with pytest.raises(TenantRefused, match="climbs above"):
            tenants.check("lab-a", {"out": "s3://lab-a/x/../../lab-b/y"})

    def test_unknown_and_missing_tenants(self, tenants):
        with pytest.raises(TenantRefused, match="unknown tenant 'lab-z'"):
            tenants.check("lab-z", {"out": "s3://lab-a/x"})
        with pytest.raises(TenantRefused, match="no tenant"):
            tenants.check(None, {"out": "s3://lab-a/x"})


class TestTenantsFile:
    def test_toml(self, tmp_path):
        path = tmp_path / "tenants.toml"
        path.write_text('[tenants.lab-a]\nprefixes = ["s3://lab-a/"]\n')
        assert Tenants.load(path).allows("lab-a", "s3://lab-a/r")

    def test_bad_files_name_the_problem(self, tmp_path):
        path = tmp_path / "tenants.toml"
        path.write_text('[tenants.lab-a]\nbuckets = ["s3://lab-a/"]\n')
        with pytest.raises(Exception, match="lab-a have no prefixes"):
            Tenants.load(path)
        path.write_text("[tenants\n")
        with pytest.raises(Exception, match="not a valid TOML"):
            Tenants.load(path)


def write_tenants(tmp_path, granted) -> str:
    path = tmp_path / "tenants.toml"
    path.write_text(f'[tenants.lab-a]\nprefixes = ["{granted}"]\n')
    return str(path)


REPROCESS = ["--models", "tiny@production", "--tracking-uri", "http://127.0.0.1:9"]  # a server: its own auth


class TestBeforeSubmission:
    def test_a_uri_outside_is_refused_and_audited(self, tmp_path, monkeypatch):
        audit = tmp_path / "audit.jsonl"
        monkeypatch.setenv("GRAINFLOW_AUDIT_LOG", str(audit))
        granted = tmp_path / "lab-a"
        tenants_file = write_tenants(tmp_path, granted)
        argv = ["--archive", str(granted / "archive"), "--out", str(tmp_path / "lab-b" / "out"), *REPROCESS]
        with pytest.raises(TenantRefused, match="--out"):
            prepare_submission("reprocess", argv, tenant="lab-a", tenants_file=tenants_file)
        (entry,) = read_audit(audit)
        assert entry["decision"] == "refused" and entry["where"] == "submit" and entry["tenant"] == "lab-a"
        assert entry["uris"]["out"] == str(tmp_path / "lab-b" / "out") and "--out" in entry["reason"]

    def test_accepted_submission_carries_the_tenant_into_the_job(self, tmp_path, monkeypatch):
        audit = tmp_path / "audit.jsonl"
        monkeypatch.setenv("GRAINFLOW_AUDIT_LOG", str(audit))
        granted = tmp_path / "lab-a"
        tenants_file = write_tenants(tmp_path, granted)
        argv = ["--archive", str(granted / "a"), "--out", str(granted / "o"), *REPROCESS]
        sub = prepare_submission("reprocess", argv, tenant="lab-a", tenants_file=tenants_file)
        assert sub.entrypoint.startswith("python -m jobs.reprocess --archive ")
        assert sub.runtime_env["env_vars"]["GRAINFLOW_TENANT"] == "lab-a"
        # sent under its own name: a cluster's GRAINFLOW_TENANTS_FILE is never replaced
        assert sub.runtime_env["env_vars"]["GRAINFLOW_SUBMITTER_TENANTS_FILE"] == tenants_file
        assert "GRAINFLOW_TENANTS_FILE" not in sub.runtime_env["env_vars"]
        assert sub.results == str(granted / "o")
        (entry,) = read_audit(audit)
        assert entry["decision"] == "accepted" and entry["submission_id"] == sub.submission_id

    def test_relative_paths_are_sent_absolute_and_a_tenant_alone_reaches_the_job(self, tmp_path, monkeypatch):
        """The job's driver runs in the head's working directory, not the submitter's; and a
        cluster whose nodes name their own tenants file needs only the tenant."""
        monkeypatch.chdir(tmp_path)
        sub = prepare_submission("reprocess", ["--archive", "./archive", "--out=runs/r1", *REPROCESS], tenant="lab-a")
        assert f"--archive {tmp_path / 'archive'} --out={tmp_path / 'runs' / 'r1'} --models" in sub.entrypoint
        assert sub.results == str(tmp_path / "runs" / "r1")
        env = sub.runtime_env["env_vars"]
        assert env["GRAINFLOW_TENANT"] == "lab-a" and "GRAINFLOW_TENANTS_FILE" not in env
        kept = prepare_submission("reprocess", ["--archive", "s3://lab-a/a", "--out", "/abs/o", *REPROCESS])
        assert "--archive s3://lab-a/a --out /abs/o" in kept.entrypoint

    def test_a_local_registry_and_checkpoint_are_checked_too(self, tmp_path, monkeypatch):
        """A job registers and promotes into its --tracking-uri, synthesize reads its --model
        checkpoint and a fine-tune its --init-weights: lab-a may not use lab-b's."""
        monkeypatch.setenv("GRAINFLOW_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
        granted = tmp_path / "lab-a"
        tenants_file = write_tenants(tmp_path, granted)
        other = tmp_path / "lab-b"
        train = ["--model", "fusion:fusion_tiny", "--archive", str(granted / "a"), "--storage", str(granted / "r"),
                 "--register", "fusion", "--promote"]
        with pytest.raises(TenantRefused, match=f"--tracking-uri {other}/mlflow.db"):
            prepare_submission("train", [*train, "--tracking-uri", f"sqlite:///{other}/mlflow.db"], tenant="lab-a",
                               tenants_file=tenants_file)
        ok = prepare_submission("train", [*train, "--tracking-uri", f"sqlite:///{granted}/mlflow.db"], tenant="lab-a",
                                tenants_file=tenants_file)
        assert ok.uris["tracking_uri"] == f"{granted}/mlflow.db"
        with pytest.raises(TenantRefused, match=f"--init-weights {other}/sam.pth"):
            prepare_submission("train", [*train, "--init-weights", str(other / "sam.pth")], tenant="lab-a",
                               tenants_file=tenants_file)
        with pytest.raises(TenantRefused, match="--model"):
            prepare_submission("synthesize", ["--model", str(other / "d.safetensors"), "--out", str(granted / "s"),
                                              "-n", "2"], tenant="lab-a", tenants_file=tenants_file)

    def test_train_and_synthesize_uris(self, tmp_path):
        from engine.submit import parse_job_args

        args = parse_job_args("train", ["--model", "fusion:fusion_tiny", "--archive", "s3://a/b", "--storage", "s3://a/r"])
        assert job_uris("train", args) == {"archive": "s3://a/b", "storage": "s3://a/r"}
        # the weights a fine-tune starts from are read like an archive: another lab's are not the tenant's
        args = parse_job_args("train", ["--model", "segmenter:sam_tiny", "--archive", "s3://a/b", "--storage",
                                        "s3://a/r", "--init-weights", "s3://b/sam.pth"])
        assert job_uris("train", args)["init_weights"] == "s3://b/sam.pth"
        args = parse_job_args("synthesize", ["--model", "m.safetensors", "--out", "s3://a/synth", "-n", "4"])
        assert job_uris("synthesize", args)["out"] == "s3://a/synth"

    def test_the_cli_refuses_before_contacting_any_cluster(self, tmp_path):
        audit = tmp_path / "audit.jsonl"
        tenants_file = write_tenants(tmp_path, tmp_path / "lab-a")
        cmd = [sys.executable, "-m", "engine.cli", "submit", "reprocess", "--address", "http://127.0.0.1:9",
               "--tenant", "lab-a", "--tenants-file", tenants_file, "--",
               "--archive", "s3://lab-b/archive", "--out", str(tmp_path / "lab-a" / "o"), *REPROCESS]
        p = subprocess.run(cmd, env={**os.environ, "GRAINFLOW_AUDIT_LOG": str(audit)}, capture_output=True,
                           text=True, timeout=120, cwd=tempfile.gettempdir())
        assert p.returncode == 2 and "may not use --archive s3://lab-b/archive" in p.stderr
        assert [e["decision"] for e in read_audit(audit)] == ["refused"]


class TestInsideTheJob:
    def test_a_job_submitted_around_the_check_is_refused_before_it_starts(self, tmp_path):
        """`python -m jobs.reprocess` run with the tenant's environment but URIs outside:
        exit 2 naming the URI, before Ray starts or any output is written; audited."""
        audit = tmp_path / "audit.jsonl"
        tenants_file = write_tenants(tmp_path, tmp_path / "lab-a")
        out = tmp_path / "elsewhere" / "out"
        env = {**os.environ, "GRAINFLOW_AUDIT_LOG": str(audit), "GRAINFLOW_TENANT": "lab-a",
               "GRAINFLOW_TENANTS_FILE": tenants_file, "GRAINFLOW_SUBMISSION_ID": "bypass-1"}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "jobs.reprocess", "--archive", str(tmp_path / "lab-a" / "a"), "--out", str(out),
               *REPROCESS]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
        assert p.returncode == 2 and f"--out {out}" in p.stderr
        assert not out.exists()
        (entry,) = read_audit(audit)
        assert (entry["decision"], entry["where"], entry["submission_id"]) == ("refused", "job", "bypass-1")

    def test_no_tenant_at_all_is_refused_when_the_cluster_has_a_tenants_file(self, tmp_path, monkeypatch):
        from jobs.reprocess import parse_args

        from engine.tenants import enforce_job_uris

        monkeypatch.setenv("GRAINFLOW_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
        monkeypatch.setenv("GRAINFLOW_TENANTS_FILE", write_tenants(tmp_path, tmp_path / "lab-a"))
        monkeypatch.delenv("GRAINFLOW_TENANT", raising=False)
        args = parse_args(["--archive", str(tmp_path / "lab-a" / "a"), "--out", str(tmp_path / "lab-a" / "o"),
                           *REPROCESS])
        with pytest.raises(TenantRefused, match="no tenant"):
            enforce_job_uris("reprocess", args)
        monkeypatch.setenv("GRAINFLOW_TENANT", "lab-a")
        enforce_job_uris("reprocess", args)  # granted: no error

    def test_the_clusters_tenants_file_rules_over_the_submitters(self, tmp_path, monkeypatch):
        """A submitter's file path (absent on the cluster) comes along with the job; the
        nodes' own file is the one checked, and the submitter's serves only where the
        nodes name none (a local head)."""
        from jobs.reprocess import parse_args

        from engine.tenants import enforce_job_uris

        monkeypatch.setenv("GRAINFLOW_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
        (tmp_path / "cluster").mkdir()
        (tmp_path / "laptop").mkdir()
        cluster_file = write_tenants(tmp_path / "cluster", tmp_path / "lab-a")
        submitter_file = write_tenants(tmp_path / "laptop", tmp_path / "elsewhere")
        monkeypatch.setenv("GRAINFLOW_TENANT", "lab-a")
        monkeypatch.setenv("GRAINFLOW_TENANTS_FILE", cluster_file)
        monkeypatch.setenv("GRAINFLOW_SUBMITTER_TENANTS_FILE", str(tmp_path / "not-on-this-node.toml"))
        args = parse_args(["--archive", str(tmp_path / "lab-a" / "a"), "--out", str(tmp_path / "lab-a" / "o"),
                           *REPROCESS])
        enforce_job_uris("reprocess", args)  # the cluster's file grants lab-a: no error
        monkeypatch.delenv("GRAINFLOW_TENANTS_FILE")
        monkeypatch.setenv("GRAINFLOW_SUBMITTER_TENANTS_FILE", submitter_file)
        with pytest.raises(TenantRefused, match="--archive"):
            enforce_job_uris("reprocess", args)  # the submitter's file grants lab-a only elsewhere
