"""Whole IP packets: one parse entry point for what the TUN delivers, and
builders for everything tun2sx writes back.

The packet layer owns what needs both the IP and the transport header: the
TCP/UDP/ICMPv6 pseudo-header checksums, the dispatch on the version nibble and
protocol, and ICMP error construction. `parse_packet_untrusted` is the only
parser the runtime calls per packet, so it avoids work a general design would
do: when the IP header has no options or extension headers, the addresses sit
right before the transport header, and one checksum call over
`addresses + segment` covers the whole pseudo-header without building it.

Checksum offload: with `IFF_VNET_HDR` the kernel accepts packets whose
transport checksum field holds only the pseudo-header sum (virtio-net
`VIRTIO_NET_HDR_F_NEEDS_CSUM`); it then sums from `csum_start` to the end and
stores the result at `csum_start + csum_offset`. The builders' `partial_checksum`
flag writes that form, and `partial_checksum_offsets` gives the two offsets.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from stack.errors import BadPacket
from stack.wire import ipv4, ipv6, tcp, udp
from stack.wire.checksum import checksum, ones_complement_sum, pseudo_header_sum
from stack.wire.icmp import IcmpHeader, emit_icmp_header, is_icmp_error, parse_icmp_untrusted
from stack.wire.ipv4 import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IPv4Header,
    emit_ipv4_header,
    parse_ipv4_untrusted,
)
from stack.wire.ipv6 import IPv6Header, emit_ipv6_header, parse_ipv6_untrusted
from stack.wire.tcp import (
    FIN,
    NO_OPTIONS,
    RST,
    SYN,
    TS_ONLY_PREFIX,
    TcpHeader,
    TcpOptions,
    emit_options,
    parse_tcp_untrusted,
)
from stack.wire.udp import UdpHeader, parse_udp_untrusted

# Offsets of the checksum field inside the transport header (virtio-net
# `csum_offset`); `csum_start` is the IP header length.
TCP_CSUM_OFFSET: Final = 16
UDP_CSUM_OFFSET: Final = 6
# RFC 1812 4.3.2.3: an ICMPv4 error carries as much of the original as fits
# in 576 bytes; RFC 4443 2.4(c): an ICMPv6 error as much as fits in 1280.
ICMP_ERROR_MAX_V4: Final = 576
ICMP_ERROR_MAX_V6: Final = 1280
DEFAULT_TTL: Final = 64

_fb = int.from_bytes
_tuple_new = tuple.__new__

# The packet almost every read brings: IPv4 without options, TCP, and either no
# options or NOP NOP Timestamps (RFC 7323 Appendix A layout). One unpack of
# the first 52 bytes replaces three; anything unusual takes the general path.
V4_TCP_TS = struct.Struct("!BBHHHBBH4s4sHHIIBBHHHIII")
V4_TCP_TS_LEN = 52
_SYN_FIN_RST = 0x07
# Builders pack the IP header and the fixed transport header together.
_V4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_V6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
_V4_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")
_V6_UDP = struct.Struct("!IHBB16s16sHHHH")


class Packet(NamedTuple):
    """A parsed IP packet.

    Attributes:
        version: 4 or 6.
        src: source address (4 or 16 bytes).
        dst: destination address.
        proto: upper-layer protocol (after IPv6 extension headers).
        ip: the IP header.
        l4: the transport header, or None for a protocol the stack does not
            parse (the payload is then the whole IP payload).
        payload: view of the transport payload (or of the ICMP message body).
        ttl: TTL or hop limit.
    """

    version: int
    src: bytes
    dst: bytes
    proto: int
    ip: IPv4Header | IPv6Header
    l4: TcpHeader | UdpHeader | IcmpHeader | None
    payload: memoryview
    ttl: int


def parse_packet_untrusted(buf: memoryview, *, verify_checksum: bool = True) -> Packet:
    """Parse an IPv4 or IPv6 packet and its TCP, UDP, ICMP or ICMPv6 header.

    With `verify_checksum` every checksum is verified: the IPv4 header's and
    the TCP, UDP (over IPv4, a zero checksum means none), ICMP and ICMPv6
    ones. Pass False when the source already vouched for the bytes (the local
    kernel writing into the TUN: virtio-net `DATA_VALID`, or `NEEDS_CSUM`
    packets whose field holds only the pseudo-header sum); then no checksum
    is read, while every length and structural check still applies.

    Args:
        buf: one whole packet as read from the TUN.
        verify_checksum: verify the IPv4 header and transport checksums.

    Returns:
        The parsed packet; unknown protocols give `l4=None`.

    Raises:
        BadPacket: anything malformed, a checksum mismatch, a zero UDP
            checksum over IPv6 (RFC 8200 8.1), or a fragment (message starts
            with "fragment").
    """
    n = len(buf)
    if n < V4_TCP_TS_LEN or buf[0] != 0x45 or buf[9] != PROTO_TCP:
        return _parse_general(buf, n, verify_checksum)
    # The common case, inline (a call costs ~0.15 us here): IPv4 without
    # options carrying TCP with no options or the NOP NOP Timestamps block.
    # Anything this path does not fully vouch for (fragments, bad lengths,
    # other option layouts, SYN with FIN or RST, a bad header checksum) goes
    # to the general path, which decides and raises exactly as it always does.
    (
        _,
        tos,
        total,
        ident,
        flags_frag,
        ttl,
        _,
        ip_sum,
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        off,
        flags,
        window,
        tcp_sum,
        urgent,
        word0,
        tsval,
        tsecr,
    ) = V4_TCP_TS.unpack_from(buf)
    hlen = (off >> 4) << 2
    if hlen == 20:
        options = NO_OPTIONS
    elif hlen == 32 and word0 == TS_ONLY_PREFIX:
        options = _tuple_new(TcpOptions, (None, None, False, (), (tsval, tsecr)))
    else:
        return _parse_general(buf, n, verify_checksum)
    if (
        total > n
        or total < 20 + hlen
        or flags_frag & 0x3FFF
        or (flags & 0x02 and flags & _SYN_FIN_RST != 0x02)
    ):
        return _parse_general(buf, n, verify_checksum)
    if verify_checksum:
        if _fb(buf[:20], "little") % 0xFFFF:
            return _parse_general(buf, n, verify_checksum)
        # total - 20 is the TCP length, + 6 the protocol: with the addresses
        # at 12..20 that makes the whole pseudo-header.
        if ones_complement_sum(buf[12:total], total - 14) != 0xFFFF:
            raise BadPacket("TCP checksum mismatch")
    ip = _tuple_new(
        IPv4Header, (tos, total, ident, flags_frag >> 13, 0, ttl, PROTO_TCP, ip_sum, src, dst, b"")
    )
    seg = _tuple_new(TcpHeader, (sport, dport, seq, ack, flags, window, tcp_sum, urgent, options))
    return _tuple_new(Packet, (4, src, dst, PROTO_TCP, ip, seg, buf[20 + hlen : total], ttl))


def _parse_general(buf: memoryview, n: int, verify_checksum: bool) -> Packet:
    """Every packet the fast path does not vouch for; the reference behaviour."""
    if not n:
        raise BadPacket("empty packet")
    version = buf[0] >> 4
    ip: IPv4Header | IPv6Header
    if version == 4:
        ip, body = parse_ipv4_untrusted(buf, verify_checksum=verify_checksum)
        proto = ip.proto
        ttl = ip.ttl
        # No options: src, dst and the transport header are contiguous.
        addr_at = 12 if ip.options == b"" else -1
        end = ip.total_length
        icmp_proto = PROTO_ICMP
    elif version == 6:
        ip, body = parse_ipv6_untrusted(buf)
        proto = ip.next_header
        ttl = ip.hop_limit
        end = ipv6.HEADER_LEN + ip.payload_length
        addr_at = 8 if end - len(body) == ipv6.HEADER_LEN else -1
        icmp_proto = PROTO_ICMPV6
    else:
        raise BadPacket(f"IP version {version} is neither 4 nor 6")
    src = ip.src
    dst = ip.dst
    l4: TcpHeader | UdpHeader | IcmpHeader | None
    if proto == PROTO_TCP:
        l4, payload = parse_tcp_untrusted(body)
        if verify_checksum:
            _verify(buf, addr_at, end, body, src, dst, proto, len(body), "TCP")
    elif proto == PROTO_UDP:
        l4, payload = parse_udp_untrusted(body)
        if l4.checksum:
            if verify_checksum:
                length = l4.length
                end -= len(body) - length  # the UDP length bounds the sum
                _verify(buf, addr_at, end, body[:length], src, dst, proto, length, "UDP")
        elif version == 6:
            raise BadPacket("UDP checksum zero over IPv6")
    elif proto == icmp_proto:
        l4, payload = parse_icmp_untrusted(body)
        if verify_checksum:
            if version == 4:
                if ones_complement_sum(body) != 0xFFFF:
                    raise BadPacket("ICMP checksum mismatch")
            else:
                _verify(buf, addr_at, end, body, src, dst, proto, len(body), "ICMPv6")
    else:
        l4 = None
        payload = body
    return _tuple_new(Packet, (version, src, dst, proto, ip, l4, payload, ttl))


def _verify(
    buf: memoryview,
    addr_at: int,
    end: int,
    body: memoryview,
    src: bytes,
    dst: bytes,
    proto: int,
    length: int,
    what: str,
) -> None:
    if addr_at >= 0:
        # Addresses (even length) then the transport bytes: the same words as
        # the pseudo-header minus protocol and length, added as `initial`.
        total = ones_complement_sum(buf[addr_at:end], proto + length)
    else:
        total = ones_complement_sum(body, _fb(src, "big") + _fb(dst, "big") + proto + length)
    if total != 0xFFFF:
        raise BadPacket(f"{what} checksum mismatch")


def _ip_header(src: bytes, dst: bytes, proto: int, l4_len: int, ttl: int) -> bytes:
    if len(src) == 4 and len(dst) == 4:
        total = ipv4.HEADER_LEN + l4_len
        if total > 0xFFFF:
            raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
        # DF set, identification 0: an atomic datagram (RFC 6864 4.1).
        hdr = IPv4Header(0, total, 0, ipv4.FLAG_DF, 0, ttl, proto, 0, src, dst)
        return emit_ipv4_header(hdr)
    if len(src) == 16 and len(dst) == 16:
        if l4_len > 0xFFFF:
            raise ValueError(f"IPv6 payload of {l4_len} bytes exceeds 65535")
        return emit_ipv6_header(IPv6Header(0, 0, l4_len, proto, ttl, src, dst))
    raise ValueError("addresses must both be 4 or both be 16 bytes")


def _transport_checksum(
    src: bytes, dst: bytes, proto: int, header: bytes, payload: bytes | memoryview, partial: bool
) -> int:
    length = len(header) + len(payload)
    if partial:
        return pseudo_header_sum(src, dst, proto, length)
    # The header length is even, so the payload's words line up after it.
    initial = _fb(src, "big") + _fb(dst, "big") + proto + length + _fb(header, "big")
    return checksum(payload, initial)


def build_tcp_packet(
    src: bytes,
    dst: bytes,
    hdr: TcpHeader,
    payload: bytes | bytearray | memoryview = b"",
    *,
    ttl: int = DEFAULT_TTL,
    partial_checksum: bool = False,
) -> bytes:
    """Build an IPv4 or IPv6 TCP packet (version chosen by address length).

    Args:
        src: source address, 4 or 16 bytes.
        dst: destination address of the same family.
        hdr: the TCP header; its checksum field is ignored.
        payload: segment data.
        ttl: TTL or hop limit.
        partial_checksum: store only the pseudo-header sum for the kernel to
            complete (see `partial_checksum_offsets`).

    Returns:
        The packet bytes.

    Raises:
        ValueError: mismatched addresses, a field out of range, or too long.
    """
    sport, dport, seq, ack, flags, window, _, urgent, options = hdr
    opts = emit_options(options)
    if flags & SYN and flags & (FIN | RST):
        raise ValueError("TCP SYN cannot be combined with FIN or RST")
    hlen = tcp.HEADER_LEN + len(opts)
    length = hlen + len(payload)
    # Sums are taken of the field values: a 32-bit field is congruent to the
    # sum of its two 16-bit words modulo 0xFFFF, so no header bytes are read
    # back. Out-of-range values make the pack below fail.
    addr = _fb(src + dst, "big")
    if partial_checksum:
        csum = (addr + PROTO_TCP + length) % 0xFFFF or 0xFFFF
    else:
        total = addr + PROTO_TCP + length + sport + dport + seq + ack + window + urgent
        total += (hlen << 10) | flags
        if opts:
            total += _fb(opts, "big")
        if payload:
            total += ones_complement_sum(payload)
        csum = -total % 0xFFFF  # one's complement of the folded, non-zero sum
    fields = (sport, dport, seq, ack, hlen << 2, flags, window, csum, urgent)
    head = _ip_head(_V4_TCP, _V6_TCP, src, dst, PROTO_TCP, length, ttl, addr, fields)
    return b"".join((head, opts, payload))


def _ip_head(
    v4: struct.Struct,
    v6: struct.Struct,
    src: bytes,
    dst: bytes,
    proto: int,
    length: int,
    ttl: int,
    addr: int,
    fields: tuple[int, ...],
) -> bytes:
    """Pack the IP header and the fixed transport header in one call."""
    try:
        if len(src) == 4 and len(dst) == 4:
            total = ipv4.HEADER_LEN + length
            if total > 0xFFFF:
                raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
            # Version 4, IHL 5, DF, identification 0: an atomic datagram
            # (RFC 6864 4.1); the header checksum from the field values.
            ip_sum = -(0x4500 + 0x4000 + total + (ttl << 8) + proto + addr) % 0xFFFF
            return v4.pack(0x45, 0, total, 0, 0x4000, ttl, proto, ip_sum, src, dst, *fields)
        if len(src) == 16 and len(dst) == 16:
            if length > 0xFFFF:
                raise ValueError(f"IPv6 payload of {length} bytes exceeds 65535")
            return v6.pack(ipv6.VERSION << 28, length, proto, ttl, src, dst, *fields)
    except struct.error as exc:
        raise ValueError(f"header field out of range: {exc}") from exc
    raise ValueError("addresses must both be 4 or both be 16 bytes")


def build_udp_packet(
    src: bytes,
    dst: bytes,
    src_port: int,
    dst_port: int,
    payload: bytes | memoryview,
    *,
    ttl: int = DEFAULT_TTL,
    partial_checksum: bool = False,
) -> bytes:
    """Build an IPv4 or IPv6 UDP datagram (version chosen by address length).

    A computed checksum of zero is sent as 0xFFFF (RFC 768), since zero means
    "no checksum" over IPv4 and is invalid over IPv6.

    Raises:
        ValueError: mismatched addresses, a port out of range, or too long.
    """
    length = udp.HEADER_LEN + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes exceeds 65535")
    addr = _fb(src + dst, "big")
    if partial_checksum:
        csum = (addr + PROTO_UDP + length) % 0xFFFF or 0xFFFF
    else:
        # The length is both in the pseudo-header and in the UDP header.
        total = addr + PROTO_UDP + 2 * length + src_port + dst_port
        if payload:
            total += ones_complement_sum(payload)
        csum = -total % 0xFFFF or 0xFFFF
    fields = (src_port, dst_port, length, csum)
    head = _ip_head(_V4_UDP, _V6_UDP, src, dst, PROTO_UDP, length, ttl, addr, fields)
    return b"".join((head, payload))


def build_icmp_packet(
    src: bytes,
    dst: bytes,
    type: int,
    code: int,
    rest: int,
    payload: bytes | memoryview,
    *,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """Build an ICMPv4 message, or ICMPv6 (with pseudo-header) for 16-byte addresses.

    Raises:
        ValueError: mismatched addresses, a field out of range, or too long.
    """
    six = len(src) == 16
    proto = PROTO_ICMPV6 if six else PROTO_ICMP
    icmp = emit_icmp_header(IcmpHeader(type, code, 0, rest))
    if six:
        csum = _transport_checksum(src, dst, proto, icmp, payload, False)
    else:
        csum = checksum(payload, _fb(icmp, "big"))
    ip = _ip_header(src, dst, proto, len(icmp) + len(payload), ttl)
    return b"".join((ip, icmp[:2], csum.to_bytes(2, "big"), icmp[4:], payload))


def build_icmp_error(
    original: bytes | memoryview,
    our_addr: bytes,
    type: int,
    code: int,
    *,
    rest: int = 0,
) -> bytes:
    """Build an ICMP error about `original`, sent from `our_addr` to its source.

    The message quotes the start of the original packet: for IPv4 its header
    and as much data as keeps the error within 576 bytes (RFC 1812 4.3.2.3,
    more than RFC 792's 8 bytes), for IPv6 as much as fits in 1280 bytes
    (RFC 4443 2.4(c)). Whether an error may be sent at all is the caller's
    decision (`may_send_icmp_error`).

    Args:
        original: the offending packet as received.
        our_addr: the address the error comes from (same family).
        type: ICMP or ICMPv6 error type, e.g. `ICMP_DEST_UNREACH`.
        code: e.g. `UNREACH_PORT` or `UNREACH6_PORT`.
        rest: rest of header (the MTU for Packet Too Big / Frag Needed).

    Raises:
        BadPacket: `original` is too short or not IPv4/IPv6.
        ValueError: `our_addr` does not match the original's family.
    """
    n = len(original)
    version = original[0] >> 4 if n else 0
    if version == 4 and n >= ipv4.HEADER_LEN:
        to = bytes(original[12:16])
        limit = ICMP_ERROR_MAX_V4 - ipv4.HEADER_LEN - 8
    elif version == 6 and n >= ipv6.HEADER_LEN:
        to = bytes(original[8:24])
        limit = ICMP_ERROR_MAX_V6 - ipv6.HEADER_LEN - 8
    else:
        raise BadPacket("cannot quote a packet that is not IPv4 or IPv6")
    if len(our_addr) != len(to):
        raise ValueError("our_addr is not of the original packet's family")
    return build_icmp_packet(our_addr, to, type, code, rest, original[:limit])


def may_send_icmp_error(packet: Packet) -> bool:
    """Tell whether RFC 1122 3.2.2 / RFC 4443 2.4(e) allow an error about `packet`.

    Not about ICMP errors, nor packets to or from multicast, broadcast or
    unspecified addresses (the source must name one host).
    """
    if isinstance(packet.l4, IcmpHeader) and is_icmp_error(packet.version, packet.l4.type):
        return False
    src, dst = packet.src, packet.dst
    if packet.version == 4:
        return not (
            src[0] >= 224
            or dst[0] >= 224  # multicast, reserved and limited broadcast
            or src == b"\0\0\0\0"
        )
    return not (src[0] == 0xFF or dst[0] == 0xFF or src == bytes(16))


def partial_checksum_offsets(packet: bytes | memoryview) -> tuple[int, int]:
    """Return virtio-net (csum_start, csum_offset) for a packet built here.

    Args:
        packet: a TCP or UDP packet from `build_tcp_packet` or
            `build_udp_packet` (no IPv6 extension headers).

    Raises:
        ValueError: not an IPv4/IPv6 TCP or UDP packet.
    """
    version = packet[0] >> 4 if len(packet) else 0
    if version == 4:
        start, proto = (packet[0] & 0x0F) << 2, packet[9]
    elif version == 6:
        start, proto = ipv6.HEADER_LEN, packet[6]
    else:
        raise ValueError("not an IP packet")
    if proto == PROTO_TCP:
        return start, TCP_CSUM_OFFSET
    if proto == PROTO_UDP:
        return start, UDP_CSUM_OFFSET
    raise ValueError(f"protocol {proto} has no offloadable checksum here")
