"""Hints for a time written in the wrong unit, for the one-line config errors.

The configuration takes times in seconds (group `tolerance` in milliseconds).
Clash/mihomo write a health check's timeout in milliseconds and sing-box
writes durations as strings ("3m", "50ms"); carried over as they are, such
values fall outside the range or are not numbers, and the line that refuses
one says what to write instead when a rewrite in the other unit fits the
range. Nothing here accepts a value: a guess would be silent.
"""

from __future__ import annotations

import math
import re

__all__ = ["milliseconds_hint", "seconds_hint", "seconds_out_of_range"]

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: str) -> float | None:
    """Seconds in a sing-box style duration ("300ms", "5s", "3m", "1h"), or None."""
    match = _DURATION.fullmatch(value)
    return None if match is None else float(match[1]) * _SECONDS[match[2]]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def seconds_hint(value: object, low: float, high: float) -> str:
    """' (write 180)' for "3m", ' (if that is milliseconds, write 5)' for 5000, else ''.

    Args:
        value: What the file or flag held, where seconds from `low` to `high` are meant.
    """
    if isinstance(value, str):
        seconds = _duration(value)
        if seconds is not None and low <= seconds <= high:
            return f" (write {seconds:g})"
        return ""
    number = _number(value)
    if number is not None and number > high and low <= number / 1000 <= high:
        return f" (if that is milliseconds, write {number / 1000:g})"
    return ""


def seconds_out_of_range(field: str, value: float, low: float, high: float) -> str | None:
    """The one-line refusal of `value` seconds for `field`, or None when it is in range.

    `not low <= value <= high` refuses NaN too, which trio refuses as a
    time-out wherever it is used.
    """
    if low <= value <= high:
        return None
    return f"{field}: {low:g} to {high:g} seconds, got {value:g}" + seconds_hint(value, low, high)


def milliseconds_hint(value: object, low: int, high: int) -> str:
    """' (write 50)' for "50ms", ' (if that is seconds, write 50)' for 0.05, else ''.

    Args:
        value: What the file held, where whole milliseconds from `low` to `high` are meant.
    """
    if isinstance(value, str):
        seconds = _duration(value)
        if seconds is None:
            return ""
        millis = seconds * 1000
        prefix = " (write"
    else:
        number = _number(value)
        if number is None or number == int(number):
            return ""  # a whole number out of range: no other unit makes it whole and in range
        millis = number * 1000
        prefix = " (if that is seconds, write"
    whole = round(millis)
    if abs(millis - whole) < 1e-6 and low <= whole <= high:
        return f"{prefix} {whole})"
    return ""
