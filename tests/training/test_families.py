"""The small SAM trains on Ray Train too (one worker holding 2 CPUs, one epoch); train()
argument checks.

The classifier's Ray Train run is the one jobs.finetune makes (test_finetune_job.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import engine.models as M
from engine.training import TrainingError, train
from engine.training.checkpointing import MODEL_FILE


def finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


class TestSegmenterTraining:
    def test_one_epoch(self, ray_session, train_archive, tracking_uri, tmp_path):
        result = train("segmenter", "sam_tiny", str(train_archive), storage_path=tmp_path / "runs", epochs=1,
                       num_workers=1, cpus_per_worker=2, batch_size=2, tile_size=128, tracking_uri=tracking_uri,
                       task_options={"max_boxes": 4}, progress_dir=tmp_path / "progress")
        # the worker holds 2 CPU slots and torch runs as many threads, whatever
        # OMP_NUM_THREADS the environment exports (make test's processes export 1)
        lines = [json.loads(line) for line in (tmp_path / "progress" / "rank0.jsonl").read_text().splitlines()]
        assert [line["event"] for line in lines] == ["start", "checkpoint"]
        assert {line["threads"] for line in lines} == {2}
        m = result.metrics
        assert finite(m) and 0.0 <= m["train_mask_iou"] <= 1.0 and 0.0 <= m["val_mask_iou"] <= 1.0
        assert m["train_loss"] > 0
        # the weights it wrote are trained ones: not those the loop started from
        torch.manual_seed(0)  # the loop seeds with train()'s seed (0) before building the model
        seed_model = M.create_segmenter("sam_tiny")
        start = seed_model.state_dict()
        trained = M.load_model(Path(result.checkpoint_path) / MODEL_FILE).state_dict()
        # a random buffer no step touches is the same: the same seeded start ...
        key = "sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        assert torch.equal(trained[key], start[key])
        # ... and the parameters moved
        params = [k for k, _ in seed_model.named_parameters()]
        moved = [k for k in params if not torch.equal(trained[k], start[k])]
        assert len(moved) > len(params) // 2, f"only {len(moved)} of {len(params)} parameters changed"


class TestTrainArguments:
    def test_detector_is_not_a_ray_train_family(self, train_archive, tmp_path):
        with pytest.raises(Exception, match="trainable families: classifier, fusion, segmenter"):
            train("detector", "yolov8n_tiny", str(train_archive), storage_path=tmp_path, epochs=1)

    def test_unknown_model_lists_the_valid_ones(self, train_archive, tmp_path):
        with pytest.raises(Exception, match="valid fusion models: .*fusion_tiny"):
            train("fusion", "fusion_huge", str(train_archive), storage_path=tmp_path, epochs=1)

    def test_too_few_samples_for_the_workers(self, train_archive, tmp_path):
        with pytest.raises(TrainingError, match="needs at least one|at least 8 each"):
            train("classifier", "resnet10t", str(train_archive), storage_path=tmp_path, epochs=1,
                  num_workers=8, max_samples_per_image=1, val_fraction=0.0)

    def test_promote_needs_a_name(self, train_archive, tmp_path):
        with pytest.raises(TrainingError, match="promote needs register_as"):
            train("fusion", "fusion_tiny", str(train_archive), storage_path=tmp_path, epochs=1, promote=True)
