"""Safe checkpoint I/O: digests recorded and checked, pickles with code refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import engine.models as M
from engine.models import checkpoint

from .payloads import write_payload_checkpoint


@pytest.fixture(scope="module")
def tiny():
    return M.create_classifier("resnet10t")


class TestSha256:
    def test_save_records_the_digest_beside_the_file(self, tiny, tmp_path):
        path = tmp_path / "clf.safetensors"
        digest = M.save_checkpoint(tiny, path)
        assert len(digest) == 64
        assert checkpoint.sidecar_path(path).read_text() == f"{digest}  clf.safetensors\n"
        assert checkpoint.read_sidecar(path) == digest == M.sha256_file(path)
        assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"

    def test_mismatch_is_refused_naming_file_and_digests(self, tiny, tmp_path):
        path = tmp_path / "clf.safetensors"
        digest = M.save_checkpoint(tiny, path)
        wrong = "0" * 64
        with pytest.raises(M.ChecksumMismatchError) as err:
            M.load_model(path, expected_sha256=wrong)
        msg = str(err.value)
        assert str(path) in msg and wrong in msg and digest in msg

    def test_a_changed_file_is_refused_by_its_sidecar(self, tiny, tmp_path):
        path = tmp_path / "clf.safetensors"
        digest = M.save_checkpoint(tiny, path)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte in the last tensor
        path.write_bytes(bytes(data))
        with pytest.raises(M.ChecksumMismatchError, match=digest):
            M.load_model(path)
        with pytest.raises(M.ChecksumMismatchError):
            M.load_state_dict(path)

    def test_expected_digest_must_look_like_one(self, tiny, tmp_path):
        path = tmp_path / "clf.safetensors"
        M.save_checkpoint(tiny, path)
        with pytest.raises(M.CheckpointError, match="64 hex digits"):
            M.load_model(path, expected_sha256="abc")

    def test_uppercase_digest_is_accepted(self, tiny, tmp_path):
        path = tmp_path / "clf.safetensors"
        digest = M.save_checkpoint(tiny, path)
        M.load_model(path, expected_sha256=digest.upper())


class TestPickleWithCode:
    def test_reduce_payload_is_refused_and_never_runs(self, tmp_path):
        marker = tmp_path / "pwned"
        path = write_payload_checkpoint(tmp_path / "evil.pt", marker)
        with pytest.raises(M.UnsafeCheckpointError, match="evil.pt"):
            M.load_state_dict(path)
        assert not marker.exists()
        with pytest.raises(M.UnsafeCheckpointError):  # Meta-style SAM path: same loader
            M.create_segmenter("sam_tiny", checkpoint=path.rename(tmp_path / "evil.pth"))
        assert not marker.exists()

    def test_the_payload_is_real(self, tmp_path):
        # Guard for the test above: unpickled without weights_only, the file appears.
        marker = tmp_path / "pwned"
        path = write_payload_checkpoint(tmp_path / "evil.pt", marker)
        torch.load(path, weights_only=False)
        assert marker.exists()


class TestFormats:
    def test_plain_safetensors_file_loads(self, tmp_path):
        path = tmp_path / "weights.safetensors"
        tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
        save_file(tensors, str(path))
        got = M.load_state_dict(path)
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)

    def test_weights_only_pt_loads(self, tmp_path):
        path = tmp_path / "weights.pt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
        assert torch.equal(M.load_state_dict(path)["w"], torch.ones(2))

    def test_corrupt_safetensors_is_a_checkpoint_error(self, tmp_path):
        path = tmp_path / "broken.safetensors"
        path.write_bytes(b"not a safetensors file")
        with pytest.raises(M.CheckpointError, match="broken.safetensors"):
            M.load_state_dict(path)

    def test_unknown_suffix_and_missing_file(self, tmp_path):
        with pytest.raises(M.CheckpointError, match="unknown checkpoint format"):
            (tmp_path / "w.ckpt").write_bytes(b"x")
            M.load_state_dict(tmp_path / "w.ckpt")
        with pytest.raises(M.CheckpointError, match="no such checkpoint"):
            M.load_state_dict(tmp_path / "absent.safetensors")

    def test_safetensors_without_config_is_not_a_model(self, tmp_path):
        path = tmp_path / "weights.safetensors"
        save_file({"a": torch.zeros(1)}, str(path))
        with pytest.raises(M.CheckpointError, match="not a grainflow checkpoint"):
            M.load_model(path)

    def test_weights_that_do_not_fit_name_the_keys(self, tiny, tmp_path):
        path = tmp_path / "w.safetensors"
        save_file({"backbone.nope": torch.zeros(1)}, str(path))
        with pytest.raises(M.CheckpointError, match="backbone.nope"):
            checkpoint.load_into(tiny, M.load_state_dict(path), source=path)

    def test_model_without_config_cannot_be_saved(self, tmp_path):
        with pytest.raises(M.CheckpointError, match="no .config"):
            M.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")

    def test_checkpoint_rebuilds_from_its_own_config(self, tmp_path):
        # The recorded config, not today's YAML, decides the architecture.
        model = M.create_classifier("resnet10t", grades=["pass", "fail"])
        path = tmp_path / "clf.safetensors"
        M.save_checkpoint(model, path, metadata={"run": "r1"})
        assert checkpoint.read_metadata(path)["run"] == "r1"
        loaded = M.load_model(path)
        assert loaded.grades == ("pass", "fail") and loaded.heads["grade"].out_features == 2
