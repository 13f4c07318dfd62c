"""Fragments on the wire: the IPv6 Fragment header, reading fragments,
finding the upper layer in a first fragment, rebuilding, and cutting output."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.reassembly import DST4, DST6, SRC4, SRC6, split
from stack.errors import BadPacket
from stack.fragments import FragmentStore
from stack.wire import ipv6
from stack.wire.fragment import (
    Ipv6FragmentHeader,
    emit_ipv6_fragment_header,
    fragment_packet,
    is_about_icmp_error,
    parse_fragment_untrusted,
    parse_ipv6_fragment_header_untrusted,
    reassembled_packet,
    upper_layer,
)
from stack.wire.ipv4 import IPv4Header, emit_ipv4_header
from stack.wire.packet import build_icmp_packet, build_udp_packet, parse_packet_untrusted

PAYLOAD = bytes(range(256)) * 8


@given(st.integers(0, 255), st.integers(0, 0x1FFF), st.booleans(), st.integers(0, 0xFFFF_FFFF))
def test_fragment_header_round_trips(nxt: int, blocks: int, more: bool, ident: int) -> None:
    header = Ipv6FragmentHeader(nxt, blocks * 8, more, ident)
    raw = emit_ipv6_fragment_header(header)
    assert len(raw) == 8
    assert parse_ipv6_fragment_header_untrusted(memoryview(raw)) == header


@pytest.mark.parametrize(
    "header",
    [
        Ipv6FragmentHeader(17, 3, False, 1),
        Ipv6FragmentHeader(17, 65536, False, 1),
        Ipv6FragmentHeader(256, 8, False, 1),
    ],
)
def test_fragment_header_emit_refuses_what_does_not_fit(header: Ipv6FragmentHeader) -> None:
    with pytest.raises(ValueError):
        emit_ipv6_fragment_header(header)


def test_fragment_header_truncated() -> None:
    with pytest.raises(BadPacket):
        parse_ipv6_fragment_header_untrusted(memoryview(bytes(7)))


def test_an_ipv4_fragment_parses() -> None:
    _, second, _ = split(build_udp_packet(SRC4, DST4, 1, 2, PAYLOAD), [1024, 1536], ident=77)
    frag = parse_fragment_untrusted(memoryview(second))
    assert (frag.version, frag.src, frag.dst, frag.proto, frag.ident) == (4, SRC4, DST4, 17, 77)
    assert (frag.offset, frag.more, len(frag.payload)) == (1024, True, 512)
    assert frag.head == second[:20]


def test_an_ipv6_fragment_after_destination_options_keeps_them_in_its_head() -> None:
    options = bytes((ipv6.FRAGMENT, 0)) + bytes(6)
    frag_hdr = emit_ipv6_fragment_header(Ipv6FragmentHeader(17, 8, False, 5))
    body = options + frag_hdr + b"12345678"
    head = bytes((0x60, 0, 0, 0)) + len(body).to_bytes(2, "big") + bytes((60, 64)) + SRC6 + DST6
    frag = parse_fragment_untrusted(memoryview(head + body))
    assert (frag.version, frag.proto, frag.ident, frag.offset, frag.more) == (6, 17, 5, 8, False)
    assert bytes(frag.payload) == b"12345678"
    # The Destination Options' Next Header now names UDP, not the Fragment header.
    assert frag.head == head + bytes((17,)) + options[1:]
    whole = reassembled_packet(6, frag.head, b"x" * 16)
    assert whole[4:6] == (8 + 16).to_bytes(2, "big")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "empty"),
        (bytes((0x50,)) + bytes(30), "version 5"),
        (bytes((0x45,)) + bytes(10), "short IPv4"),
        (bytes((0x60,)) + bytes(10), "short IPv6"),
    ],
)
def test_junk_is_refused(raw: bytes, why: str) -> None:
    with pytest.raises(BadPacket):
        parse_fragment_untrusted(memoryview(raw))


def _v4(flags: int, offset: int, payload: bytes, *, hlen_words: int = 5) -> bytes:
    header = IPv4Header(0, 20 + len(payload), 1, flags, offset, 64, 17, 0, SRC4, DST4)
    return emit_ipv4_header(header) + payload


def _v6(chain: bytes, nxt: int, payload_length: int | None = None) -> bytes:
    plen = len(chain) if payload_length is None else payload_length
    return bytes((0x60, 0, 0, 0)) + plen.to_bytes(2, "big") + bytes((nxt, 64)) + SRC6 + DST6 + chain


@pytest.mark.parametrize(
    "packet",
    [
        _v4(0, 0, b"x" * 16),  # no fragment at all
        _v4(1, 0, b"x" * 12),  # more to follow, not whole 8-octet blocks
        _v4(1, 0, b""),  # more to follow, nothing in it
        _v4(0, 0x1FFF, b"x" * 16),  # ends beyond 65,535 octets
        _v4(1, 0, b"x" * 16)[:30],  # total length beyond the buffer
        b"\x44" + _v4(1, 0, b"x" * 16)[1:],  # header length below 20
        _v6(b"", 17),  # no Fragment header
        _v6(b"", 17, payload_length=100),  # payload length beyond the buffer
        _v6(bytes((44, 0)) + bytes(6) + bytes((44, 0)), 0),  # Hop-by-Hop truncated chain
        _v6(bytes((0, 0)) + bytes(6), 60),  # Hop-by-Hop not first
        _v6(bytes((44,)), 60),  # Destination Options truncated
        _v6(bytes((44, 1)) + bytes(6), 60),  # Destination Options longer than the packet
        _v6(b"".join(bytes((60, 0)) + bytes(6) for _ in range(9)), 60),  # too many
        _v6(emit_ipv6_fragment_header(Ipv6FragmentHeader(17, 0, True, 1)) + b"x" * 4, 44),
    ],
)
def test_malformed_fragments_are_refused(packet: bytes) -> None:
    with pytest.raises(BadPacket):
        parse_fragment_untrusted(memoryview(packet))


def test_ipv4_header_checksum_is_verified_unless_told() -> None:
    raw = bytearray(_v4(1, 0, b"x" * 16))
    raw[8] ^= 1
    with pytest.raises(BadPacket, match="checksum"):
        parse_fragment_untrusted(memoryview(bytes(raw)))
    assert parse_fragment_untrusted(memoryview(bytes(raw)), verify_checksum=False).more


@pytest.mark.parametrize(
    ("version", "proto", "data", "found"),
    [
        (4, 6, bytes(19), None),
        (4, 6, bytes(12) + b"\x80" + bytes(7), None),  # data offset 32: options missing
        (4, 6, bytes(12) + b"\x50" + bytes(7), 6),
        (4, 17, bytes(7), None),
        (4, 17, bytes(8), 17),
        (4, 1, bytes(8), 1),
        (4, 50, b"", 50),  # a protocol whose header is unknown here
        (6, 58, bytes(8), 58),
        (6, 60, bytes((17, 0)) + bytes(6) + bytes(8), 17),
        (6, 60, bytes((17, 0)) + bytes(6) + bytes(7), None),
        (6, 60, bytes((17, 1)) + bytes(6), None),  # the options end beyond it
        (6, 60, bytes((17,)), None),
        (6, 43, bytes((44, 0)) + bytes(6), None),  # a second Fragment header
        (6, 0, bytes(8), None),  # Hop-by-Hop after the Fragment header
        (6, 60, b"".join(bytes((60, 0)) + bytes(6) for _ in range(9)), None),
    ],
)
def test_upper_layer_is_found_only_when_the_first_fragment_holds_it(
    version: int, proto: int, data: bytes, found: int | None
) -> None:
    result = upper_layer(version, proto, memoryview(data))
    assert (None if result is None else result[0]) == found


def test_is_about_icmp_error() -> None:
    assert is_about_icmp_error(4, 1, memoryview(bytes((3, 3))))
    assert not is_about_icmp_error(4, 1, memoryview(bytes((8, 0))))
    assert is_about_icmp_error(6, 58, memoryview(bytes((1, 4))))
    assert not is_about_icmp_error(6, 58, memoryview(bytes((128, 0))))
    assert not is_about_icmp_error(6, 17, memoryview(bytes((1, 4))))
    assert not is_about_icmp_error(4, 1, memoryview(b""))


def test_reassembled_packet_refuses_what_ip_cannot_carry() -> None:
    with pytest.raises(ValueError):
        reassembled_packet(4, bytes(20), bytes(65516))
    with pytest.raises(ValueError):
        reassembled_packet(6, bytes(40), bytes(65536))
    assert len(reassembled_packet(6, bytes(40), bytes(65535))) == 65575


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("mtu", [576, 1280, 1500, 9000])
def test_output_fragments_fit_the_mtu_and_reassemble_to_the_packet(v6: bool, mtu: int) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    packet = build_icmp_packet(src, dst, 129 if v6 else 0, 0, 0x10001, bytes(range(256)) * 80)
    fragments = fragment_packet(packet, mtu, ident=0x1_0002)
    assert len(fragments) > 1
    assert all(len(f) <= mtu for f in fragments)
    parsed = [parse_fragment_untrusted(memoryview(f)) for f in fragments]  # checksums verified
    assert [p.more for p in parsed] == [True] * (len(parsed) - 1) + [False]
    assert all(p.offset % 8 == 0 and p.ident == (0x1_0002 if v6 else 2) for p in parsed)
    if not v6:
        assert all(not f[6] & 0x40 for f in fragments)  # DF clear
    store = FragmentStore()
    wholes = [w for f in fragments if (w := store.receive(memoryview(f), 0.0)) is not None]
    assert len(wholes) == 1
    got = parse_packet_untrusted(memoryview(wholes[0]))
    assert bytes(got.payload) == bytes(range(256)) * 80


def test_output_fragmentation_refuses_a_tiny_mtu_or_junk() -> None:
    packet = build_udp_packet(SRC4, DST4, 1, 2, PAYLOAD)
    with pytest.raises(ValueError):
        fragment_packet(packet, 27, 1)
    with pytest.raises(ValueError):
        fragment_packet(build_udp_packet(SRC6, DST6, 1, 2, PAYLOAD), 55, 1)
    with pytest.raises(ValueError):
        fragment_packet(b"\x50" + bytes(40), 1500, 1)
