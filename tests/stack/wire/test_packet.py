"""Whole packets: builders and parser together, checksums, ICMP errors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import BadPacket
from stack.wire.checksum import checksum, ones_complement_sum
from stack.wire.icmp import (
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REQUEST,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    UNREACH6_PORT,
    UNREACH_PORT,
    IcmpHeader,
)
from stack.wire.ipv4 import IPv4Header, emit_ipv4_header
from stack.wire.ipv6 import IPv6Header
from stack.wire.packet import (
    ICMP_ERROR_MAX_V4,
    ICMP_ERROR_MAX_V6,
    TCP_CSUM_OFFSET,
    UDP_CSUM_OFFSET,
    Packet,
    _parse_general,
    build_icmp_error,
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    may_send_icmp_error,
    parse_packet_untrusted,
    partial_checksum_offsets,
)
from stack.wire.tcp import ACK, PSH, SYN, TcpHeader, TcpOptions
from stack.wire.udp import UdpHeader
from tests.stack.wire.strategies import address_pairs, payloads, tcp_headers, u8, u16, u32

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
TS_ACK = TcpHeader(1234, 80, 1000, 2000, ACK | PSH, 500, options=TcpOptions(timestamp=(5, 6)))
ttls = st.integers(1, 255)


def parse(raw: bytes, verify: bool = True) -> Packet:
    return parse_packet_untrusted(memoryview(raw), verify_checksum=verify)


def checked_field(raw: bytes, at: int) -> int:
    return int.from_bytes(raw[at : at + 2], "big")


@given(address_pairs, tcp_headers(), payloads, ttls)
def test_tcp_round_trip(addrs: tuple[bytes, bytes], h: TcpHeader, data: bytes, ttl: int) -> None:
    src, dst = addrs
    raw = build_tcp_packet(src, dst, h, data, ttl=ttl)
    p = parse(raw)
    start = 20 if len(src) == 4 else 40
    assert p.l4 == h._replace(checksum=checked_field(raw, start + TCP_CSUM_OFFSET))
    assert (p.version, p.src, p.dst, p.proto, p.ttl) == (
        4 if len(src) == 4 else 6,
        src,
        dst,
        6,
        ttl,
    )
    assert bytes(p.payload) == data
    assert parse(raw + b"trailer") == p


@given(address_pairs, u16, u16, payloads, ttls)
def test_udp_round_trip(
    addrs: tuple[bytes, bytes], sp: int, dp: int, data: bytes, ttl: int
) -> None:
    src, dst = addrs
    raw = build_udp_packet(src, dst, sp, dp, data, ttl=ttl)
    p = parse(raw)
    start = 20 if len(src) == 4 else 40
    assert p.l4 == UdpHeader(sp, dp, 8 + len(data), checked_field(raw, start + UDP_CSUM_OFFSET))
    assert bytes(p.payload) == data
    assert (p.src, p.dst, p.proto, p.ttl) == (src, dst, 17, ttl)


@given(address_pairs, u8, u8, u32, payloads)
def test_icmp_round_trip(
    addrs: tuple[bytes, bytes], icmp_type: int, code: int, rest: int, data: bytes
) -> None:
    src, dst = addrs
    raw = build_icmp_packet(src, dst, icmp_type, code, rest, data)
    p = parse(raw)
    start = 20 if len(src) == 4 else 40
    assert p.l4 == IcmpHeader(icmp_type, code, checked_field(raw, start + 2), rest)
    assert p.proto == (1 if len(src) == 4 else 58)
    assert bytes(p.payload) == data


def complete_partial_checksum(raw: bytes) -> bytes:
    """Do what the kernel does for a NEEDS_CSUM packet (virtio-net)."""
    start, offset = partial_checksum_offsets(raw)
    value = checksum(raw[start:])  # the field already holds the pseudo sum
    at = start + offset
    return raw[:at] + value.to_bytes(2, "big") + raw[at + 2 :]


@given(address_pairs, tcp_headers(), payloads)
def test_partial_tcp_checksum_completes_to_full(
    addrs: tuple[bytes, bytes], h: TcpHeader, data: bytes
) -> None:
    partial = build_tcp_packet(*addrs, h, data, partial_checksum=True)
    assert parse(partial, verify=False).l4 is not None
    assert complete_partial_checksum(partial) == build_tcp_packet(*addrs, h, data)


@given(address_pairs, payloads)
def test_partial_udp_checksum_completes_to_full(addrs: tuple[bytes, bytes], data: bytes) -> None:
    partial = build_udp_packet(*addrs, 53, 5353, data, partial_checksum=True)
    full = build_udp_packet(*addrs, 53, 5353, data)
    completed = complete_partial_checksum(partial)
    # A sum of zero is sent as 0xFFFF by us; the device may leave 0 (over IPv4
    # that means "none"), so compare everything else.
    start, offset = partial_checksum_offsets(full)
    at = start + offset
    assert completed[:at] + completed[at + 2 :] == full[:at] + full[at + 2 :]
    parse(completed)


def test_partial_checksum_offsets_reject_other_packets() -> None:
    with pytest.raises(ValueError, match="protocol"):
        partial_checksum_offsets(build_icmp_packet(A4, B4, 8, 0, 0, b""))
    with pytest.raises(ValueError, match="not an IP"):
        partial_checksum_offsets(b"")


def test_udp_zero_checksum_sent_as_ffff() -> None:
    # Choose the payload word that makes the whole sum 0xFFFF (checksum 0).
    base = build_udp_packet(A4, B4, 1, 2, b"\0\0")
    fill = checked_field(base, 26)
    raw = build_udp_packet(A4, B4, 1, 2, fill.to_bytes(2, "big"))
    assert checked_field(raw, 26) == 0xFFFF
    assert bytes(parse(raw).payload) == fill.to_bytes(2, "big")


def test_udp_checksum_zero_means_none_over_ipv4_only() -> None:
    raw4 = bytearray(build_udp_packet(A4, B4, 1, 2, b"data"))
    raw4[26:28] = b"\0\0"
    assert parse(bytes(raw4)).l4 == UdpHeader(1, 2, 12, 0)
    raw6 = bytearray(build_udp_packet(A6, B6, 1, 2, b"data"))
    raw6[46:48] = b"\0\0"
    with pytest.raises(BadPacket, match="zero over IPv6"):
        parse(bytes(raw6), verify=False)


def test_udp_length_below_ip_payload_bounds_checksum() -> None:
    # Trailing bytes inside the IP payload but after the UDP length: ignored.
    raw = build_udp_packet(A4, B4, 1, 2, b"data")
    padded = IPv4Header(0, len(raw) + 4, 0, 2, 0, 64, 17, 0, A4, B4)
    packet = emit_ipv4_header(padded) + raw[20:] + b"pad!"
    assert bytes(parse(packet).payload) == b"data"


SAMPLES = {
    "tcp4": build_tcp_packet(A4, B4, TS_ACK, b"hello"),
    "tcp4-syn": build_tcp_packet(A4, B4, TcpHeader(1, 2, 3, 0, SYN, 9, options=TcpOptions(1460))),
    "tcp6": build_tcp_packet(A6, B6, TS_ACK, b"hello"),
    "udp4": build_udp_packet(A4, B4, 1, 2, b"hello"),
    "udp6": build_udp_packet(A6, B6, 1, 2, b"hello"),
    "icmp4": build_icmp_packet(A4, B4, 8, 0, 0x10001, b"hello"),
    "icmp6": build_icmp_packet(A6, B6, 128, 0, 0x10001, b"hello"),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_every_single_byte_corruption_is_caught(name: str) -> None:
    raw = SAMPLES[name]
    for at in range(len(raw)):
        for flip in (0x01, 0x80, 0xFF):
            if name.endswith("6") and (at in (1, 2, 3, 6, 7) or (at == 0 and flip == 0x01)):
                # No IPv6 checksum covers traffic class, flow label and hop
                # limit; another next header is just a protocol we skip.
                continue
            bad = bytearray(raw)
            bad[at] ^= flip
            if name == "udp4" and bad[26:28] == b"\0\0":
                continue  # "no checksum", legitimately accepted
            with pytest.raises(BadPacket):
                parse(bytes(bad))


@pytest.mark.parametrize("name", SAMPLES)
def test_every_truncation_is_bad(name: str) -> None:
    raw = SAMPLES[name]
    for n in range(len(raw)):
        with pytest.raises(BadPacket):
            parse(raw[:n], verify=False)


@pytest.mark.parametrize("name", [name for name in SAMPLES if name != "tcp4-syn"])
def test_unverified_parse_ignores_transport_checksum(name: str) -> None:
    raw = bytearray(SAMPLES[name])
    raw[-1] ^= 0xFF
    with pytest.raises(BadPacket, match="checksum"):
        parse(bytes(raw))
    assert bytes(parse(bytes(raw), verify=False).payload)[-1] == ord("o") ^ 0xFF


def test_unknown_protocols_have_no_l4() -> None:
    for src, dst, proto in ((A4, B4, 1), (A6, B6, 58)):
        # ICMPv6 over IPv4 and ICMPv4 over IPv6 are unknown protocols.
        other = 58 if proto == 1 else 1
        raw = bytearray(build_icmp_packet(src, dst, 8, 0, 0, b"x"))
        if len(src) == 4:
            header = IPv4Header(0, len(raw), 0, 2, 0, 64, other, 0, src, dst)
            raw[:20] = emit_ipv4_header(header)
        else:
            raw[6] = other
        p = parse(bytes(raw))
        assert p.l4 is None and p.proto == other and len(p.payload) == 9


def test_wrong_ip_version() -> None:
    for first in (0x00, 0x55, 0xF0):
        with pytest.raises(BadPacket, match="version"):
            parse(bytes([first]) + bytes(60))


@given(st.sampled_from([b"E\0", b"F\0", b"`\0", b""]), st.binary(max_size=120), st.booleans())
def test_arbitrary_bytes_raise_only_bad_packet(prefix: bytes, data: bytes, verify: bool) -> None:
    with contextlib.suppress(BadPacket):
        parse(prefix + data, verify)


@given(
    tcp_headers(),
    payloads,
    st.integers(0, 80),
    st.sampled_from([0x00, 0x01, 0x10, 0x45, 0xFF]),
    st.booleans(),
)
def test_fast_path_agrees_with_general_path(
    h: TcpHeader, data: bytes, at: int, value: int, verify: bool
) -> None:
    raw = bytearray(build_tcp_packet(A4, B4, h, data))
    if at < len(raw):
        raw[at] = value
    buf = memoryview(bytes(raw))
    try:
        expected: Packet | str = _parse_general(buf, len(buf), verify)
    except BadPacket as exc:
        expected = str(exc)
    try:
        got: Packet | str = parse_packet_untrusted(buf, verify_checksum=verify)
    except BadPacket as exc:
        got = str(exc)
    assert got == expected


def test_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="addresses"):
        build_tcp_packet(A4, B6, TS_ACK)
    with pytest.raises(ValueError, match="65535"):
        build_udp_packet(A4, B4, 1, 2, bytes(65528))
    with pytest.raises(ValueError, match="65535"):
        build_tcp_packet(A4, B4, TS_ACK, bytes(65500))
    with pytest.raises(ValueError, match="65535"):
        build_tcp_packet(A6, B6, TS_ACK, bytes(65504))
    assert len(build_tcp_packet(A6, B6, TS_ACK, bytes(65503))) == 40 + 65535


def test_builder_ignores_header_checksum_field() -> None:
    assert build_tcp_packet(A4, B4, TS_ACK._replace(checksum=0xBEEF)) == build_tcp_packet(
        A4, B4, TS_ACK
    )


@pytest.mark.parametrize("size", [28, 100, 576, 1500, 9000])
def test_icmp_error_v4(size: int) -> None:
    original = build_udp_packet(B4, A4, 5000, 53, bytes(size - 28))
    err = build_icmp_error(original, A4, ICMP_DEST_UNREACH, UNREACH_PORT)
    p = parse(err)
    assert (p.src, p.dst) == (A4, B4)
    assert p.l4 == IcmpHeader(ICMP_DEST_UNREACH, UNREACH_PORT, checked_field(err, 22), 0)
    assert len(err) == min(ICMP_ERROR_MAX_V4, 28 + size)
    assert bytes(p.payload) == original[: len(err) - 28]


@pytest.mark.parametrize("size", [72, 1280, 1500])
def test_icmp_error_v6(size: int) -> None:
    original = build_tcp_packet(B6, A6, TS_ACK, bytes(size - 72))
    err = build_icmp_error(original, A6, ICMP6_DEST_UNREACH, UNREACH6_PORT)
    p = parse(err)
    assert (p.src, p.dst, p.proto) == (A6, B6, 58)
    assert len(err) == min(ICMP_ERROR_MAX_V6, 48 + size)
    assert bytes(p.payload) == original[: len(err) - 48]


def test_icmp_error_rejects_garbage_and_family_mismatch() -> None:
    for junk in (b"", b"\x45" * 10, bytes(40), b"\x60" * 39):
        with pytest.raises(BadPacket):
            build_icmp_error(junk, A4, 3, 3)
    with pytest.raises(ValueError, match="family"):
        build_icmp_error(SAMPLES["udp4"], A6, 1, 4)


def test_may_send_icmp_error() -> None:
    assert may_send_icmp_error(parse(SAMPLES["udp4"]))
    assert may_send_icmp_error(parse(SAMPLES["tcp6"]))
    assert may_send_icmp_error(parse(build_icmp_packet(A4, B4, 8, 0, 0, b"")))
    assert may_send_icmp_error(parse(build_icmp_packet(A6, B6, ICMP6_ECHO_REQUEST, 0, 0, b"")))
    assert not may_send_icmp_error(parse(build_icmp_packet(A4, B4, 3, 1, 0, b"")))
    assert not may_send_icmp_error(parse(build_icmp_packet(A6, B6, 1, 0, 0, b"")))
    for src, dst in ((A4, bytes([224, 0, 0, 1])), (A4, b"\xff" * 4), (bytes(4), B4)):
        assert not may_send_icmp_error(parse(build_udp_packet(src, dst, 1, 2, b"")))
    for src, dst in ((A6, b"\xff\x02" + bytes(13) + b"\x01"), (bytes(16), B6)):
        assert not may_send_icmp_error(parse(build_udp_packet(src, dst, 1, 2, b"")))


def test_echo_reply_layout() -> None:
    raw = build_icmp_packet(A4, B4, ICMP_ECHO_REPLY, 0, 0x00070001, b"ping")
    assert raw[20:22] == b"\0\0" and raw[24:28] == b"\0\x07\0\x01"
    assert ones_complement_sum(raw[20:]) == 0xFFFF
    assert isinstance(parse(raw).ip, IPv4Header)
    assert isinstance(parse(build_icmp_packet(A6, B6, 129, 0, 0, b"")).ip, IPv6Header)
