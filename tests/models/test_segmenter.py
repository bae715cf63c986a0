"""SAM segmenter: one mask per box per tile; Meta-style weights loaded weights-only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engine.models as M
from engine.models.segmenter import PIXEL_MEAN, PIXEL_STD, Segmentation, build_sam_small


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return M.create_segmenter("sam_tiny")


@pytest.fixture(scope="module", params=["box zoom", "whole tile"])
def any_sam(request):
    """sam_tiny as registered (box zoom) and the same model seeing whole tiles (the path
    Meta's configs take)."""
    torch.manual_seed(0)
    if request.param == "box zoom":
        return M.create_segmenter("sam_tiny")
    return build_sam_small(zoom_context=None)


class TestSegment:
    def test_one_mask_per_box_with_the_tile_shape(self, any_sam):
        tiles = np.random.default_rng(0).random((3, 100, 130), dtype=np.float32)
        boxes = [np.array([[10, 10, 50, 60], [0, 0, 129, 99]], np.float32), np.zeros((0, 4), np.float32),
                 np.array([[5, 5, 20, 20]], np.float32)]
        out = any_sam.segment(tiles, boxes)
        assert len(out) == 3
        for seg, box in zip(out, boxes):
            assert isinstance(seg, Segmentation)
            assert seg.masks.shape == (len(box), 100, 130) and seg.masks.dtype == bool
            assert seg.iou.shape == (len(box),) and seg.iou.dtype == np.float32

    def test_integer_tiles(self, any_sam):
        tiles = np.random.default_rng(1).integers(0, 255, (2, 256, 256), dtype=np.uint8)
        out = any_sam.segment(tiles, [np.array([[0, 0, 100, 100]]), np.array([[50, 50, 200, 120]])])
        assert [s.masks.shape for s in out] == [(1, 256, 256), (1, 256, 256)]

    def test_batched_equals_one_by_one(self, any_sam):
        # 100 x 130 tiles go through the resize path (longest side to 256).
        tiles = np.random.default_rng(2).random((2, 100, 130), dtype=np.float32)
        boxes = [np.array([[10, 10, 90, 90], [60, 50, 120, 99]]), np.array([[0, 0, 129, 99]])]
        both = any_sam.segment(tiles, boxes)
        for i in range(2):
            (single,) = any_sam.segment(tiles[i : i + 1], boxes[i : i + 1])
            np.testing.assert_allclose(single.iou, both[i].iou, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(single.masks, both[i].masks)
            # box j's mask is the one that box alone gets: masks are in the order of the boxes
            for j, box in enumerate(boxes[i]):
                (alone,) = any_sam.segment(tiles[i : i + 1], [box[None]])
                np.testing.assert_array_equal(alone.masks[0], both[i].masks[j])
                np.testing.assert_allclose(alone.iou[0], both[i].iou[j], rtol=1e-4, atol=1e-5)

    def test_zoomed_masks_stay_in_their_window(self):
        torch.manual_seed(0)
        sam = M.create_segmenter("sam_tiny")
        assert sam.zoom is not None
        tiles = np.random.default_rng(3).random((1, 256, 256), dtype=np.float32)
        # 10 x 6 px: a 20 x 16 px window (2x each side, min 16 px), x 105 +- 10, y 123 +- 8;
        # 20 x 20 px far away: a 40 x 40 px window, x 40 +- 20, y 200 +- 20
        boxes = np.array([[100, 120, 110, 126], [30, 190, 50, 210]], np.float32)
        sam.sam.mask_threshold = -1e3  # every pixel the model paints counts
        try:
            (seg,) = sam.segment(tiles, [boxes])
        finally:
            sam.sam.mask_threshold = 0.0
        extents = []
        for mask in seg.masks:
            ys, xs = np.nonzero(mask)
            extents.append((xs.min(), xs.max() + 1, ys.min(), ys.max() + 1))
        assert extents == [(95, 115, 115, 131), (20, 60, 180, 220)]

    def test_box_count_and_shape_errors(self, any_sam):
        tiles = np.zeros((2, 64, 64), np.float32)
        with pytest.raises(ValueError, match="one N x 4 array per image"):
            any_sam.segment(tiles, [np.zeros((1, 4))])
        with pytest.raises(ValueError, match=r"boxes\[1\]"):
            any_sam.segment(tiles, [np.zeros((1, 4)), np.zeros((4,))])

    def test_grey_is_replicated_and_normalised(self, any_sam):
        x = any_sam.preprocess(torch.full((1, 1, 128, 256), 0.5))
        assert x.shape == (1, 3, 256, 256)
        for c in range(3):
            expected = (127.5 - PIXEL_MEAN[c]) / PIXEL_STD[c]
            torch.testing.assert_close(x[0, c, :128], torch.full((128, 256), expected))
        assert torch.all(x[0, :, 128:] == 0), "padding below the resized tile"

    def test_forward_is_differentiable_with_multimask(self, any_sam):
        out = any_sam(torch.rand(1, 1, 256, 256), [torch.tensor([[10.0, 10.0, 80.0, 80.0]])], multimask_output=True)
        assert out[0].low_res_logits.shape == (1, 3, 64, 64) and out[0].iou.shape == (1, 3)
        assert out[0].low_res_logits.requires_grad


class TestMetaWeights:
    def test_meta_style_pth_loads_weights_only(self, sam, tmp_path):
        # Meta's files are torch.save(sam.state_dict()): keys of Sam, no wrapper prefix.
        path = tmp_path / "sam_tiny.pth"
        torch.save(sam.sam.state_dict(), path)
        loaded = M.create_segmenter("sam_tiny", checkpoint=path, expected_sha256=M.sha256_file(path))
        for key, value in sam.sam.state_dict().items():
            assert torch.equal(loaded.sam.state_dict()[key], value), key

    def test_same_keys_as_safetensors_and_our_own_save(self, sam, tmp_path):
        save_file({k: v.contiguous() for k, v in sam.sam.state_dict().items()}, str(tmp_path / "meta.safetensors"))
        M.save_checkpoint(sam, tmp_path / "ours.safetensors")
        for name in ("meta.safetensors", "ours.safetensors"):
            loaded = M.create_segmenter("sam_tiny", checkpoint=tmp_path / name)
            assert torch.equal(loaded.sam.mask_decoder.iou_token.weight, sam.sam.mask_decoder.iou_token.weight)

    def test_wrong_architecture_names_the_file(self, sam, tmp_path):
        path = tmp_path / "other.pth"
        torch.save(M.create_segmenter("sam_tiny", embed_dim=48).sam.state_dict(), path)
        with pytest.raises(M.CheckpointError, match="other.pth"):
            M.create_segmenter("sam_tiny", checkpoint=path)

    @pytest.mark.slow
    def test_vit_b_loads_a_meta_style_file(self, tmp_path):
        model = M.create_segmenter("sam_vit_b")
        path = tmp_path / "sam_vit_b.pth"
        torch.save(model.sam.state_dict(), path)
        loaded = M.create_segmenter("sam_vit_b", checkpoint=path, expected_sha256=M.sha256_file(path))
        assert torch.equal(loaded.sam.image_encoder.pos_embed, model.sam.image_encoder.pos_embed)


def test_a_checkpoint_saved_with_other_box_zoom_is_refused_by_create_segmenter(tmp_path):
    """Box zoom has no weights: loading a file trained without it into a model that zooms
    would run another inference than the one it learnt, silently."""
    import engine.models as M

    path = tmp_path / "sam_nozoom.safetensors"
    M.save_checkpoint(M.create_segmenter("sam_tiny", zoom_context=None), path)
    with pytest.raises(M.CheckpointError, match="zoom_context: file None"):
        M.create_segmenter("sam_tiny", checkpoint=path)
    assert M.create_segmenter("sam_tiny", checkpoint=path, zoom_context=None).zoom is None  # matching: loads
    assert M.load_model(path).zoom is None
