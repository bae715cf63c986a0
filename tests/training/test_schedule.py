"""The learning-rate schedules: shape of the curve, and that it depends on the step alone."""

from __future__ import annotations

import pytest

from engine.training.schedule import FINAL_RATIO, learning_rate, steps_per_epoch, warmup_steps


def test_constant_is_the_base_rate_at_every_step():
    assert {learning_rate("constant", 2e-3, s, 100) for s in range(100)} == {2e-3}


def test_cosine_warms_up_peaks_at_the_base_rate_and_decays_to_its_floor():
    base, total = 1e-3, 200
    curve = [learning_rate("cosine", base, s, total) for s in range(total)]
    warm = warmup_steps(total)
    assert warm == 10
    assert curve[0] == pytest.approx(base / (warm + 1))
    assert all(a < b for a, b in zip(curve[:warm + 1], curve[1:warm + 1]))  # rising up to the peak
    assert curve[warm - 1] == pytest.approx(base * warm / (warm + 1)) and curve[warm] == pytest.approx(base)
    assert all(a >= b for a, b in zip(curve[warm:], curve[warm + 1:]))  # never rising after it
    assert curve[-1] == pytest.approx(FINAL_RATIO * base)
    assert curve[warm + (total - warm) // 2] == pytest.approx(base * (1 + FINAL_RATIO) / 2, rel=0.02)
    # a worker that gets a step more than planned keeps the floor, never starts over
    assert learning_rate("cosine", base, total + 5, total) == pytest.approx(FINAL_RATIO * base)


def test_a_one_step_run_trains_at_the_base_rate():
    assert learning_rate("cosine", 1e-3, 0, 1) == 1e-3


def test_a_short_run_still_warms_up_and_decays():
    assert [round(learning_rate("cosine", 1.0, s, 3), 6) for s in range(3)] == [0.5, 1.0, FINAL_RATIO]


def test_unknown_schedule_named_with_the_valid_ones():
    with pytest.raises(ValueError, match="'linear'.*constant, cosine"):
        learning_rate("linear", 1e-3, 0, 10)


@pytest.mark.parametrize("samples, workers, batch, expected", [(38, 2, 8, 3), (32, 2, 16, 1), (33, 2, 16, 1),
                                                                (1, 2, 8, 1), (256, 2, 16, 8)])
def test_steps_per_epoch_follows_ray_trains_equal_split(samples, workers, batch, expected):
    assert steps_per_epoch(samples, workers, batch) == expected
