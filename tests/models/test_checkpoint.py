"""Safe checkpoint I/O: digests recorded and checked, pickles with code refused."""

from __future__ import annotations

import os
from pathlib import Path

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

    def test_the_same_weights_saved_again_have_the_same_digest(self, tiny, tmp_path):
        """safetensors writes metadata in a hash map's order; save_checkpoint sorts it, so
        a rerun that makes the same weights makes the same file."""
        meta = {"epoch": "3", "run": "r1"}
        digests = {M.save_checkpoint(tiny, tmp_path / f"c{i}.safetensors", metadata=meta) for i in range(5)}
        assert len(digests) == 1
        loaded = M.load_model(tmp_path / "c0.safetensors", expected_sha256=digests.pop())
        for k, v in tiny.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        assert checkpoint.read_metadata(tmp_path / "c0.safetensors")["epoch"] == "3"

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


class TestNotACheckpoint:
    """Files that are no checkpoint at all (a failed download, a git-lfs pointer, a copy
    cut off) are said to be that, not called code-carrying pickles."""

    @staticmethod
    def refused(path: Path, *fragments: str) -> str:
        with pytest.raises(M.CheckpointError) as info:
            M.load_state_dict(path)
        assert not isinstance(info.value, M.UnsafeCheckpointError), info.value
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "could run code" not in message
        for fragment in fragments:
            assert fragment in message, message
        return message

    def test_an_html_login_page_saved_as_a_sam_checkpoint(self, tmp_path):
        path = tmp_path / "sam_vit_b.pth"
        path.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>\n")
        self.refused(path, "not a torch checkpoint", "starts with b'<!DOCTYPE html>", "HTML")
        with pytest.raises(M.CheckpointError, match="not a torch checkpoint"):  # the path SAM's weights take
            M.create_segmenter("sam_tiny", checkpoint=path)

    def test_a_git_lfs_pointer(self, tmp_path):
        path = tmp_path / "best.pt"
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 375042383\n")
        self.refused(path, "not a torch checkpoint", "git-lfs pointer", "git lfs pull")

    def test_an_empty_file(self, tmp_path):
        (tmp_path / "w.pt").write_bytes(b"")
        self.refused(tmp_path / "w.pt", "not a torch checkpoint", "empty")

    @pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
    def test_a_checkpoint_cut_off_halfway(self, tmp_path, zipped):
        whole = tmp_path / "whole.pt"
        torch.save({"w": torch.ones(64), "b": torch.zeros(3)}, whole, _use_new_zipfile_serialization=zipped)
        data = whole.read_bytes()
        (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
        self.refused(tmp_path / "cut.pt", "damaged or truncated")

    def test_garbage_after_a_pickle_header(self, tmp_path):
        (tmp_path / "w.pt").write_bytes(b"\x80\x02not really a pickle at all" * 3)
        self.refused(tmp_path / "w.pt", "damaged or truncated")

    @pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch notes the protocol first
    def test_a_bare_pickle_with_a_payload_is_still_unsafe(self, tmp_path):
        import pickle

        from .payloads import CreatesFile

        marker = tmp_path / "pwned"
        path = tmp_path / "raw.pt"
        path.write_bytes(pickle.dumps({"w": torch.ones(2), "x": CreatesFile(marker)}, protocol=4))
        with pytest.raises(M.UnsafeCheckpointError, match=r"could run code.*imports (builtins|io)\.open"):
            M.load_state_dict(path)
        assert not marker.exists()

    def test_a_damaged_config_in_a_checkpoint(self, tiny, tmp_path):
        from safetensors.torch import load_file

        path = tmp_path / "clf.safetensors"
        M.save_checkpoint(tiny, path)
        save_file(load_file(path), str(path), metadata={"format": checkpoint.FORMAT, "config": "{not json"})
        with pytest.raises(M.CheckpointError, match="recorded model config is damaged"):
            M.load_model(path, expected_sha256=M.sha256_file(path))


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


class TestConfigCannotRunCode:
    """A .safetensors file carries its model's config; Ultralytics builds a YOLO config by
    eval()-ing its activation and calling what its layers name. A file must not run code
    through either."""

    def _evil(self, tmp_path, edit):
        import json

        from engine.models.detector import _arch_yaml

        good = tmp_path / "good.safetensors"
        M.save_checkpoint(M.create_detector("yolov8n_tiny"), good)
        meta = checkpoint.read_metadata(good)
        cfg = json.loads(meta["config"])
        model_yaml = _arch_yaml("yolov8", "n")
        edit(model_yaml)
        cfg["builder"] = "yolo_yaml"
        cfg["args"] = {"model_yaml": model_yaml, "defect_classes": cfg["args"]["defect_classes"], "channels": 1}
        evil = tmp_path / "evil.safetensors"
        save_file(M.load_state_dict(good), str(evil), metadata={**meta, "config": json.dumps(cfg)})
        return evil

    def test_an_activation_that_runs_code_is_refused(self, tmp_path):
        marker = tmp_path / "ran"
        evil = self._evil(tmp_path, lambda y: y.update(activation=(
            f"(__import__('pathlib').Path({str(marker)!r}).write_text('x'), __import__('torch').nn.SiLU())[1]")))
        with pytest.raises(M.ModelConfigError, match="activation"):
            M.load_model(evil)
        assert not marker.exists()

    def test_a_layer_naming_a_function_is_refused(self, tmp_path):
        # torch_safe_load (a function of ultralytics.nn.tasks) would unpickle any path given
        evil = self._evil(tmp_path, lambda y: y["head"].append([-1, 1, "torch_safe_load", ["/tmp/x.pt"]]))
        with pytest.raises(M.ModelConfigError, match="torch_safe_load"):
            M.load_model(evil)

    def test_a_layer_that_downloads_weights_is_refused(self, tmp_path):
        evil = self._evil(tmp_path, lambda y: y["backbone"].insert(0, [-1, 1, "TorchVision",
                                                                       ["resnet152", "DEFAULT", True, 2]]))
        with pytest.raises(M.ModelConfigError, match="downloads weights"):
            M.load_model(evil)

    def test_plain_activations_and_every_registered_yolo_still_build(self):
        from engine.models.detector import _arch_yaml, check_yolo_yaml

        for act in ("nn.SiLU()", "torch.nn.LeakyReLU(0.1)", "nn.ReLU(inplace=True)", None):
            check_yolo_yaml({**_arch_yaml("yolo11", "n"), "activation": act})
        for arch in ("yolov8", "yolo11"):
            for scale in ("n", "s", "m"):
                check_yolo_yaml(_arch_yaml(arch, scale))


class TestCheckedReadIsTheLoadedRead:
    """The digest is checked on the very read that is parsed: a file replaced right after
    the check (a shared cache, another process) is never the one loaded."""

    def _after_check(self, monkeypatch, then):
        """Run `then(path)` right after the digest check of every checked open (the
        public `open_checked` goes through `_open_checked` too)."""
        real = checkpoint._open_checked

        def check_then(path, expected_sha256=None):
            out = real(path, expected_sha256)
            then(path)
            return out

        monkeypatch.setattr(checkpoint, "_open_checked", check_then)

    def _swap_after_check(self, monkeypatch, replacement):
        import os

        # another process replaces the file just now
        self._after_check(monkeypatch, lambda path: os.replace(replacement, path))

    def test_a_file_written_in_place_after_the_check_is_refused(self, tmp_path, monkeypatch):
        path = tmp_path / "clf.safetensors"
        digest = M.save_checkpoint(M.create_classifier("resnet10t"), path)

        def scribble(p):
            with open(p, "r+b") as f:
                f.seek(-4, 2)
                f.write(b"\xff\xff\xff\xff")

        self._after_check(monkeypatch, scribble)
        with pytest.raises(M.CheckpointError, match="written to while"):
            M.load_model(path, expected_sha256=digest)

    def test_load_model_keeps_the_checked_bytes(self, tmp_path, monkeypatch):
        torch.manual_seed(0)
        path = tmp_path / "clf.safetensors"
        digest = M.save_checkpoint(M.create_classifier("resnet10t"), path)
        torch.manual_seed(1)
        M.save_checkpoint(M.create_classifier("resnet10t"), tmp_path / "other.safetensors")
        expected = M.load_state_dict(path)
        other = M.load_state_dict(tmp_path / "other.safetensors")
        assert not all(torch.equal(other[k], v) for k, v in expected.items())
        swapped = []

        def swap(p):
            os.replace(tmp_path / "other.safetensors", p)
            swapped.append(Path(p))

        self._after_check(monkeypatch, swap)
        loaded = M.load_model(path, expected_sha256=digest).state_dict()
        # the other file did replace the checked one, after its check ...
        assert swapped == [path] and M.sha256_file(path) != digest
        # ... and what was loaded is still the checked bytes
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())

    def test_a_pickle_swapped_in_after_the_check_never_runs(self, tmp_path, monkeypatch):
        from .test_detector import ultralytics_pt

        from engine.models.detector import Detector

        path = tmp_path / "best.pt"
        digest = ultralytics_pt(M.create_detector("yolov8n_tiny"), path)
        marker = tmp_path / "pwned"
        payload = write_payload_checkpoint(tmp_path / "evil.pt", marker)
        self._swap_after_check(monkeypatch, payload)
        assert isinstance(M.load_detector_checkpoint(path, digest), Detector)
        assert not marker.exists()
