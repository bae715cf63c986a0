"""The audit log: whole lines from many processes, nothing rewritten, no pixels."""

import json
import multiprocessing as mp
import os
import stat

import numpy as np
import pytest

from engine.audit import AuditLog, read_audit
from engine.errors import GrainflowError


def _write_many(path, worker, n):
    log = AuditLog(path)
    for i in range(n):
        log.append({"worker": worker, "i": i, "route": "/v1/analyze", "pad": "x" * 500})


class TestAuditLog:
    def test_entries_are_appended_with_time_and_pid(self, tmp_path):
        path = tmp_path / "audit" / "audit.jsonl"
        log = AuditLog(path)
        log.append({"route": "/healthz", "status": 200})
        log.append({"route": "/v1/analyze", "status": 401, "tenant": None})
        entries = read_audit(path)
        assert [e["status"] for e in entries] == [200, 401]
        assert all(e["pid"] == os.getpid() and e["time"].endswith("+00:00") for e in entries)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_reopening_keeps_earlier_entries(self, tmp_path):
        path = tmp_path / "audit.jsonl"
        AuditLog(path).append({"n": 1})
        AuditLog(path).append({"n": 2})
        assert [e["n"] for e in read_audit(path)] == [1, 2]

    def test_processes_interleave_whole_lines(self, tmp_path):
        path = tmp_path / "audit.jsonl"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_write_many, args=(path, w, 200)) for w in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        lines = path.read_bytes().splitlines()
        assert len(lines) == 600
        entries = [json.loads(line) for line in lines]
        for w in range(3):
            assert [e["i"] for e in entries if e["worker"] == w] == list(range(200))

    @pytest.mark.parametrize("payload", [b"\x00\x01", np.zeros((2, 2), np.uint8), {"nested": [bytearray(3)]}])
    def test_pixels_are_refused(self, tmp_path, payload):
        log = AuditLog(tmp_path / "audit.jsonl")
        with pytest.raises(GrainflowError, match="never pixels"):
            log.append({"image": payload})
        assert read_audit(tmp_path / "audit.jsonl") == []

    def test_a_corrupt_line_is_named(self, tmp_path):
        path = tmp_path / "audit.jsonl"
        path.write_text('{"ok": 1}\nnot json\n')
        with pytest.raises(GrainflowError, match=r"audit.jsonl:2"):
            read_audit(path)
