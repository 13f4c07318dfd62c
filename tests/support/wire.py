"""Compare a packet as stack.wire parsed it with dpkt's reading of the same bytes.

dpkt is an independent implementation: the differential tests feed it
generated packets, the golden tests packets the kernel wrote.
"""

from __future__ import annotations

import struct

import dpkt

from stack.wire.icmp import IcmpHeader
from stack.wire.ipv4 import IPv4Header
from stack.wire.ipv6 import IPv6Header
from stack.wire.packet import Packet
from stack.wire.tcp import TcpHeader, TcpOptions
from stack.wire.udp import UdpHeader

__all__ = ["assert_same", "assert_same_checksums", "dpkt_options"]


def dpkt_options(opts: bytes) -> TcpOptions:
    """Interpret dpkt.tcp.parse_opts output the way tun2sx's TcpOptions does."""
    mss = wscale = timestamp = None
    sack_permitted = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    for kind, data in dpkt.tcp.parse_opts(opts):
        if kind == dpkt.tcp.TCP_OPT_EOL:
            break
        if kind == dpkt.tcp.TCP_OPT_MSS and len(data) == 2:
            mss = struct.unpack("!H", data)[0]
        elif kind == dpkt.tcp.TCP_OPT_WSCALE and len(data) == 1:
            wscale = data[0]
        elif kind == dpkt.tcp.TCP_OPT_SACKOK and not data:
            sack_permitted = True
        elif kind == dpkt.tcp.TCP_OPT_SACK and len(data) in (8, 16, 24, 32):
            edges = struct.unpack(f"!{len(data) // 4}I", data)
            sack_blocks = tuple(zip(edges[0::2], edges[1::2], strict=True))
        elif kind == dpkt.tcp.TCP_OPT_TIMESTAMP and len(data) == 8:
            timestamp = struct.unpack("!II", data)
    return TcpOptions(mss, wscale, sack_permitted, sack_blocks, timestamp)


def assert_same(raw: bytes, p: Packet) -> None:
    """Compare every field tun2sx parsed with dpkt's view of the same bytes."""
    if p.version == 4:
        ip = dpkt.ip.IP(raw)
        assert isinstance(p.ip, IPv4Header)
        h = p.ip
        assert (h.tos, h.total_length, h.ident, h.ttl, h.proto, h.checksum) == (
            ip.tos,
            ip.len,
            ip.id,
            ip.ttl,
            ip.p,
            ip.sum,
        )
        assert (h.flags, h.frag_offset) == (ip.rf << 2 | ip.df << 1 | ip.mf, ip.offset >> 3)
        assert (h.src, h.dst, h.options) == (ip.src, ip.dst, ip.opts)
    else:
        ip = dpkt.ip6.IP6(raw)
        assert isinstance(p.ip, IPv6Header)
        h6 = p.ip
        assert (h6.traffic_class, h6.flow_label, h6.payload_length) == (ip.fc, ip.flow, ip.plen)
        assert (h6.next_header, h6.hop_limit, h6.src, h6.dst) == (ip.p, ip.hlim, ip.src, ip.dst)
    l4 = ip.data
    if isinstance(p.l4, TcpHeader):
        t = p.l4
        assert (t.src_port, t.dst_port, t.seq, t.ack, t.flags, t.window) == (
            l4.sport,
            l4.dport,
            l4.seq,
            l4.ack,
            l4.flags,
            l4.win,
        )
        assert (t.checksum, t.urgent) == (l4.sum, l4.urp)
        assert t.options == dpkt_options(l4.opts)
        assert bytes(p.payload) == l4.data
    elif isinstance(p.l4, UdpHeader):
        u = p.l4
        assert (u.src_port, u.dst_port, u.length, u.checksum) == (
            l4.sport,
            l4.dport,
            l4.ulen,
            l4.sum,
        )
        assert bytes(p.payload) == l4.data
    elif isinstance(p.l4, IcmpHeader):
        wire = bytes(l4)
        assert (p.l4.type, p.l4.code, p.l4.checksum) == (l4.type, l4.code, l4.sum)
        assert p.l4.rest == int.from_bytes(wire[4:8], "big")
        assert bytes(p.payload) == wire[8:]
    assert_same_checksums(raw, p)


def assert_same_checksums(raw: bytes, p: Packet) -> None:
    """Zero the checksums in dpkt's objects; dpkt recomputes them on output."""
    ip = dpkt.ip.IP(raw) if p.version == 4 else dpkt.ip6.IP6(raw)
    if p.version == 4:
        ip.sum = 0
    if p.l4 is not None:
        ip.data.sum = 0
    redone = bytes(ip)
    if p.version == 4:
        assert int.from_bytes(redone[10:12], "big") == p.ip.checksum  # type: ignore[union-attr]
    if p.l4 is not None:
        l4 = dpkt.ip.IP(redone).data if p.version == 4 else dpkt.ip6.IP6(redone).data
        assert l4.sum == p.l4.checksum
