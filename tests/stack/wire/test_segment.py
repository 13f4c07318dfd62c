"""The per-segment path: the fast parse and the templates agree with the general code."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import BadPacket
from stack.wire.packet import build_tcp_packet, build_udp_packet, parse_packet_untrusted
from stack.wire.segment import TcpTemplate, parse_plain_tcp_untrusted, source_address
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, DataRun, TcpHeader, TcpOptions
from tests.stack.wire.strategies import address_pairs, payloads, tcp_headers, u16, u32

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
TS = TcpOptions(timestamp=(5, 6))
TS_ACK = TcpHeader(1234, 80, 1000, 2000, ACK | PSH, 500, options=TS)

# Headers as the connection sends them after the handshake: only the
# timestamp option, any flags but SYN (the template's own path).
ts_headers = st.builds(
    TcpHeader,
    u16,
    u16,
    u32,
    u32,
    st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | PSH | FIN, RST | ACK, RST]),
    u16,
    u16,
    u16,
    st.tuples(u32, u32).map(lambda ts: TcpOptions(timestamp=ts)),
)

# SYNs as Linux sends them: MSS, SACK permitted, timestamps, window scale
# (20 bytes of options, the layout the fast parse takes), with any flags.
syn_headers = st.builds(
    TcpHeader,
    u16,
    u16,
    u32,
    u32,
    st.sampled_from([SYN, SYN | ACK, ACK, SYN | PSH, FIN | ACK]),
    u16,
    u16,
    u16,
    st.builds(
        TcpOptions,
        mss=u16,
        wscale=st.integers(0, 255),
        sack_permitted=st.just(True),
        sack_blocks=st.just(()),
        timestamp=st.tuples(u32, u32),
    ),
)
LINUX_SYN = TcpHeader(
    40000,
    443,
    7,
    0,
    SYN,
    64240,
    options=TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0)),
)


@given(address_pairs, ts_headers | tcp_headers(), payloads, st.integers(1, 255), st.booleans())
def test_template_builds_what_build_tcp_packet_builds(
    addrs: tuple[bytes, bytes], h: TcpHeader, data: bytes, ttl: int, partial: bool
) -> None:
    src, dst = addrs
    template = TcpTemplate(src, dst, ttl=ttl, partial_checksum=partial)
    expected = build_tcp_packet(src, dst, h, data, ttl=ttl, partial_checksum=partial)
    assert template.build(h, data) == expected
    assert template.build(h, bytearray(data)) == expected
    assert template.build(h, memoryview(data)) == expected


@given(
    address_pairs,
    ts_headers | tcp_headers(),
    st.integers(1, 64),
    st.lists(st.integers(0, 255), min_size=1, max_size=6),
    st.sampled_from([ACK, ACK | PSH]),
    st.integers(1, 255),
    st.booleans(),
)
def test_a_run_is_built_as_its_segments_one_by_one(
    addrs: tuple[bytes, bytes],
    first: TcpHeader,
    mss: int,
    fills: list[int],
    last_flags: int,
    ttl: int,
    partial: bool,
) -> None:
    """`build_run` gives what `build` gives for each segment of the run
    (SEQ wrapping, the last segment's flags, either checksum mode)."""
    src, dst = addrs
    template = TcpTemplate(src, dst, ttl=ttl, partial_checksum=partial)
    payloads: list[bytes | memoryview] = [
        memoryview(bytes([fill, i]) * mss) for i, fill in enumerate(fills)
    ]
    run = DataRun(first, 2 * mss, payloads, last_flags)
    segments = run.segments()
    assert [h.seq for h, _ in segments] == [
        (first.seq + i * 2 * mss) & 0xFFFFFFFF for i in range(len(fills))
    ]
    assert segments[-1][0].flags == last_flags
    expected = [
        build_tcp_packet(src, dst, h, p, ttl=ttl, partial_checksum=partial) for h, p in segments
    ]
    assert template.build_run(run) == expected


def test_template_rejects_what_the_builder_rejects() -> None:
    with pytest.raises(ValueError, match="addresses"):
        TcpTemplate(A4, B6)
    with pytest.raises(ValueError, match="TTL"):
        TcpTemplate(A4, B4, ttl=256)
    with pytest.raises(ValueError, match="65535"):
        TcpTemplate(A4, B4).build(TS_ACK, bytes(65500))
    with pytest.raises(ValueError, match="65535"):
        TcpTemplate(A6, B6).build(TS_ACK, bytes(65504))
    assert len(TcpTemplate(A6, B6).build(TS_ACK, bytes(65503))) == 40 + 65535
    with pytest.raises(ValueError, match="out of range"):
        TcpTemplate(A4, B4).build(TS_ACK._replace(options=TcpOptions(timestamp=(1 << 32, 0))))
    with pytest.raises(ValueError, match="out of range"):
        TcpTemplate(A6, B6).build(TS_ACK._replace(window=1 << 16))


def _general(buf: memoryview, verify: bool) -> object:
    try:
        pkt = parse_packet_untrusted(buf, verify_checksum=verify)
    except BadPacket as exc:
        return str(exc)
    assert isinstance(pkt.l4, TcpHeader)
    return pkt.src, pkt.dst, pkt.l4, bytes(pkt.payload)


@given(
    st.sampled_from([(A4, B4), (A6, B6)]),
    ts_headers | syn_headers | tcp_headers(),
    payloads,
    st.integers(0, 100),
    st.sampled_from([0x00, 0x01, 0x06, 0x10, 0x45, 0x60, 0xFF]),
    st.booleans(),
)
def test_fast_parse_agrees_with_the_general_parser(
    addrs: tuple[bytes, bytes], h: TcpHeader, data: bytes, at: int, value: int, verify: bool
) -> None:
    raw = bytearray(build_tcp_packet(*addrs, h, data))
    if at < len(raw):
        raw[at] = value
    buf = memoryview(bytes(raw))
    try:
        got = parse_plain_tcp_untrusted(buf, verify)
    except BadPacket as exc:
        assert str(exc) == _general(buf, verify)
        return
    if got is not None:
        src, dst, hdr, payload = got
        assert (src, dst, hdr, bytes(payload)) == _general(buf, verify)


@given(st.sampled_from([(A4, B4), (A6, B6)]), syn_headers, payloads, st.booleans())
def test_a_syn_in_linux_layout_is_taken_by_the_fast_parse_as_the_general_parser_reads_it(
    addrs: tuple[bytes, bytes], h: TcpHeader, data: bytes, verify: bool
) -> None:
    buf = memoryview(build_tcp_packet(*addrs, h, data))
    got = parse_plain_tcp_untrusted(buf, verify)
    assert got is not None
    src, dst, hdr, payload = got
    assert (src, dst, hdr, bytes(payload)) == _general(buf, verify)


def test_fast_parse_takes_the_common_shapes_only() -> None:
    data = b"x" * 100
    for src, dst in ((A4, B4), (A6, B6)):
        for h in (TS_ACK, TS_ACK._replace(options=TcpOptions()), LINUX_SYN):
            got = parse_plain_tcp_untrusted(memoryview(build_tcp_packet(src, dst, h, data)), True)
            assert got is not None and got[2] == h._replace(checksum=got[2].checksum)
            assert (got[0], got[1], bytes(got[3])) == (src, dst, data)
    sack = TS_ACK._replace(options=TcpOptions(sack_blocks=((1, 2),), timestamp=(5, 6)))
    # A SYN in another layout (without timestamps, or without window scale).
    no_ts = LINUX_SYN._replace(options=LINUX_SYN.options._replace(timestamp=None))
    no_ws = LINUX_SYN._replace(options=LINUX_SYN.options._replace(wscale=None))
    v6 = bytearray(build_tcp_packet(A6, B6, TS_ACK, data))
    v6[6] = 60  # a Destination Options header in front (as the general parser sees it)
    others = [
        build_tcp_packet(A4, B4, sack, data),  # other options
        build_tcp_packet(A6, B6, sack, data),
        build_tcp_packet(A4, B4, no_ts),
        build_tcp_packet(A6, B6, no_ws),
        build_udp_packet(A4, B4, 1, 2, data),  # not TCP
        build_udp_packet(A6, B6, 1, 2, data),
        bytes(v6),
        build_tcp_packet(A4, B4, TS_ACK._replace(options=TcpOptions()))[:40],  # too short
        build_tcp_packet(A6, B6, TS_ACK._replace(options=TcpOptions()))[:60],
    ]
    for raw in others:
        assert parse_plain_tcp_untrusted(memoryview(raw), True) is None


def test_trusted_sources_skip_checksums_for_those_sources_only() -> None:
    """The rule NetStack applies to the TUN's own address (docs/wire.md)."""
    for src, dst in ((A4, B4), (A6, B6)):
        raw = bytearray(build_tcp_packet(src, dst, TS_ACK, b"payload"))
        raw[-1] ^= 0xFF  # a payload byte: only the TCP checksum can tell
        buf = memoryview(bytes(raw))
        with pytest.raises(BadPacket, match="TCP checksum"):
            parse_plain_tcp_untrusted(buf, True)
        with pytest.raises(BadPacket, match="TCP checksum"):
            parse_plain_tcp_untrusted(buf, True, frozenset({dst}))  # not the source
        got = parse_plain_tcp_untrusted(buf, True, frozenset({src}))
        assert got is not None and bytes(got[3]) == b"payloa" + bytes([raw[-1]])
        assert parse_plain_tcp_untrusted(buf, False) is not None


def test_source_address() -> None:
    assert source_address(memoryview(build_tcp_packet(A4, B4, TS_ACK))) == A4
    assert source_address(memoryview(build_tcp_packet(A6, B6, TS_ACK))) == A6
    for raw in (b"", b"\x45" + bytes(10), b"\x60" + bytes(30), b"\x70" + bytes(60)):
        assert source_address(memoryview(raw)) is None
