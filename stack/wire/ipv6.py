"""IPv6 header (RFC 8200 section 3) and a bounded walk over extension headers.

The parser returns the upper-layer protocol directly in `next_header`, after
skipping Hop-by-Hop Options, Routing and Destination Options headers (RFC 8200
4.3, 4.4, 4.6), because nothing above this layer cares about them: tun2sx is
the final destination of every packet and no option it could meet changes how
a flow is handled. The walk is bounded in count and checked against the
payload length before every read. A Fragment header is refused with a
`BadPacket` whose message starts with "fragment" (the caller reassembles
those, `stack.fragments`);
any other value (TCP, UDP, ICMPv6, No Next Header, ESP, ...) ends the walk.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |Version| Traffic Class |           Flow Label                  |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Payload Length        |  Next Header  |   Hop Limit   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    +                         Source Address                        +
    |                          (16 octets)                          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    +                      Destination Address                      +
    |                          (16 octets)                          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Extension headers that the walk skips share this start (RFC 8200 4.3):

    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Next Header  |  Hdr Ext Len  |  ... (Hdr Ext Len + 1) * 8 octets in all
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

`emit_ipv6_header` writes no extension headers: what tun2sx sends never needs
one, so a round trip holds for headers whose next header is the upper layer.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from stack.errors import BadPacket

VERSION: Final = 6
HEADER_LEN: Final = 40

# Extension header and upper-layer numbers (IANA "Assigned Internet Protocol
# Numbers"; RFC 8200 4).
HOP_BY_HOP: Final = 0
ROUTING: Final = 43
FRAGMENT: Final = 44
DEST_OPTIONS: Final = 60
NO_NEXT_HEADER: Final = 59
_SKIPPED: Final = frozenset((HOP_BY_HOP, ROUTING, DEST_OPTIONS))
# RFC 8200 4.1 allows Hop-by-Hop, Destination (twice), Routing, Fragment, AH,
# ESP before the upper layer; eight is more than any honest packet carries.
MAX_EXTENSION_HEADERS: Final = 8

# version/traffic class/flow label, payload length, next header, hop limit,
# source, destination.
_HDR = struct.Struct("!IHBB16s16s")
_tuple_new = tuple.__new__


class IPv6Header(NamedTuple):
    """An IPv6 header, with extension headers already walked.

    Attributes:
        traffic_class: the 8-bit traffic class (DSCP << 2 | ECN).
        flow_label: the 20-bit flow label.
        payload_length: the payload length field (extension headers included).
        next_header: the upper-layer protocol found after the extension
            headers the parser skips (equal to the header's own field when
            there are none).
        hop_limit: the hop limit.
        src: 16-byte source address.
        dst: 16-byte destination address.
    """

    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes


def parse_ipv6_untrusted(buf: memoryview) -> tuple[IPv6Header, memoryview]:
    """Parse an IPv6 header, skip extension headers, return the upper layer.

    The payload length field is honoured: bytes after it are not payload.
    Jumbograms (payload length 0 with a Jumbo option) are not supported and
    parse as an empty payload.

    Args:
        buf: the packet, starting at the IPv6 header.

    Returns:
        The header (with `next_header` set to the upper-layer protocol) and a
        view of the upper-layer bytes (no copy).

    Raises:
        BadPacket: wrong version, truncated packet, payload length beyond the
            buffer, a malformed or misplaced extension header, too many
            extension headers, or a Fragment header (message starts with
            "fragment").
    """
    n = len(buf)
    if n < HEADER_LEN:
        raise BadPacket(f"IPv6 header truncated ({n} bytes)")
    first, plen, nxt, hops, src, dst = _HDR.unpack_from(buf)
    if first >> 28 != VERSION:
        raise BadPacket(f"IP version {first >> 28} is not 6")
    end = HEADER_LEN + plen
    if end > n:
        raise BadPacket(f"IPv6 payload length {plen} beyond {n - HEADER_LEN} bytes")
    pos = HEADER_LEN
    if nxt in _SKIPPED or nxt == FRAGMENT:
        nxt, pos = _walk_extension_headers(buf, nxt, end)
    header = _tuple_new(
        IPv6Header, ((first >> 20) & 0xFF, first & 0xFFFFF, plen, nxt, hops, src, dst)
    )
    return header, buf[pos:end]


def _walk_extension_headers(buf: memoryview, nxt: int, end: int) -> tuple[int, int]:
    pos = HEADER_LEN
    for count in range(MAX_EXTENSION_HEADERS):
        if nxt == FRAGMENT:
            raise BadPacket("fragment: IPv6 Fragment header")
        if nxt not in _SKIPPED:
            return nxt, pos
        if nxt == HOP_BY_HOP and count:
            raise BadPacket("IPv6 Hop-by-Hop header not first")
        if pos + 2 > end:
            raise BadPacket(f"IPv6 extension header {nxt} truncated")
        length = (buf[pos + 1] + 1) << 3
        if pos + length > end:
            raise BadPacket(f"IPv6 extension header {nxt} length {length} beyond payload")
        nxt = buf[pos]
        pos += length
    if nxt in _SKIPPED or nxt == FRAGMENT:
        raise BadPacket(f"more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")
    return nxt, pos


def emit_ipv6_header(header: IPv6Header) -> bytes:
    """Serialise a fixed IPv6 header (no extension headers).

    Raises:
        ValueError: a field is out of range or an address is not 16 bytes.
    """
    if len(header.src) != 16 or len(header.dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if not 0 <= header.traffic_class <= 0xFF or not 0 <= header.flow_label <= 0xFFFFF:
        raise ValueError("IPv6 traffic class or flow label out of range")
    try:
        return _HDR.pack(
            (VERSION << 28) | (header.traffic_class << 20) | header.flow_label,
            header.payload_length,
            header.next_header,
            header.hop_limit,
            header.src,
            header.dst,
        )
    except struct.error as exc:
        raise ValueError(f"IPv6 header field out of range: {exc}") from exc
