"""The unit hints of the config errors: what they suggest is accepted, and means the same time."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from outbounds.units import milliseconds_hint, seconds_hint

LOW, HIGH = 0.1, 60.0  # a group's timeout, seconds


def _suggested(hint: str) -> float:
    match = re.search(r"write (\S+)\)$", hint)
    assert match is not None, hint
    return float(match[1])


@given(st.one_of(st.integers(-(10**9), 10**9), st.floats(allow_nan=True, allow_infinity=True)))
def test_a_seconds_hint_fits_the_range_and_is_the_value_in_milliseconds(value: float) -> None:
    hint = seconds_hint(value, LOW, HIGH)
    if LOW <= value <= HIGH:
        assert hint == ""  # nothing to fix
    if hint:
        suggested = _suggested(hint)
        assert LOW <= suggested <= HIGH
        assert abs(suggested * 1000 - value) <= 1e-6 * abs(value)


@given(st.integers(0, 10**7), st.sampled_from(["ms", "s", "m", "h"]))
def test_a_duration_string_is_hinted_in_seconds_when_it_fits(amount: int, unit: str) -> None:
    seconds = amount * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    hint = seconds_hint(f"{amount}{unit}", LOW, HIGH)
    assert bool(hint) == (LOW <= seconds <= HIGH)
    if hint:
        assert abs(_suggested(hint) - seconds) <= 1e-4 * seconds


@given(st.floats(0, 100, allow_nan=False))
def test_a_milliseconds_hint_is_whole_and_in_range(value: float) -> None:
    hint = milliseconds_hint(value, 0, 60000)
    if hint:
        suggested = _suggested(hint)
        assert suggested == int(suggested)
        assert 0 <= suggested <= 60000
        assert abs(suggested - value * 1000) < 1e-6


def test_examples() -> None:
    assert seconds_hint(5000, LOW, HIGH) == " (if that is milliseconds, write 5)"
    assert seconds_hint(10**9, LOW, HIGH) == ""  # no unit makes it fit
    assert seconds_hint("3m", 1, 86400) == " (write 180)"
    assert seconds_hint("soon", 1, 86400) == ""
    assert milliseconds_hint(0.05, 0, 60000) == " (if that is seconds, write 50)"
    assert milliseconds_hint("1.5s", 0, 60000) == " (write 1500)"
    assert milliseconds_hint(100000, 0, 60000) == ""
