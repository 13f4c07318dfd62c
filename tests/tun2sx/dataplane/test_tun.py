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


class _CountingTun(TunDevice):
    """A device over a socketpair that counts its reads and the failed ones."""

    def __init__(self, fd: int, *, offload: bool = False) -> None:
        super().__init__(fd, name="fake0", mtu=1500, offload=offload)
        self.reads = self.failed = 0

    def _read_packet(self, fd: int, size: int) -> bytes:
        self.reads += 1
        try:
            return os.read(fd, size)
        except BlockingIOError:
            self.failed += 1
            raise


def test_a_batch_of_one_packet_costs_one_read_and_a_longer_one_reads_until_empty() -> None:
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = _CountingTun(ours.detach())
    packets = [build_udp_packet(V4A, V4B, 53, 4000, bytes([i]) * (10 + i)) for i in range(5)]
    try:
        assert device.read_ready() == [] and (device.reads, device.failed) == (1, 1)
        theirs.send(packets[0])
        device.reads = device.failed = 0
        assert [bytes(p.data) for p in device.read_ready()] == packets[:1]
        assert (device.reads, device.failed) == (1, 0)  # no read that fails
        for packet in packets:
            theirs.send(packet)
        device.reads = device.failed = 0
        assert [bytes(p.data) for p in device.read_ready()] == packets
        assert (device.reads, device.failed) == (6, 1)
        for packet in packets:
            theirs.send(packet)
        assert [bytes(p.data) for p in device.read_ready(limit=2)] == packets[:2]
        assert [bytes(p.data) for p in device.read_ready()] == packets[2:]
        assert device.rx_packets == 11
        assert device.rx_bytes == 2 * sum(map(len, packets)) + len(packets[0])
    finally:
        device.close()
        theirs.close()
