"""Differential tests: stack.wire and dpkt read the same bytes the same way.

dpkt is an independent implementation, so agreement on field values and on
recomputed checksums catches mistakes a round trip through our own emitter
would repeat. Golden kernel packets go through the same comparison in
test_golden.py.
"""

from __future__ import annotations

import struct

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from stack.wire.packet import (
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    parse_packet_untrusted,
)
from stack.wire.tcp import TcpHeader, parse_tcp_untrusted
from tests.stack.wire.strategies import address_pairs, payloads, tcp_headers, u8, u16, u32
from tests.support.wire import assert_same, dpkt_options


@given(address_pairs, tcp_headers(), payloads)
def test_tcp_packets(addrs: tuple[bytes, bytes], h: TcpHeader, data: bytes) -> None:
    raw = build_tcp_packet(*addrs, h, data)
    assert_same(raw, parse_packet_untrusted(memoryview(raw)))


@given(address_pairs, u16, u16, payloads)
def test_udp_packets(addrs: tuple[bytes, bytes], sp: int, dp: int, data: bytes) -> None:
    raw = build_udp_packet(*addrs, sp, dp, data)
    assert_same(raw, parse_packet_untrusted(memoryview(raw)))


@given(address_pairs, st.sampled_from([0, 3, 8, 11, 1, 2, 128, 129]), u8, u32, payloads)
def test_icmp_packets(
    addrs: tuple[bytes, bytes], icmp_type: int, code: int, rest: int, data: bytes
) -> None:
    raw = build_icmp_packet(*addrs, icmp_type, code, rest, data)
    assert_same(raw, parse_packet_untrusted(memoryview(raw)))


# Well-formed option lists, including kinds tun2sx skips and known kinds with
# the wrong length (which both sides must ignore).
option = st.one_of(
    st.just(b"\x01"),
    st.builds(lambda v: b"\x02\x04" + v.to_bytes(2, "big"), u16),
    st.builds(lambda v: bytes([3, 3, v]), u8),
    st.just(b"\x04\x02"),
    st.builds(lambda a, b: b"\x08\x0a" + struct.pack("!II", a, b), u32, u32),
    st.lists(u32, min_size=2, max_size=8)
    .filter(lambda e: len(e) % 2 == 0)
    .map(lambda e: bytes([5, 2 + 4 * len(e)]) + struct.pack(f"!{len(e)}I", *e)),
    st.builds(lambda k, b: bytes([k, 2 + len(b)]) + b, st.sampled_from([6, 30, 34, 254]), payloads),
    st.builds(lambda b: b"\x02" + bytes([2 + len(b)]) + b, st.binary(max_size=3)),
)


@given(st.lists(option, max_size=8))
def test_tcp_option_parsing(options: list[bytes]) -> None:
    block = b"".join(options)
    if len(block) > 40:
        block = b""
    block += bytes(-len(block) % 4)
    raw = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, (20 + len(block)) // 4 << 4, 0x10, 5, 0, 0) + block
    ours = parse_tcp_untrusted(memoryview(raw))[0]
    theirs = dpkt.tcp.TCP(raw)
    # With several copies of an option, both keep the last one.
    assert ours.options == dpkt_options(theirs.opts)
