"""IPv4 header (RFC 791): parse with the header checksum verified, and emit.

tun2sx terminates every flow itself, so it never forwards: options are kept
as raw bytes and otherwise ignored. Fragments are refused with a `BadPacket`
whose message starts with "fragment", so the per-packet path never pays for
them; the caller hands those to reassembly (`stack.wire.fragment`,
`stack.fragments`).

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |Version|  IHL  |Type of Service|          Total Length         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Identification        |Flags|      Fragment Offset    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Time to Live |    Protocol   |         Header Checksum       |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                       Source Address                          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Destination Address                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Options                    |    Padding    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The type of service byte is kept whole (DSCP and ECN together).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from stack.errors import BadPacket

VERSION: Final = 4
HEADER_LEN: Final = 20
MAX_HEADER_LEN: Final = 60
MAX_OPTIONS_LEN: Final = MAX_HEADER_LEN - HEADER_LEN

# The 3-bit flags field: bit 0 is reserved, then Don't Fragment, More Fragments.
FLAG_RESERVED: Final = 0b100
FLAG_DF: Final = 0b010
FLAG_MF: Final = 0b001

# Protocol numbers (IANA "Assigned Internet Protocol Numbers").
PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

# ver/ihl, tos, total length, id, flags/fragment offset, ttl, protocol,
# checksum, source, destination.
_HDR = struct.Struct("!BBHHHBBH4s4s")
_fb = int.from_bytes
_tuple_new = tuple.__new__


class IPv4Header(NamedTuple):
    """An IPv4 header.

    Attributes:
        tos: the whole type-of-service byte (DSCP << 2 | ECN).
        total_length: header plus payload, in bytes.
        ident: the identification field.
        flags: the 3-bit flags field (`FLAG_DF`, `FLAG_MF`).
        frag_offset: the fragment offset in 8-byte units.
        ttl: time to live.
        proto: the upper-layer protocol number.
        checksum: the header checksum as received (emit computes its own).
        src: 4-byte source address.
        dst: 4-byte destination address.
        options: raw option bytes, a multiple of 4 long (kept, not interpreted).
    """

    tos: int
    total_length: int
    ident: int
    flags: int
    frag_offset: int
    ttl: int
    proto: int
    checksum: int
    src: bytes
    dst: bytes
    options: bytes = b""


def parse_ipv4_untrusted(
    buf: memoryview, *, verify_checksum: bool = True
) -> tuple[IPv4Header, memoryview]:
    """Parse an IPv4 header and return it with a view of its payload.

    The total length field is honoured: bytes after it (link padding) are not
    part of the payload.

    Args:
        buf: the packet, starting at the IPv4 header.
        verify_checksum: verify the header checksum (False only for bytes
            whose integrity the source vouches for, such as the local kernel).

    Returns:
        The header and a view of the payload (no copy).

    Raises:
        BadPacket: wrong version, truncated packet, bad header length, total
            length out of range, bad header checksum, or a fragment (the
            message then starts with "fragment").
    """
    n = len(buf)
    if n < HEADER_LEN:
        raise BadPacket(f"IPv4 header truncated ({n} bytes)")
    ver_ihl, tos, total, ident, flags_frag, ttl, proto, csum, src, dst = _HDR.unpack_from(buf)
    if ver_ihl >> 4 != VERSION:
        raise BadPacket(f"IP version {ver_ihl >> 4} is not 4")
    hlen = (ver_ihl & 0x0F) << 2
    if hlen < HEADER_LEN:
        raise BadPacket(f"IPv4 header length {hlen} below {HEADER_LEN}")
    if total < hlen or total > n:
        raise BadPacket(f"IPv4 total length {total} out of range ({hlen}..{n})")
    # A valid header sums to 0xFFFF, i.e. 0 modulo 0xFFFF; the version nibble
    # makes an all-zero header (the other zero) impossible.
    if verify_checksum and _fb(buf[:hlen], "little") % 0xFFFF:
        raise BadPacket("IPv4 header checksum mismatch")
    if flags_frag & 0x3FFF:
        raise BadPacket(
            f"fragment: IPv4 offset {(flags_frag & 0x1FFF) << 3}, "
            f"more fragments {bool(flags_frag & 0x2000)}"
        )
    options = b"" if hlen == HEADER_LEN else buf[HEADER_LEN:hlen].tobytes()
    header = _tuple_new(
        IPv4Header,
        (tos, total, ident, flags_frag >> 13, 0, ttl, proto, csum, src, dst, options),
    )
    return header, buf[hlen:total]


def emit_ipv4_header(header: IPv4Header) -> bytes:
    """Serialise a header with a freshly computed header checksum.

    `header.checksum` is ignored; `total_length` is written as given (the
    caller knows the payload length).

    Raises:
        ValueError: a field is out of range, an address is not 4 bytes, or the
            options are not a multiple of 4 bytes up to 40.
    """
    opts = header.options
    if len(opts) % 4 or len(opts) > MAX_OPTIONS_LEN:
        raise ValueError(f"IPv4 options must be 4-byte aligned and at most 40, got {len(opts)}")
    if len(header.src) != 4 or len(header.dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    if not 0 <= header.flags <= 0b111 or not 0 <= header.frag_offset <= 0x1FFF:
        raise ValueError("IPv4 flags or fragment offset out of range")
    hlen = HEADER_LEN + len(opts)
    fields = (
        (VERSION << 4) | (hlen >> 2),
        header.tos,
        header.total_length,
        header.ident,
        (header.flags << 13) | header.frag_offset,
        header.ttl,
        header.proto,
    )
    try:
        raw = _HDR.pack(*fields, 0, header.src, header.dst)
    except struct.error as exc:
        raise ValueError(f"IPv4 header field out of range: {exc}") from exc
    # The version nibble makes the sum non-zero, so -sum mod 0xFFFF is its
    # one's complement (0 for a sum of 0xFFFF, which the modulo reports as 0).
    csum = -_fb(raw + opts, "big") % 0xFFFF
    return _HDR.pack(*fields, csum, header.src, header.dst) + opts


def is_fragment_error(exc: BadPacket) -> bool:
    """Tell whether a `BadPacket` from the IP parsers reports a fragment.

    The network layer sends such packets to reassembly instead of counting
    them as malformed.
    """
    return str(exc).startswith("fragment")
