"""Tile grids over one pyramid level: chunk-aligned cores with a halo, planned, not read.

A `TileGrid` is the level cut into tile *cores*: rectangles of whole chunks that
partition the level exactly (the last row and column end at the level's edge). Each
tile is read with a *halo*, `halo` extra pixels on every side so that a model sees
context across core borders; the halo is clipped at the level's edge and each
`TileSpec` records the halo it really has. Like torchgeo's `GridGeoSampler`, the grid
knows its length up front and yields light frozen specs, never pixels.

Why chunk-aligned cores: a read task touches whole chunks, and outputs written per core
(label masks) land on whole chunks, so no two tiles ever write the same chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from engine.tiling.transform import LevelTransform

TileKey = tuple[str, int, int, int]
"""(image_id, level, y, x): y, x the level-0 pixel of the core's top-left corner."""


@dataclass(frozen=True, slots=True)
class TileSpec:
    """One tile: a core of `height` x `width` pixels of `level` at (y0, x0), read with a halo.

    y0, x0: the core's top-left pixel in pixels of `level`.
    halo: pixels actually read beyond the core, (top, bottom, left, right); smaller than
    the grid's halo where the core touches the level's edge.
    transform: maps this level's edge coordinates to level 0 and nm (shared by a grid).
    """

    image_id: str
    level: int
    y0: int
    x0: int
    height: int
    width: int
    halo: tuple[int, int, int, int] = (0, 0, 0, 0)
    transform: LevelTransform = field(default_factory=LevelTransform, compare=False)

    @property
    def y1(self) -> int:
        return self.y0 + self.height

    @property
    def x1(self) -> int:
        return self.x0 + self.width

    @property
    def core(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the core in level pixels, half open."""
        return (self.y0, self.y1, self.x0, self.x1)

    @property
    def read_region(self) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of core plus halo in level pixels: what a read task fetches."""
        top, bottom, left, right = self.halo
        return (self.y0 - top, self.y1 + bottom, self.x0 - left, self.x1 + right)

    @property
    def read_shape(self) -> tuple[int, int]:
        top, bottom, left, right = self.halo
        return (self.height + top + bottom, self.width + left + right)

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """Where the core lies inside the read array (of `read_shape`)."""
        top, _, left, _ = self.halo
        return (slice(top, top + self.height), slice(left, left + self.width))

    @property
    def origin0(self) -> tuple[int, int]:
        """Level-0 pixel (y, x) of the core's top-left corner."""
        return self.transform.level0_origin(self.y0, self.x0)

    @property
    def read_origin0(self) -> tuple[float, float]:
        """Level-0 edge coordinates (y, x) of the read array's top-left corner."""
        y0, _, x0, _ = self.read_region
        return self.transform.to_level0(y0, x0)

    @property
    def key(self) -> TileKey:
        """(image_id, level, y, x) with level-0 y, x: the ledger / skip-set key."""
        y, x = self.origin0
        return (self.image_id, self.level, y, x)

    def core_level0(self) -> tuple[float, float, float, float]:
        """The core in level-0 edge coordinates, xyxy (x0, y0, x1, y1)."""
        y0, x0 = self.transform.to_level0(self.y0, self.x0)
        y1, x1 = self.transform.to_level0(self.y1, self.x1)
        return (x0, y0, x1, y1)

    def read_level0(self) -> tuple[float, float, float, float]:
        """What the tile reads (core plus halo) in level-0 edge coordinates, xyxy."""
        y0, y1, x0, x1 = self.read_region
        (ly0, lx0), (ly1, lx1) = self.transform.to_level0(y0, x0), self.transform.to_level0(y1, x1)
        return (lx0, ly0, lx1, ly1)

    def core_physical(self) -> tuple[float, float, float, float]:
        """The core's outer edges in nm, xyxy (NGFF physical space of the image)."""
        x0, y0, x1, y1 = self.core_level0()
        py0, px0 = self.transform.to_physical(y0, x0)
        py1, px1 = self.transform.to_physical(y1, x1)
        return (px0, py0, px1, py1)

    def boxes_to_level0(self, boxes: np.ndarray) -> np.ndarray:
        """N x 4 xyxy boxes in read-array pixels (halo included) -> level-0 xyxy float64."""
        top, _, left, _ = self.halo
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        shifted = b + np.array([self.x0 - left, self.y0 - top, self.x0 - left, self.y0 - top], dtype=np.float64)
        return self.transform.boxes_to_level0(shifted)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one level of one image.

    shape, chunks: (y, x) of the level's array, in pixels.
    tile: (y, x) core size; each a positive multiple of the chunk (None: one chunk).
    halo: pixels read around each core on every side (clipped at the edge), >= 0.
    """

    image_id: str
    level: int
    shape: tuple[int, int]
    chunks: tuple[int, int]
    tile: tuple[int, int] | None = None
    halo: int = 0
    transform: LevelTransform = field(default_factory=LevelTransform)

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        chunks = tuple(int(c) for c in self.chunks)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{self.image_id} level {self.level}: shape {self.shape} is not a 2-D (y, x) shape")
        if len(chunks) != 2 or min(chunks) < 1:
            raise ValueError(f"{self.image_id} level {self.level}: chunks {self.chunks} must be two positive sizes")
        tile = chunks if self.tile is None else tuple(int(t) for t in self.tile)
        if len(tile) != 2 or any(t < 1 or t % c for t, c in zip(tile, chunks)):
            raise ValueError(
                f"{self.image_id} level {self.level}: tile {self.tile} must be a positive multiple of the chunk {chunks}"
            )
        if int(self.halo) < 0:
            raise ValueError(f"{self.image_id} level {self.level}: halo {self.halo} must be >= 0")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "chunks", chunks)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "halo", int(self.halo))

    @classmethod
    def from_image(cls, image, image_id: str, level: int, *, tile: int | tuple[int, int] | None = None,
                   halo: int = 0) -> TileGrid:
        """The grid of `level` of a `MultiscaleImage` (metadata only)."""
        info = image.levels[level]
        if isinstance(tile, int):
            tile = (tile, tile)
        return cls(image_id, level, info.shape, info.chunks, tile, halo, LevelTransform.from_image(image, level))

    @property
    def n_rows(self) -> int:
        return math.ceil(self.shape[0] / self.tile[0])

    @property
    def n_cols(self) -> int:
        return math.ceil(self.shape[1] / self.tile[1])

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile_at(self, row: int, col: int) -> TileSpec:
        """The tile in grid row `row`, column `col`."""
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise IndexError(f"tile ({row}, {col}) outside the {self.n_rows} x {self.n_cols} grid of {self.image_id}")
        (h, w), (th, tw), g = self.shape, self.tile, self.halo
        y0, x0 = row * th, col * tw
        y1, x1 = min(y0 + th, h), min(x0 + tw, w)
        halo = (min(g, y0), min(g, h - y1), min(g, x0), min(g, w - x1))
        return TileSpec(self.image_id, self.level, y0, x0, y1 - y0, x1 - x0, halo, self.transform)

    def __getitem__(self, index: int) -> TileSpec:
        """Tiles in row-major order; negative indices count from the end."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"tile index {index} outside a grid of {n} tiles")
        return self.tile_at(*divmod(index, self.n_cols))

    def __iter__(self) -> Iterator[TileSpec]:
        return self.tiles_in(0, self.n_rows, 0, self.n_cols)

    def tiles_in(self, r0: int, r1: int, c0: int, c1: int) -> Iterator[TileSpec]:
        """Tiles of grid rows [r0, r1) and columns [c0, c1), row-major."""
        for row in range(r0, r1):
            for col in range(c0, c1):
                yield self.tile_at(row, col)

    def index_of(self, y: int, x: int) -> tuple[int, int]:
        """(row, col) of the tile whose core holds level pixel (y, x)."""
        if not (0 <= y < self.shape[0] and 0 <= x < self.shape[1]):
            raise IndexError(f"pixel ({y}, {x}) outside level {self.level} of {self.image_id} {self.shape}")
        return (y // self.tile[0], x // self.tile[1])

    def index_of_key(self, key: TileKey) -> tuple[int, int] | None:
        """(row, col) of the tile with ledger key `key`, or None if no tile of this grid has it."""
        image_id, level, y, x = key
        if image_id != self.image_id or level != self.level:
            return None
        ly, lx = self.transform.from_level0(y, x)
        ly, lx = int(round(ly)), int(round(lx))
        if ly % self.tile[0] or lx % self.tile[1] or not (0 <= ly < self.shape[0] and 0 <= lx < self.shape[1]):
            return None
        row, col = ly // self.tile[0], lx // self.tile[1]
        return (row, col) if self.tile_at(row, col).key == key else None
