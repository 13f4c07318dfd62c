"""UDP and ICMP headers: round trips, lengths, malformed input, helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import BadPacket
from stack.wire.icmp import (
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_SOLICIT,
    ICMP6_PACKET_TOO_BIG,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REQUEST,
    ICMP_TIME_EXCEEDED,
    IcmpHeader,
    echo_ident_seq,
    echo_rest,
    emit_icmp_header,
    is_icmp_error,
    parse_icmp_untrusted,
)
from stack.wire.udp import UdpHeader, emit_udp_header, parse_udp_untrusted
from tests.stack.wire.strategies import icmp_headers, u16


@given(u16, u16, u16, st.binary(max_size=64))
def test_udp_round_trip(sport: int, dport: int, csum: int, payload: bytes) -> None:
    h = UdpHeader(sport, dport, 8 + len(payload), csum)
    raw = emit_udp_header(h)
    parsed, body = parse_udp_untrusted(memoryview(raw + payload))
    assert parsed == h
    assert bytes(body) == payload
    assert emit_udp_header(parsed) == raw


def test_udp_length_bounds_payload() -> None:
    raw = emit_udp_header(UdpHeader(1, 2, 12, 0)) + b"abcd"
    for trailer in (b"", b"\0", b"trailing bytes"):
        _, body = parse_udp_untrusted(memoryview(raw + trailer))
        assert bytes(body) == b"abcd"
    for n in range(len(raw)):
        with pytest.raises(BadPacket):
            parse_udp_untrusted(memoryview(raw[:n]))


@pytest.mark.parametrize("length", [0, 7, 13, 0xFFFF])
def test_udp_bad_length(length: int) -> None:
    raw = emit_udp_header(UdpHeader(1, 2, length, 0)) + b"abcd"
    with pytest.raises(BadPacket, match="UDP length"):
        parse_udp_untrusted(memoryview(raw))


@given(st.binary(max_size=40))
def test_udp_arbitrary_bytes(data: bytes) -> None:
    try:
        h, body = parse_udp_untrusted(memoryview(data))
    except BadPacket:
        return
    assert len(body) == h.length - 8


@given(icmp_headers, st.binary(max_size=64))
def test_icmp_round_trip(h: IcmpHeader, payload: bytes) -> None:
    raw = emit_icmp_header(h)
    parsed, body = parse_icmp_untrusted(memoryview(raw + payload))
    assert parsed == h
    assert bytes(body) == payload
    assert emit_icmp_header(parsed) == raw


def test_icmp_truncated() -> None:
    raw = emit_icmp_header(IcmpHeader(8, 0, 0, 1))
    for n in range(len(raw)):
        with pytest.raises(BadPacket):
            parse_icmp_untrusted(memoryview(raw[:n]))


@given(u16, u16)
def test_echo_rest_round_trip(ident: int, seq: int) -> None:
    assert echo_ident_seq(echo_rest(ident, seq)) == (ident, seq)


def test_error_classification() -> None:
    assert is_icmp_error(4, ICMP_DEST_UNREACH)
    assert is_icmp_error(4, ICMP_TIME_EXCEEDED)
    assert not is_icmp_error(4, ICMP_ECHO_REQUEST)
    assert is_icmp_error(6, ICMP6_PACKET_TOO_BIG)
    assert not is_icmp_error(6, ICMP6_ECHO_REQUEST)
    assert not is_icmp_error(6, ICMP6_NEIGHBOR_SOLICIT)


@pytest.mark.parametrize(
    ("emit", "value"),
    [(emit_udp_header, UdpHeader(1 << 16, 2, 8, 0)), (emit_icmp_header, IcmpHeader(256, 0, 0))],
)
def test_emit_rejects_out_of_range(emit: object, value: object) -> None:
    with pytest.raises(ValueError, match="range"):
        emit(value)  # type: ignore[operator]
