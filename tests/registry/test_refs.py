"""Ref parsing: `name`, `name@alias`, `name/version`; everything else a clear error."""

from __future__ import annotations

import pytest

from engine.errors import GrainflowError
from engine.registry import ModelRef, RegistryError, parse_ref


class TestParseRef:
    @pytest.mark.parametrize(
        ("ref", "expected"),
        [
            ("yolo-defects", ModelRef("yolo-defects", alias="production")),
            ("yolo-defects@canary", ModelRef("yolo-defects", alias="canary")),
            ("sam.tiny_v2/12", ModelRef("sam.tiny_v2", version=12)),
            ("A1@prod_2", ModelRef("A1", alias="prod_2")),
        ],
    )
    def test_valid(self, ref, expected):
        assert parse_ref(ref) == expected
        assert str(parse_ref(ref)) == (ref if ("@" in ref or "/" in ref) else f"{ref}@production")

    @pytest.mark.parametrize(
        ("ref", "reason"),
        [
            ("a@", "empty alias"),
            ("/3", "empty model name"),
            ("@production", "empty model name"),
            ("x/notanumber", "not a positive integer"),
            ("x/0", "not a positive integer"),
            ("x/-1", "not a positive integer"),
            ("x/ 3", "not a positive integer"),
            ("x/", "not a positive integer"),
            ("x/3/4", "not a positive integer"),
            ("a@b@c", "more than one '@'"),
            ("a/1@canary", "not both"),
            ("", "empty model name"),
            ("bad name", "bad model name"),
            ("../etc", "bad model name"),
            ("m@latest", "reserved"),
            ("m@v2", "reserved"),
            ("m@has space", "bad alias"),
        ],
    )
    def test_malformed_names_the_ref(self, ref, reason):
        with pytest.raises(RegistryError) as info:
            parse_ref(ref)
        assert repr(ref) in str(info.value)
        assert reason in str(info.value)
        assert isinstance(info.value, GrainflowError)

    def test_not_a_string(self):
        with pytest.raises(RegistryError, match="not a string"):
            parse_ref(3)  # type: ignore[arg-type]
