"""`grainflow catalog`'s listing of an archive with non-square pixels, as a user reads it:
the pixel size column gives both sizes (y x x, as the shape column) where they differ.

(Here beside the report's pixel-size tests, which read the same catalog columns; the
other `grainflow catalog` tests are in tests/test_cli.py.)"""

from __future__ import annotations

from engine.stores.catalog import CatalogRow, write_catalog
from engine.stores.uri import resolve

from .conftest import grainflow


def _row(image_id: str, size_y: float, size_x: float, unit: str = "nanometer") -> CatalogRow:
    return CatalogRow(image_id=image_id, uri=f"images/{image_id}.ome.zarr", modality="SEM", pixel_size_y=size_y,
                      pixel_size_x=size_x, unit=unit, height=512, width=256, dtype="uint8", levels=1, chunk=256,
                      checksum="0")


class TestCatalogListing:
    def test_non_square_pixels_are_listed_y_by_x(self, tmp_path):
        archive = tmp_path / "archive"
        write_catalog(resolve(str(archive)), [_row("fast-scan", 200.0, 100.0), _row("square", 100.0, 100.0),
                                              _row("optical", 1.0, 1.0, "micrometer")])
        cli = grainflow("catalog", str(archive))
        assert cli.returncode == 0, cli.stderr
        rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
                for line in cli.stdout.splitlines() if line.startswith("│")}
        assert rows["fast-scan"][-1] == "200 x 100 nm"
        assert rows["square"][-1] == "100 nm"
        assert rows["optical"][-1] == "1 µm"
        assert rows["fast-scan"][4] == "512 x 256"  # the shape, in the same y x x order
