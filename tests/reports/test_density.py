"""Density maps count what the tables count: stitched objects, each once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from engine.reports import figures, write_report
from engine.reports.run import load_run

from .data import Img, Obj, write_run
from .test_report import Page

# one defect over the corner where 4 tiles meet (each tile and its halo saw a piece of it),
# two small ones inside tile (0, 1), one whose centroid lies in the failed tile (1, 1)
IMAGES = {
    "cross": Img([Obj("pore", (120, 120, 136, 136)), Obj("crack", (140, 10, 150, 20)),
                  Obj("crack", (200, 30, 210, 40))]),
    "failed": Img([Obj("pore", (150, 150, 170, 170)), Obj("pore", (10, 10, 20, 20))], failed=((1, 1),)),
}


class TestDensityMaps:
    def test_each_map_totals_the_tables_count(self, tmp_path, monkeypatch):
        out = write_run(tmp_path / "run", IMAGES)
        drawn = {}
        original = figures.density_maps

        def capture(counts, *args):
            drawn.update(counts)
            return original(counts, *args)

        monkeypatch.setattr(figures, "density_maps", capture)
        text = Path(write_report(str(out))).read_text(encoding="utf-8")
        summary = pd.read_parquet(out / "summary.parquet").set_index("image_id")
        assert set(drawn) == set(IMAGES)
        for image_id, tiles in drawn.items():
            # the map's total is the n_defects of the image table, not the tiles' detections (4 + 1 + 1 here)
            assert tiles["n_objects"].sum() == summary.at[image_id, "n_defects"]
            done = tiles["status"] == "done"
            assert (tiles.loc[done, "object_density_per_mm2"]
                    == tiles.loc[done, "n_objects"] / tiles.loc[done, "core_area_mm2"]).all()
        cross = drawn["cross"].set_index(["y", "x"])["n_objects"].to_dict()
        # the corner defect's centroid (128, 128) is in the core [128, 256)² only
        assert cross == {(0, 0): 0, (0, 128): 2, (128, 0): 0, (128, 128): 1}
        page = Page(text)
        caption = next(c for c in page.captions if "Stitched defects" in c)
        assert "counted once, in the tile whose core holds its centroid" in caption
        assert "failed: 1" in caption  # the defect in the failed tile, counted in the nearest done one

    def test_counts_by_centroid(self, tmp_path):
        from engine.reports.density import image_tile_counts

        out = write_run(tmp_path / "run", IMAGES)
        run = load_run(str(out))
        counts = image_tile_counts(run, "failed")
        assert counts.total == 2 and counts.moved == 1 and counts.unplaced == 0
        by_tile = counts.tiles.set_index(["y", "x"])["n_objects"].to_dict()
        assert by_tile[(0, 0)] == 1 and by_tile[(128, 128)] == 0
        assert sum(by_tile.values()) == 2
