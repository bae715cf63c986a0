"""An Ultralytics detection dataset whose images are tiles read from an OME-Zarr archive.

`ArchiveTileDataset` subclasses Ultralytics' `YOLODataset` and replaces only where
images and labels come from: `get_img_files` and `get_labels` return the tile plan
(`engine.training.detector.tiles`), and `load_image` reads a tile's pixels from the
archive when a batch needs them (an image whose pixels are not square is resampled
to the tile's square pixels as the batch job resamples it, its `defects` labels by
nearest neighbour: `TrainingTile.resampled`). Everything downstream is Ultralytics'
own: mosaic, affine and flip augmentation, letterboxing, rectangular validation
batches, `Format` and `collate_fn`. So no image or label file is written: there is
no second copy of the archive on disk, not even of the tiles a run uses.

This module imports Ultralytics at import time (it subclasses its classes); import it
only after `engine.runtime.configure_offline()`, as `train_detector` does.
"""

from __future__ import annotations

import copy
import random
from typing import Sequence

import numpy as np
from ultralytics.cfg import get_cfg
from ultralytics.data.dataset import YOLODataset

from engine.augment.symmetry import material_symmetry
from engine.training.detector.pixels import ImageCache, to_uint8
from engine.training.detector.tiles import TrainingTile, yolo_format

# engine.synth writes each defect's mask into this label image beside the pixels.
DEFECT_LABELS = "defects"


class ArchiveTileDataset(YOLODataset):
    """Tiles of an archive as an Ultralytics detection dataset (single channel).

    Each item is Ultralytics' sample dict: "img" a 1 x H x W uint8 tensor, "cls" N x 1
    float32, "bboxes" N x 4 float32 normalised xywh, "batch_idx" N, "im_file" the tile's
    key (not a path), "ori_shape", "resized_shape", "ratio_pad"; `collate_fn` batches them.

    tiles: the plan; imgsz: training side in pixels (tiles larger than it are not
    expected: the plan uses tiles of imgsz); augment: Ultralytics' training transforms
    (mosaic etc.) from `hyp`, else letterbox only; rect: rectangular val batches.
    cache: False, or "ram" to keep decoded tiles in memory; "disk" is refused: it would
    write .npy copies of the tiles, the second dataset this class exists to avoid.
    """

    def __init__(self, tiles: Sequence[TrainingTile], *, class_names: Sequence[str], imgsz: int, augment: bool,
                 hyp=None, rect: bool = False, batch_size: int = 16, stride: int = 32, pad: float = 0.0,
                 cache: bool | str | None = False, prefix: str = ""):
        if isinstance(cache, str) and cache.lower() == "disk":
            raise ValueError("cache='disk' would write tiles to disk; use cache=False or 'ram'")
        if not tiles:
            raise ValueError("no tiles to train or validate on")
        self._tiles = {t.key: t for t in tiles}
        if len(self._tiles) != len(tiles):
            raise ValueError("tile plan holds the same tile twice")
        self._order = list(tiles)
        self._reader = ImageCache()
        self._exact: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # mask-fitted labels by tile key
        data = {"names": dict(enumerate(class_names)), "nc": len(class_names), "channels": 1}
        hyp = hyp if hyp is not None else get_cfg()
        # Vertical mirrors are drawn here, tile by tile, where the tile's material allows
        # one (engine.augment.symmetry: an AM alloy's build direction stays up); Ultralytics'
        # own flip would mirror every tile, and every mosaic of them (`build_transforms`).
        self._flipud = float(getattr(hyp, "flipud", 0.0) or 0.0) if augment else 0.0
        super().__init__(
            img_path="<archive tiles>", imgsz=imgsz, cache=cache or False, augment=augment,
            hyp=hyp, prefix=prefix, rect=rect, batch_size=batch_size,
            stride=stride, pad=pad, single_cls=False, classes=None, fraction=1.0, data=data, task="detect",
        )

    # --- where images and labels come from -------------------------------------------

    def get_img_files(self, img_path) -> list[str]:
        """Tile keys in plan order (Ultralytics' `im_files`; nothing on disk)."""
        return [t.key for t in self._order]

    def get_labels(self) -> list[dict]:
        """One Ultralytics label dict per tile, from the plan (no label files)."""
        labels = []
        for tile in self._order:
            cls, xywh = yolo_format(*tile.clipped_labels(), tile.shape)
            labels.append({
                "im_file": tile.key, "shape": tile.shape, "cls": cls, "bboxes": xywh,
                "segments": [], "keypoints": None, "normalized": True, "bbox_format": "xywh",
            })
        return labels

    def tile(self, index: int) -> TrainingTile:
        """The plan entry behind item `index` (rect mode reorders items by aspect ratio)."""
        return self._tiles[self.im_files[index]]

    def read_tile(self, index: int) -> np.ndarray:
        """Item `index`'s pixels: (H, W) uint8, read from the archive now (resampled to
        the tile's square pixels where the image's are not square)."""
        t = self.tile(index)
        if t.resampled:
            return to_uint8(self._reader.read_resampled(t.image, t.level, t.scale, (t.y0, t.x0), t.shape))
        return to_uint8(self._reader.read(t.image, t.level, t.y0, t.y1, t.x0, t.x1))

    def read_tile_labels(self, tile: TrainingTile) -> np.ndarray | None:
        """The tile's (H, W) region of the `defects` label image, on the tile's pixels
        (nearest neighbour on its square grid where resampled); None when the image has
        no such label image."""
        if tile.resampled:
            return self._reader.read_labels_nearest(tile.image, DEFECT_LABELS, tile.level, tile.scale,
                                                    (tile.y0, tile.x0), tile.shape)
        return self._reader.read_labels(tile.image, DEFECT_LABELS, tile.level, tile.y0, tile.y1, tile.x0, tile.x1)

    def update_labels_info(self, label: dict) -> dict:
        """Exact boxes for defects a tile edge cuts, then Ultralytics' own label packing.

        `get_labels` gave clipped boxes (metadata only: the plan holds no pixels). When an
        edge cuts a defect and the image has its `defects` label image, this tile's boxes
        are fitted to the mask pixels inside it, read the first time the tile is used
        (a few small arrays per tile are then kept).
        """
        key = label["im_file"]
        tile = self._tiles[key]
        if tile.is_cut:
            if key not in self._exact:
                mask = self.read_tile_labels(tile)
                self._exact[key] = None if mask is None else yolo_format(*tile.labels_from_mask(mask), tile.shape)
            if self._exact[key] is not None:
                cls, xywh = self._exact[key]
                label["cls"], label["bboxes"] = cls.copy(), xywh.copy()
        return super().update_labels_info(label)

    def build_transforms(self, hyp=None):
        """Ultralytics' transforms without its vertical flip (drawn per tile in
        `get_image_and_label`). Ultralytics builds them again from the trainer's own
        settings when it turns mosaic off for the last epochs (`close_mosaic`), so the
        flip is taken out here, where both pass."""
        hyp = copy.copy(hyp)
        hyp.flipud = 0.0
        return super().build_transforms(hyp)

    def get_image_and_label(self, index: int) -> dict:
        """Ultralytics' item (pixels and instances) of one tile, mirrored top to bottom
        with probability `flipud` where the tile's material allows a vertical mirror,
        before mosaic and the other transforms (so each tile of a mosaic is judged by
        its own material). Draws from Python's `random`, which Ultralytics seeds."""
        label = super().get_image_and_label(index)
        if self._flipud > 0 and "vflip" in material_symmetry(self.tile(index).material) and \
                random.random() < self._flipud:
            instances = label["instances"]
            instances.flipud(1 if instances.normalized else label["img"].shape[0])
            label["img"] = np.ascontiguousarray(np.flipud(label["img"]))
        return label

    def load_image(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        """(H x W x 1 uint8 tile, original (h, w), loaded (h, w)).

        Never resized: a tile is already at the model's pixel scale, and a defect's
        size in pixels is part of what the detector learns. Keeps Ultralytics' mosaic
        buffer (recently read tiles stay in memory for the next mosaics).
        """
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im = self.read_tile(i)[..., None]
        hw = im.shape[:2]
        if self.augment and self.cache != "ram":
            self.ims[i], self.im_hw0[i], self.im_hw[i] = im, hw, hw
            self.buffer.append(i)
            if 1 < len(self.buffer) >= self.max_buffer_length:
                j = self.buffer.pop(0)
                self.ims[j], self.im_hw0[j], self.im_hw[j] = None, None, None
        return im, hw, hw

    def cache_images_to_disk(self, i: int) -> None:  # pragma: no cover - refused in __init__
        raise RuntimeError("ArchiveTileDataset never writes tiles to disk")
