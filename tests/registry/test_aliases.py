"""The alias history behind rollback, as pure functions."""

from __future__ import annotations

from engine.registry import aliases


class TestAliasHistory:
    def test_moves_append_and_skip_repeats(self):
        h = aliases.moved([], None, 1)
        h = aliases.moved(h, 1, 2)
        h = aliases.moved(h, 2, 2)
        assert h == [1, 2]

    def test_move_made_outside_grainflow_is_kept(self):
        # production was set to 3 by hand in MLflow's UI; history knew only [1, 2]
        assert aliases.moved([1, 2], 3, 4) == [1, 2, 3, 4]

    def test_popped_targets_previous(self):
        assert aliases.popped([1, 2, 3], 3) == [1, 2]
        assert aliases.popped([1, 2], 3) == [1, 2]  # current 3 set outside: back to 2
        assert aliases.popped([2], 2) == []

    def test_encode_decode_round_trip_and_bound(self):
        history = list(range(1, 500))
        decoded = aliases.decode(aliases.encode(history))
        assert decoded == history[-aliases.MAX_ENTRIES:]

    def test_unreadable_tag_is_empty_history(self):
        assert aliases.decode(None) == []
        assert aliases.decode("not json") == []
        assert aliases.decode('{"a": 1}') == []
        assert aliases.decode('[1, "2", true, 3]') == [1, 3]
