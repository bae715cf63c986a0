"""Dropout after a restart: an epoch's random draws depend on (seed, epoch, rank) alone.

The training loop seeds torch's global RNG with `epoch_seed` at the start of every
epoch, so a run resumed at epoch k from a checkpoint drops the same units in epoch k as
the run that was never interrupted (the shuffle, the augmentation and the learning rate
already follow the epoch and step).
"""

from __future__ import annotations

import torch

from engine.models import create_model
from engine.training.loop import epoch_seed


def _epoch_outputs(model, x, seed: int, epochs: range, rank: int = 0) -> list[torch.Tensor]:
    """The model's training-mode output on `x`, once per epoch, as the loop seeds them."""
    out = []
    for epoch in epochs:
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        out.append(model(x)["material"].detach().clone())
    return out


def test_a_resumed_epoch_drops_what_the_uninterrupted_run_dropped():
    torch.manual_seed(0)
    model = create_model("classifier", "resnet18").train()
    x = torch.rand(2, 1, 64, 64)
    uninterrupted = _epoch_outputs(model, x, seed=7, epochs=range(3))
    torch.rand(1000)  # a restarted worker: the global RNG anywhere else
    resumed = _epoch_outputs(model, x, seed=7, epochs=range(2, 3))
    assert torch.equal(resumed[0], uninterrupted[2])
    # dropout is on (resnet18's drop_rate 0.2): epochs and ranks draw apart
    assert not torch.equal(uninterrupted[1], uninterrupted[2])
    assert not torch.equal(_epoch_outputs(model, x, seed=7, epochs=range(2, 3), rank=1)[0], uninterrupted[2])
