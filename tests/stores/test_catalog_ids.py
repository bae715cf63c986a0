"""Image ids the reprocessing job can name its outputs after: percent-encoded (9 bytes
per CJK character), with what the job adds, an id must fit a file name."""

from __future__ import annotations

import errno
import urllib.parse

import pytest

from engine.data.sinks import partition
from engine.stores.catalog import MAX_ENCODED_ID_BYTES, MAX_NAME_BYTES, encoded_id_bytes, id_name_problem

CJK = "铁"  # one CJK character: 3 bytes of UTF-8, 9 percent-encoded


def job_names(image_id: str) -> list[str]:
    """The file names the job makes of an image id: its table partitions, its label image
    under --out, and a preprocessing parameters file while `put_file` writes it."""
    quoted = urllib.parse.quote(image_id, safe="")
    return [partition(image_id), f"{quoted}.ome.zarr", f"{quoted}.json.4194304.tmp"]


class TestIdNameProblem:
    def test_encoded_length_is_the_sinks_partition_name(self):
        for image_id in ("plain-id_1.2", "a b/c", CJK * 40, "naïve"):
            assert len(partition(image_id)) == len("image_id=") + encoded_id_bytes(image_id)

    def test_forty_cjk_characters_are_named_with_their_length(self):
        problem = id_name_problem(CJK * 40)
        assert problem is not None and CJK * 40 in problem and "360 bytes" in problem
        assert f"{MAX_ENCODED_ID_BYTES} that fit a file name of {MAX_NAME_BYTES} bytes" in problem

    def test_ascii_ids_and_short_cjk_ids_pass(self):
        assert id_name_problem("steel-sample-0001") is None
        assert id_name_problem("x" * MAX_ENCODED_ID_BYTES) is None
        assert id_name_problem(CJK * (MAX_ENCODED_ID_BYTES // 9)) is None
        assert id_name_problem("x" * (MAX_ENCODED_ID_BYTES + 1)) is not None

    def test_the_limit_is_what_this_file_system_takes(self, tmp_path):
        """Every name of the longest id allowed can be created; one byte more cannot."""
        longest = "x" * MAX_ENCODED_ID_BYTES
        for name in job_names(longest):
            (tmp_path / name).touch()
        with pytest.raises(OSError) as info:
            for name in job_names(longest + "x"):
                (tmp_path / name).touch()
        assert info.value.errno == errno.ENAMETOOLONG
