"""TCP header and options (RFC 9293 section 3.1, RFC 7323, RFC 2018).

`TcpHeader` is both what `parse_tcp_untrusted` returns and what
`emit_tcp_header` writes, so every header survives a round trip. Parsing
checks lengths before reading a field and raises only `BadPacket`. The
checksum is not verified here: it needs the IP pseudo-header, so the packet
layer (`stack.wire.packet`) owns it.

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |          Source Port          |       Destination Port        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                        Sequence Number                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Acknowledgment Number                      |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Data |       |C|E|U|A|P|R|S|F|                               |
    | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
    |       |       |R|E|G|K|H|T|N|N|                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |           Checksum            |         Urgent Pointer        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                           [Options]                           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Value types are `NamedTuple`s: immutable, without a per-instance dict, and
built straight from `struct` tuples, which keeps the per-packet cost low
(an attrs frozen class costs about three times as much to create).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from stack.errors import BadPacket

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

HEADER_LEN = 20
MAX_OPTIONS_LEN = 40

_HDR = struct.Struct("!HHIIBBHHH")
# The fixed header followed by the first three option words: read in one call
# whenever 32 bytes are there, so the usual NOP NOP TS block costs nothing more.
_HDR_TS = struct.Struct("!HHIIBBHHHIII")
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
# Option kinds (IANA "TCP Option Kind Numbers").
_EOL, _NOP, _MSS, _WSCALE, _SACK_PERM, _SACK, _TIMESTAMP = 0, 1, 2, 3, 4, 5, 8
# The option block almost every data segment carries: NOP NOP TS(len 10),
# as the first word of the options (the packet parsers' fast paths test it).
TS_ONLY_PREFIX = 0x0101080A
_TS_ONLY_BYTES = TS_ONLY_PREFIX.to_bytes(4, "big")
# NOP NOP TS(len 10) TSval TSecr, and the option fields that must be unset
# for a segment to carry only that block.
_TS_ONLY_BLOCK = struct.Struct("!4sII")
NO_SYN_OPTIONS = (None, None, False, ())
# A SYN's or SYN-ACK's options with all four kinds offered, in the order
# `_emit_options_general` writes them (Linux's): MSS, SACK permitted and
# TS, NOP and window scale; packed in one call.
_FULL_SYN_BLOCK = struct.Struct("!BBH4sII3sB")
_SACK_PERM_TS = bytes((_SACK_PERM, 2, _TIMESTAMP, 10))
_NOP_WS = bytes((_NOP, _WSCALE, 3))
# NamedTuple's generated __new__ is a Python function; calling tuple.__new__
# with a ready tuple skips that frame (about 0.25 us per header here).
_tuple_new = tuple.__new__


class TcpOptions(NamedTuple):
    """The TCP options tun2sx understands; unknown options are skipped.

    Attributes:
        mss: maximum segment size (SYN only).
        wscale: window scale shift count (SYN only), capped at 14 by the user.
        sack_permitted: SACK-permitted seen (SYN only).
        sack_blocks: (left, right) sequence-number pairs of SACK blocks.
        timestamp: (TSval, TSecr), or None if absent.
    """

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamp: tuple[int, int] | None = None


NO_OPTIONS = TcpOptions()


class TcpHeader(NamedTuple):
    """A TCP header. `window` is the raw 16-bit field, not scaled."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    checksum: int = 0
    urgent: int = 0
    options: TcpOptions = NO_OPTIONS


class DataRun(NamedTuple):
    """Full-sized data segments in a row, sent together: one header's worth.

    Segment i carries `payloads[i]` (each `mss` octets) behind the header
    `first` with SEQ advanced by i * `mss` (modulo 2**32); the last one has
    `last_flags` instead of `first.flags`. Everything else is the same in
    all of them, so a packet builder can take the run's common fields once
    (`segment.TcpTemplate.build_run`); `segments` gives the headers one by
    one.
    """

    first: TcpHeader
    mss: int
    payloads: list[bytes | memoryview]
    last_flags: int

    def segments(self) -> list[tuple[TcpHeader, bytes | memoryview]]:
        """Return the run as (header, payload) pairs."""
        first, mss, payloads, last_flags = self
        last = len(payloads) - 1
        seq = first.seq
        return [
            (
                first._replace(
                    seq=(seq + i * mss) & 0xFFFFFFFF,
                    flags=last_flags if i == last else first.flags,
                ),
                payload,
            )
            for i, payload in enumerate(payloads)
        ]


def parse_tcp_untrusted(buf: memoryview) -> tuple[TcpHeader, memoryview]:
    """Parse a TCP segment.

    Args:
        buf: the TCP header and payload (the IP payload).

    Returns:
        The header and a view of the payload.

    Raises:
        BadPacket: truncated header, bad data offset, malformed options, or
            a SYN combined with FIN or RST.
    """
    n = len(buf)
    if n >= 32:
        sport, dport, seq, ack, off, flags, window, checksum, urgent, word0, tsval, tsecr = (
            _HDR_TS.unpack_from(buf)
        )
    elif n >= HEADER_LEN:
        sport, dport, seq, ack, off, flags, window, checksum, urgent = _HDR.unpack_from(buf)
        word0 = tsval = tsecr = 0
    else:
        raise BadPacket(f"TCP header truncated ({n} bytes)")
    hlen = (off >> 4) << 2
    if hlen < HEADER_LEN or hlen > n:
        raise BadPacket(f"TCP data offset {hlen} out of range for {n} bytes")
    if flags & SYN and flags & (FIN | RST):
        raise BadPacket("TCP SYN combined with FIN or RST")
    if hlen == HEADER_LEN:
        options = NO_OPTIONS
    elif hlen == 32 and word0 == TS_ONLY_PREFIX:
        options = _tuple_new(TcpOptions, (None, None, False, (), (tsval, tsecr)))
    else:
        options = _parse_options(buf[HEADER_LEN:hlen])
    header = _tuple_new(
        TcpHeader, (sport, dport, seq, ack, flags, window, checksum, urgent, options)
    )
    return header, buf[hlen:]


def _parse_options(opt: memoryview) -> TcpOptions:
    mss = wscale = None
    sack_permitted = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamp = None
    i = 0
    end = len(opt)
    while i < end:
        kind = opt[i]
        if kind == _EOL:
            break
        if kind == _NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise BadPacket("TCP option length missing")
        length = opt[i + 1]
        if length < 2 or i + length > end:
            raise BadPacket(f"TCP option {kind} has bad length {length}")
        # A known option with the wrong length is ignored, as Linux does.
        if kind == _MSS and length == 4:
            mss = _U16.unpack_from(opt, i + 2)[0]
        elif kind == _WSCALE and length == 3:
            wscale = opt[i + 2]
        elif kind == _SACK_PERM and length == 2:
            sack_permitted = True
        elif kind == _TIMESTAMP and length == 10:
            timestamp = _U32X2.unpack_from(opt, i + 2)
        elif kind == _SACK and length in (10, 18, 26, 34):
            count = (length - 2) // 8
            blocks = struct.unpack_from(f"!{2 * count}I", opt, i + 2)
            sack_blocks = tuple(zip(blocks[0::2], blocks[1::2], strict=True))
        i += length
    return TcpOptions(mss, wscale, sack_permitted, sack_blocks, timestamp)


def emit_options(options: TcpOptions) -> bytes:
    """Serialise options, 32-bit aligned with NOPs (Linux's layout).

    Raises:
        ValueError: the options do not fit in 40 bytes, or a field is out
            of range.
    """
    if options is NO_OPTIONS:
        return b""
    if options.timestamp is not None and options[:4] == NO_SYN_OPTIONS:
        # Every segment after the handshake: NOP NOP TS, packed in one call.
        try:
            return _TS_ONLY_BLOCK.pack(_TS_ONLY_BYTES, *options.timestamp)
        except struct.error as exc:
            raise ValueError(f"TCP timestamp out of range: {exc}") from exc
    mss, wscale, sack_permitted, sack_blocks, timestamp = options
    if (
        sack_permitted
        and mss is not None
        and wscale is not None
        and timestamp is not None
        and not sack_blocks
    ):
        # Every SYN-ACK to an application that offered all four: one call.
        try:
            return _FULL_SYN_BLOCK.pack(_MSS, 4, mss, _SACK_PERM_TS, *timestamp, _NOP_WS, wscale)
        except struct.error:
            pass  # the general path names the field
    try:
        out = _emit_options_general(options)
    except struct.error as exc:
        raise ValueError(f"TCP option field out of range: {exc}") from exc
    if len(out) > MAX_OPTIONS_LEN:
        raise ValueError(f"TCP options take {len(out)} bytes, more than {MAX_OPTIONS_LEN}")
    return out


def _emit_options_general(options: TcpOptions) -> bytes:
    parts: list[bytes] = []
    if options.mss is not None:
        parts.append(struct.pack("!BBH", _MSS, 4, options.mss))
    if options.timestamp is not None:
        tsval, tsecr = options.timestamp
        lead = bytes((_SACK_PERM, 2)) if options.sack_permitted else b"\x01\x01"
        parts.append(lead + struct.pack("!BBII", _TIMESTAMP, 10, tsval, tsecr))
    elif options.sack_permitted:
        parts.append(bytes((_NOP, _NOP, _SACK_PERM, 2)))
    if options.wscale is not None:
        parts.append(bytes((_NOP, _WSCALE, 3, options.wscale)))
    if options.sack_blocks:
        flat = [edge for block in options.sack_blocks for edge in block]
        parts.append(
            bytes((_NOP, _NOP, _SACK, 2 + 4 * len(flat))) + struct.pack(f"!{len(flat)}I", *flat)
        )
    return b"".join(parts)


def emit_tcp_header(header: TcpHeader) -> bytes:
    """Serialise a header with its options, checksum field as given.

    Raises:
        ValueError: a field is out of range or the options do not fit.
    """
    opts = emit_options(header.options)
    hlen = HEADER_LEN + len(opts)
    if header.flags & SYN and header.flags & (FIN | RST):
        raise ValueError("TCP SYN cannot be combined with FIN or RST")
    try:
        fixed = _HDR.pack(
            header.src_port,
            header.dst_port,
            header.seq,
            header.ack,
            (hlen >> 2) << 4,
            header.flags,
            header.window,
            header.checksum,
            header.urgent,
        )
    except struct.error as exc:
        raise ValueError(f"TCP header field out of range: {exc}") from exc
    return fixed + opts
