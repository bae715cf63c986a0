"""A detector's training started from a checkpoint: weights moved by name and shape,
class outputs by class name, an RGB stem summed to one channel, other models refused.
(The run itself, as a Ray task from a trained checkpoint: test_detector_training.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

import engine.models as M
from engine.runtime import configure_offline
from engine.training.detector.warm_start import (DetectorWarmStartError, check_init_weights, class_convs,
                                                 transfer_weights, warm_start)


@pytest.fixture(scope="module", autouse=True)
def offline():
    configure_offline()


def detector(seed: int, **overrides):
    torch.manual_seed(seed)
    return M.create_detector("yolov8n_tiny", **overrides)


@pytest.fixture(scope="module")
def source():
    return detector(1)


@pytest.fixture(scope="module")
def source_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "production.safetensors"
    return path, M.save_checkpoint(source, path)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_the_same_model_starts_from_the_file_bit_for_bit(source_file, source):
    path, digest = source_file
    target = detector(2)
    transfer = warm_start(target, path)
    assert (transfer.fraction, transfer.adapted, transfer.left) == (1.0, (), ())
    assert transfer.sha256 == digest and transfer.source == "yolov8n_tiny"
    for key, value in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[key], value), key


def test_class_outputs_follow_the_class_names(source):
    """The new model lists its classes in another order and has one the file's lacks:
    each shared class's scores come from that class's row, the new class keeps its start."""
    names = ("void", "pore", "delamination", "crack", "inclusion", "scratch")
    target = detector(2, defect_classes=list(names))
    before = state(target)
    transfer = warm_start_from(source, target)
    mine, theirs = class_convs(target), class_convs(source)
    assert len(mine) == len(theirs) == 3
    for m, t in zip(mine, theirs):
        for i, name in enumerate(names):
            for what in ("weight", "bias"):
                got = getattr(m, what)[i]
                if name in source.names:
                    assert torch.equal(got, getattr(t, what)[source.names.index(name)]), (name, what)
    new = names.index("delamination")
    head_keys = [k for k in before if k.endswith(("2.weight", "2.bias")) and ".cv3." in k]
    assert len(head_keys) == 6 and set(head_keys) == set(transfer.adapted)
    for key in head_keys:
        assert torch.equal(target.model.state_dict()[key][new], before[key][new]), key
    assert transfer.left == () and 0.98 < transfer.fraction < 1.0
    assert transfer.source_classes == source.names


def warm_start_from(source, target):
    return transfer_weights(target, source, file="production.safetensors", sha256="0" * 64)


def test_an_rgb_checkpoint_starts_a_grey_model_with_its_stem_summed(tmp_path):
    """What Ultralytics writes for an RGB model (a pickled half-precision model object),
    read without running it; its stem over three equal channels is the grey stem."""
    rgb = detector(3, channels=3, defect_classes=["person", "pore", "car"])
    path = tmp_path / "best.pt"
    torch.save({"model": copy.deepcopy(rgb.model).half(), "ema": None, "train_args": {"imgsz": 128}}, path)
    target = detector(2)
    (tmp_path / "best.pt.sha256").write_text(f"{M.sha256_file(path)}  best.pt\n")
    with pytest.raises(DetectorWarmStartError, match="best.pt: an Ultralytics .pt is a pickle, read only with"):
        warm_start(target, path)  # a pickle: neither its own digest nor one beside it says who made it
    transfer = warm_start(target, path, M.sha256_file(path))
    stem = "model.0.conv.weight"
    assert transfer.adapted[0] == stem
    want = rgb.model.state_dict()[stem].half().float().sum(dim=1, keepdim=True)
    torch.testing.assert_close(target.model.state_dict()[stem], want)
    pore = target.names.index("pore")
    for m, t in zip(class_convs(target), class_convs(rgb)):
        torch.testing.assert_close(m.weight[pore], t.weight[1].half().float())
    grey = torch.rand(1, 1, 64, 64)
    rgb.eval(), target.eval()
    with torch.no_grad():  # the stems agree on a grey image given as three equal channels
        torch.testing.assert_close(target.model.model[0].conv(grey),
                                   rgb.model.model[0].conv(grey.expand(-1, 3, -1, -1)).float(),
                                   atol=2e-2, rtol=1e-2)


def test_another_scale_is_refused_naming_the_file_and_its_model(source_file):
    path, _ = source_file
    with pytest.raises(DetectorWarmStartError, match=r"production.safetensors: only 1% of this detector's "
                                                     r"weights fit those of the file's 'yolov8n_tiny'"):
        check_init_weights("yolov8s", path)


@pytest.mark.parametrize("case, words", [
    ("missing", "no such file"),
    ("suffix", "a grainflow .safetensors or an Ultralytics .pt, not a .pth file"),
    ("digest", "sha256"),
    ("other family", "not a detector"),
])
def test_files_that_cannot_start_a_detector_are_named(source_file, tmp_path, case, words):
    path, _ = source_file
    sha = None
    if case == "missing":
        path = tmp_path / "nothing.safetensors"
    elif case == "suffix":
        path = tmp_path / "sam_vit_b.pth"
        path.write_bytes(b"not read")
    elif case == "digest":
        sha = "ab" * 32
    else:
        path = tmp_path / "classifier.safetensors"
        M.save_checkpoint(M.create_classifier("resnet10t"), path)
    with pytest.raises(DetectorWarmStartError if case in ("suffix", "missing") else M.CheckpointError,
                       match=words):
        check_init_weights("yolov8n_tiny", path, sha)
