"""Wrap-safe sequence arithmetic, checked against a reference on the circle."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stack.seq import (
    MASK,
    seq_add,
    seq_diff,
    seq_ge,
    seq_gt,
    seq_in_window,
    seq_le,
    seq_lt,
    seq_max,
    seq_min,
    unwrap,
    wrap,
)

u32 = st.integers(0, MASK)
offset = st.integers(-(2**31) + 1, 2**31 - 1)


def test_comparisons_across_the_wrap() -> None:
    assert seq_lt(0xFFFFFFFF, 0)
    assert seq_gt(0, 0xFFFFFFFF)
    assert seq_le(5, 5) and seq_ge(5, 5)
    assert not seq_lt(5, 5) and not seq_gt(5, 5)
    assert seq_add(0xFFFFFFFF, 2) == 1
    assert seq_add(1, -2) == 0xFFFFFFFF
    assert seq_diff(1, 0xFFFFFFFF) == 2
    assert seq_diff(0, 0x80000000) == -(2**31)  # half a circle reads as "behind"
    assert seq_max(0xFFFFFFF0, 3) == 3
    assert seq_min(0xFFFFFFF0, 3) == 0xFFFFFFF0
    assert seq_in_window(2, 0xFFFFFFFE, 5)
    assert not seq_in_window(3, 0xFFFFFFFE, 5)
    assert not seq_in_window(0xFFFFFFFD, 0xFFFFFFFE, 5)


@given(u32, offset)
def test_add_then_diff_round_trips(a: int, n: int) -> None:
    b = seq_add(a, n)
    assert seq_diff(b, a) == n
    assert seq_lt(a, b) == (n > 0)
    assert seq_gt(a, b) == (n < 0)
    assert seq_le(a, b) == (n >= 0)
    assert seq_ge(a, b) == (n <= 0)
    assert seq_max(a, b) == (b if n >= 0 else a)
    assert seq_min(a, b) == (a if n >= 0 else b)


@given(u32, st.integers(0, 2**40), offset)
def test_unwrap_recovers_positions_near_the_reference(base: int, ref: int, n: int) -> None:
    position = ref + n
    assert unwrap(wrap(position, base), ref, base) == position


@given(u32, st.integers(0, 2**31 - 1), st.integers(0, 2**32))
def test_in_window_matches_offsets(start: int, size: int, k: int) -> None:
    assert seq_in_window(seq_add(start, k), start, size) == ((k & MASK) < size)
