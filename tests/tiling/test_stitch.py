"""Stitching: ownership, merging across borders, NMS, masks cropped to cores."""

from __future__ import annotations

import numpy as np
import pytest

from engine.tiling import (
    LevelTransform, TileBoxes, TileGrid, crop_to_core, nms, owned, stitch_boxes, tile_boxes_to_level0, tile_core_level0,
)


def _detect(grid: TileGrid, objects: list[tuple[float, float, float, float, int]]) -> list[TileBoxes]:
    """A perfect detector: each tile reports every object (level-0 xyxy) clipped to its read region."""
    out = []
    for spec in grid:
        ry0, ry1, rx0, rx1 = spec.read_region
        (ly0, lx0), (ly1, lx1) = spec.transform.to_level0(ry0, rx0), spec.transform.to_level0(ry1, rx1)
        boxes, classes = [], []
        for x0, y0, x1, y1, cls in objects:
            cx0, cy0, cx1, cy1 = max(x0, lx0), max(y0, ly0), min(x1, lx1), min(y1, ly1)
            if cx1 > cx0 and cy1 > cy0:
                boxes.append((cx0, cy0, cx1, cy1))
                classes.append(cls)
        out.append(TileBoxes(spec.core_level0(), np.array(boxes).reshape(-1, 4), np.linspace(0.9, 0.5, len(boxes)),
                             np.array(classes, dtype=np.int64), spec.read_level0()))
    return out


def _as_set(result) -> set[tuple]:
    return {(*map(float, b), int(c)) for b, c in zip(result.boxes, result.classes)}


class TestStitchBoxes:
    @pytest.mark.parametrize("halo", [0, 4, 40])
    def test_box_split_across_a_border_is_one_object(self, halo):
        grid = TileGrid("a", 0, (128, 128), (32, 32), (64, 64), halo)
        defect = (50.0, 10.0, 80.0, 20.0, 1)  # crosses the vertical border x = 64
        result = stitch_boxes(_detect(grid, [defect]))
        assert _as_set(result) == {defect}

    @pytest.mark.parametrize("halo", [0, 8])
    def test_box_cut_at_a_corner_into_four_is_one_object(self, halo):
        grid = TileGrid("a", 0, (128, 128), (32, 32), (64, 64), halo)
        defect = (40.0, 50.0, 90.0, 70.0, 2)  # crosses x = 64 and y = 64
        result = stitch_boxes(_detect(grid, [defect]))
        assert _as_set(result) == {defect}
        assert result.parts.tolist() == [4 if halo == 0 else result.parts[0]]

    def test_distinct_nearby_objects_stay_apart(self):
        grid = TileGrid("a", 0, (128, 128), (32, 32), (64, 64), 8)
        left = (50.0, 10.0, 61.0, 30.0, 1)   # ends 3 px before the border x = 64
        right = (67.0, 10.0, 80.0, 30.0, 1)  # starts 3 px after it
        result = stitch_boxes(_detect(grid, [left, right]))
        assert _as_set(result) == {left, right}

    def test_objects_seen_whole_in_the_halo_are_not_pieces(self):
        """Two separate defects, one reaching past the border into its neighbour's halo
        and one starting before it: each tile saw both whole, so neither is cut."""
        grid = TileGrid("a", 0, (256, 256), (64, 64), (128, 128), 32)
        left = (100.0, 40.0, 134.0, 100.0, 1)   # centre x 117: tile x [0, 128)
        right = (110.0, 40.0, 160.0, 90.0, 1)   # centre x 135: tile x [128, 256)
        assert _as_set(stitch_boxes(_detect(grid, [left, right]))) == {left, right}

    def test_slanted_defect_cut_by_a_border_is_one_object(self):
        """A long diagonal scratch: its two pieces overlap along the border only in the
        strip both tiles saw (less than half the shorter piece's extent)."""
        grid = TileGrid("a", 0, (256, 256), (64, 64), (128, 128), 16)
        tiles = [TileBoxes(spec.core_level0(), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), spec.read_level0())
                 for spec in grid]
        scratch = {0: (0.0, 49.0, 144.0, 70.0), 1: (112.0, 60.0, 256.0, 82.0)}  # as tiles x<128, x>=128 see it
        for i, box in scratch.items():
            t = tiles[i]
            tiles[i] = TileBoxes(t.core, np.array([box]), np.array([0.9]), np.array([4]), t.read)
        result = stitch_boxes(tiles)
        assert _as_set(result) == {(0.0, 49.0, 256.0, 82.0, 4)} and result.parts.tolist() == [2]

    def test_parallel_cut_scratches_stay_two_objects(self):
        """Two parallel slanted scratches cut by one border: each piece pairs with its own
        continuation, not with the other scratch's piece it also overlaps."""
        grid = TileGrid("a", 0, (256, 256), (64, 64), (128, 128), 16)
        pieces = {0: [(0.0, 49.0, 144.0, 70.0), (0.0, 79.0, 144.0, 100.0)],
                  1: [(112.0, 60.0, 256.0, 82.0), (112.0, 90.0, 256.0, 112.0)]}
        tiles = []
        for i, spec in enumerate(grid):
            b = np.array(pieces.get(i, [])).reshape(-1, 4)
            tiles.append(TileBoxes(spec.core_level0(), b, np.full(len(b), 0.9), np.full(len(b), 4), spec.read_level0()))
        assert _as_set(stitch_boxes(tiles)) == {(0.0, 49.0, 256.0, 82.0, 4), (0.0, 79.0, 256.0, 112.0, 4)}

    @staticmethod
    def _two_tiles(pieces: dict[int, list[tuple[float, float, float, float]]]) -> list[TileBoxes]:
        """Tiles x [0, 128) and [128, 256) of one row (halo 16) reporting class-4 `pieces`."""
        grid = TileGrid("a", 0, (128, 256), (64, 64), (128, 128), 16)
        tiles = []
        for i, spec in enumerate(grid):
            b = np.array(pieces.get(i, [])).reshape(-1, 4)
            tiles.append(TileBoxes(spec.core_level0(), b, np.linspace(0.9, 0.8, len(b)), np.full(len(b), 4),
                                   spec.read_level0()))
        return tiles

    def test_a_u_whose_bottom_one_tile_saw_whole_is_one_object(self):
        """The left tile sees the U's bottom joining both arms (one piece); the right
        tile sees two arms: all three are one defect."""
        tiles = self._two_tiles({0: [(60.0, 20.0, 144.0, 100.0)],
                                 1: [(112.0, 20.0, 200.0, 40.0), (112.0, 80.0, 200.0, 100.0)]})
        result = stitch_boxes(tiles)
        assert _as_set(result) == {(60.0, 20.0, 200.0, 100.0, 4)} and result.parts.tolist() == [3]

    def test_a_small_cut_defect_beside_a_long_one_is_not_swapped_with_it(self):
        """A long crack and a small pore of one class both cut by the border, the pore
        beside the crack along it: each piece pairs with its own continuation."""
        tiles = self._two_tiles({0: [(40.0, 10.0, 144.0, 110.0), (100.0, 40.0, 144.0, 50.0)],
                                 1: [(112.0, 40.0, 150.0, 50.0), (112.0, 10.0, 220.0, 110.0)]})
        assert _as_set(stitch_boxes(tiles)) == {(40.0, 10.0, 220.0, 110.0, 4), (100.0, 40.0, 150.0, 50.0, 4)}

    def test_a_cut_box_ending_short_of_the_read_edge_is_still_a_piece(self):
        """A detector's box of a cut object ends a few pixels short of where its tile
        read (here 6 px, of a 16 px halo)."""
        tiles = self._two_tiles({0: [(60.0, 40.0, 138.0, 60.0)], 1: [(118.0, 40.0, 200.0, 60.0)]})
        assert _as_set(stitch_boxes(tiles)) == {(60.0, 40.0, 200.0, 60.0, 4)}

    def test_objects_cut_at_different_places_along_a_border_stay_apart(self):
        grid = TileGrid("a", 0, (128, 128), (32, 32), (64, 64), 0)
        upper = (60.0, 5.0, 70.0, 15.0, 1)
        lower = (60.0, 30.0, 70.0, 40.0, 1)
        assert _as_set(stitch_boxes(_detect(grid, [upper, lower]))) == {upper, lower}

    def test_merging_is_class_aware(self):
        grid = TileGrid("a", 0, (128, 128), (32, 32), (64, 64), 0)
        # Two classes overlapping across the border: left part one class, right part another.
        tiles = _detect(grid, [(50.0, 10.0, 64.0, 20.0, 1), (64.0, 10.0, 80.0, 20.0, 2)])
        assert len(stitch_boxes(tiles)) == 2

    def test_halo_duplicate_kept_by_the_owning_core_only(self):
        grid = TileGrid("a", 0, (128, 128), (32, 32), (64, 64), 16)
        inside = (40.0, 40.0, 58.0, 58.0, 0)  # in tile (0, 0)'s core, seen in 3 halos
        tiles = _detect(grid, [inside])
        assert sum(len(t.boxes) for t in tiles) == 4
        result = stitch_boxes(tiles)
        assert _as_set(result) == {inside} and result.parts.tolist() == [1]

    def test_many_objects_across_a_pyramid_level(self):
        rng = np.random.default_rng(3)
        grid = TileGrid("a", 2, (256, 256), (16, 16), (32, 32), 6, LevelTransform(factor=(4.0, 4.0)))
        # level-0 extent is 1024 x 1024; well separated objects on a lattice, some on borders
        objects = []
        for gy in range(8):
            for gx in range(8):
                x0, y0 = gx * 128 + rng.uniform(0, 60), gy * 128 + rng.uniform(0, 60)
                objects.append((float(round(x0)), float(round(y0)), float(round(x0)) + 50, float(round(y0)) + 40, gx % 3))
        result = stitch_boxes(_detect(grid, objects))
        assert _as_set(result) == set(objects)


class TestPlacement:
    def test_row_placement_matches_the_spec(self):
        """A datasource row's origin, scale and halo place boxes and cores like its TileSpec."""
        grid = TileGrid("a", 2, (50, 70), (8, 8), (16, 16), 5, LevelTransform(factor=(4.0, 4.0)))
        boxes = np.array([[0.0, 1.0, 3.5, 7.0], [10.0, 2.0, 12.0, 20.0]])
        for spec in grid:
            origin, scale = spec.read_origin0, spec.transform.factor
            assert tile_core_level0(origin, scale, spec.halo, spec.read_shape) == spec.core_level0()
            np.testing.assert_array_equal(tile_boxes_to_level0(boxes, origin, scale), spec.boxes_to_level0(boxes))


class TestOwnedAndNms:
    def test_owned_is_half_open(self):
        boxes = np.array([[0, 0, 2, 2], [62, 62, 65, 65], [63, 63, 65, 65]], float)
        assert owned(boxes, (0, 0, 64, 64)).tolist() == [True, True, False]

    def test_nms_class_aware(self):
        boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], float)
        keep = nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 0, 1, 0]), 0.5)
        assert keep.tolist() == [0, 2, 3]

    def test_nms_matches_brute_force(self):
        rng = np.random.default_rng(0)
        xy = rng.uniform(0, 500, (300, 2))
        wh = rng.uniform(5, 60, (300, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.uniform(size=300)
        classes = rng.integers(0, 3, 300)
        expected = []
        for c in range(3):
            idx = [i for i in np.argsort(-scores) if classes[i] == c]
            alive = []
            for i in idx:
                if all(_iou(boxes[i], boxes[j]) <= 0.4 for j in alive):
                    alive.append(i)
            expected += alive
        assert sorted(nms(boxes, scores, classes, 0.4).tolist()) == sorted(expected)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class TestCropToCore:
    def test_each_output_chunk_has_one_writer(self):
        grid = TileGrid("a", 0, (100, 70), (16, 16), (32, 32), 7)
        writes = np.zeros(grid.shape, np.int32)
        for spec in grid:
            mask = np.ones(spec.read_shape, np.uint32)
            core = crop_to_core(mask, spec.halo)
            assert core.shape == (spec.height, spec.width)
            writes[spec.y0 : spec.y1, spec.x0 : spec.x1] += core
        assert (writes == 1).all()
        # every chunk lies inside exactly one core
        for cy in range(0, 100, 16):
            for cx in range(0, 70, 16):
                owners = [s for s in grid if s.y0 <= cy < s.y1 and s.x0 <= cx < s.x1]
                assert len(owners) == 1 and owners[0].y1 >= min(cy + 16, 100) and owners[0].x1 >= min(cx + 16, 70)

    def test_crop_keeps_leading_axes_and_refuses_oversized_halo(self):
        a = np.arange(2 * 10 * 12).reshape(2, 10, 12)
        assert crop_to_core(a, (1, 2, 3, 4)).shape == (2, 7, 5)
        with pytest.raises(ValueError, match="larger than the tile"):
            crop_to_core(a, (6, 6, 0, 0))


def test_pieces_meet_on_a_border_that_neighbours_compute_in_different_floats():
    """Resampled tiles (a non-integer scale) compute a shared border as origin + n * scale
    on each side, which can differ in the last bit: still one line, so one object."""
    from engine.tiling.stitch import TileBoxes, stitch_boxes

    right_of_a, left_of_b = 256.04, 256.03999999999996  # 0.37 px steps: 692 * 0.37 two ways
    assert right_of_a != left_of_b
    a = TileBoxes((0.0, 0.0, right_of_a, 256.04), np.array([[right_of_a - 10, 100, right_of_a, 120]]),
                  np.array([0.9]), np.array([0]))
    b = TileBoxes((left_of_b, 0.0, 512.08, 256.04), np.array([[left_of_b, 100, left_of_b + 10, 120]]),
                  np.array([0.8]), np.array([0]))
    merged = stitch_boxes([a, b])
    assert len(merged) == 1 and merged.parts.tolist() == [2]
