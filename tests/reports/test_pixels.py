"""The pixel sizes the models saw, as a reader of the report checks them: the header says
whether each image ran at its own level 0 or at a target, the Images table gives each
image's level and model pixel size, and resampled images carry their factor (upsampled
ones are called out: the models saw detail the archive does not hold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.reports import write_report
from engine.reports.pixels import resampling_text
from engine.stores.catalog import CatalogRow, image_uri, relative_image_path, write_catalog
from engine.stores.uri import resolve
from engine.stores.writer import write_image

from .data import Img, Obj, write_run
from .test_report import Page


def _archive(root: Path, level0_nm: dict[str, float]) -> Path:
    """An archive of 64 x 64 px images (two levels: 32 px chunks) at the given level-0
    pixel sizes (nm)."""
    archive = resolve(str(root))
    rows = []
    for image_id, nm in level0_nm.items():
        pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        info = write_image(image_uri(archive, image_id), pixels, pixel_size=nm, chunk=32)
        rows.append(CatalogRow(image_id=image_id, uri=relative_image_path(image_id), modality="SEM",
                               pixel_size_y=info.pixel_size[0], pixel_size_x=info.pixel_size[1], unit=info.unit,
                               height=64, width=64, dtype=info.dtype, levels=info.levels, chunk=info.chunk,
                               checksum=info.checksum))
        assert info.levels == 2
    write_catalog(archive, rows)
    return root


def _page(run: Path) -> tuple[Page, str]:
    text = Path(write_report(str(run))).read_text(encoding="utf-8")
    return Page(text), text


class TestNativePixels:
    def test_header_says_each_image_ran_at_its_own_level_0(self, tmp_path):
        """No --pixel-size and a bundle without one (`make demo`): the job records the
        finest level-0 size as its target, but each image ran at its own level 0."""
        run = write_run(tmp_path / "run", {"fine": Img([Obj("pore", (10, 10, 30, 30))], pixel_nm=128.9),
                                           "coarse": Img(pixel_nm=1089.0)},
                        settings={"target_pixel_size_nm": 128.9, "tolerance": "inf"},
                        result={"target_pixel_size_nm": 128.9})
        page, _ = _page(run)
        assert page.header["model pixel size (nm)"] == "each image's own level 0 (128.9-1089 nm)"
        images = page.table("image-summary").set_index("image_id")
        assert images.loc[["fine", "coarse"], "level"].tolist() == ["0", "0"]
        assert images.loc[["fine", "coarse"], "pixel_size_nm"].tolist() == ["128.9", "1089"]


class TestTargetPixelSize:
    def test_resampled_images_carry_their_factor_and_upsampling_is_called_out(self, tmp_path):
        """Target 25 nm, tolerance 1.3, the levels and sizes the job plans: a 110 nm image
        is upsampled 4.4x from level 0; an 8 nm image's nearest level (1, 16 nm) is 1.56x
        off, past the tolerance, so it is downsampled from that level (the coarsest finer
        than 25 nm); a 20 nm image is read as stored (within 1.3x)."""
        archive = _archive(tmp_path / "archive", {"coarse": 110.0, "fine": 8.0, "near": 20.0})
        run = write_run(tmp_path / "run", {"coarse": Img(pixel_nm=25.0), "fine": Img(level=1, pixel_nm=25.0),
                                           "near": Img(pixel_nm=20.0)},
                        settings={"archive": str(archive), "target_pixel_size_nm": 25.0, "tolerance": 1.3},
                        result={"target_pixel_size_nm": 25.0})
        page, text = _page(run)
        images = page.table("image-summary").set_index("image_id")
        assert images["level"].to_dict() == {"coarse": "0", "fine": "1", "near": "0"}
        assert images["pixel_size_nm"].to_dict() == {"coarse": "25", "fine": "25", "near": "20"}
        assert images["resampled"].to_dict() == {"coarse": "upsampled 4.4x", "fine": "downsampled 1.56x",
                                                 "near": ""}
        assert "1 image(s) were upsampled" in text and "check their results: coarse" in text
        assert page.header["model pixel size (nm)"] == (
            "25 nm (images read at 20-25 nm: a pyramid level within 1.3x of it is read as stored)")

    def test_the_recorded_level_pixel_sizes_need_no_archive(self, tmp_path):
        """A run records each level's (y, x) pixel size: the report compares them with the
        model pixel without opening the archive (here there is none: moved, or on S3 and
        tens of thousands of images), non-square levels included."""
        run = write_run(tmp_path / "run", {"stretched": Img(pixel_nm=100.0, level_nm=(200.0, 100.0)),
                                           "coarse": Img(level=1, pixel_nm=25.0, level_nm=(110.0, 110.0)),
                                           "as_stored": Img(pixel_nm=20.0, level_nm=(20.0, 20.0))},
                        settings={"archive": str(tmp_path / "gone"), "target_pixel_size_nm": 25.0, "tolerance": 1.3})
        page, text = _page(run)
        images = page.table("image-summary").set_index("image_id")
        assert images["resampled"].to_dict() == {"as_stored": "", "coarse": "upsampled 4.4x",
                                                 "stretched": "upsampled 2x in y (to square pixels)"}
        assert "2 image(s) were upsampled" in text

    def test_header_is_the_target_when_every_image_ran_at_it(self, tmp_path):
        run = write_run(tmp_path / "run", {"a": Img(pixel_nm=25.0), "b": Img(pixel_nm=25.0)},
                        settings={"target_pixel_size_nm": 25.0, "tolerance": 1.5})
        page, text = _page(run)
        assert page.header["model pixel size (nm)"] == "25 nm"
        assert "were upsampled" not in text  # no catalog: nothing to compare with, nothing claimed


class TestResamplingText:
    @pytest.mark.parametrize("level_nm, model_nm, text", [
        ((100.0, 100.0), 100.0, ""),
        ((100.5, 100.0), 100.0, ""),  # rational TIFF resolutions round
        ((110.0, 110.0), 25.0, "upsampled 4.4x"),
        ((16.0, 16.0), 25.0, "downsampled 1.56x"),
        # (200, 100) nm pixels read at native pixels: made square at the finer size
        ((200.0, 100.0), 100.0, "upsampled 2x in y (to square pixels)"),
        ((200.0, 100.0), 150.0, "upsampled 1.33x in y, downsampled 1.5x in x (to square pixels)"),
    ])
    def test_factor_per_axis(self, level_nm, model_nm, text):
        assert resampling_text(level_nm, model_nm) == text
