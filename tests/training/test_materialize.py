"""Cached training datasets read back to back: no spurious "will hang" warning.

Ray Data warns that a dataset "will hang unless more CPUs are freed up" when it starts
while the cluster's resource view shows no CPU free. Right after the training set's
read, which can hold every slot, the view still counts them for up to a report period,
so the validation set's read used to start under that warning, which `make demo`
printed. `engine.training.trainer._materialize` waits (up to a second) for a slot to
show free; here the slots are held a little longer, by an actor, to be sure.
"""

from __future__ import annotations

import threading

from ray.util.debug import reset_log_once

from engine.training.trainer import _materialize, wait_for_free_cpu


def test_a_cached_read_waits_for_the_slots_earlier_work_held_instead_of_warning(ray_session, capfd):
    reset_log_once("cpu_warning")  # Ray warns once per process
    # every CPU slot held, as the training set's read holds them until just before the
    # validation set's starts; freed 0.3 s later (the view's lag, stretched to be sure)
    free = ray_session.available_resources().get("CPU", 0)  # the session's Ray: other tests' leftovers
    holder = ray_session.remote(num_cpus=free)(_Holder).remote()
    ray_session.get(holder.ready.remote(), timeout=60)
    threading.Timer(0.3, ray_session.kill, args=(holder,)).start()
    cached = _materialize({"validation": ray_session.data.range(8, override_num_blocks=2)})
    assert sorted(r["id"] for r in cached["validation"].take_all()) == list(range(8))
    # Ray's own handler writes the warning to the driver's stderr (its logging config
    # replaces handlers a test would add)
    assert "will hang" not in capfd.readouterr().err


class _Holder:
    def ready(self) -> bool:
        return True


def test_the_wait_needs_a_free_slot_in_several_polls_in_a_row():
    views = iter([1, 0, 2, 1, 1, 0, 0])  # a slot seen, taken back, then seen three times
    seen = []

    def free_cpus():
        seen.append(next(views))
        return seen[-1]

    assert wait_for_free_cpu(free_cpus, polls=3, interval_s=0, timeout_s=10)
    assert seen == [1, 0, 2, 1, 1]  # not after the first poll that saw one


def test_the_wait_gives_up_after_its_timeout_and_says_so():
    assert not wait_for_free_cpu(lambda: 0, polls=3, interval_s=0.01, timeout_s=0.05)
