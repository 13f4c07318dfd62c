"""The Internet checksum against a word-by-word reference and against dpkt."""

from __future__ import annotations

import random

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.wire.checksum import checksum, ones_complement_sum, pseudo_header_sum


def reference_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 section 4.1, literally: add 16-bit words, fold the carries."""
    if len(data) % 2:
        data += b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# Lengths around every switch in the implementation (single modulo, folded,
# chunked) and the sizes the stack meets (headers, MSS, 64 KB GSO).
BOUNDARY_LENGTHS = [
    *range(0, 9),
    19,
    20,
    40,
    799,
    800,
    801,
    1439,
    1440,
    1441,
    1460,
    2879,
    2880,
    2881,
    5761,
    11521,
    64000,
    65535,
]


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_sum_matches_reference(data: bytes, initial: int) -> None:
    assert ones_complement_sum(data, initial) == reference_sum(data, initial)


@given(st.binary(max_size=600), st.integers(0, 1 << 40))
def test_unfolded_initial_is_accepted(data: bytes, initial: int) -> None:
    folded = reference_sum(b"", initial)
    assert ones_complement_sum(data, initial) == reference_sum(data, folded)


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
@pytest.mark.parametrize("fill", ["random", "zeros", "ones"])
def test_boundary_lengths(length: int, fill: str) -> None:
    data = {
        "random": random.Random(length).randbytes(length),
        "zeros": bytes(length),
        "ones": b"\xff" * length,
    }[fill]
    expected = reference_sum(data)
    assert ones_complement_sum(data) == expected
    assert ones_complement_sum(memoryview(data)) == expected
    assert ones_complement_sum(bytearray(data)) == expected
    assert ones_complement_sum(data, 0xFFFF) == reference_sum(data, 0xFFFF)


def test_the_two_zeros() -> None:
    # +0 only for nothing at all; any non-zero data that cancels out is -0.
    assert ones_complement_sum(b"") == 0
    assert ones_complement_sum(bytes(100)) == 0
    assert ones_complement_sum(b"\xff\xff") == 0xFFFF
    assert ones_complement_sum(b"\x00\x01\xff\xfe") == 0xFFFF
    assert ones_complement_sum(b"", 0xFFFF) == 0xFFFF
    assert checksum(bytes(20)) == 0xFFFF
    assert checksum(b"\xff\xff") == 0


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    assert ones_complement_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2


@given(st.binary(max_size=2000))
def test_checksum_matches_dpkt(data: bytes) -> None:
    assert checksum(data) == dpkt.in_cksum(data)


@given(st.binary(max_size=400).map(lambda b: b + b"\0\0"))
def test_inserted_checksum_verifies(data: bytes) -> None:
    # Even offset for the field, as in every header.
    at = (len(data) - 2) & ~1
    zeroed = data[:at] + b"\0\0" + data[at + 2 :]
    value = checksum(zeroed)
    filled = zeroed[:at] + value.to_bytes(2, "big") + zeroed[at + 2 :]
    if any(zeroed):
        assert ones_complement_sum(filled) == 0xFFFF


@given(
    st.sampled_from([4, 16]).flatmap(
        lambda n: st.tuples(st.binary(min_size=n, max_size=n), st.binary(min_size=n, max_size=n))
    ),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
)
def test_pseudo_header_matches_layout(addrs: tuple[bytes, bytes], proto: int, length: int) -> None:
    src, dst = addrs
    if len(src) == 4:  # RFC 9293 3.1
        layout = src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    else:  # RFC 8200 8.1
        layout = src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])
    assert pseudo_header_sum(src, dst, proto, length) == reference_sum(layout)


def test_pseudo_header_large_v6_length() -> None:
    src, dst = bytes(16), bytes(15) + b"\x01"
    layout = src + dst + (70000).to_bytes(4, "big") + bytes([0, 0, 0, 6])
    assert pseudo_header_sum(src, dst, 6, 70000) == reference_sum(layout)
