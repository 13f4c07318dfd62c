"""TUN helpers that need no device: the virtio-net header we write."""

from __future__ import annotations

import os

from stack.netstack import GsoPacket
from stack.wire.fragment import fragment_packet
from stack.wire.packet import build_icmp_packet, build_tcp_packet, build_udp_packet
from stack.wire.tcp import ACK, TcpHeader, TcpOptions
from tun2sx.dataplane.tun import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    TunDevice,
    _vnet_header_for,
)

V4A, V4B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
V6A, V6B = bytes(15) + b"\x01", bytes(15) + b"\x02"
HDR = TcpHeader(80, 40000, 1, 2, ACK, 100, options=TcpOptions(timestamp=(1, 2)))


def test_small_tcp_segment_needs_checksum_only() -> None:
    pkt = build_tcp_packet(V4A, V4B, HDR, b"x" * 100, partial_checksum=True)
    flags, gso, hdr_len, _gso_size, start, offset = VNET_HDR.unpack(_vnet_header_for(pkt, 1500))
    assert (flags, gso, start, offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 20, 16)
    assert hdr_len == 20 + 32


def test_large_tcp_segment_is_cut_by_the_kernel() -> None:
    for src, dst, ip_len, gso_type in (
        (V4A, V4B, 20, VIRTIO_NET_HDR_GSO_TCPV4),
        (V6A, V6B, 40, VIRTIO_NET_HDR_GSO_TCPV6),
    ):
        pkt = build_tcp_packet(src, dst, HDR, b"y" * 30000, partial_checksum=True)
        flags, gso, hdr_len, gso_size, start, offset = VNET_HDR.unpack(_vnet_header_for(pkt, 1500))
        assert gso == gso_type
        assert hdr_len == ip_len + 32
        assert gso_size == 1500 - ip_len - 32
        assert (flags, start, offset) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, ip_len, 16)


def test_udp_and_icmp() -> None:
    udp = build_udp_packet(V4A, V4B, 53, 4000, b"q", partial_checksum=True)
    assert VNET_HDR.unpack(_vnet_header_for(udp, 1500)) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        0,
        0,
        0,
        20,
        6,
    )
    ping = build_icmp_packet(V4A, V4B, 0, 0, 0x10001, b"abc")
    assert _vnet_header_for(ping, 1500) == bytes(VNET_HDR.size)


def test_udp_fragments_carry_a_plain_header() -> None:
    # Their checksum is whole (the stack computes it before cutting); asking
    # the kernel to finish it would overwrite data in every fragment.
    for src, dst in ((V4A, V4B), (V6A, V6B)):
        udp = build_udp_packet(src, dst, 53, 4000, b"q" * 4000)
        fragments = fragment_packet(udp, 1500, ident=1)
        assert len(fragments) == 3
        assert all(_vnet_header_for(f, 1500) == bytes(VNET_HDR.size) for f in fragments)


def test_a_gso_packet_is_cut_at_its_packet_size_not_the_devices_mtu() -> None:
    read_end, write_end = os.pipe()
    device = TunDevice(write_end, name="tun0", mtu=9000, offload=True)
    try:
        pkt = build_tcp_packet(V4A, V4B, HDR, b"z" * 30000, partial_checksum=True)
        device.write(GsoPacket(pkt, 1500))
        written = os.read(read_end, 65536)
    finally:
        device.close()
        os.close(read_end)
    header, packet = written[: VNET_HDR.size], written[VNET_HDR.size :]
    _flags, gso, hdr_len, gso_size, _start, _offset = VNET_HDR.unpack(header)
    assert (gso, hdr_len, gso_size) == (VIRTIO_NET_HDR_GSO_TCPV4, 52, 1500 - 52)
    assert packet == pkt


def test_a_full_device_queue_drops_and_counts() -> None:
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="fake0", mtu=1500, offload=False)
    try:
        packet = build_udp_packet(V4A, V4B, 53, 4000, b"q" * 1000)
        for _ in range(10_000):  # far more than the pair's buffer holds
            device.write(packet)
            if device.statistics_tx_drops:
                break
        assert device.statistics_tx_drops == 1
        assert device.statistics_tx_errors == 0
        device.write(packet)
        assert device.statistics_tx_drops == 2
        assert theirs.recv(2000) == packet  # what fitted is intact
    finally:
        device.close()
        theirs.close()


def test_queue_drops_of_a_device_that_has_no_statistics_is_zero() -> None:
    r, w = os.pipe()
    device = TunDevice(r, name="no-such-device0", mtu=1500, offload=False)
    try:
        assert device.queue_drops() == 0
    finally:
        device.close()
        os.close(w)
