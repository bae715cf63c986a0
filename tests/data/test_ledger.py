"""The ledger of finished tiles: one whole file per batch, named by its keys; read back
as a set of keys, each once."""

from __future__ import annotations

import pytest

from engine.data.ledger import SCHEMA, Ledger, batch_name
from engine.errors import MetadataError

A, B, C = ("img-a", 0, 0, 0), ("img-a", 0, 0, 128), ("img-b", 1, 256, 0)


class TestLedger:
    def test_record_then_read(self, tmp_path):
        ledger = Ledger(tmp_path / "out")
        assert ledger.keys() == set() and ledger.read().num_rows == 0  # no ledger yet
        written = ledger.record([C, A], [3, 1])
        assert written.path.startswith(str(tmp_path / "out" / "ledger"))
        table = ledger.read()
        assert table.schema == SCHEMA
        assert table.to_pylist() == [{"image_id": "img-a", "level": 0, "y": 0, "x": 0, "n_defects": 1},
                                     {"image_id": "img-b", "level": 1, "y": 256, "x": 0, "n_defects": 3}]
        assert ledger.keys() == {A, C}

    def test_a_retried_batch_replaces_its_own_file(self, tmp_path):
        ledger = Ledger(tmp_path)
        first = ledger.record([A, B])
        again = ledger.record([B, A])  # same tiles, any order: same name
        assert first == again and len(ledger.files()) == 1
        assert batch_name([A, B]) != batch_name([A, C])

    def test_a_tile_in_two_batches_reads_once(self, tmp_path):
        ledger = Ledger(tmp_path)
        ledger.record([A, B], [1, 2])
        ledger.record([B, C], [2, 0])  # e.g. a batch redone after its driver was killed
        assert len(ledger.files()) == 2
        table = ledger.read()
        assert table.num_rows == 3 and ledger.keys() == {A, B, C}
        assert ledger.read(["image_id", "y"]).column_names == ["image_id", "y"]

    def test_empty_batch_writes_nothing(self, tmp_path):
        ledger = Ledger(tmp_path)
        assert ledger.record([]) is None and ledger.files() == []

    def test_partial_writes_are_not_read(self, tmp_path):
        ledger = Ledger(tmp_path)
        ledger.record([A])
        (tmp_path / "ledger" / "x.parquet.123.tmp").write_bytes(b"half a file")  # a writer killed mid-write
        assert ledger.keys() == {A}

    def test_unreadable_file_is_named(self, tmp_path):
        ledger = Ledger(tmp_path)
        ledger.record([A])
        (tmp_path / "ledger" / "bad.parquet").write_bytes(b"not parquet")
        with pytest.raises(MetadataError, match="bad.parquet"):
            ledger.keys()

    def test_misuse(self, tmp_path):
        ledger = Ledger(tmp_path)
        with pytest.raises(ValueError, match="2 keys but 1"):
            ledger.record([A, B], [1])
        with pytest.raises(ValueError, match="unknown columns"):
            ledger.read(["tile"])

    def test_clear(self, tmp_path):
        ledger = Ledger(tmp_path)
        ledger.record([A])
        ledger.clear()
        assert ledger.keys() == set()
        ledger.clear()  # nothing to clear is fine

    def test_on_s3(self, s3_bucket):
        ledger = Ledger(f"{s3_bucket}/runs/r1")
        ledger.record([A, B], [0, 5])
        ledger.record([C])
        assert ledger.keys() == {A, B, C} and len(ledger.files()) == 2
        ledger.clear()
        assert ledger.keys() == set()


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from engine.data.ledger import put_file
    from engine.stores.uri import resolve

    (tmp_path / "report.html").mkdir()  # the target is a folder: the rename fails
    with pytest.raises(IsADirectoryError):
        put_file(resolve(str(tmp_path / "report.html")), b"<html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
