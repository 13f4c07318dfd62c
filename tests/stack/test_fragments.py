"""Reassembly: orders, duplicates, overlaps, time-outs, memory limits, tiny
and atomic fragments, and that any split in any order gives the datagram back."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.reassembly import DST4, DST6, SRC4, SRC6, same_datagram, split
from stack.fragments import (
    DATAGRAM_OVERHEAD,
    FRAGMENT_OVERHEAD,
    REASSEMBLY_TIME_EXCEEDED,
    FragmentConfig,
    FragmentError,
    FragmentStore,
)
from stack.wire import icmp, ipv6
from stack.wire.fragment import Ipv6FragmentHeader, emit_ipv6_fragment_header
from stack.wire.ipv4 import IPv4Header, emit_ipv4_header
from stack.wire.packet import build_icmp_packet, build_tcp_packet, build_udp_packet
from stack.wire.tcp import ACK, TcpHeader

PAYLOAD = bytes(range(256)) * 12  # 3072 octets


def udp(v6: bool = False, payload: bytes = PAYLOAD, src: bytes | None = None) -> bytes:
    if v6:
        return build_udp_packet(src or SRC6, DST6, 1000, 2000, payload)
    return build_udp_packet(src or SRC4, DST4, 1000, 2000, payload)


def feed(store: FragmentStore, fragments: list[bytes], now: float = 0.0) -> list[bytes]:
    out = []
    for frag in fragments:
        whole = store.receive(memoryview(frag), now)
        if whole is not None:
            out.append(whole)
    return out


def outcomes(store: FragmentStore) -> dict[str, int]:
    return {k: v for k, v in store.counters.items() if v}


CUTS = [1024, 2048, 2560]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("order", ["in order", "reverse", "shuffled"])
def test_a_datagram_comes_back_whole_in_any_order(v6: bool, order: str) -> None:
    packet = udp(v6)
    fragments = split(packet, CUTS, ident=7)
    if order == "reverse":
        fragments.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(fragments)
    store = FragmentStore()
    [whole] = feed(store, fragments)
    assert same_datagram(whole, packet)
    assert outcomes(store) == {"frag_reassembled": 1}
    assert len(store) == 0 and store.held_bytes == 0 and store.next_deadline() is None


def test_the_reassembled_ipv4_header_is_the_first_fragments_with_fresh_length_and_checksum() -> (
    None
):
    packet = udp()
    [whole] = feed(FragmentStore(), split(packet, CUTS, ident=0x1234))
    # Identification of the fragments, no MF, no offset, checksum that sums to 0xFFFF.
    assert whole[4:6] == b"\x12\x34" and whole[6:8] == b"\0\0"
    assert int.from_bytes(whole[:20], "little") % 0xFFFF == 0
    assert whole[20:] == packet[20:]


@given(
    v6=st.booleans(),
    size=st.integers(16, 3000),
    cuts=st.lists(st.integers(1, 400), max_size=20),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_split_in_any_order_reassembles_exactly(
    v6: bool, size: int, cuts: list[int], seed: int
) -> None:
    packet = udp(v6, bytes(random.Random(seed).randbytes(size)))
    data_len = len(packet) - (40 if v6 else 20)
    points = sorted({c * 8 for c in cuts if 0 < c * 8 < data_len})
    fragments = split(packet, points, ident=seed & 0xFFFF)
    random.Random(seed).shuffle(fragments)
    store = FragmentStore()
    results = feed(store, fragments)
    if not points and not v6:
        # One piece of IPv4 is no fragment at all: the parser takes it.
        assert results == [] and store.counters["frag_bad"] == 1
        return
    assert len(results) == 1 and same_datagram(results[0], packet)
    assert store.held_bytes == 0


def test_exact_duplicates_are_dropped_and_the_datagram_still_completes() -> None:
    packet = udp()
    a, b, c, d = split(packet, CUTS, ident=1)
    store = FragmentStore()
    assert feed(store, [a, b, a, b, d]) == []
    [whole] = feed(store, [c])
    assert same_datagram(whole, packet)
    assert outcomes(store) == {"frag_duplicates": 2, "frag_reassembled": 1}


@pytest.mark.parametrize("v6", [False, True])
def test_an_overlap_discards_the_datagram_and_its_later_fragments(v6: bool) -> None:
    packet = udp(v6)
    a, b, c, d = split(packet, CUTS, ident=9)
    # The same span as b but starting 8 octets earlier: it rewrites a's end.
    (_, early, *_) = split(packet, [1016, 2048], ident=9)
    store = FragmentStore()
    assert feed(store, [a, b, early, c, d]) == []
    assert outcomes(store) == {"frag_overlaps": 1, "frag_after_discard": 2}
    # The tombstone costs a little and goes at the time-out, without an error.
    assert store.held_bytes == DATAGRAM_OVERHEAD
    assert store.handle_timeout(61.0) == []
    assert len(store) == 0 and store.held_bytes == 0
    # Afterwards the same identification may be used again.
    [whole] = feed(store, [a, b, c, d], now=62.0)
    assert same_datagram(whole, packet)


def test_a_repeat_with_other_bytes_is_an_overlap() -> None:
    packet = udp()
    a, b, c, d = split(packet, CUTS, ident=2)
    forged = bytearray(b)
    forged[-1] ^= 0xFF
    store = FragmentStore()
    assert feed(store, [a, b, bytes(forged), c, d]) == []
    assert store.counters["frag_overlaps"] == 1


def test_a_fragment_reaching_into_the_next_one_is_an_overlap() -> None:
    packet = udp()
    _a, _b, c, _d = split(packet, CUTS, ident=3)
    (_, longer, _) = split(packet, [1024, 2056], ident=3)  # b plus 8 octets of c
    store = FragmentStore()
    assert feed(store, [c, longer]) == []
    assert store.counters["frag_overlaps"] == 1


@pytest.mark.parametrize(
    "cuts_of_liar",
    [
        [2048],  # a second "last" fragment that ends earlier than the first
        [3080, 3136],  # a middle fragment past the known end (3080)
    ],
)
def test_a_fragment_that_contradicts_the_end_discards_the_datagram(
    cuts_of_liar: list[int],
) -> None:
    packet = udp()
    a, b, c, d = split(packet, CUTS, ident=4)
    longer = udp(payload=PAYLOAD + bytes(64))
    liar = split(longer, cuts_of_liar, ident=4)[-1 if len(cuts_of_liar) == 1 else -2]
    store = FragmentStore()
    assert feed(store, [d, liar]) == []
    assert store.counters["frag_bad"] == 1
    assert feed(store, [a, b, c]) == []


def test_a_last_fragment_ending_before_pieces_already_held_discards() -> None:
    packet = udp()
    _a, _b, c, _d = split(packet, CUTS, ident=5)
    shorter = udp(payload=PAYLOAD[:2000])
    early_last = split(shorter, [1024], ident=5)[-1]  # ends before c
    store = FragmentStore()
    assert feed(store, [c, early_last]) == []
    assert store.counters["frag_bad"] == 1


@pytest.mark.parametrize(
    ("v6", "timeout", "icmp_type"),
    [(False, 30.0, icmp.ICMP_TIME_EXCEEDED), (True, 60.0, icmp.ICMP6_TIME_EXCEEDED)],
)
def test_a_missing_piece_times_out_with_time_exceeded_quoting_the_first_fragment(
    v6: bool, timeout: float, icmp_type: int
) -> None:
    packet = udp(v6)
    a, b, c, d = split(packet, CUTS, ident=6)
    store = FragmentStore()
    feed(store, [a, b], now=100.0)
    feed(store, [d], now=110.0)  # the clock runs from the first fragment
    assert store.next_deadline() == 100.0 + timeout
    assert store.handle_timeout(100.0 + timeout - 0.001) == []
    [error] = store.handle_timeout(100.0 + timeout)
    assert error == FragmentError(a[: len(error.original)], DST6 if v6 else DST4, icmp_type, 1)
    assert error.code == REASSEMBLY_TIME_EXCEEDED
    assert len(error.original) == min(len(a), 1232 if v6 else 548)
    assert outcomes(store) == {"frag_timed_out": 1}
    assert store.held_bytes == 0 and store.next_deadline() is None
    # c coming late starts a new datagram, which cannot complete alone.
    assert feed(store, [c], now=200.0) == []


def test_no_time_exceeded_without_the_first_fragment() -> None:
    _, b, c, d = split(udp(True), CUTS, ident=6)
    store = FragmentStore()
    feed(store, [b, c, d])
    assert store.handle_timeout(60.0) == []
    assert store.counters["frag_timed_out"] == 1


@pytest.mark.parametrize(
    "packet",
    [
        build_udp_packet(SRC4, b"\xe0\0\0\1", 1, 2, PAYLOAD),  # to a multicast group
        build_udp_packet(bytes(4), DST4, 1, 2, PAYLOAD),  # from no address
        build_udp_packet(SRC6, b"\xff\x02" + bytes(14), 1, 2, PAYLOAD),
        build_icmp_packet(SRC4, DST4, icmp.ICMP_DEST_UNREACH, 3, 0, PAYLOAD),
        build_icmp_packet(SRC6, DST6, icmp.ICMP6_PACKET_TOO_BIG, 0, 1280, PAYLOAD),
    ],
    ids=["v4-multicast", "v4-unspecified", "v6-multicast", "icmp-error", "icmpv6-error"],
)
def test_no_time_exceeded_about_multicast_unspecified_or_icmp_errors(packet: bytes) -> None:
    first, *_ = split(packet, [1024, 2048], ident=8)
    store = FragmentStore()
    feed(store, [first])
    assert store.handle_timeout(100.0) == []
    assert store.counters["frag_timed_out"] == 1


def test_deadlines_of_both_versions_are_combined() -> None:
    store = FragmentStore()
    feed(store, split(udp(True), CUTS, ident=1)[:1], now=0.0)  # IPv6: 60
    assert store.next_deadline() == 60.0
    feed(store, split(udp(), CUTS, ident=1)[:1], now=10.0)  # IPv4: 40
    assert store.next_deadline() == 40.0
    store.handle_timeout(40.0)
    assert store.next_deadline() == 60.0


def test_memory_is_charged_per_datagram_and_fragment() -> None:
    a, *_ = split(udp(), CUTS, ident=1)
    _, b, *_ = split(udp(), CUTS, ident=1)
    store = FragmentStore()
    feed(store, [b])
    assert store.held_bytes == DATAGRAM_OVERHEAD + 1024 + FRAGMENT_OVERHEAD
    feed(store, [a])  # the first fragment also keeps its quote for the ICMP error
    assert store.held_bytes == DATAGRAM_OVERHEAD + 2 * (1024 + FRAGMENT_OVERHEAD) + 548


def _first_pieces(count: int, src: bytes = SRC4) -> list[bytes]:
    """The second fragment of `count` datagrams (no quote: a fixed cost each)."""
    return [split(udp(src=src), CUTS, ident=i)[1] for i in range(count)]


COST = DATAGRAM_OVERHEAD + 1024 + FRAGMENT_OVERHEAD


def test_a_source_over_its_limit_loses_its_oldest_datagram() -> None:
    other = b"\x0a\x00\x00\x63"
    store = FragmentStore(FragmentConfig(max_bytes_per_source=4 * COST, max_bytes=100 * COST))
    feed(store, _first_pieces(1, other))
    feed(store, _first_pieces(4))
    assert store.counters["frag_evicted"] == 0 and store.held_bytes == 5 * COST
    feed(store, [split(udp(), CUTS, ident=4)[1]])
    assert store.counters["frag_evicted"] == 1
    assert len(store) == 5 and store.held_bytes == 5 * COST
    # The other source kept its datagram: it completes.
    a, _, c, d = split(udp(src=other), CUTS, ident=0)
    [whole] = feed(store, [a, c, d])
    assert same_datagram(whole, udp(src=other))
    # The oldest of the busy source (ident 0) went: its second piece is missing.
    a, _, c, d = split(udp(), CUTS, ident=0)
    assert feed(store, [a, c, d]) == []


def test_all_sources_over_the_total_lose_the_oldest_datagram_of_anyone() -> None:
    store = FragmentStore(FragmentConfig(max_bytes_per_source=10 * COST, max_bytes=3 * COST))
    feed(store, _first_pieces(1, b"\x0a\x00\x00\x63"))
    feed(store, _first_pieces(2))
    assert store.held_bytes == 3 * COST
    v6_piece = split(udp(True), CUTS, ident=0)[1]  # an IPv6 one tips it over
    feed(store, [v6_piece], now=1.0)
    assert store.counters["frag_evicted"] == 1
    assert len(store) == 3 and store.held_bytes == 3 * COST
    # The one that went was the oldest (the other source's, first in).
    assert store.next_deadline() == 30.0
    store.handle_timeout(30.0)
    assert len(store) == 1 and store.next_deadline() == 61.0


@pytest.mark.parametrize(
    "config",
    [
        FragmentConfig(max_bytes_per_source=COST + 100),
        FragmentConfig(max_bytes=COST + 100),
    ],
    ids=["per source", "in total"],
)
def test_a_datagram_that_cannot_fit_alone_is_refused(config: FragmentConfig) -> None:
    store = FragmentStore(config)
    _a, b, c, _d = split(udp(), CUTS, ident=1)
    feed(store, [b])
    assert feed(store, [c]) == []
    assert outcomes(store) == {"frag_refused": 1}
    assert len(store) == 0 and store.held_bytes == 0


def test_an_ipv4_tcp_first_fragment_without_the_whole_tcp_header_is_refused() -> None:
    # RFC 1858: 8 octets of TCP header in the first fragment, flags in the next.
    segment = build_tcp_packet(SRC4, DST4, TcpHeader(1, 2, 3, 4, ACK, 100), b"x" * 64)
    tiny, rest = split(segment, [8], ident=1)
    store = FragmentStore()
    assert feed(store, [tiny, rest]) == []
    assert outcomes(store) == {"frag_tiny": 1}
    assert store.handle_timeout(30.0) == []  # no first fragment held: no error


def test_an_ipv6_first_fragment_without_the_whole_header_chain_is_refused() -> None:
    # RFC 7112: Destination Options after the Fragment header, UDP in the next piece.
    options = bytes((17, 1)) + bytes(14)
    datagram = options + build_udp_packet(SRC6, DST6, 1, 2, PAYLOAD[:100])[40:]
    frag = emit_ipv6_fragment_header(Ipv6FragmentHeader(ipv6.DEST_OPTIONS, 0, True, 5))
    plen = (8 + 16).to_bytes(2, "big")
    first = bytes((0x60, 0, 0, 0)) + plen + bytes((44, 64)) + SRC6 + DST6 + frag + datagram[:16]
    store = FragmentStore()
    assert store.receive(memoryview(first), 0.0) is None
    assert outcomes(store) == {"frag_tiny": 1}


def test_an_ipv6_atomic_fragment_is_a_whole_packet_beside_a_pending_datagram() -> None:
    packet = udp(True, b"atomic")
    frag = emit_ipv6_fragment_header(Ipv6FragmentHeader(17, 0, False, 42))
    plen = (len(packet) - 40 + 8).to_bytes(2, "big")
    atomic = packet[:4] + plen + bytes((44,)) + packet[7:40] + frag + packet[40:]
    store = FragmentStore()
    pending = split(udp(True), CUTS, ident=42)
    feed(store, pending[:2])
    assert store.receive(memoryview(atomic), 0.0) == packet
    assert outcomes(store) == {"frag_atomic": 1}
    # The pending datagram with the same identification is untouched.
    [whole] = feed(store, pending[2:])
    assert whole == udp(True)


def test_malformed_fragments_are_counted_never_raised() -> None:
    store = FragmentStore()
    good = split(udp(), CUTS, ident=1)[0]
    for n in range(len(good)):
        store.receive(memoryview(good[:n]), 0.0)
    assert store.counters["frag_bad"] == len(good)
    assert len(store) == 0


def test_a_bad_ipv4_header_checksum_is_refused_unless_trusted() -> None:
    a = bytearray(split(udp(), CUTS, ident=1)[1])
    a[10] ^= 1
    store = FragmentStore()
    assert store.receive(memoryview(bytes(a)), 0.0) is None
    assert store.counters["frag_bad"] == 1
    store.receive(memoryview(bytes(a)), 0.0, verify_checksum=False)
    assert len(store) == 1


def test_a_datagram_longer_than_ipv4_allows_is_refused_at_the_end() -> None:
    # Every fragment fits with its own 20-octet header, but the first carries
    # 40 octets of options: together more than 65,535 octets.
    end = 65535 - 20
    first = (
        emit_ipv4_header(IPv4Header(0, 60 + 1024, 1, 1, 0, 64, 17, 0, SRC4, DST4, bytes(40)))
        + udp()[20 : 20 + 1024]
    )
    last_len = end - 1024
    last = emit_ipv4_header(
        IPv4Header(0, 20 + last_len, 1, 0, 1024 >> 3, 64, 17, 0, SRC4, DST4)
    ) + bytes(last_len)
    store = FragmentStore()
    assert feed(store, [first, last]) == []
    assert outcomes(store) == {"frag_bad": 1}
    assert store.held_bytes == 0
