"""Wrap-safe 32-bit TCP sequence number arithmetic (RFC 9293 section 3.4).

Sequence numbers live on a circle of 2**32 values, so `a < b` means "b is
less than half the circle ahead of a", never a plain integer comparison.
Everything that compares or subtracts wire sequence numbers goes through
here, so the wrap-around rule is written once.

The TCP state machine itself keeps *unwrapped* positions (plain Python
ints counted from the initial sequence number, which never wrap) and uses
`unwrap` to place a wire value next to a known reference. That keeps the
hot path free of modular arithmetic while staying correct across the wrap.
"""

from __future__ import annotations

MASK = 0xFFFFFFFF
_HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    """Return `a + n` on the 32-bit sequence circle (n may be negative)."""
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """Return the signed distance from `b` to `a`, in [-2**31, 2**31).

    Positive when `a` is ahead of `b`. Exactly half a circle apart is
    ambiguous; it is reported as negative (a is "behind").
    """
    return ((a - b + _HALF) & MASK) - _HALF


def seq_lt(a: int, b: int) -> bool:
    """Return True if `a` comes strictly before `b`."""
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    """Return True if `a` comes before `b` or equals it."""
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    """Return True if `a` comes strictly after `b`."""
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    """Return True if `a` comes after `b` or equals it."""
    return seq_diff(a, b) >= 0


def seq_max(a: int, b: int) -> int:
    """Return whichever of `a` and `b` is later on the circle."""
    return a if seq_diff(a, b) >= 0 else b


def seq_min(a: int, b: int) -> int:
    """Return whichever of `a` and `b` is earlier on the circle."""
    return a if seq_diff(a, b) <= 0 else b


def seq_in_window(x: int, start: int, size: int) -> bool:
    """Return True if `x` lies in `[start, start + size)` on the circle.

    Args:
        x: the sequence number to test.
        start: the left edge of the window.
        size: the window length in octets, 0 <= size < 2**31.
    """
    return ((x - start) & MASK) < size


def unwrap(wire: int, reference: int, base: int) -> int:
    """Turn a 32-bit wire value into an unwrapped position near `reference`.

    Positions are plain ints counted from `base` (an initial sequence
    number); `reference` is a position known to be within 2**31 of the
    value on the wire (rcv_nxt for incoming sequence numbers, snd_una for
    acknowledgements).

    Args:
        wire: the 32-bit value from a header.
        reference: an unwrapped position close to the answer.
        base: the 32-bit initial sequence number that position 0 maps to.

    Returns:
        The unwrapped position p with (base + p) mod 2**32 == wire that is
        closest to `reference` (may be negative for a far-behind value).
    """
    return reference + seq_diff(wire, (base + reference) & MASK)


def wrap(position: int, base: int) -> int:
    """Return the 32-bit wire value of an unwrapped position."""
    return (base + position) & MASK
