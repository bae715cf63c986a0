"""Tile plans for detector training: which pixels a sample reads and which boxes it holds.

Planning reads the archive's catalog and ground truth only (and, when a pixel size is
asked for, each image's pyramid metadata); no pixel is read here. A `TrainingTile` is a
small frozen value that says where a tile lies and what boxes it carries; the dataset
(`engine.training.detector.dataset`) reads the pixels when a batch needs them.

Coordinates: tiles and their boxes are in pixels of the pyramid level they are read
from; ground truth is in level-0 pixels and is divided by the level's downsampling.

The job's pixels: an image is trained and evaluated on the pixels the batch job and the
endpoint deliver it in (`job_read`, engine.data.tile_plan's rules):
- for a model of a pixel size (`pixel_size_nm`), the job's plan at its DEFAULT_TOLERANCE:
  a square image's level nearest that size, as stored, when it is within the tolerance;
  otherwise (no such level: e.g. levels stop at 40 nm and the model's are 100 nm) exactly
  that size, resampled from the level the job picks (`choose_level`); an image whose
  pixels are not square (`engine.data.tile_plan.is_square` of its y and x sizes, e.g. a
  fast-scan SEM's (10, 5) nm) always exactly that size (`choose_square_pixels`);
- with none (a model that records no pixel size), level 0: as stored, or, for pixels
  that are not square, resampled to its finer size (the job's native rule).
Where resampled, tile coordinates and boxes count the job's output pixels (its
`engine.preprocess.resample.OutputGrid`) and the dataset resamples them from the level.
Read otherwise, a defect would be learnt at one size or shape in pixels and met at
another: a round pore read in (10, 5) nm pixels is a 1:2 ellipse, a 600 nm pore read at
40 nm is 2.5x the size the job shows a 100 nm model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine.data.sample_plan import level_grid
from engine.data.tile_plan import DEFAULT_TOLERANCE, choose_level, choose_square_pixels, is_square
from engine.errors import GrainflowError, MetadataError
from engine.stores.catalog import read_catalog, read_table
from engine.stores.ngff import to_nanometres
from engine.stores.uri import StoreLocation, resolve

TRUTH_FILE = "ground_truth.parquet"  # engine.synth.truth.TRUTH_FILE, without importing the synth stack

# A box cut by a tile edge is kept when this much of its area and at least this many
# pixels of each side remain: the thresholds Ultralytics applies to boxes its own
# augmentations cut (`box_candidates`: area ratio 0.1, sides 2 px), so labels cut by
# tiling and labels cut by mosaic/affine follow one rule.
MIN_VISIBLE = 0.1
MIN_SIDE_PX = 2.0


class ArchiveLabelError(GrainflowError, ValueError):
    """An archive that cannot be used for detector training (no ground truth, unknown classes, ...)."""


@dataclass(frozen=True)
class TrainingTile:
    """One training/validation tile and the ground truth that touches it.

    image: the OME-Zarr image; level: pyramid level read; (y0, x0, y1, x1): the tile,
    half open, in pixels of that level, or, when `resampled`, in the square model
    pixels resampled from it (module docstring); scale: level-0 pixels per tile pixel
    (y, x), the square grid's step when resampled; material: the image's material (for
    reports). For each defect whose box meets the tile: classes (N int64 class indices),
    instance_ids (N int64, values in the image's `defects` label image), boxes (N x 4
    float32 xyxy in tile pixels, x right, y down, whole: they may reach past the tile's
    edges) and areas (N float32, the defect's mask area in tile pixels). resampled:
    whether the job resamples the image (its pixels are not square, or no level is
    within its tolerance of the model's pixel size: `job_read`), so the tile is read on
    the square grid `scale` (pixel j covers level-0 [j * scale, (j + 1) * scale) per
    axis) from `level`.
    """

    image_id: str
    image: StoreLocation
    level: int
    y0: int
    x0: int
    y1: int
    x1: int
    scale: tuple[float, float] = (1.0, 1.0)
    material: str | None = None
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False)
    instance_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32), compare=False)
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), compare=False)
    resampled: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in tile pixels (of `level`, or its square resampling)."""
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def key(self) -> str:
        """A name for the tile in logs and Ultralytics' `im_file` (not a file path)."""
        return f"{self.image_id}:L{self.level}:y{self.y0}:x{self.x0}"

    @property
    def is_background(self) -> bool:
        """Whether no defect is labelled in this tile (by the metadata rule)."""
        return len(self.clipped_labels()[0]) == 0

    @property
    def is_cut(self) -> bool:
        """Whether a tile edge cuts some defect's box (its clipped box is then only an
        estimate; `labels_from_mask` gives the exact one)."""
        h, w = self.shape
        b = self.boxes
        return bool(len(b)) and bool(((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)).any())

    def clipped_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(M int64 classes, M x 4 float32 xyxy tile pixels): boxes clipped to the tile,
        kept by the `MIN_VISIBLE` / `MIN_SIDE_PX` rule. From metadata only."""
        h, w = self.shape
        kept, idx = clip_boxes(self.boxes, (0, 0, w, h))
        return self.classes[idx], kept

    def labels_from_mask(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(M int64 classes, M x 4 float32 xyxy): each defect's box fitted to its mask
        pixels inside the tile. labels: the tile's (H, W) region of the `defects` label
        image (on the tile's square grid when `resampled`). A defect is kept when at
        least `MIN_VISIBLE` of its mask area and `MIN_SIDE_PX` pixels each way lie in
        the tile: a thin diagonal crack cut by an edge gets the box of the piece that is
        there, not of the empty corner its whole box would leave.
        """
        classes, boxes = [], []
        for cls, iid, area in zip(self.classes, self.instance_ids, self.areas):
            ys, xs = np.nonzero(labels == iid)
            if len(ys) == 0 or len(ys) < MIN_VISIBLE * area:
                continue
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if box[2] - box[0] < MIN_SIDE_PX or box[3] - box[1] < MIN_SIDE_PX:
                continue
            classes.append(cls)
            boxes.append(box)
        return np.asarray(classes, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


def yolo_format(classes: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels in Ultralytics' YOLO format: (N x 1 float32 classes, N x 4 float32
    normalised xywh: centre x/y and width/height as fractions of the tile's (h, w))."""
    h, w = shape
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    xywh = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                     (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], axis=1)
    return np.asarray(classes, np.float32).reshape(-1, 1), xywh.astype(np.float32)


def grid_starts(length: int, tile: int, overlap: int = 0) -> list[int]:
    """Start offsets of tiles of side `tile` covering [0, length), evenly spread.

    Every tile is whole (the last one ends flush with the edge), neighbours overlap by at
    least `overlap` pixels; a length of at most `tile` gives one tile at 0.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return sorted({int(round(s)) for s in np.linspace(0, length - tile, n)})


def clip_boxes(boxes: np.ndarray, window: tuple[float, float, float, float], *,
               min_visible: float = MIN_VISIBLE, min_side: float = MIN_SIDE_PX) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N x 4 xyxy) clipped to `window` (x0, y0, x1, y1), shifted to its origin.

    Returns (kept boxes M x 4 float32 in window pixels, M indices into `boxes`): a box is
    kept when at least `min_visible` of its area and `min_side` pixels of each side lie
    inside the window.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    wx0, wy0, wx1, wy1 = window
    c = boxes.copy()
    c[:, 0::2] = c[:, 0::2].clip(wx0, wx1)
    c[:, 1::2] = c[:, 1::2].clip(wy0, wy1)
    cw, ch = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    keep = np.flatnonzero((cw >= min_side) & (ch >= min_side) & (cw * ch >= min_visible * area))
    out = c[keep] - np.array([wx0, wy0, wx0, wy0])
    return out.astype(np.float32), keep


def read_ground_truth(archive: StoreLocation) -> pd.DataFrame:
    """The archive's ground-truth table (one row per defect, level-0 boxes y0, x0, y1, x1)."""
    location = archive.join(TRUTH_FILE)
    if not location.exists():
        raise ArchiveLabelError(
            f"{archive}: no {TRUTH_FILE}; detector training needs labelled boxes (an archive from `grainflow synth`)"
        )
    try:
        return read_table(location).to_pandas()
    except MetadataError as exc:
        raise ArchiveLabelError(str(exc)) from None


@dataclass(frozen=True)
class ImageEntry:
    """One catalog image as the planner needs it: where it is and its level geometry.

    shape: (h, w) tile pixels covering the image: the level's own, or, when `resampled`
    (the job resamples the image: `job_read`), the extent of the square grid the batch
    job reads it on; scale: level-0 pixels per tile pixel (y, x), that grid's step when
    resampled.
    """

    image_id: str
    image: StoreLocation
    material: str | None
    level: int
    shape: tuple[int, int]
    scale: tuple[float, float]
    resampled: bool = False


def image_entries(archive: str | StoreLocation, *, image_ids: list[str] | None = None,
                  pixel_size_nm: float | None = None) -> list[ImageEntry]:
    """Catalog images (all, or `image_ids` in that order) with the level and grid to read,
    as the batch job and the endpoint read them for a model of `pixel_size_nm`.

    pixel_size_nm=None reads level 0 (defect sizes in engine.synth are level-0 pixels),
    from the catalog alone; an image whose pixels are not square gets level 0's square
    grid at its finer size (`engine.data.sample_plan.level_grid`: the native rule). A
    pixel size opens each image's metadata (no pixels) and takes the job's plan for it
    (`target_entry`): the level nearest it as stored where that is within the job's
    tolerance and the pixels are square, else the job's square grid of exactly that size.
    """
    archive = resolve(archive)
    catalog = read_catalog(archive).set_index("image_id", drop=False)
    if image_ids is not None:
        missing = [i for i in image_ids if i not in catalog.index]
        if missing:
            raise ArchiveLabelError(f"{archive}: images {missing[:5]} are not in the catalog")
        catalog = catalog.loc[list(image_ids)]
    out = []
    for row in catalog.itertuples(index=False):
        location = archive.join(row.uri)
        material = None if pd.isna(row.material) else str(row.material)
        if pixel_size_nm is not None:
            from engine.stores.image import open_image

            out.append(target_entry(row.image_id, location, material, open_image(location), pixel_size_nm))
            continue
        pixel_size_yx = (to_nanometres(float(row.pixel_size_y), str(row.unit)),
                         to_nanometres(float(row.pixel_size_x), str(row.unit)))
        if is_square(*pixel_size_yx):
            out.append(ImageEntry(row.image_id, location, material, 0, (int(row.height), int(row.width)), (1.0, 1.0)))
        else:
            step, extent, _, _ = level_grid(int(row.height), int(row.width), pixel_size_yx, 0)
            out.append(ImageEntry(row.image_id, location, material, 0, tuple(extent),
                                  (float(step[0]), float(step[1])), resampled=True))
    return out


def job_target(image, level: int, pixel_size_nm: float | None) -> tuple[float, float]:
    """(target nm, tolerance) the batch job plans an opened image (`MultiscaleImage`) with
    for a model of `pixel_size_nm`: that size at the job's DEFAULT_TOLERANCE; None, a
    model that records no pixel size: native pixels of `level` (its x size, tolerance
    inf), as the job and the endpoint read such a model."""
    if pixel_size_nm is not None:
        return float(pixel_size_nm), DEFAULT_TOLERANCE
    from engine.tiling.transform import LevelTransform

    return LevelTransform.from_image(image, level).level_pixel_size_nm[1], math.inf


def job_read(image, level: int, pixel_size_nm: float | None) -> tuple[int, float | None]:
    """(level, output nm) the batch job and the endpoint read an opened image
    (`MultiscaleImage`) at for a model of `pixel_size_nm` (`job_target`: `level` counts
    only when that is None): output nm None when they read the level as stored, else the
    square pixel size (nm) they resample it to (engine.data.tile_plan.plan_image's rule:
    `choose_square_pixels` for pixels that are not square, else `choose_level`)."""
    target_nm, tolerance = job_target(image, level, pixel_size_nm)
    square = choose_square_pixels(image, target_nm, tolerance)
    if square is not None:
        return square
    level, resampled = choose_level(image, target_nm, tolerance)
    return level, (float(target_nm) if resampled else None)


def target_entry(image_id: str, location: StoreLocation, material: str | None, image,
                 pixel_size_nm: float) -> ImageEntry:
    """The entry of an opened image (`MultiscaleImage`) for a model of `pixel_size_nm` nm:
    the level and grid the batch job and the endpoint read it on for that model
    (`job_read`: engine.data.tile_plan.plan_image with the target and the job's
    DEFAULT_TOLERANCE).

    Read as stored (square pixels, a level within the tolerance): that level, the one
    nearest the target by x, its own pixels, as before. Resampled (pixels that are not
    square, or no level within the tolerance): exactly `pixel_size_nm` on the image's
    global `OutputGrid`, from the level the job picks (for square pixels the coarsest
    finer than the target, else level 0; for others the coarsest no coarser along either
    axis). Level sizes come from the NGFF transforms, so a pyramid that does not halve
    is read right.
    """
    from engine.preprocess.resample import OutputGrid
    from engine.tiling.transform import LevelTransform

    level, output_nm = job_read(image, 0, pixel_size_nm)
    if output_nm is None:
        h, w = image.levels[level].shape
        return ImageEntry(image_id, location, material, level, (h, w), (image.shape[0] / h, image.shape[1] / w))
    grid = OutputGrid.for_image(image.shape, LevelTransform.from_image(image, level).pixel_size_nm, output_nm)
    return ImageEntry(image_id, location, material, level, tuple(int(v) for v in grid.extent),
                      (float(grid.step[0]), float(grid.step[1])), resampled=True)


@dataclass(frozen=True)
class ImageTruth:
    """Ground truth of one image in pixels of its level: boxes N x 4 float64 xyxy,
    classes N int64, instance_ids N int64, areas N float64 (mask area)."""

    boxes: np.ndarray
    classes: np.ndarray
    instance_ids: np.ndarray
    areas: np.ndarray


def truth_by_image(truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The ground-truth table split into one frame per image id (one pass over the table)."""
    return {str(k): g for k, g in truth.groupby("image_id", sort=False)}


def image_truth(truth: dict[str, pd.DataFrame], entry: ImageEntry, class_index: dict[str, int]) -> ImageTruth:
    """The ground-truth rows of one image (from `truth_by_image`), scaled from level 0 to
    the entry's tile pixels (per axis: `scale` may differ along y and x). An image
    without rows has no defects."""
    rows = truth.get(entry.image_id)
    if rows is None:
        rows = pd.DataFrame({c: [] for c in ("defect_class", "x0", "y0", "x1", "y1", "instance_id", "area_px")})
    unknown = sorted(set(rows["defect_class"]) - set(class_index))
    if unknown:
        raise ArchiveLabelError(
            f"image {entry.image_id}: defect classes {unknown} are not among the model's {list(class_index)}"
        )
    sy, sx = entry.scale
    boxes = np.stack([rows["x0"] / sx, rows["y0"] / sy, rows["x1"] / sx, rows["y1"] / sy], axis=1) if len(rows) else (
        np.zeros((0, 4)))
    return ImageTruth(
        boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
        classes=np.array([class_index[c] for c in rows["defect_class"]], np.int64),
        instance_ids=rows["instance_id"].to_numpy(np.int64),
        areas=rows["area_px"].to_numpy(np.float64) / (sy * sx),
    )


def plan_tiles(archive: str | StoreLocation, class_names: list[str] | tuple[str, ...], *, tile: int,
               overlap: int = 0, image_ids: list[str] | None = None, pixel_size_nm: float | None = None,
               truth: pd.DataFrame | None = None) -> list[TrainingTile]:
    """Tiles of side `tile` (level pixels; the job's square output pixels for an image it
    resamples, module docstring) covering each image, with the defects they meet.

    Images smaller than `tile` give one tile of their own size (Ultralytics pads them;
    nothing is resized, so a defect keeps its size in pixels). Tiles without defects are
    kept: they teach the model the microstructure that is not a defect.
    """
    archive = resolve(archive)
    truth = truth_by_image(read_ground_truth(archive) if truth is None else truth)
    class_index = {name: i for i, name in enumerate(class_names)}
    tiles = []
    for entry in image_entries(archive, image_ids=image_ids, pixel_size_nm=pixel_size_nm):
        tiles += entry_tiles(entry, image_truth(truth, entry, class_index), tile=tile, overlap=overlap)
    return tiles


def entry_tiles(entry: ImageEntry, truth: ImageTruth, *, tile: int, overlap: int = 0) -> list[TrainingTile]:
    """Tiles of side `tile` overlapping by `overlap` (tile pixels of `entry`) covering one
    image, each with the defects of `truth` it meets, boxes in its own pixels."""
    h, w = entry.shape
    th, tw = min(tile, h), min(tile, w)
    tiles = []
    for y0 in grid_starts(h, th, min(overlap, th - 1)):
        for x0 in grid_starts(w, tw, min(overlap, tw - 1)):
            b = truth.boxes
            meets = (b[:, 0] < x0 + tw) & (b[:, 2] > x0) & (b[:, 1] < y0 + th) & (b[:, 3] > y0)
            shifted = (b[meets] - np.array([x0, y0, x0, y0])).astype(np.float32)
            tiles.append(TrainingTile(
                entry.image_id, entry.image, entry.level, y0, x0, y0 + th, x0 + tw, entry.scale, entry.material,
                truth.classes[meets], truth.instance_ids[meets], shifted, truth.areas[meets].astype(np.float32),
                resampled=entry.resampled))
    return tiles


def limit_background(tiles: list[TrainingTile], ratio: float | None, seed: int) -> list[TrainingTile]:
    """All tiles that show a defect, and at most `ratio` times as many without one
    (a seeded choice, plan order kept); ratio=None keeps every tile.

    Defects are sparse: most tiles of an archive show none, and on a CPU budget they
    would take most of each epoch. Some are kept so the model still sees plain
    microstructure (grain boundaries, pearlite, graphite) and learns it is no defect.
    """
    if ratio is None:
        return list(tiles)
    if ratio < 0:
        raise ValueError(f"background ratio must be >= 0 or None, got {ratio}")
    empty = [i for i, t in enumerate(tiles) if t.is_background]
    n_keep = min(len(empty), round(ratio * (len(tiles) - len(empty))))
    keep = set(np.random.default_rng(seed).choice(empty, size=n_keep, replace=False).tolist()) if n_keep else set()
    return [t for i, t in enumerate(tiles) if not t.is_background or i in keep]


def split_images(image_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split image ids (not tiles: no image is in both sets) into (train, val), seeded.

    At least one image goes to each side when there are two or more images.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = sorted(image_ids)
    if len(ids) < 2:
        raise ArchiveLabelError(f"need at least 2 images to hold some out for validation, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val
