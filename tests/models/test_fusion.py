"""Fusion model: detail/context geometry, heads, and that context reaches the output."""

from __future__ import annotations

import pytest
import torch

import engine.models as M
from engine.models.fusion import WeightedFusion, context_origin


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return M.create_fusion("fusion_tiny").eval()


class TestGeometry:
    def test_context_origin(self):
        # Detail [0, 64) at level k: centre 32 -> 8 at level k+2; a 64 px context starts at -24.
        assert context_origin(0, 0, 64, 64) == (-24, -24)
        # Detail rows [128, 192), cols [256, 320): centre (160, 288) -> (40, 72) at k+2.
        assert context_origin(128, 256, 64, 64) == (8, 40)
        assert context_origin(128, 256, 64, 32) == (24, 56)
        assert context_origin(8, 8, 16, 4, offset=1) == (6, 6)

    def test_context_origin_off_the_pixel_grid(self):
        with pytest.raises(ValueError, match="whole pixel"):
            context_origin(1, 0, 64, 64)

    def test_footprint_is_the_centred_quarter(self, model):
        assert model.footprint((64, 64), (64, 64)) == (24.0, 24.0, 40.0, 40.0)
        assert model.footprint((64, 64), (32, 32)) == (8.0, 8.0, 24.0, 24.0)

    def test_context_that_does_not_cover_the_detail(self, model):
        with pytest.raises(ValueError, match="does not cover"):
            model(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 8, 8))


class TestForward:
    @pytest.mark.parametrize("context_size", [64, 32])
    def test_heads(self, model, context_size):
        out = model(torch.rand(2, 1, 64, 64), torch.rand(2, 1, context_size, context_size))
        assert out["material"].shape == (2, 12)
        assert out["grade"].shape == (2, 4)
        assert out["segmentation"].shape == (2, 6, 64, 64)
        assert model.segment_classes[0] == "background" and len(model.segment_classes) == 6

    def test_context_reaches_every_head(self, model):
        detail = torch.rand(1, 1, 64, 64)
        with torch.no_grad():
            a = model(detail, torch.zeros(1, 1, 64, 64))
            b = model(detail, torch.rand(1, 1, 64, 64))
        for key in ("material", "grade", "segmentation"):
            assert not torch.allclose(a[key], b[key]), key

    def test_batch_sizes_must_match(self, model):
        with pytest.raises(ValueError, match="one batch size"):
            model(torch.rand(2, 1, 64, 64), torch.rand(1, 1, 64, 64))

    def test_non_square_and_odd_sizes(self, model):
        out = model(torch.rand(1, 1, 72, 100), torch.rand(1, 1, 40, 52))
        assert out["segmentation"].shape == (1, 6, 72, 100)


class TestWeightedFusion:
    def test_normalised_non_negative_weights(self):
        fuse = WeightedFusion(3)
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(fuse([x, x, x]), x, atol=1e-3, rtol=1e-3)
        with torch.no_grad():
            fuse.weight.copy_(torch.tensor([-1.0, 1.0, 0.0]))  # relu: only the second counts
        torch.testing.assert_close(fuse([x * 0, x, x * 5]), x, atol=1e-3, rtol=1e-3)


class TestClassifier:
    def test_heads_and_names(self):
        clf = M.create_classifier("resnet10t").eval()
        out = clf(torch.rand(3, 1, 64, 80))
        assert set(out) == {"material", "grade"}
        assert out["material"].shape == (3, len(clf.materials)) == (3, 12)
        assert out["grade"].shape == (3, 4) and clf.grades == ("A", "B", "C", "D")
        assert clf.backbone.conv1[0].in_channels == 1
