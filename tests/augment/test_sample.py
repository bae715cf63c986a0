import numpy as np
import pytest

from engine.augment import Sample, SampleError, boxes_from_mask, to_unit_float


class TestSample:
    def test_defaults(self):
        s = Sample(np.zeros((4, 5), np.float32), "SEM", 2.0)
        assert s.scan_lines is True and s.shape == (4, 5) and s.log == ()
        assert Sample(np.zeros((4, 5), np.float32), "TEM", 2.0).scan_lines is False

    @pytest.mark.parametrize("kw, match", [
        (dict(image=np.zeros((4, 5), np.float64)), "float32"),
        (dict(image=np.full((4, 5), 1.5, np.float32)), r"\[0, 1\]"),
        (dict(image=np.full((4, 5), np.nan, np.float32)), "finite"),
        (dict(modality="XRD"), "SEM, TEM, optical"),
        (dict(pixel_size_nm=0.0), "pixel_size_nm"),
        (dict(mask=np.zeros((4, 4), np.int32)), "mask"),
        (dict(mask=np.zeros((4, 5), np.float32)), "mask"),
        (dict(boxes=np.zeros((2, 3), np.float32)), "boxes"),
        (dict(boxes=np.zeros((2, 4)), classes=np.zeros(3, np.int64)), "classes"),
        (dict(classes=np.zeros(3, np.int64)), "without boxes"),
        (dict(mask_kind="panoptic"), "mask_kind"),
    ])
    def test_bad_input_names_the_field(self, kw, match):
        args = dict(image=np.zeros((4, 5), np.float32), modality="SEM", pixel_size_nm=1.0) | kw
        with pytest.raises(SampleError, match=match):
            Sample(**args)

    def test_empty_boxes(self):
        s = Sample(np.zeros((4, 5), np.float32), "SEM", 1.0, boxes=np.zeros((0,)))
        assert s.boxes.shape == (0, 4) and s.boxes.dtype == np.float32


class TestToUnitFloat:
    def test_integer_full_scale(self):
        assert to_unit_float(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
        out = to_unit_float(np.array([[0, 65535]], np.uint16))
        assert out.dtype == np.float32 and out.tolist() == [[0.0, 1.0]]

    def test_float_clipped(self):
        assert to_unit_float(np.array([[-1.0, np.nan, 2.0]])).tolist() == [[0.0, 0.0, 1.0]]


class TestBoxesFromMask:
    def test_pixel_edge_boxes(self):
        m = np.zeros((10, 10), np.int32)
        m[2:5, 3:7] = 4
        boxes, present = boxes_from_mask(m, np.array([4, 2]))
        assert boxes[0].tolist() == [3, 2, 7, 5] and present.tolist() == [True, False]
