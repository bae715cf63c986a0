"""TileGrid: cores partition the level, are chunk aligned, halos clip at the edges."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from engine.stores.image import open_image
from engine.stores.writer import write_image
from engine.tiling import LevelTransform, TileGrid, TileSpec

CASES = [
    # shape, chunks, tile, halo
    ((1, 1), (1, 1), (1, 1), 0),
    ((7, 5), (2, 3), (2, 3), 1),
    ((64, 64), (16, 16), (32, 32), 8),
    ((100, 37), (16, 8), (32, 24), 5),
    ((513, 1025), (128, 256), (256, 512), 40),
    ((300, 200), (64, 64), (64, 128), 200),  # halo larger than the image
]


def _coverage(grid: TileGrid) -> np.ndarray:
    count = np.zeros(grid.shape, np.int32)
    for spec in grid:
        count[spec.y0 : spec.y1, spec.x0 : spec.x1] += 1
    return count


class TestTileGrid:
    @pytest.mark.parametrize("shape, chunks, tile, halo", CASES)
    def test_cores_partition_the_level(self, shape, chunks, tile, halo):
        grid = TileGrid("img", 0, shape, chunks, tile, halo)
        assert (_coverage(grid) == 1).all()
        assert len(grid) == len(list(grid)) == grid.n_rows * grid.n_cols

    @pytest.mark.parametrize("shape, chunks, tile, halo", CASES)
    def test_cores_are_unions_of_whole_chunks(self, shape, chunks, tile, halo):
        grid = TileGrid("img", 0, shape, chunks, tile, halo)
        for spec in grid:
            assert spec.y0 % chunks[0] == 0 and spec.x0 % chunks[1] == 0
            # ends on a chunk boundary or on the level's edge
            assert spec.y1 % chunks[0] == 0 or spec.y1 == shape[0]
            assert spec.x1 % chunks[1] == 0 or spec.x1 == shape[1]

    @pytest.mark.parametrize("shape, chunks, tile, halo", CASES)
    def test_halo_clipped_at_edges(self, shape, chunks, tile, halo):
        grid = TileGrid("img", 0, shape, chunks, tile, halo)
        for spec in grid:
            y0, y1, x0, x1 = spec.read_region
            assert 0 <= y0 <= spec.y0 and spec.y1 <= y1 <= shape[0]
            assert 0 <= x0 <= spec.x0 and spec.x1 <= x1 <= shape[1]
            top, bottom, left, right = spec.halo
            assert top == min(halo, spec.y0) and bottom == min(halo, shape[0] - spec.y1)
            assert left == min(halo, spec.x0) and right == min(halo, shape[1] - spec.x1)
            assert spec.read_shape == (y1 - y0, x1 - x0)
            core = np.zeros(spec.read_shape)[spec.core_slices]
            assert core.shape == (spec.height, spec.width)

    def test_default_tile_is_one_chunk(self):
        grid = TileGrid("img", 0, (10, 10), (4, 4))
        assert grid.tile == (4, 4) and len(grid) == 9

    @pytest.mark.parametrize("tile", [(3, 4), (4, 6), (0, 4)])
    def test_tile_must_be_a_chunk_multiple(self, tile):
        with pytest.raises(ValueError, match="multiple of the chunk"):
            TileGrid("img", 0, (16, 16), (4, 4), tile)

    def test_indexing_matches_iteration(self):
        grid = TileGrid("img", 0, (100, 37), (16, 8), (32, 24), 5)
        tiles = list(grid)
        assert [grid[i] for i in range(len(grid))] == tiles
        assert grid[-1] == tiles[-1]
        with pytest.raises(IndexError):
            grid[len(grid)]
        assert grid.index_of(99, 36) == (grid.n_rows - 1, grid.n_cols - 1)

    def test_length_of_a_huge_grid_is_computed_not_enumerated(self):
        grid = TileGrid("img", 0, (2**24, 2**25), (512, 512))
        assert len(grid) == 2**31
        assert grid[-1].x1 == 2**25

    def test_keys_round_trip(self):
        grid = TileGrid("img", 2, (50, 70), (8, 8), (16, 16), 4, LevelTransform(factor=(4.0, 4.0)))
        for spec in grid:
            assert grid.index_of_key(spec.key) == grid.index_of(spec.y0, spec.x0)
        assert grid.index_of_key(("img", 2, 1, 0)) is None
        assert grid.index_of_key(("other", 2, 0, 0)) is None

    def test_specs_pickle(self):
        grid = TileGrid("img", 1, (100, 37), (16, 8), (32, 24), 5, LevelTransform(factor=(2.0, 2.0)))
        specs = list(grid)
        assert pickle.loads(pickle.dumps(specs)) == specs
        assert pickle.loads(pickle.dumps(grid)) == grid
        assert isinstance(specs[0], TileSpec) and not hasattr(specs[0], "__dict__")  # slotted: light


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """300 x 400 uint8, (2, 3) nm pixels, 32-pixel chunks, a 2x mean pyramid."""
    uri = tmp_path_factory.mktemp("img") / "a.ome.zarr"
    rng = np.random.default_rng(0)
    write_image(uri, rng.integers(0, 255, (300, 400), dtype=np.uint8), pixel_size=(2.0, 3.0), unit="nm", chunk=32)
    return open_image(uri)


class TestPhysicalCoordinates:
    def test_level_transform_from_ngff(self, image):
        for k in range(len(image.levels)):
            t = LevelTransform.from_image(image, k)
            assert t.factor == (2.0**k, 2.0**k) and t.shift == (0.0, 0.0)
            assert t.level_pixel_size_nm == pytest.approx((2.0 * 2**k, 3.0 * 2**k))

    def test_level_pixel_centre_maps_to_ngff_position(self, image):
        # NGFF: centre of level-k pixel i is at i * scale_k + translation_k (physical).
        for k, level in enumerate(image.multiscale.levels):
            t = LevelTransform.from_image(image, k)
            for i in (0, 3, 17):
                y0, x0 = t.to_level0(i + 0.5, i + 0.5)
                assert (y0, x0) == (i * 2**k + 2**k / 2,) * 2  # level-0 centre i*2^k + (2^k-1)/2, +0.5 for edges
                py, px = t.to_physical(y0, x0)
                ty, tx = level.translation or (0.0, 0.0)
                assert py == pytest.approx(i * level.scale[0] + ty)
                assert px == pytest.approx(i * level.scale[1] + tx)

    def test_tile_core_in_level0_and_nm(self, image):
        grid = TileGrid.from_image(image, "a", 1, tile=64, halo=8)
        spec = grid.tile_at(1, 1)
        assert (spec.y0, spec.x0) == (64, 64) and spec.key == ("a", 1, 128, 128)
        assert spec.core_level0() == (128.0, 128.0, 256.0, 256.0)
        x0, y0, x1, y1 = spec.core_physical()
        assert (x0, y0) == pytest.approx((127.5 * 3.0, 127.5 * 2.0))
        assert (x1 - x0, y1 - y0) == pytest.approx((128 * 3.0, 128 * 2.0))

    def test_boxes_from_read_array_to_level0(self, image):
        spec = TileGrid.from_image(image, "a", 2, tile=32, halo=4).tile_at(1, 1)
        assert spec.halo == (4, 4, 4, 4)
        # A box on the core's first pixel (read-array pixels 4..5).
        b = spec.boxes_to_level0(np.array([[4, 4, 5, 5]]))
        assert b.tolist() == [[128.0, 128.0, 132.0, 132.0]]

    def test_foreign_pyramid_without_translation(self):
        class _Level:
            def __init__(self, scale, translation=None):
                self.scale, self.translation = scale, translation

        class _MS:
            levels = (_Level((1.0, 1.0)), _Level((3.0, 3.0)))

            def axis_index(self, name):
                return {"y": 0, "x": 1}[name]

        class _Image:
            multiscale, unit = _MS(), "micrometer"

        t = LevelTransform.from_image(_Image(), 1)
        # level-1 pixel 0 is centred on level-0 pixel 0: its edges are at -1 .. 2.
        assert t.factor == (3.0, 3.0) and t.to_level0(0, 0) == (-1.0, -1.0)
        assert t.pixel_size_nm == (1000.0, 1000.0)
