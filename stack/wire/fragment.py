"""IP fragments on the wire: read one for reassembly, cut a packet into them.

`parse_ipv4_untrusted` and `parse_ipv6_untrusted` refuse fragments, so the
per-packet path never pays for them; the network layer hands what they
refused to `parse_fragment_untrusted`, which checks everything reassembly
relies on (lengths, the 8-octet rule, the 65,535-octet ceiling) and returns
a `Fragment`. The reassembler (`stack.fragments`) keys, orders and joins
them, and `reassembled_packet` rebuilds the whole datagram from the first
fragment's header, so the normal parser sees an ordinary packet.

The IPv6 Fragment header (RFC 8200 4.5):

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Next Header  |   Reserved    |      Fragment Offset    |Res|M|
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         Identification                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

IPv4 keeps the same information in its own header (identification, MF,
offset in 8-octet units). `fragment_packet` is the output side: it cuts a
packet the packet layer built (no IPv4 options, no IPv6 extension headers)
into fragments that fit the device MTU.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from stack.errors import BadPacket
from stack.wire import ipv4, ipv6
from stack.wire.icmp import is_icmp_error

HEADER_LEN: Final = 8
MAX_DATAGRAM: Final = 0xFFFF
_V6_FRAG = struct.Struct("!BBHI")
_V4_HDR = struct.Struct("!BBHHHBBH4s4s")
_V6_HDR = struct.Struct("!IHBB16s16s")
_PROTO_TCP: Final = 6
_PROTO_UDP: Final = 17
_PROTO_ICMP: Final = 1
_PROTO_ICMPV6: Final = 58
_fb = int.from_bytes


class Ipv6FragmentHeader(NamedTuple):
    """An IPv6 Fragment header.

    Attributes:
        next_header: the header that follows in the fragmentable part.
        offset: where this fragment's data starts, in octets (a multiple of 8).
        more: the M flag: more fragments follow.
        ident: the 32-bit identification.
    """

    next_header: int
    offset: int
    more: bool
    ident: int


def parse_ipv6_fragment_header_untrusted(buf: memoryview) -> Ipv6FragmentHeader:
    """Parse the 8-octet Fragment header at the start of `buf`.

    Raises:
        BadPacket: fewer than 8 octets.
    """
    if len(buf) < HEADER_LEN:
        raise BadPacket(f"IPv6 Fragment header truncated ({len(buf)} bytes)")
    nxt, _, off_m, ident = _V6_FRAG.unpack_from(buf)
    return Ipv6FragmentHeader(nxt, off_m & 0xFFF8, bool(off_m & 1), ident)


def emit_ipv6_fragment_header(header: Ipv6FragmentHeader) -> bytes:
    """Serialise a Fragment header (reserved fields zero).

    Raises:
        ValueError: the offset is not a multiple of 8 below 65,536, or a
            field does not fit.
    """
    if header.offset % 8 or not 0 <= header.offset <= 0xFFF8:
        raise ValueError(f"fragment offset {header.offset} is not a multiple of 8 below 65536")
    try:
        return _V6_FRAG.pack(header.next_header, 0, header.offset | int(header.more), header.ident)
    except struct.error as exc:
        raise ValueError(f"IPv6 Fragment header field out of range: {exc}") from exc


class Fragment(NamedTuple):
    """One fragment of an IPv4 or IPv6 datagram.

    Attributes:
        version: 4 or 6.
        src: source address.
        dst: destination address.
        proto: IPv4: the protocol; IPv6: the Fragment header's next header.
        ident: the identification (16 bits for IPv4, 32 for IPv6).
        offset: where `payload` starts in the datagram's data, in octets.
        more: more fragments follow (MF / M).
        head: what `reassembled_packet` puts before the data: the IPv4
            header with its options, or the IPv6 header and the extension
            headers before the Fragment header, with the Next Header that
            named the Fragment header already set to `proto`.
        payload: this fragment's data (a view, no copy).
    """

    version: int
    src: bytes
    dst: bytes
    proto: int
    ident: int
    offset: int
    more: bool
    head: bytes
    payload: memoryview


def parse_fragment_untrusted(buf: memoryview, *, verify_checksum: bool = True) -> Fragment:
    """Parse an IPv4 or IPv6 fragment.

    A fragment whose data would end beyond 65,535 octets of datagram, or
    that says more follow while its length is not a multiple of 8 (RFC 791,
    RFC 8200 4.5) or zero, is refused. An IPv6 packet with offset 0 and no
    more fragments (an atomic fragment, RFC 6946) parses like any other.

    Args:
        buf: the whole packet as read.
        verify_checksum: verify the IPv4 header checksum.

    Raises:
        BadPacket: anything malformed, or a packet that is not a fragment.
    """
    n = len(buf)
    version = buf[0] >> 4 if n else 0
    if version == 4:
        return _parse_v4(buf, n, verify_checksum)
    if version == 6:
        return _parse_v6(buf, n)
    raise BadPacket(f"IP version {version} is neither 4 nor 6")


def _parse_v4(buf: memoryview, n: int, verify_checksum: bool) -> Fragment:
    if n < ipv4.HEADER_LEN:
        raise BadPacket(f"IPv4 header truncated ({n} bytes)")
    ver_ihl, _, total, ident, flags_frag, _, proto, _, src, dst = _V4_HDR.unpack_from(buf)
    hlen = (ver_ihl & 0x0F) << 2
    if hlen < ipv4.HEADER_LEN or total < hlen or total > n:
        raise BadPacket(f"IPv4 header length {hlen} or total length {total} out of range")
    if verify_checksum and _fb(buf[:hlen], "little") % 0xFFFF:
        raise BadPacket("IPv4 header checksum mismatch")
    offset = (flags_frag & 0x1FFF) << 3
    more = bool(flags_frag & 0x2000)
    if not offset and not more:
        raise BadPacket("not a fragment")
    payload = buf[hlen:total]
    _check_lengths(offset, len(payload), more, hlen)
    return Fragment(4, src, dst, proto, ident, offset, more, bytes(buf[:hlen]), payload)


def _parse_v6(buf: memoryview, n: int) -> Fragment:
    if n < ipv6.HEADER_LEN:
        raise BadPacket(f"IPv6 header truncated ({n} bytes)")
    _, plen, nxt, _, src, dst = _V6_HDR.unpack_from(buf)
    end = ipv6.HEADER_LEN + plen
    if end > n:
        raise BadPacket(f"IPv6 payload length {plen} beyond {n - ipv6.HEADER_LEN} bytes")
    pos = ipv6.HEADER_LEN
    link = 6  # where the Next Header naming the current header sits
    for count in range(ipv6.MAX_EXTENSION_HEADERS):
        if nxt == ipv6.FRAGMENT:
            break
        if nxt not in (ipv6.HOP_BY_HOP, ipv6.ROUTING, ipv6.DEST_OPTIONS):
            raise BadPacket("not a fragment")
        if nxt == ipv6.HOP_BY_HOP and count:
            raise BadPacket("IPv6 Hop-by-Hop header not first")
        if pos + 2 > end or pos + ((buf[pos + 1] + 1) << 3) > end:
            raise BadPacket(f"IPv6 extension header {nxt} truncated")
        nxt, link = buf[pos], pos
        pos += (buf[pos + 1] + 1) << 3
    else:
        raise BadPacket(f"more than {ipv6.MAX_EXTENSION_HEADERS} IPv6 extension headers")
    frag = parse_ipv6_fragment_header_untrusted(buf[pos:end])
    payload = buf[pos + HEADER_LEN : end]
    _check_lengths(frag.offset, len(payload), frag.more, pos - ipv6.HEADER_LEN)
    head = bytearray(buf[:pos])
    head[link] = frag.next_header
    return Fragment(
        6, src, dst, frag.next_header, frag.ident, frag.offset, frag.more, bytes(head), payload
    )


def _check_lengths(offset: int, length: int, more: bool, extra: int) -> None:
    """RFC 791 / RFC 8200 4.5: whole 8-octet blocks but the last, 64 KiB in all."""
    if more and (length == 0 or length % 8):
        raise BadPacket(f"fragment of {length} octets with more to follow")
    if extra + offset + length > MAX_DATAGRAM:
        raise BadPacket(f"fragment ends at {offset + length}, beyond the largest datagram")


def upper_layer(version: int, proto: int, data: memoryview) -> tuple[int, memoryview] | None:
    """Find the upper-layer header in a first fragment's data.

    IPv6 extension headers after the Fragment header (Destination Options,
    Routing) are walked. RFC 1858 (IPv4) and RFC 7112 (IPv6) require the
    first fragment to hold the whole header chain and the transport header;
    this says whether it does.

    Returns:
        The upper-layer protocol and the bytes from its header on, or None
        when the first fragment ends before the TCP, UDP or ICMP header does.
    """
    if version == 6:
        pos = 0
        for _ in range(ipv6.MAX_EXTENSION_HEADERS):
            if proto not in (ipv6.ROUTING, ipv6.DEST_OPTIONS, ipv6.FRAGMENT, ipv6.HOP_BY_HOP):
                break
            if pos + 2 > len(data) or proto in (ipv6.FRAGMENT, ipv6.HOP_BY_HOP):
                return None  # a second Fragment header or a late Hop-by-Hop: no chain
            proto = data[pos]
            pos += (data[pos + 1] + 1) << 3
        else:
            return None
        if pos > len(data):
            return None  # the chain ends beyond the first fragment
        data = data[pos:]
    if proto == _PROTO_TCP:
        need = 20 if len(data) < 13 else max(20, (data[12] >> 4) << 2)
    elif proto in (_PROTO_UDP, _PROTO_ICMP, _PROTO_ICMPV6):
        need = 8
    else:
        need = 0
    if len(data) < need:
        return None
    return proto, data


def is_about_icmp_error(version: int, proto: int, data: memoryview) -> bool:
    """Whether upper-layer bytes (from `upper_layer`) carry an ICMP error."""
    icmp_proto = _PROTO_ICMP if version == 4 else _PROTO_ICMPV6
    return proto == icmp_proto and bool(data) and is_icmp_error(version, data[0])


def reassembled_packet(version: int, head: bytes, data: bytes) -> bytes:
    """The whole datagram: the first fragment's `head` and the joined data.

    The IPv4 header gets the new total length, no fragment flags or offset
    and a fresh checksum; the IPv6 header the new payload length.

    Raises:
        ValueError: the datagram would be longer than IP allows (65,535
            octets in all for IPv4, of payload for IPv6).
    """
    length = len(head) + len(data) - (ipv6.HEADER_LEN if version == 6 else 0)
    if length > MAX_DATAGRAM:
        raise ValueError(f"reassembled datagram of {length} octets is too long")
    if version == 4:
        hlen = len(head)
        hdr = bytearray(head)
        hdr[2:4] = (hlen + len(data)).to_bytes(2, "big")
        hdr[6] = hdr[6] & 0x40  # keep DF, clear MF and the offset
        hdr[7] = 0
        hdr[10:12] = b"\0\0"
        hdr[10:12] = (-_fb(hdr, "big") % 0xFFFF).to_bytes(2, "big")
        return bytes(hdr) + data
    return b"".join((head[:4], length.to_bytes(2, "big"), head[6:], data))


def fragment_packet(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """Cut a packet we built into fragments of at most `mtu` octets.

    IPv4: every fragment repeats the header with DF clear, MF on all but the
    last, the offset and `ident` (16 bits). IPv6: each fragment is the fixed
    header and a Fragment header with `ident` (32 bits) before its piece.
    Pieces are whole 8-octet blocks but the last.

    Raises:
        ValueError: not an IPv4 or IPv6 packet, or an MTU too small to carry
            eight octets of data per fragment.
    """
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        hlen = (packet[0] & 0x0F) << 2
        step = (mtu - hlen) & ~7
        if step < 8:
            raise ValueError(f"MTU {mtu} too small to fragment")
        fields = list(_V4_HDR.unpack_from(packet))
        opts = packet[ipv4.HEADER_LEN : hlen]
        data = memoryview(packet)[hlen:]
        out = []
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            more = 0x2000 if start + step < len(data) else 0
            fields[2] = hlen + len(piece)
            fields[3] = ident & 0xFFFF
            fields[4] = more | (start >> 3)
            fields[7] = 0
            raw = _V4_HDR.pack(*fields) + opts
            fields[7] = -_fb(raw, "big") % 0xFFFF
            out.append(b"".join((_V4_HDR.pack(*fields), opts, piece)))
        return out
    if version == 6:
        step = (mtu - ipv6.HEADER_LEN - HEADER_LEN) & ~7
        if step < 8:
            raise ValueError(f"MTU {mtu} too small to fragment")
        nxt = packet[6]
        data = memoryview(packet)[ipv6.HEADER_LEN :]
        out = []
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            more = start + step < len(data)
            frag = _V6_FRAG.pack(nxt, 0, start | more, ident & 0xFFFFFFFF)
            plen = (HEADER_LEN + len(piece)).to_bytes(2, "big")
            out.append(
                b"".join((packet[:4], plen, bytes((ipv6.FRAGMENT,)), packet[7:40], frag, piece))
            )
        return out
    raise ValueError("not an IP packet")
