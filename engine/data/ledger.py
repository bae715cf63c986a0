"""The ledger of finished tiles: what a rerun of a batch job may skip.

    ledger = Ledger("s3://lab/runs/r1")
    ledger.record(keys, n_defects)          # after the tiles' outputs are durable
    done = ledger.keys()                    # {(image_id, level, y, x), ...} -> datasource skip

Layout: ``<out>/ledger/<digest>.parquet``, one file per written batch of tiles, one row
per tile with the columns of `SCHEMA`; ``(image_id, level, y, x)`` is the tile's key
(`engine.tiling.TileKey`: level-0 pixel of the core's top-left corner), exactly the
datasource's columns and skip set.

Why one file per batch, named by a digest of its keys: files are written whole (a
reader sees a batch's file or nothing, never half of it) and never appended to, so
nothing needs a lock, on local disk or on S3; a retried batch (Ray retries a failed or
killed task with the same input) writes the same name and replaces its own file instead
of adding a second one. A tile is in the ledger only once its outputs are written (the
sink writes the ledger last), so an interruption at any moment leaves every ledgered
tile complete; tiles written but not yet ledgered are simply done again, and their
deterministically named outputs are overwritten with the same content.

Reading costs one listing and one small read per file; the driver reads only the key
columns. Tiles that failed (`error` rows) are not ledgered: a rerun tries them again.
Nor are tiles read with a reduced halo (`halo_reduced` rows, `engine.data.tile_read`: a
bad chunk beside the core): their outputs are written, but a rerun redoes them, so
once the chunk is repaired the outputs are an uninterrupted clean run's. The sink
(`engine.data.sinks.WriteTileOutputs`) decides which tiles it records.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import MetadataError
from engine.stores.uri import StoreLocation, resolve
from engine.tiling.grid import TileKey

LEDGER_DIR = "ledger"
KEY_COLUMNS = ("image_id", "level", "y", "x")
SCHEMA = pa.schema([("image_id", pa.string()), ("level", pa.int32()), ("y", pa.int64()), ("x", pa.int64()),
                    ("n_defects", pa.int32())])


def batch_name(keys: Iterable[TileKey]) -> str:
    """The file name of a batch: a digest of its sorted keys (same tiles, same name)."""
    h = hashlib.sha256()
    for image_id, level, y, x in sorted((str(k[0]), int(k[1]), int(k[2]), int(k[3])) for k in keys):
        h.update(f"{image_id}\x00{level}\x00{y}\x00{x}\n".encode())
    return f"{h.hexdigest()[:32]}.parquet"


def put_file(location: StoreLocation, data: bytes) -> None:
    """Write `data` as the whole file at `location`: a reader sees the old file or the
    new one, never a part (local: write a temporary file, then rename; object stores:
    one PUT)."""
    fs = location.filesystem()
    if location.scheme == "file":
        import os

        os.makedirs(location.parent().path, exist_ok=True)
        tmp = f"{location.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, location.path)  # onto a directory: IsADirectoryError
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(location.path, data)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class Ledger:
    """The finished tiles of one job output `out` (any store URI); see the module doc."""

    def __init__(self, out: str | StoreLocation):
        self.out = resolve(out)
        self.location = self.out.join(LEDGER_DIR)

    def __repr__(self) -> str:
        return f"Ledger({self.out.uri!r})"

    def record(self, keys: Sequence[TileKey], n_defects: Sequence[int] | None = None) -> StoreLocation | None:
        """Ledger these tiles (call only once their outputs are durable); returns the file
        written, or None for an empty batch. n_defects: per tile, default 0."""
        keys = [(str(k[0]), int(k[1]), int(k[2]), int(k[3])) for k in keys]
        if not keys:
            return None
        counts = [0] * len(keys) if n_defects is None else [int(n) for n in n_defects]
        if len(counts) != len(keys):
            raise ValueError(f"ledger: {len(keys)} keys but {len(counts)} defect counts")
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        table = pa.table({
            "image_id": [keys[i][0] for i in order], "level": [keys[i][1] for i in order],
            "y": [keys[i][2] for i in order], "x": [keys[i][3] for i in order],
            "n_defects": [counts[i] for i in order],
        }, schema=SCHEMA)
        target = self.location.join(batch_name(keys))
        put_file(target, table_bytes(table))
        return target

    def files(self) -> list[StoreLocation]:
        """The ledger's batch files (sorted); [] when there is no ledger yet."""
        fs = self.location.filesystem()
        if not fs.exists(self.location.path):
            return []
        names = sorted(p for p in fs.ls(self.location.path, detail=False) if p.endswith(".parquet"))
        return [self.location.join(n.rsplit("/", 1)[-1]) for n in names]

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every ledgered tile (one row per tile: a tile ledgered by two batches, which a
        killed driver can leave behind, appears once), sorted by key."""
        columns = list(columns or SCHEMA.names)
        unknown = sorted(set(columns) - set(SCHEMA.names))
        if unknown:
            raise ValueError(f"ledger: unknown columns {unknown}; columns are {SCHEMA.names}")
        files = self.files()
        if not files:
            return SCHEMA.empty_table().select(columns)
        fs = self.location.filesystem()

        def one(loc: StoreLocation) -> pa.Table:
            try:
                with fs.open(loc.path, "rb") as f:
                    return pq.read_table(f, columns=columns, schema=SCHEMA)
            except (pa.ArrowInvalid, OSError) as exc:
                raise MetadataError(f"{loc}: unreadable ledger file ({exc}); delete it to redo its tiles") from None

        # Object stores are latency-bound: overlap the small reads.
        with ThreadPoolExecutor(max_workers=16) as pool:
            table = pa.concat_tables(pool.map(one, files))
        keys = [c for c in KEY_COLUMNS if c in columns]
        if keys:
            rest = [c for c in columns if c not in keys]
            grouped = table.group_by(keys, use_threads=False).aggregate([(c, "max") for c in rest])
            table = pa.table({c: grouped[c if c in keys else f"{c}_max"] for c in columns})
            table = table.sort_by([(c, "ascending") for c in keys])
        return table

    def keys(self) -> set[TileKey]:
        """The keys of the finished tiles: the datasource's `skip` set."""
        t = self.read(KEY_COLUMNS)
        return set(zip(t["image_id"].to_pylist(), t["level"].to_pylist(), t["y"].to_pylist(), t["x"].to_pylist()))

    def clear(self) -> None:
        """Forget every finished tile (a fresh run)."""
        fs = self.location.filesystem()
        if fs.exists(self.location.path):
            fs.rm(self.location.path, recursive=True)


__all__ = ["KEY_COLUMNS", "LEDGER_DIR", "Ledger", "SCHEMA", "batch_name", "put_file", "table_bytes"]
