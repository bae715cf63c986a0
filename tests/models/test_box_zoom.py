"""Box zoom: windows around SAM's box prompts (square or oblong), crops of them, and masks pasted back."""

from __future__ import annotations

import pytest
import torch

from engine.models import box_zoom
from engine.models.box_zoom import BoxZoom


class TestWindows:
    def test_square_centred_on_the_box_with_context(self):
        w = BoxZoom(context=3.0, min_side=4.0).windows(torch.tensor([[10.0, 20.0, 30.0, 30.0]]))
        torch.testing.assert_close(w, torch.tensor([[-10.0, -5.0, 50.0, 55.0]]))  # 60 px square around (20, 25)

    def test_small_boxes_get_min_side(self):
        w = BoxZoom(context=3.0, min_side=16.0).windows(torch.tensor([[5.0, 5.0, 7.0, 6.0]]))
        torch.testing.assert_close(w, torch.tensor([[-2.0, -2.5, 14.0, 13.5]]))

    def test_elongated_boxes_get_oblong_windows_up_to_max_aspect(self):
        zoom = BoxZoom(context=2.0, min_side=4.0, max_aspect=4.0)
        boxes = torch.tensor([[0.0, 0.0, 10.0, 100.0], [0.0, 0.0, 40.0, 100.0]])  # 1:10 and 2:5
        w = zoom.windows(boxes)
        torch.testing.assert_close(w[:, 2:] - w[:, :2], torch.tensor([[50.0, 200.0], [80.0, 200.0]]))
        torch.testing.assert_close((w[:, :2] + w[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2)
        # the box fills the middle half of its window along both axes
        torch.testing.assert_close(box_zoom.to_window(boxes[1:], w[1:], 64), torch.tensor([[16.0, 16.0, 48.0, 48.0]]))

    @pytest.mark.parametrize("kwargs, match", [({"context": 0.5}, "context must be >= 1"), ({"min_side": 0}, "min_side"),
                                               ({"max_aspect": 0.5}, "max_aspect")])
    def test_bad_settings_are_named(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            BoxZoom(**kwargs)


class TestCropAndPaste:
    def test_box_lands_in_the_middle_third_of_its_crop(self):
        box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
        windows = BoxZoom(context=3.0).windows(box)
        torch.testing.assert_close(box_zoom.to_window(box, windows, 96), torch.tensor([[32.0, 32.0, 64.0, 64.0]]))
        points = torch.tensor([[[20.0, 30.0], [10.0, 20.0]]])  # N x P x 2
        torch.testing.assert_close(box_zoom.to_window(points, windows, 96), torch.tensor([[[48.0, 48.0], [32.0, 32.0]]]))

    def test_crop_reads_its_own_image_and_zeros_past_the_edge(self):
        images = torch.zeros(2, 1, 32, 32)
        images[1, 0, 8:16, 8:16] = 1.0
        windows = torch.tensor([[4.0, 4.0, 20.0, 20.0], [4.0, 4.0, 20.0, 20.0], [-16.0, -16.0, 0.0, 0.0]])
        crops = box_zoom.crop(images, torch.tensor([0, 1, 1]), windows, 16)
        assert crops.shape == (3, 1, 16, 16)
        assert crops[0].sum() == 0 and crops[2].sum() == 0
        torch.testing.assert_close(crops[1, 0, 4:12, 4:12], torch.ones(8, 8))  # the square, 1:1 in a 16 px window
        assert crops[1].sum() == 64

    def test_paste_puts_a_crop_back_where_it_came_from(self):
        mask = torch.zeros(1, 40, 50)
        mask[0, 12:20, 22:34] = 1.0
        windows = BoxZoom(context=2.0).windows(torch.tensor([[22.0, 12.0, 34.0, 20.0]]))  # 24 px window
        crop = box_zoom.crop(mask[:, None], torch.tensor([0]), windows, 96)[:, 0]  # 4x upsampled
        back = box_zoom.paste(crop, windows, (40, 50), fill=-1.0)
        assert back.shape == (1, 40, 50)
        torch.testing.assert_close((back > 0.5).float(), mask)
        inside = torch.zeros(40, 50, dtype=torch.bool)
        inside[4:28, 16:40] = True  # the window: x 16..40, y 4..28
        assert torch.all(back[0][~inside] == -1.0)

    def test_an_oblong_window_pastes_back_where_it_came_from(self):
        mask = torch.zeros(1, 60, 40)
        mask[0, 10:50, 18:22] = 1.0  # a 4 x 40 px line
        box = torch.tensor([[18.0, 10.0, 22.0, 50.0]])
        windows = BoxZoom(context=1.25, max_aspect=2.0).windows(box)  # 25 x 50 px
        crop = box_zoom.crop(mask[:, None], torch.tensor([0]), windows, 100)[:, 0]
        square = box_zoom.crop(mask[:, None], torch.tensor([0]), BoxZoom(context=1.25).windows(box), 100)[:, 0]
        assert ((crop[0, 50] > 0.5).sum(), (square[0, 50] > 0.5).sum()) == (16, 8)  # the line twice as wide
        back = box_zoom.paste(crop, windows, (60, 40), fill=-1.0)
        torch.testing.assert_close((back > 0.5).float(), mask)

    def test_window_wholly_off_the_tile_pastes_nothing(self):
        back = box_zoom.paste(torch.ones(1, 8, 8), torch.tensor([[100.0, 100.0, 120.0, 120.0]]), (32, 32), fill=-5.0)
        assert torch.all(back == -5.0)
