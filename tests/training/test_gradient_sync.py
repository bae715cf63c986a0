"""gradient_sync="allreduce": `_average_gradients` in a real 2-process gloo group.

The small SAM's Ray Train run (test_families.py) cannot tell averaged gradients from
unsynchronised ones; here each rank's gradients are known, so the mean is checked.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from engine.local_head import free_port
from engine.training.loop import _average_gradients


def _model() -> torch.nn.Module:
    """Four parameters: `a` with a gradient on both ranks, `b` only on rank 1, `c` on
    neither, `frozen` not trained."""
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.zeros(2, 3))
    m.b = torch.nn.Parameter(torch.zeros(4))
    m.c = torch.nn.Parameter(torch.zeros(5))
    m.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    return m


def _grads(rank: int) -> dict[str, torch.Tensor | None]:
    r = float(rank + 1)
    return {"a": torch.arange(6.0).view(2, 3) * r, "b": torch.full((4,), 8.0) if rank == 1 else None,
            "c": None, "frozen": None}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = _model()
        for name, g in _grads(rank).items():
            getattr(m, name).grad = g
        _average_gradients(m)
        torch.save({n: p.grad for n, p in m.named_parameters()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class TestAverageGradients:
    def test_two_ranks_end_with_the_mean(self, tmp_path):
        mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
        want = {"a": torch.arange(6.0).view(2, 3) * 1.5,  # (1x + 2x) / 2
                "b": torch.full((4,), 4.0),  # rank 0 had none: counts as zero
                "c": torch.zeros(5)}  # no rank had one: zeros, not None
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt")
            assert got["frozen"] is None, f"rank {rank}: a parameter not trained got a gradient"
            for name, value in want.items():
                torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=f"rank {rank}, {name}")

    def test_without_a_process_group_gradients_are_left_alone(self):
        m = _model()
        for name, g in _grads(1).items():
            getattr(m, name).grad = g
        _average_gradients(m)
        torch.testing.assert_close(m.a.grad, torch.arange(6.0).view(2, 3) * 2)
        torch.testing.assert_close(m.b.grad, torch.full((4,), 8.0))
        assert m.c.grad is None
