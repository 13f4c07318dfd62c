"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) headers: parse, emit, constants.

Both versions share the same first eight bytes, so one value type serves
both; the packet layer knows which version it holds and owns the checksum
(ICMPv6 covers a pseudo-header, ICMPv4 does not). The 32-bit "rest of header"
is kept as one integer: identifier << 16 | sequence for echo messages, the
MTU for Packet Too Big, the pointer for Parameter Problem, zero otherwise.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     Type      |     Code      |          Checksum             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                     Rest of Header                            |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     Message body (for errors: as much of the invoking packet  |
    |     as fits) ...                                              |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from stack.errors import BadPacket

HEADER_LEN: Final = 8

# ICMPv4 types (RFC 792) and destination-unreachable codes (RFC 792, RFC 1812).
ICMP_ECHO_REPLY: Final = 0
ICMP_DEST_UNREACH: Final = 3
ICMP_SOURCE_QUENCH: Final = 4
ICMP_REDIRECT: Final = 5
ICMP_ECHO_REQUEST: Final = 8
ICMP_TIME_EXCEEDED: Final = 11
ICMP_PARAM_PROBLEM: Final = 12
UNREACH_NET: Final = 0
UNREACH_HOST: Final = 1
UNREACH_PROTOCOL: Final = 2
UNREACH_PORT: Final = 3
UNREACH_FRAG_NEEDED: Final = 4
UNREACH_ADMIN: Final = 13
_ICMP_ERRORS: Final = frozenset(
    (ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM)
)

# ICMPv6 types (RFC 4443, RFC 4861) and destination-unreachable codes.
ICMP6_DEST_UNREACH: Final = 1
ICMP6_PACKET_TOO_BIG: Final = 2
ICMP6_TIME_EXCEEDED: Final = 3
ICMP6_PARAM_PROBLEM: Final = 4
ICMP6_ECHO_REQUEST: Final = 128
ICMP6_ECHO_REPLY: Final = 129
ICMP6_ROUTER_SOLICIT: Final = 133
ICMP6_ROUTER_ADVERT: Final = 134
ICMP6_NEIGHBOR_SOLICIT: Final = 135
ICMP6_NEIGHBOR_ADVERT: Final = 136
UNREACH6_NO_ROUTE: Final = 0
UNREACH6_ADMIN: Final = 1
UNREACH6_BEYOND_SCOPE: Final = 2
UNREACH6_ADDR: Final = 3
UNREACH6_PORT: Final = 4

_HDR = struct.Struct("!BBHI")
_tuple_new = tuple.__new__


class IcmpHeader(NamedTuple):
    """An ICMPv4 or ICMPv6 header.

    Attributes:
        type: the message type.
        code: the message code.
        checksum: the checksum field.
        rest: the 32-bit rest of header (see `echo_rest`).
    """

    type: int
    code: int
    checksum: int
    rest: int = 0


def parse_icmp_untrusted(buf: memoryview) -> tuple[IcmpHeader, memoryview]:
    """Parse an ICMPv4 or ICMPv6 header.

    Args:
        buf: the ICMP message (the IP payload).

    Returns:
        The header and a view of the message body.

    Raises:
        BadPacket: fewer than 8 bytes.
    """
    n = len(buf)
    if n < HEADER_LEN:
        raise BadPacket(f"ICMP header truncated ({n} bytes)")
    return _tuple_new(IcmpHeader, _HDR.unpack_from(buf)), buf[HEADER_LEN:]


def emit_icmp_header(header: IcmpHeader) -> bytes:
    """Serialise a header, checksum field as given.

    Raises:
        ValueError: a field is out of range.
    """
    try:
        return _HDR.pack(*header)
    except struct.error as exc:
        raise ValueError(f"ICMP header field out of range: {exc}") from exc


def echo_rest(ident: int, seq: int) -> int:
    """Pack an echo identifier and sequence number into `IcmpHeader.rest`."""
    return ((ident & 0xFFFF) << 16) | (seq & 0xFFFF)


def echo_ident_seq(rest: int) -> tuple[int, int]:
    """Split `IcmpHeader.rest` of an echo message into (identifier, sequence)."""
    return rest >> 16, rest & 0xFFFF


def is_icmp_error(version: int, icmp_type: int) -> bool:
    """Tell whether a message is an ICMP error (never answered with an error).

    RFC 1122 3.2.2 and RFC 4443 2.4(e) forbid sending an ICMP error about an
    ICMP error; for ICMPv6, types below 128 are errors.

    Args:
        version: 4 or 6.
        icmp_type: the message type.
    """
    if version == 6:
        return icmp_type < 128
    return icmp_type in _ICMP_ERRORS
