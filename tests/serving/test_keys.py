"""The keys file when admins run `keys add` and `keys revoke` at the same time, from
separate processes: every key printed as created is in the file, and a revoked key
stays revoked."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from engine.serving.keys import KeyStore, add_key, keys_file_lock, list_keys, revoke_key

# spawn, not fork: the test process may run threads (a moto server, Ray's) that a forked
# child would inherit mid-lock
SPAWN = multiprocessing.get_context("spawn")
TIMEOUT_S = 60
needs_proc_locks = pytest.mark.skipif(not Path("/proc/locks").exists(),
                                      reason="needs Linux /proc/locks to see a process wait for a flock")


def _add_keys_at_once(path: str, tenant: str, how_many: int, start: multiprocessing.Barrier,
                      results: multiprocessing.Queue) -> None:
    """In a child: wait for the others at `start`, then add `how_many` keys; reports
    (tenant, [key id or "ErrorName: message"]) on `results`."""
    start.wait(TIMEOUT_S)
    outcome = []
    for _ in range(how_many):
        try:
            outcome.append(add_key(path, tenant)[0])
        except Exception as exc:  # reported, so the test shows what an admin would have seen
            outcome.append(f"{type(exc).__name__}: {exc}")
    results.put((tenant, outcome))


def _add_key_pausing_after_its_read(path: str, has_read: multiprocessing.Event, go_on: multiprocessing.Event,
                                    results: multiprocessing.Queue) -> None:
    """In a child: `add_key` held up between reading the keys file and writing it back,
    as a descheduled process or a slow disk holds it. add_key draws the new key's id
    right after its read, so the pause goes there."""
    import secrets

    draw = secrets.token_hex

    def token_hex_after_a_pause(nbytes: int) -> str:
        has_read.set()
        go_on.wait(TIMEOUT_S)
        return draw(nbytes)

    secrets.token_hex = token_hex_after_a_pause
    results.put(add_key(path, "lab-b"))


def _revoke(path: str, key_id: str) -> None:
    revoke_key(path, key_id)


def _waits_on_a_flock(pid: int) -> bool:
    """Whether process `pid` is queued for a flock (Linux /proc/locks marks a waiter "->")."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid):
            return True
    return False


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {TIMEOUT_S} s waiting until {what}")
        time.sleep(0.01)


class TestConcurrentKeyChanges:
    def test_parallel_adds_from_processes_all_land_in_the_file(self, tmp_path):
        """Six provisioning processes add five keys each, all released at once: the
        unlocked read-modify-write lost keys it had printed as created, and a shared
        temp file name made some adds fail with FileNotFoundError."""
        path = tmp_path / "keys.json"
        tenants, per_process = [f"lab-{i}" for i in range(6)], 5
        start, results = SPAWN.Barrier(len(tenants)), SPAWN.Queue()
        adders = [SPAWN.Process(target=_add_keys_at_once, args=(str(path), t, per_process, start, results))
                  for t in tenants]
        for p in adders:
            p.start()
        reported = dict(results.get(timeout=TIMEOUT_S) for _ in adders)
        for p in adders:
            p.join(TIMEOUT_S)

        printed = [key_id for outcome in reported.values() for key_id in outcome]
        assert not [o for o in printed if ":" in o], "adds failed"
        stored = {p.key_id: p.tenant for p in list_keys(path)}
        assert len(printed) == len(tenants) * per_process
        assert {key_id: stored.get(key_id) for key_id in printed} == {
            key_id: tenant for tenant, outcome in reported.items() for key_id in outcome}
        assert os.listdir(tmp_path) == ["keys.json"]  # no temp or lock file left behind
        assert path.stat().st_mode & 0o777 == 0o600

    @needs_proc_locks
    def test_a_revoke_during_an_add_stays_revoked(self, tmp_path):
        """An add reads the file; a revoke comes in; the add writes back what it read.
        Unlocked, that write put the revoked key back in force. Now the revoke waits for
        the add's lock and removes the key from the file the add wrote."""
        path = tmp_path / "keys.json"
        a_id, a = add_key(path, "lab-a")
        has_read, go_on, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        adding = SPAWN.Process(target=_add_key_pausing_after_its_read, args=(str(path), has_read, go_on, results))
        adding.start()
        try:
            assert has_read.wait(TIMEOUT_S), "the add never read the keys file"
            revoking = SPAWN.Process(target=_revoke, args=(str(path), a_id))
            revoking.start()
            # the revoke either waits for the add's lock, or (unlocked) has done its work
            _wait_until(lambda: not revoking.is_alive() or _waits_on_a_flock(revoking.pid),
                        "the revoke finished or waited for the keys file's lock")
        finally:
            go_on.set()
        b_id, b = results.get(timeout=TIMEOUT_S)
        adding.join(TIMEOUT_S)
        revoking.join(TIMEOUT_S)
        assert revoking.exitcode == 0

        store = KeyStore.load(path)
        assert store.verify(a) is None, "the revoked key is back in force"
        assert store.verify(b).tenant == "lab-b"
        assert [p.key_id for p in list_keys(path)] == [b_id]

    @needs_proc_locks
    def test_a_script_holding_the_lock_is_waited_for(self, tmp_path):
        """A script that edits the keys file by hand holds `keys_file_lock`; an add waits
        for it, then adds to the edited file rather than writing over the edit."""
        path = tmp_path / "keys.json"
        add_key(path, "lab-a")
        start, results = SPAWN.Barrier(1), SPAWN.Queue()  # held here until the child has them
        with keys_file_lock(path):
            adding = SPAWN.Process(target=_add_keys_at_once, args=(str(path), "lab-b", 1, start, results))
            adding.start()
            _wait_until(lambda: not adding.is_alive() or _waits_on_a_flock(adding.pid),
                        "the add finished or waited for the keys file's lock")
            assert [p.tenant for p in list_keys(path)] == ["lab-a"], "the add wrote while the lock was held"
            path.write_text(json.dumps({"keys": []}))  # the script's edit: lab-a's key removed
        tenant, (b_id,) = results.get(timeout=TIMEOUT_S)
        adding.join(TIMEOUT_S)
        assert [(p.key_id, p.tenant) for p in list_keys(path)] == [(b_id, "lab-b")]

    def test_a_keys_file_named_relative_to_the_working_folder(self, tmp_path, monkeypatch):
        """`grainflow serve keys add --keys keys.json`: the lock goes beside it there."""
        monkeypatch.chdir(tmp_path)
        key_id, key = add_key("keys.json", "lab-a")
        assert KeyStore.load(tmp_path / "keys.json").verify(key).tenant == "lab-a"
        assert revoke_key("keys.json", key_id).tenant == "lab-a"
        assert os.listdir(tmp_path) == ["keys.json"]
