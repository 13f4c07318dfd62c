"""Raw packet builders and the input reader the harnesses share.

The stack's own builders (`stack.wire.packet`) refuse what no sane sender
writes; these write anything (SYN+FIN, option bytes that do not parse, a
broken checksum) with plain struct packing, so the harnesses and the
end-to-end storm (tests/e2e/storm.py, which runs in a namespace and imports
this module) can aim such packets at the stack. Nothing here imports the
project's packages.
"""

from __future__ import annotations

import struct

_IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")


class ByteReader:
    """Takes numbers and byte strings off a fuzz input; past its end, zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def num(self, nbytes: int) -> int:
        """The next `nbytes` as a big-endian unsigned number."""
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "big")

    def take(self, n: int) -> bytes:
        """The next `n` bytes (fewer at the end)."""
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, frag: int = 0) -> bytes:
    """A valid-looking IPv4 header (right checksum) for any payload."""
    total = 20 + payload_len
    hdr = bytearray(_IPV4_HDR.pack(0x45, 0, total & 0xFFFF, 1, frag, 64, proto, 0, src, dst))
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return bytes(hdr)


def ipv4_packet(src: bytes, dst: bytes, proto: int, body: bytes, frag: int = 0) -> bytes:
    """`body` behind a valid-looking IPv4 header."""
    return ipv4_header(src, dst, proto, len(body), frag) + body


def tcp_packet(
    src: bytes,
    dst: bytes,
    ports: tuple[int, int],
    seq: int,
    ack: int,
    flags: int,
    options: bytes = b"",
    payload: bytes = b"",
    *,
    window: int = 512,
    good_checksum: bool = True,
) -> bytes:
    """IPv4 + TCP with any flags and option bytes (up to 40).

    Unlike `stack.wire.packet.build_tcp_packet` it writes what no sane
    sender would (SYN+FIN, option bytes that do not parse). The checksums
    are right unless `good_checksum` is false (then the TCP one is wrong).
    The TCP segment alone is ``tcp_packet(...)[20:]``.
    """
    options = options[:40]
    options += b"\0" * (-len(options) % 4)
    offset = (5 + len(options) // 4) << 4
    head = _TCP_HDR.pack(*ports, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, offset, flags, window, 0, 0)
    seg = bytearray(head + options + payload)
    csum = checksum(src + dst + struct.pack("!BBH", 0, 6, len(seg)) + bytes(seg))
    struct.pack_into("!H", seg, 16, csum if good_checksum else csum ^ 0x0F0F)
    return ipv4_packet(src, dst, 6, bytes(seg))
