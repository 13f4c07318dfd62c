"""The per-segment path of TCP over IP: what every data segment and ACK costs.

Without the TUN's virtio-net header (an Android VpnService fd, or
`--no-offload`) every TCP segment is one packet, so what the stack spends
per packet is what a stream costs. Two pieces live here:

- `parse_plain_tcp_untrusted` reads the shape almost every packet from an
  application has, IPv4 without options or IPv6 without extension headers
  carrying TCP with no options or the NOP NOP Timestamps block (RFC 7323
  Appendix A), in one `unpack_from`, and returns just what the TCP
  demultiplexer needs: the addresses, the TCP header and the payload,
  without the IP header and `Packet` values `parse_packet_untrusted`
  builds. For any other packet it returns None and the caller takes the
  general parser, which decides (and raises) exactly as it always does.
- `TcpTemplate` holds what never changes between the segments of one
  address pair (the addresses, the TTL, their share of both checksums), so
  a segment with the timestamp option is one `struct.pack` of the IP
  header, the TCP header and the option, plus the payload's checksum.
  Anything else (SYN-ACK options, SACK blocks, no timestamps) is handed to
  `packet.build_tcp_packet`; both give the same bytes, which the tests
  check.

Checksums may be skipped for packets from trusted sources (see
`parse_plain_tcp_untrusted`): the runtime decides which, docs/wire.md says why.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from typing import Final

from stack.errors import BadPacket
from stack.wire.checksum import ones_complement_sum
from stack.wire.ipv4 import PROTO_TCP
from stack.wire.packet import DEFAULT_TTL, V4_TCP_TS, V4_TCP_TS_LEN, build_tcp_packet
from stack.wire.tcp import (
    NO_OPTIONS,
    NO_SYN_OPTIONS,
    SYN,
    TS_ONLY_PREFIX,
    DataRun,
    TcpHeader,
    TcpOptions,
)

_fb = int.from_bytes
_tuple_new = tuple.__new__

# IPv6 header (no extension headers), then the TCP part of packet.V4_TCP_TS.
_V6_TCP_TS: Final = struct.Struct("!IHBB16s16sHHIIBBHHHIII")
_V6_TCP_TS_LEN: Final = 72
# The option's fixed words (NOP NOP, kind 8 length 10) in the checksum.
_TS_WORDS: Final = 0x0101 + 0x080A
# Data offset 8 words (32-byte header), in the word the flags share.
_TS_OFFSET_WORD: Final = 0x8000
_TS_OFFSET_BYTE: Final = 0x80
_SYN_FIN_RST: Final = 0x07
# A run's packet from the header bytes its segments share (the IP header and
# ports; ACK, offset, flags and window; urgent pointer and option) and the
# two fields that differ, SEQ and the checksum.
_RUN_V4: Final = struct.Struct("!24sI8sH14s")
_RUN_V6: Final = struct.Struct("!44sI8sH14s")

# What the plain parse reads: the fields of V4_TCP_TS and _V6_TCP_TS it
# uses, the others skipped as pad bytes (fewer values to make per packet;
# the IPv4 header checksum is summed from the bytes when verified).
_PLAIN_V4: Final = struct.Struct("!2xH2xH4x4s4sHHIIBBHHHIII")
_PLAIN_V6: Final = struct.Struct("!4xH2x16s16sHHIIBBHHHIII")

# A SYN's options in Linux's layout (and Android's), 20 bytes:
#
#    0               1               2               3
#   +-------+-------+---------------+
#   | 2 MSS |   4   |  MSS value    |
#   +-------+-------+-------+-------+
#   |4 SACKP|   2   | 8 TS  |  10   |
#   +-------+-------+-------+-------+
#   |            TSval              |
#   +-------------------------------+
#   |            TSecr              |
#   +-------+-------+-------+-------+
#   | 1 NOP | 3 WS  |   3   | shift |
#   +-------+-------+-------+-------+
#
# The plain parse reads the first two words where a timestamp-only header
# has its option; the other three are read only for a header of this size.
_MSS_WORD: Final = 0x0204
_SACK_PERM_TS: Final = 0x0402080A
_NOP_WS: Final = 0x010303
_SYN_TAIL: Final = struct.Struct("!III")

Segment = tuple[bytes, bytes, TcpHeader, memoryview]


def _syn_options(buf: memoryview, at: int, word0: int) -> TcpOptions | None:
    """The options of a SYN in Linux's layout (MSS, SACK permitted,
    timestamps, window scale), `at` the offset of its TSval; None when
    the last word is not NOP and window scale."""
    tsval, tsecr, last = _SYN_TAIL.unpack_from(buf, at)
    if last >> 8 != _NOP_WS:
        return None
    return _tuple_new(TcpOptions, (word0 & 0xFFFF, last & 0xFF, True, (), (tsval, tsecr)))


def parse_plain_tcp_untrusted(
    buf: memoryview, verify_checksum: bool, trusted_sources: Container[bytes] = ()
) -> Segment | None:
    """Parse the common IPv4 or IPv6 TCP packet, or return None for any other.

    Args:
        buf: one whole packet as read from the TUN.
        verify_checksum: verify the IPv4 header and TCP checksums.
        trusted_sources: source addresses whose packets are not verified
            even so (the local host's own TUN address: see docs/wire.md).

    Returns:
        (src, dst, TCP header, payload view); None when the packet is not
        IPv4 without options or IPv6 without extension headers carrying TCP
        with no options, only NOP NOP Timestamps, or a SYN's options in
        Linux's layout (`_syn_options`), or anything about it
        needs the general parser's judgement (fragments, bad lengths, a SYN
        with FIN or RST, a bad IP header checksum).

    Raises:
        BadPacket: the TCP checksum is wrong (the only verdict given here).
    """
    n = len(buf)
    if n < V4_TCP_TS_LEN:
        return None
    first = buf[0]
    if first == 0x45:
        if buf[9] != PROTO_TCP:
            return None
        (
            total,
            flags_frag,
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
        ) = _PLAIN_V4.unpack_from(buf)
        hlen = (off >> 4) << 2
        if hlen == 32 and word0 == TS_ONLY_PREFIX:
            options = _tuple_new(TcpOptions, (None, None, False, (), (tsval, tsecr)))
        elif hlen == 20:
            options = NO_OPTIONS
        elif hlen == 40 and n >= 60 and word0 >> 16 == _MSS_WORD and tsval == _SACK_PERM_TS:
            syn_options = _syn_options(buf, 48, word0)
            if syn_options is None:
                return None
            options = syn_options
        else:
            return None
        if (
            total > n
            or total < 20 + hlen
            or flags_frag & 0x3FFF
            or (flags & 0x02 and flags & _SYN_FIN_RST != 0x02)
        ):
            return None
        if verify_checksum and src not in trusted_sources:
            if _fb(buf[:20], "little") % 0xFFFF:
                return None
            # total - 20 is the TCP length, + 6 the protocol: with the
            # addresses at 12..20 that makes the whole pseudo-header.
            if ones_complement_sum(buf[12:total], total - 14) != 0xFFFF:
                raise BadPacket("TCP checksum mismatch")
        header = _tuple_new(
            TcpHeader, (sport, dport, seq, ack, flags, window, tcp_sum, urgent, options)
        )
        return src, dst, header, buf[20 + hlen : total]
    # IPv6 here, not in a function of its own: a call is ~0.1 us per packet.
    if n < _V6_TCP_TS_LEN or first >> 4 != 6 or buf[6] != PROTO_TCP:
        return None
    (
        length,
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
    ) = _PLAIN_V6.unpack_from(buf)
    hlen = (off >> 4) << 2
    if hlen == 32 and word0 == TS_ONLY_PREFIX:
        options = _tuple_new(TcpOptions, (None, None, False, (), (tsval, tsecr)))
    elif hlen == 20:
        options = NO_OPTIONS
    elif hlen == 40 and n >= 80 and word0 >> 16 == _MSS_WORD and tsval == _SACK_PERM_TS:
        syn_options = _syn_options(buf, 68, word0)
        if syn_options is None:
            return None
        options = syn_options
    else:
        return None
    total = 40 + length
    if total > n or length < hlen or (flags & 0x02 and flags & _SYN_FIN_RST != 0x02):
        return None
    # The addresses at 8..40 and the segment after them, plus the length
    # and the next header: the whole pseudo-header (RFC 8200 8.1).
    if (
        verify_checksum
        and src not in trusted_sources
        and ones_complement_sum(buf[8:total], length + PROTO_TCP) != 0xFFFF
    ):
        raise BadPacket("TCP checksum mismatch")
    header = _tuple_new(
        TcpHeader, (sport, dport, seq, ack, flags, window, tcp_sum, urgent, options)
    )
    return src, dst, header, buf[40 + hlen : total]


def source_address(buf: memoryview) -> bytes | None:
    """Return the source address of an IPv4 or IPv6 packet, if it has one."""
    n = len(buf)
    version = buf[0] >> 4 if n else 0
    if version == 4 and n >= 20:
        return bytes(buf[12:16])
    if version == 6 and n >= 40:
        return bytes(buf[8:24])
    return None


class TcpTemplate:
    """Builds the TCP packets from one address to another.

    `build(hdr, payload)` returns the same bytes as
    `build_tcp_packet(src, dst, hdr, payload, ttl=..., partial_checksum=...)`;
    for a header with only the timestamp option (every segment after the
    handshake, on connections that use timestamps) it packs the whole
    header in one call and sums only the fields that change.
    """

    __slots__ = (
        "_dst",
        "_ip_base",
        "_partial",
        "_pseudo_base",
        "_six",
        "_src",
        "_ts_options",
        "_ttl",
    )

    def __init__(
        self, src: bytes, dst: bytes, *, ttl: int = DEFAULT_TTL, partial_checksum: bool = False
    ) -> None:
        """Prepare the packets from `src` to `dst`.

        Raises:
            ValueError: the addresses are not both 4 or both 16 bytes, or the
                TTL is out of range.
        """
        if len(src) != len(dst) or len(src) not in (4, 16):
            raise ValueError("addresses must both be 4 or both be 16 bytes")
        if not 0 <= ttl <= 0xFF:
            raise ValueError(f"TTL {ttl} out of range")
        self._src = src
        self._dst = dst
        self._ttl = ttl
        self._partial = partial_checksum
        self._six = len(src) == 16
        addr = _fb(src, "big") + _fb(dst, "big")
        # The pseudo-header without the length, and the TCP words that are
        # the same in every such header; the IPv4 header's constant words.
        self._pseudo_base = addr + PROTO_TCP
        self._ip_base = 0x4500 + 0x4000 + (ttl << 8) + PROTO_TCP + addr
        # The last options value found to carry only a timestamp.
        self._ts_options: TcpOptions | None = None

    def build_run(self, run: DataRun) -> list[bytes]:
        """Return the packets of `run`: `build` of each of `run.segments()`.

        A run's segments differ only in SEQ, the checksum and perhaps the
        last one's flags: the first packet is built by `build` (which
        checks every field), the others reuse its header bytes and the sum
        of the fields they share, and add their SEQ and payload sums.
        """
        first, mss, payloads, last_flags = run
        options = first.options
        if (
            len(payloads) < 2
            or first.flags & SYN
            or options.timestamp is None
            or (options is not self._ts_options and not self._ts_only(options))
        ):
            return [self.build(hdr, payload) for hdr, payload in run.segments()]
        seq = first.seq
        flags = first.flags
        packets = [self.build(first, payloads[0])]
        head = packets[0]
        cut = 44 if self._six else 24
        prefix = head[:cut]
        middle = head[cut + 4 : cut + 12]
        tail = head[cut + 14 : cut + 28]
        pack = _RUN_V6.pack if self._six else _RUN_V4.pack
        last = len(payloads) - 1
        if self._partial:
            # The pseudo-header sum alone: the same in every packet.
            csum = _fb(head[cut + 12 : cut + 14], "big")
            for i in range(1, last + 1):
                if i == last:
                    middle = middle[:5] + bytes((last_flags,)) + middle[6:]
                packets.append(
                    pack(prefix, (seq + i * mss) & 0xFFFFFFFF, middle, csum, tail) + payloads[i]
                )
            return packets
        sport, dport, _, ack, _, window, _, urgent, _ = first
        tsval, tsecr = options.timestamp
        # As in `build`: the fields' values, congruent to their words' sum.
        common = (
            self._pseudo_base
            + 32
            + mss
            + sport
            + dport
            + ack
            + window
            + urgent
            + _TS_OFFSET_WORD
            + _TS_WORDS
            + tsval
            + tsecr
        )
        for i in range(1, last + 1):
            if i == last and last_flags != flags:
                middle = middle[:5] + bytes((last_flags,)) + middle[6:]
                flags = last_flags
            pos = (seq + i * mss) & 0xFFFFFFFF
            payload = payloads[i]
            csum = -(common + flags + pos + ones_complement_sum(payload)) % 0xFFFF
            packets.append(pack(prefix, pos, middle, csum, tail) + payload)
        return packets

    def _ts_only(self, options: TcpOptions) -> bool:
        """Return True (and remember `options`) if it carries only a timestamp."""
        if options[:4] != NO_SYN_OPTIONS:
            return False
        self._ts_options = options
        return True

    def build(self, hdr: TcpHeader, payload: bytes | bytearray | memoryview = b"") -> bytes:
        """Return the packet carrying `hdr` and `payload` (its checksum field ignored).

        Raises:
            ValueError: a field out of range, or the packet too long.
        """
        sport, dport, seq, ack, flags, window, _, urgent, options = hdr
        ts = options.timestamp
        # The headers of one output share one options value: it is checked
        # once (identity), not sliced and compared for every segment.
        if (
            ts is None
            or flags & SYN
            or (options is not self._ts_options and not self._ts_only(options))
        ):
            return build_tcp_packet(
                self._src,
                self._dst,
                hdr,
                payload,
                ttl=self._ttl,
                partial_checksum=self._partial,
            )
        tsval, tsecr = ts
        length = 32 + len(payload)
        if self._partial:
            csum = (self._pseudo_base + length) % 0xFFFF or 0xFFFF
        else:
            # 32-bit fields are congruent to the sum of their 16-bit words
            # modulo 0xFFFF, so the sum is taken of the field values; an
            # out-of-range value makes the pack below fail.
            total = (
                self._pseudo_base
                + length
                + sport
                + dport
                + seq
                + ack
                + window
                + urgent
                + _TS_OFFSET_WORD
                + flags
                + _TS_WORDS
                + tsval
                + tsecr
            )
            if payload:
                total += ones_complement_sum(payload)
            csum = -total % 0xFFFF
        try:
            if self._six:
                if length > 0xFFFF:
                    raise ValueError(f"IPv6 payload of {length} bytes exceeds 65535")
                head = _V6_TCP_TS.pack(
                    0x60000000,
                    length,
                    PROTO_TCP,
                    self._ttl,
                    self._src,
                    self._dst,
                    sport,
                    dport,
                    seq,
                    ack,
                    _TS_OFFSET_BYTE,
                    flags,
                    window,
                    csum,
                    urgent,
                    TS_ONLY_PREFIX,
                    tsval,
                    tsecr,
                )
            else:
                size = 20 + length
                if size > 0xFFFF:
                    raise ValueError(f"IPv4 packet of {size} bytes exceeds 65535")
                head = V4_TCP_TS.pack(
                    0x45,
                    0,
                    size,
                    0,
                    0x4000,  # DF, identification 0: atomic (RFC 6864 4.1)
                    self._ttl,
                    PROTO_TCP,
                    -(self._ip_base + size) % 0xFFFF,
                    self._src,
                    self._dst,
                    sport,
                    dport,
                    seq,
                    ack,
                    _TS_OFFSET_BYTE,
                    flags,
                    window,
                    csum,
                    urgent,
                    TS_ONLY_PREFIX,
                    tsval,
                    tsecr,
                )
        except struct.error as exc:
            raise ValueError(f"header field out of range: {exc}") from exc
        return head + payload if payload else head
