"""IPv4 header: round trips, checksum, fragments, lengths, malformed input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import BadPacket
from stack.wire.checksum import ones_complement_sum
from stack.wire.ipv4 import (
    FLAG_DF,
    FLAG_MF,
    IPv4Header,
    emit_ipv4_header,
    is_fragment_error,
    parse_ipv4_untrusted,
)
from tests.stack.wire.strategies import ipv4_headers

SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def header(**changes: Any) -> IPv4Header:
    base = IPv4Header(0, 28, 7, FLAG_DF, 0, 64, 17, 0, SRC, DST)
    return base._replace(**changes)


def packet(h: IPv4Header, payload: bytes = b"") -> bytes:
    return emit_ipv4_header(h._replace(total_length=20 + len(h.options) + len(payload))) + payload


@given(st.data(), st.binary(max_size=64))
def test_round_trip(data: st.DataObject, payload: bytes) -> None:
    h = data.draw(ipv4_headers(payload_len=len(payload)))
    raw = emit_ipv4_header(h)
    assert ones_complement_sum(raw) == 0xFFFF
    parsed, body = parse_ipv4_untrusted(memoryview(raw + payload))
    assert parsed == h._replace(checksum=int.from_bytes(raw[10:12], "big"))
    assert bytes(body) == payload
    assert emit_ipv4_header(parsed) == raw


def test_total_length_honoured_and_trailing_ignored() -> None:
    raw = packet(header(), b"12345678")
    for trailer in (b"", b"\0", b"padding!" * 10):
        h, body = parse_ipv4_untrusted(memoryview(raw + trailer))
        assert bytes(body) == b"12345678"
        assert h.total_length == 28


def test_every_truncation_is_bad() -> None:
    raw = packet(header(options=b"\x01\x01\x01\x00"), b"12345678")
    for n in range(len(raw)):
        with pytest.raises(BadPacket):
            parse_ipv4_untrusted(memoryview(raw[:n]))


def test_options_kept_and_skipped() -> None:
    opts = b"\x94\x04\x00\x00"  # Router Alert (RFC 2113)
    h, body = parse_ipv4_untrusted(memoryview(packet(header(options=opts), b"data")))
    assert h.options == opts
    assert bytes(body) == b"data"


@pytest.mark.parametrize(
    ("flags", "offset"), [(FLAG_MF, 0), (0, 1), (FLAG_MF | FLAG_DF, 100), (0, 0x1FFF)]
)
def test_fragments_are_refused_and_recognisable(flags: int, offset: int) -> None:
    raw = packet(header(flags=flags, frag_offset=offset), b"12345678")
    with pytest.raises(BadPacket) as info:
        parse_ipv4_untrusted(memoryview(raw))
    assert is_fragment_error(info.value)


def test_df_and_reserved_bits_are_not_fragments() -> None:
    for flags in (0, FLAG_DF, 0b100, 0b110):
        h, _ = parse_ipv4_untrusted(memoryview(packet(header(flags=flags), b"12345678")))
        assert h.flags == flags


def test_bad_checksum() -> None:
    raw = bytearray(packet(header(), b"12345678"))
    raw[10] ^= 0x01
    with pytest.raises(BadPacket, match="checksum") as info:
        parse_ipv4_untrusted(memoryview(bytes(raw)))
    assert not is_fragment_error(info.value)


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, 0x65, "version"),
        (0, 0x44, "header length"),
        (0, 0x4F, "total length"),  # 60-byte header in a 28-byte packet
        (3, 19, "total length"),  # total length below the header
        (3, 200, "total length"),  # beyond the buffer
    ],
)
def test_malformed_fields(offset: int, value: int, reason: str) -> None:
    raw = bytearray(packet(header(), b"12345678"))
    raw[offset] = value
    with pytest.raises(BadPacket, match=reason):
        parse_ipv4_untrusted(memoryview(bytes(raw)))


@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_bad_packet(data: bytes) -> None:
    try:
        h, body = parse_ipv4_untrusted(memoryview(data))
    except BadPacket:
        return
    assert len(body) == h.total_length - 20 - len(h.options)


@pytest.mark.parametrize(
    "changes",
    [
        {"options": b"\x01"},
        {"options": bytes(44)},
        {"src": b"\0\0\0"},
        {"dst": bytes(16)},
        {"flags": 8},
        {"frag_offset": 0x2000},
        {"ttl": 256},
        {"total_length": -1},
    ],
)
def test_emit_rejects_out_of_range(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="IPv4"):
        emit_ipv4_header(header(**changes))


def test_checksum_check_can_be_waived_for_trusted_sources() -> None:
    raw = bytearray(packet(header(), b"12345678"))
    raw[10] ^= 0x01
    h, body = parse_ipv4_untrusted(memoryview(bytes(raw)), verify_checksum=False)
    assert h.checksum == int.from_bytes(raw[10:12], "big") and bytes(body) == b"12345678"
