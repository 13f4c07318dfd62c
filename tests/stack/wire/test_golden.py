"""Golden packets written by the Linux kernel (see tests/data/capture_golden.py).

Each file is parsed with checksums verified, compared field by field with
dpkt, checked against what the kernel is known to send, and rebuilt with our
builders: the transport bytes must come out identical, checksum included,
which shows the emitters produce exactly what a real stack produces.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.wire.icmp import (
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REQUEST,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REQUEST,
    UNREACH6_PORT,
    UNREACH_PORT,
    IcmpHeader,
)
from stack.wire.ipv4 import FLAG_DF, IPv4Header, emit_ipv4_header
from stack.wire.ipv6 import IPv6Header, emit_ipv6_header
from stack.wire.packet import (
    Packet,
    build_icmp_error,
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    parse_packet_untrusted,
)
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpHeader
from stack.wire.udp import UdpHeader
from tests.support.wire import assert_same

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "golden"
FILES = sorted(p.name for p in GOLDEN.glob("*.bin"))
OUR4, PEER4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
OUR6 = bytes.fromhex("fd00" + "00" * 13 + "01")
PEER6 = bytes.fromhex("fd00" + "00" * 13 + "02")


def load(name: str) -> tuple[bytes, Packet]:
    raw = (GOLDEN / name).read_bytes()
    return raw, parse_packet_untrusted(memoryview(raw))


def test_the_capture_is_complete() -> None:
    assert len(FILES) == 12


@pytest.mark.parametrize("name", FILES)
def test_dpkt_agrees(name: str) -> None:
    raw, packet = load(name)
    assert_same(raw, packet)


@pytest.mark.parametrize("name", FILES)
def test_ip_header_re_emits_identically(name: str) -> None:
    raw, packet = load(name)
    if isinstance(packet.ip, IPv4Header):
        assert emit_ipv4_header(packet.ip) == raw[:20]
    else:
        assert isinstance(packet.ip, IPv6Header)
        assert emit_ipv6_header(packet.ip) == raw[:40]


@pytest.mark.parametrize("name", FILES)
def test_transport_rebuilds_byte_for_byte(name: str) -> None:
    raw, p = load(name)
    start = 20 if p.version == 4 else 40
    payload = bytes(p.payload)
    if isinstance(p.l4, TcpHeader):
        rebuilt = build_tcp_packet(p.src, p.dst, p.l4, payload, ttl=p.ttl)
    elif isinstance(p.l4, UdpHeader):
        sport, dport = p.l4.src_port, p.l4.dst_port
        rebuilt = build_udp_packet(p.src, p.dst, sport, dport, payload, ttl=p.ttl)
    else:
        assert isinstance(p.l4, IcmpHeader)
        rebuilt = build_icmp_packet(p.src, p.dst, p.l4.type, p.l4.code, p.l4.rest, payload)
    assert rebuilt[start:] == raw[start:]


@pytest.mark.parametrize(
    ("name", "src", "mss"),
    [("kernel_tcp_syn_v4.bin", OUR4, 1460), ("kernel_tcp_syn_v6.bin", OUR6, 1440)],
)
def test_kernel_syn_carries_every_option(name: str, src: bytes, mss: int) -> None:
    _raw, p = load(name)
    assert isinstance(p.l4, TcpHeader)
    assert p.src == src and p.l4.dst_port == 80 and p.l4.flags == SYN
    opts = p.l4.options
    # MTU 1500 minus the IP and TCP headers; Linux offers all four options.
    assert opts.mss == mss
    assert opts.sack_permitted
    assert opts.wscale is not None and 0 < opts.wscale <= 14
    assert opts.timestamp is not None and opts.timestamp[1] == 0
    assert len(p.payload) == 0
    if isinstance(p.ip, IPv4Header):
        assert p.ip.flags == FLAG_DF  # Linux sets DF on TCP (path MTU discovery)


def test_kernel_handshake_sequence() -> None:
    _, syn = load("kernel_tcp_syn_v4.bin")
    _, ack = load("kernel_tcp_ack_v4.bin")
    _, data = load("kernel_tcp_data_v4.bin")
    _, fin = load("kernel_tcp_fin_v4.bin")
    for p in (syn, ack, data, fin):
        assert isinstance(p.l4, TcpHeader)
    assert isinstance(syn.l4, TcpHeader) and isinstance(ack.l4, TcpHeader)
    assert isinstance(data.l4, TcpHeader) and isinstance(fin.l4, TcpHeader)
    assert ack.l4.flags == ACK and ack.l4.seq == syn.l4.seq + 1
    assert ack.l4.ack == 1_000_001  # our ISS + 1
    assert data.l4.flags == ACK | PSH and bytes(data.payload) == b"GET / HTTP/1.0\r\n\r\n"
    assert fin.l4.flags == ACK | FIN and fin.l4.seq == data.l4.seq + len(data.payload)
    # Timestamps on every segment once both SYNs carried them (RFC 7323 3.2).
    for p in (ack, data, fin):
        assert p.l4 is not None and p.l4.options.timestamp is not None  # type: ignore[union-attr]
    # Window scale applies after the SYN: the raw field is small.
    assert ack.l4.window < syn.l4.window


def test_kernel_rst_for_closed_port() -> None:
    _, p = load("kernel_tcp_rst_v4.bin")
    assert isinstance(p.l4, TcpHeader)
    # RFC 9293 3.10.7.1: RST with seq 0 and ACK of the SYN's sequence + 1.
    assert p.l4.flags == RST | ACK and p.l4.seq == 0 and p.l4.ack == 12346
    assert p.l4.window == 0 and p.l4.src_port == 9


@pytest.mark.parametrize(
    ("name", "icmp_type"),
    [
        ("kernel_icmp_echo_request_v4.bin", ICMP_ECHO_REQUEST),
        ("kernel_icmpv6_echo_request_v6.bin", ICMP6_ECHO_REQUEST),
    ],
)
def test_kernel_ping(name: str, icmp_type: int) -> None:
    _, p = load(name)
    assert isinstance(p.l4, IcmpHeader)
    assert p.l4.type == icmp_type and p.l4.code == 0
    assert p.l4.rest & 0xFFFF == 1  # the first sequence number of ping -c1
    assert len(p.payload) == 56  # ping's default data size


@pytest.mark.parametrize(
    ("name", "our", "icmp_type", "code"),
    [
        ("kernel_icmp_port_unreach_v4.bin", OUR4, ICMP_DEST_UNREACH, UNREACH_PORT),
        ("kernel_icmpv6_port_unreach_v6.bin", OUR6, ICMP6_DEST_UNREACH, UNREACH6_PORT),
    ],
)
def test_our_icmp_error_matches_the_kernels(
    name: str, our: bytes, icmp_type: int, code: int
) -> None:
    raw, p = load(name)
    assert isinstance(p.l4, IcmpHeader)
    assert (p.l4.type, p.l4.code, p.l4.rest) == (icmp_type, code, 0)
    quoted = bytes(p.payload)
    original = parse_packet_untrusted(memoryview(quoted))
    assert isinstance(original.l4, UdpHeader) and original.l4.dst_port == 9
    ours = build_icmp_error(quoted, our, icmp_type, code)
    start = 20 if p.version == 4 else 40
    assert ours[start:] == raw[start:]
    assert parse_packet_untrusted(memoryview(ours)).dst == (PEER4 if p.version == 4 else PEER6)
