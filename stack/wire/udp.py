"""UDP header (RFC 768): parse and emit.

The checksum needs the IP pseudo-header, so the packet layer
(`stack.wire.packet`) verifies and computes it; this module only checks the
length field, which bounds the datagram: bytes after `length` are not payload
(Linux trims them the same way).

     0      7 8     15 16    23 24    31
    +--------+--------+--------+--------+
    |     Source      |   Destination   |
    |      Port       |      Port       |
    +--------+--------+--------+--------+
    |                 |                 |
    |     Length      |    Checksum     |
    +--------+--------+--------+--------+
    |
    |          data octets ...
    +---------------- ...
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from stack.errors import BadPacket

HEADER_LEN: Final = 8
_HDR = struct.Struct("!HHHH")
_tuple_new = tuple.__new__


class UdpHeader(NamedTuple):
    """A UDP header.

    Attributes:
        src_port: source port.
        dst_port: destination port.
        length: header plus payload, in bytes.
        checksum: the checksum field (0 over IPv4 means "none").
    """

    src_port: int
    dst_port: int
    length: int
    checksum: int = 0


def parse_udp_untrusted(buf: memoryview) -> tuple[UdpHeader, memoryview]:
    """Parse a UDP header.

    Args:
        buf: the UDP header and payload (the IP payload).

    Returns:
        The header and a view of the `length - 8` payload bytes.

    Raises:
        BadPacket: truncated header, or a length field below 8 or beyond
            the buffer.
    """
    n = len(buf)
    if n < HEADER_LEN:
        raise BadPacket(f"UDP header truncated ({n} bytes)")
    fields = _HDR.unpack_from(buf)
    length = fields[2]
    if length < HEADER_LEN or length > n:
        raise BadPacket(f"UDP length {length} out of range (8..{n})")
    return _tuple_new(UdpHeader, fields), buf[HEADER_LEN:length]


def emit_udp_header(header: UdpHeader) -> bytes:
    """Serialise a header, every field as given.

    Raises:
        ValueError: a field does not fit in 16 bits.
    """
    try:
        return _HDR.pack(*header)
    except struct.error as exc:
        raise ValueError(f"UDP header field out of range: {exc}") from exc
