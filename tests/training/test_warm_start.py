"""Fine-tuning from given weights (engine.training.warm_start): a run starts from a file
the user supplies, in Meta's SAM format, and trains only the named modules.

sam_tiny stands in for Meta's ViT-B (same `Sam` keys, a file saved as Meta saves theirs:
a bare state dict); the Ray Train run is one worker, one epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.models as M
from engine.models.checkpoint import sha256_file
from engine.models.errors import CheckpointError, ChecksumMismatchError
from engine.training import train
from engine.training.checkpointing import MODEL_FILE
from engine.training.trainer import check_resume
from engine.training.warm_start import WarmStartError, check_warm_start, freeze_all_but, frozen_to_eval

DECODER = "sam.mask_decoder"


@pytest.fixture(scope="module")
def meta_style_weights(tmp_path_factory) -> Path:
    """A sam_tiny's `Sam` state dict saved with torch.save, as Meta ships sam_vit_b_01ec64.pth,
    from other weights than a run's own seeded initialisation."""
    torch.manual_seed(123)
    model = M.create_segmenter("sam_tiny")
    path = tmp_path_factory.mktemp("init") / "sam_tiny_pretrained.pth"
    torch.save(model.sam.state_dict(), path)
    return path


class TestFreeze:
    def test_only_the_named_module_trains(self):
        model = M.create_segmenter("sam_tiny")
        trainable = freeze_all_but(model, [DECODER])
        moving = {n for n, p in model.named_parameters() if p.requires_grad}
        assert moving and all(n.startswith(DECODER + ".") for n in moving)
        assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in moving)
        assert any(n.startswith("sam.image_encoder.") for n, p in model.named_parameters() if not p.requires_grad)

    def test_frozen_batch_norm_keeps_its_statistics(self):
        model = M.create_model("classifier", "resnet10t")
        freeze_all_but(model, ["heads"])
        before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
        model.train()
        frozen_to_eval(model, ["heads"])
        out = model(torch.randn(4, 1, 64, 64))
        sum(v.sum() for v in out.values()).backward()
        after = model.state_dict()
        assert before and all(torch.equal(after[k], v) for k, v in before.items())
        assert all(m.training for m in model.heads.modules())
        assert not any(m.training for m in model.backbone.modules())

    def test_an_unknown_module_lists_the_ones_there_are(self):
        with pytest.raises(WarmStartError, match=r"'mask_decoder': not a module.*sam.image_encoder.*sam.mask_decoder"):
            freeze_all_but(M.create_segmenter("sam_tiny"), ["mask_decoder"])


class TestCheckedBeforeRay:
    def test_a_fitting_file_gives_its_digest(self, meta_style_weights):
        digest = check_warm_start("segmenter", "sam_tiny", None, meta_style_weights, None, [DECODER])
        assert digest == sha256_file(meta_style_weights)

    def test_weights_of_another_model_are_refused(self, tmp_path):
        other = tmp_path / "classifier.pth"
        torch.save(M.create_model("classifier", "resnet10t").state_dict(), other)
        with pytest.raises(CheckpointError, match="classifier.pth: does not fit"):
            check_warm_start("segmenter", "sam_tiny", None, other, None, [])

    def test_a_changed_file_is_refused(self, meta_style_weights):
        with pytest.raises(ChecksumMismatchError):
            check_warm_start("segmenter", "sam_tiny", None, meta_style_weights, "0" * 64, [])

    def test_a_missing_file_is_named(self, tmp_path):
        with pytest.raises(WarmStartError, match="nope.pth: no such file .it must be readable at this path by every"):
            check_warm_start("segmenter", "sam_tiny", None, tmp_path / "nope.pth", None, [])


class TestFineTuneOnRayTrain:
    def test_decoder_only_run_keeps_the_encoder_it_was_given(self, ray_session, train_archive, tracking_uri,
                                                             meta_style_weights, tmp_path):
        result = train("segmenter", "sam_tiny", str(train_archive), storage_path=tmp_path / "runs", epochs=1,
                       num_workers=1, cpus_per_worker=2, batch_size=2, tile_size=128, tracking_uri=tracking_uri,
                       task_options={"max_boxes": 4}, init_weights=meta_style_weights, train_only=[DECODER],
                       run_name="decoder-only")
        given = torch.load(meta_style_weights, weights_only=True)
        trained = M.load_model(Path(result.checkpoint_path) / MODEL_FILE).state_dict()
        frozen = [k for k in given if not k.startswith("mask_decoder.")]
        decoder = [k for k, _ in M.create_segmenter("sam_tiny").sam.mask_decoder.named_parameters()]
        # the run started from the file, not from its own seed, and left all but the decoder as given ...
        assert all(torch.equal(trained["sam." + k], given[k]) for k in frozen)
        # ... while the decoder trained
        moved = [k for k in decoder if not torch.equal(trained[f"{DECODER}.{k}"], given[f"mask_decoder.{k}"])]
        assert len(moved) > len(decoder) // 2, f"only {len(moved)} of {len(decoder)} decoder parameters changed"
        assert 0.0 <= result.metrics["val_mask_iou"] <= 1.0

        # resuming that run must train the same modules: refused before Ray, naming both
        with pytest.raises(WarmStartError, match="trained only sam.mask_decoder; this run asks for every module"):
            check_resume(tmp_path / "runs", "decoder-only", "segmenter", "sam_tiny", None, [])
