"""IPv6 header and the extension-header walk."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import BadPacket
from stack.wire.ipv4 import is_fragment_error
from stack.wire.ipv6 import (
    DEST_OPTIONS,
    FRAGMENT,
    HOP_BY_HOP,
    MAX_EXTENSION_HEADERS,
    NO_NEXT_HEADER,
    ROUTING,
    IPv6Header,
    emit_ipv6_header,
    parse_ipv6_untrusted,
)
from tests.stack.wire.strategies import ipv6_headers

SRC = bytes.fromhex("fd000000000000000000000000000001")
DST = bytes.fromhex("fd000000000000000000000000000002")
UDP = 17


def ext(next_header: int, units: int = 0) -> bytes:
    """An extension header of (units + 1) * 8 bytes: PadN-filled options."""
    pad = 4 + 8 * units  # one PadN option (RFC 8200 4.2) fills the header
    return bytes([next_header, units, 1, pad]) + bytes(pad)


def packet(first: int, chain: bytes, upper: bytes = b"12345678", trailer: bytes = b"") -> bytes:
    h = IPv6Header(0, 0, len(chain) + len(upper), first, 64, SRC, DST)
    return emit_ipv6_header(h) + chain + upper + trailer


@given(st.data(), st.binary(max_size=64))
def test_round_trip(data: st.DataObject, payload: bytes) -> None:
    h = data.draw(ipv6_headers(payload_len=len(payload)))
    raw = emit_ipv6_header(h)
    parsed, body = parse_ipv6_untrusted(memoryview(raw + payload))
    assert parsed == h
    assert bytes(body) == payload
    assert emit_ipv6_header(parsed) == raw


def test_payload_length_honoured_and_trailing_ignored() -> None:
    for trailer in (b"", b"\0", b"x" * 50):
        h, body = parse_ipv6_untrusted(memoryview(packet(UDP, b"", trailer=trailer)))
        assert bytes(body) == b"12345678"
        assert h.payload_length == 8


def test_every_truncation_is_bad() -> None:
    raw = packet(HOP_BY_HOP, ext(UDP))
    for n in range(len(raw)):
        with pytest.raises(BadPacket):
            parse_ipv6_untrusted(memoryview(raw[:n]))


@pytest.mark.parametrize(
    "chain",
    [
        [HOP_BY_HOP],
        [ROUTING],
        [DEST_OPTIONS],
        [HOP_BY_HOP, DEST_OPTIONS, ROUTING, DEST_OPTIONS],
    ],
)
def test_walk_reaches_upper_layer(chain: list[int]) -> None:
    nexts = [*chain[1:], UDP]
    raw_chain = b"".join(ext(n, units=i % 2) for i, n in enumerate(nexts))
    h, body = parse_ipv6_untrusted(memoryview(packet(chain[0], raw_chain)))
    assert h.next_header == UDP
    assert h.payload_length == len(raw_chain) + 8
    assert bytes(body) == b"12345678"


def test_no_next_header_and_unknown_stop_the_walk() -> None:
    h, body = parse_ipv6_untrusted(memoryview(packet(DEST_OPTIONS, ext(NO_NEXT_HEADER))))
    assert h.next_header == NO_NEXT_HEADER
    assert bytes(body) == b"12345678"
    h, _ = parse_ipv6_untrusted(memoryview(packet(50, b"")))  # ESP: opaque
    assert h.next_header == 50


@pytest.mark.parametrize(
    ("first", "chain"),
    [(FRAGMENT, bytes([UDP, 0, 0, 0, 0, 0, 0, 1])), (HOP_BY_HOP, ext(FRAGMENT))],
)
def test_fragment_header_is_refused_and_recognisable(first: int, chain: bytes) -> None:
    with pytest.raises(BadPacket) as info:
        parse_ipv6_untrusted(memoryview(packet(first, chain)))
    assert is_fragment_error(info.value)


def test_hop_by_hop_must_come_first() -> None:
    with pytest.raises(BadPacket, match="Hop-by-Hop"):
        parse_ipv6_untrusted(memoryview(packet(DEST_OPTIONS, ext(HOP_BY_HOP) + ext(UDP))))


def test_walk_is_bounded() -> None:
    chain = b"".join(ext(DEST_OPTIONS) for _ in range(MAX_EXTENSION_HEADERS)) + ext(UDP)
    with pytest.raises(BadPacket, match="extension headers"):
        parse_ipv6_untrusted(memoryview(packet(DEST_OPTIONS, chain)))
    ok = b"".join(ext(DEST_OPTIONS) for _ in range(MAX_EXTENSION_HEADERS - 1)) + ext(UDP)
    assert parse_ipv6_untrusted(memoryview(packet(DEST_OPTIONS, ok)))[0].next_header == UDP


def test_extension_header_beyond_payload_length() -> None:
    # The header claims 16 bytes; the payload length leaves room for 8.
    raw = bytearray(packet(DEST_OPTIONS, ext(UDP), upper=b""))
    raw[41] = 1
    with pytest.raises(BadPacket, match="beyond payload"):
        parse_ipv6_untrusted(memoryview(bytes(raw) + bytes(16)))


@pytest.mark.parametrize(("offset", "value"), [(0, 0x40), (0, 0x00), (5, 200)])
def test_malformed_fixed_header(offset: int, value: int) -> None:
    raw = bytearray(packet(UDP, b""))
    raw[offset] = value
    with pytest.raises(BadPacket):
        parse_ipv6_untrusted(memoryview(bytes(raw)))


@given(st.binary(min_size=40, max_size=120), st.sampled_from([0, 43, 44, 60, 6, 17, 58]))
def test_arbitrary_bytes_raise_only_bad_packet(data: bytes, first: int) -> None:
    raw = bytes([0x60]) + data[1:6] + bytes([first]) + data[7:]
    try:
        h, body = parse_ipv6_untrusted(memoryview(raw))
    except BadPacket:
        return
    assert len(body) <= h.payload_length


@pytest.mark.parametrize(
    "changes",
    [
        {"src": bytes(4)},
        {"traffic_class": 256},
        {"flow_label": 1 << 20},
        {"payload_length": 1 << 16},
        {"hop_limit": -1},
    ],
)
def test_emit_rejects_out_of_range(changes: dict[str, Any]) -> None:
    h = IPv6Header(0, 0, 0, UDP, 64, SRC, DST)._replace(**changes)
    with pytest.raises(ValueError, match="IPv6"):
        emit_ipv6_header(h)
