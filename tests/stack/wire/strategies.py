"""Hypothesis strategies for wire values that `emit_*` accepts.

Each strategy draws only values that survive a round trip (no fragments, TCP
options that fit in 40 bytes, no SYN with FIN or RST), so a failed
`parse(emit(x)) == x` is always a bug, never a strategy artefact. Tests that
need invalid input build it from these by corrupting bytes.
"""

from __future__ import annotations

from hypothesis import strategies as st

from stack.wire import tcp
from stack.wire.icmp import IcmpHeader
from stack.wire.ipv4 import FLAG_DF, IPv4Header
from stack.wire.ipv6 import IPv6Header
from stack.wire.tcp import TcpHeader, TcpOptions, emit_options
from stack.wire.udp import UdpHeader

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
payloads = st.binary(max_size=300)
# Upper layers the IPv6 walk does not skip (not 0, 43, 44, 60).
upper_layers = u8.filter(lambda v: v not in (0, 43, 44, 60))


@st.composite
def tcp_options(draw: st.DrawFn) -> TcpOptions:
    blocks = st.lists(st.tuples(u32, u32), max_size=4).map(tuple)
    opts = TcpOptions(
        mss=draw(st.none() | u16),
        wscale=draw(st.none() | u8),
        sack_permitted=draw(st.booleans()),
        sack_blocks=draw(blocks),
        timestamp=draw(st.none() | st.tuples(u32, u32)),
    )
    try:
        emit_options(opts)
    except ValueError:
        # Drop what does not fit, as a sender would: SACK blocks first.
        opts = opts._replace(sack_blocks=opts.sack_blocks[:1], mss=None)
    return opts


@st.composite
def tcp_headers(draw: st.DrawFn) -> TcpHeader:
    flags = draw(u8)
    if flags & tcp.SYN and flags & (tcp.FIN | tcp.RST):
        flags &= ~tcp.SYN
    return TcpHeader(
        src_port=draw(u16),
        dst_port=draw(u16),
        seq=draw(u32),
        ack=draw(u32),
        flags=flags,
        window=draw(u16),
        checksum=draw(u16),
        urgent=draw(u16),
        options=draw(tcp_options()),
    )


@st.composite
def ipv4_headers(draw: st.DrawFn, payload_len: int = 0) -> IPv4Header:
    options = draw(st.binary(max_size=10).map(lambda b: b * 4))
    return IPv4Header(
        tos=draw(u8),
        total_length=20 + len(options) + payload_len,
        ident=draw(u16),
        # Reserved and DF bits only: MF or an offset would make a fragment.
        flags=draw(st.sampled_from((0, FLAG_DF, 0b100, 0b110))),
        frag_offset=0,
        ttl=draw(u8),
        proto=draw(u8),
        checksum=0,
        src=draw(addr4),
        dst=draw(addr4),
        options=options,
    )


@st.composite
def ipv6_headers(draw: st.DrawFn, payload_len: int = 0) -> IPv6Header:
    return IPv6Header(
        traffic_class=draw(u8),
        flow_label=draw(st.integers(0, 0xFFFFF)),
        payload_length=payload_len,
        next_header=draw(upper_layers),
        hop_limit=draw(u8),
        src=draw(addr6),
        dst=draw(addr6),
    )


udp_headers = st.builds(UdpHeader, u16, u16, st.integers(8, 0xFFFF), u16)
icmp_headers = st.builds(IcmpHeader, u8, u8, u16, u32)
address_pairs = st.tuples(addr4, addr4) | st.tuples(addr6, addr6)
