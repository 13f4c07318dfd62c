"""NetStack under a storm of hostile packets beside one live TCP connection.

The network layer promises that one bad packet never costs another flow
anything: it counts what it drops, by reason, and never raises. These tests
interleave thousands of malformed, truncated, mis-checksummed, fragmented
and out-of-window packets with an in-order byte stream on a live
connection, then check that the stream arrived exact, the connection is
still established, and the counters account for the drops. The packet
builders are shared with the `netstack_input` fuzz harness.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.netstack_input import (
    APP,
    APP_ISN,
    APP_PORT,
    CONFIG,
    GREETING,
    ISS,
    REMOTE,
    REMOTE_PORT,
    ipv4_header,
    open_flow,
    raw_tcp_packet,
)
from fuzz.netstack_input import TestOneInput as fuzz_one_input
from stack.errors import BadPacket
from stack.fragments import FragmentStore
from stack.netstack import GsoPacket, NetStack, NetStackConfig, UdpDatagram
from stack.tcp import NEED_DATA, DataReceived, FlowKey, TcpConfig, TcpConnection, TcpState
from stack.wire import icmp
from stack.wire.fragment import fragment_packet
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import (
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    parse_packet_untrusted,
)
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpHeader, TcpOptions

PORTS = (APP_PORT, REMOTE_PORT)
CHUNK = 500
ACK_NO = (ISS + 1) & 0xFFFFFFFF
TS = TcpOptions(timestamp=(3, 0))


class Storm:
    """Feeds a live connection its real stream and junk; tallies what it sent."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.stack = NetStack(CONFIG)
        self.conn: TcpConnection = open_flow(self.stack, 0.0)
        self.next_seq = (APP_ISN + 1 + len(GREETING)) & 0xFFFFFFFF
        self.delivered = bytearray(GREETING)
        self.sent = bytearray(GREETING)
        self.malformed = 0
        self.fragments = 0
        self.now = 0.0

    def feed(self, packet: bytes) -> None:
        self.stack.receive(memoryview(packet), self.now)
        self.drain()

    def drain(self) -> None:
        while (event := self.conn.next_event()) is not NEED_DATA:
            assert isinstance(event, DataReceived), event
            self.delivered += event.data
        for out in self.stack.packets_to_send(self.now):
            parse_packet_untrusted(memoryview(out))

    def real_chunk(self) -> None:
        data = self.rng.randbytes(CHUNK)
        hdr = TcpHeader(*PORTS, self.next_seq, ACK_NO, ACK | PSH, 4096, options=TS)
        self.feed(build_tcp_packet(APP, REMOTE, hdr, data))
        self.sent += data
        self.next_seq = (self.next_seq + CHUNK) & 0xFFFFFFFF

    def junk(self) -> None:
        rng = self.rng
        kind = rng.randrange(11)
        garbage = rng.randbytes(rng.randrange(1, 300))
        seq = self.next_seq
        if kind == 0:  # random bytes, IPv4-looking or not
            self.feed(rng.choice((b"\x45", b"\x60", b"")) + garbage)
            return  # may happen to be a packet of some other flow
        if kind == 1:  # a good IPv4 header in front of random bytes
            self.feed(ipv4_header(APP, REMOTE, rng.choice((6, 17, 1, 58)), len(garbage)) + garbage)
            return
        if kind == 2:  # a TCP header cut short
            body = raw_tcp_packet(APP, REMOTE, PORTS, seq, ACK_NO, ACK)[20 : 20 + rng.randrange(20)]
            self.malformed += 1
            self.feed(ipv4_header(APP, REMOTE, 6, len(body)) + body)
        elif kind == 3:  # the next bytes of the live flow, with a broken checksum
            hdr = TcpHeader(*PORTS, seq, ACK_NO, ACK | PSH, 4096, options=TS)
            pkt = bytearray(build_tcp_packet(APP, REMOTE, hdr, garbage))
            pkt[36] ^= 0xFF
            self.malformed += 1
            self.feed(bytes(pkt))
        elif kind == 4:  # options whose lengths cannot parse, carrying in-order data
            bogus = bytes((rng.choice((2, 3, 4, 8, 30)), rng.choice((0, 1, 41))))
            self.malformed += 1
            self.feed(raw_tcp_packet(APP, REMOTE, PORTS, seq, ACK_NO, ACK, bogus, garbage))
        elif kind == 5:  # SYN+FIN aimed at the live flow
            self.malformed += 1
            self.feed(raw_tcp_packet(APP, REMOTE, PORTS, seq, ACK_NO, SYN | FIN, b"", garbage))
        elif kind == 6:  # a fragment of the live flow's next segment
            tcp = raw_tcp_packet(APP, REMOTE, PORTS, seq, ACK_NO, ACK, b"", garbage)[20:]
            frag = rng.choice((0x2000, 0x2000 | 3, 5))
            self.fragments += 1
            self.feed(ipv4_header(APP, REMOTE, 6, len(tcp), frag) + tcp)
        elif kind == 7:  # an old segment overlapping delivered bytes, wrong contents
            back = rng.randrange(1, len(self.delivered) + 1)
            old = (seq - back) & 0xFFFFFFFF
            hdr = TcpHeader(*PORTS, old, ACK_NO, ACK | PSH, 4096, options=TS)
            self.feed(build_tcp_packet(APP, REMOTE, hdr, garbage[:back]))
        elif kind == 8:  # far outside the receive window
            far = (seq + rng.randrange(1 << 20, 1 << 31)) & 0xFFFFFFFF
            hdr = TcpHeader(*PORTS, far, ACK_NO, ACK | PSH, 4096, options=TS)
            self.feed(build_tcp_packet(APP, REMOTE, hdr, garbage))
        elif kind == 9:  # RST or SYN with a wrong sequence number
            flags = rng.choice((RST, RST | ACK, SYN))
            wrong = (seq + rng.choice((1, 7, 5000, 1 << 30))) & 0xFFFFFFFF
            hdr = TcpHeader(*PORTS, wrong, ACK_NO, flags, 4096, options=TS)
            self.feed(build_tcp_packet(APP, REMOTE, hdr))
        else:  # acknowledges data never sent
            hdr = TcpHeader(*PORTS, seq, (ACK_NO + 1_000_000) & 0xFFFFFFFF, ACK, 4096, options=TS)
            self.feed(build_tcp_packet(APP, REMOTE, hdr))


def test_storm_leaves_live_stream_exact_and_counts_drops() -> None:
    storm = Storm(seed=6)
    for _ in range(200):
        for _ in range(25):
            storm.junk()
        storm.real_chunk()
        storm.now += 0.01
        storm.stack.tcp.handle_timeout(storm.now)
        storm.drain()
    assert bytes(storm.delivered) == bytes(storm.sent)
    assert storm.conn.state is TcpState.ESTABLISHED
    counters = storm.stack.counters
    assert counters["rx_packets"] == 3 + 200 * 26
    assert counters["rx_malformed"] >= storm.malformed > 500
    assert counters["rx_fragments"] == storm.fragments > 100
    stats = storm.conn.statistics()
    assert stats.dup_segments > 0
    assert stats.challenge_acks > 0


def test_random_packets_never_raise() -> None:
    rng = random.Random(61)
    stack = NetStack(CONFIG)
    conn = open_flow(stack, 0.0)
    for i in range(5000):
        head = rng.choice(
            (b"", b"\x45\x00", b"\x60\x00\x00\x00", struct.pack("!B", rng.randrange(256)))
        )
        stack.receive(memoryview(head + rng.randbytes(rng.randrange(120))), i / 1000)
        stack.packets_to_send(i / 1000)
    assert stack.counters["rx_packets"] == 5003
    assert stack.counters["rx_malformed"] > 4000
    assert conn.state is TcpState.ESTABLISHED


def test_fuzz_corpus_replays_clean() -> None:
    # Every seed of the netstack_input harness, and any crash it found,
    # stays a regression test here.
    corpus = Path(__file__).parents[2] / "fuzz" / "corpus" / "netstack_input"
    seeds = sorted(corpus.iterdir())
    assert len(seeds) >= 10
    for path in seeds:
        fuzz_one_input(path.read_bytes())


def test_handle_timeout_names_only_the_connections_it_ran() -> None:
    stack = NetStack(CONFIG)
    live = open_flow(stack, 0.0)
    stack.packets_to_send(0.0)
    deadline = stack.tcp.next_deadline()
    assert deadline is not None
    assert stack.tcp.handle_timeout(deadline / 2) == []
    assert stack.tcp.handle_timeout(deadline) == [live]


def _gso_flow(app_mss: int) -> tuple[NetStack, TcpConnection]:
    """A flow on a 9000-byte device with GSO, from an application with `app_mss`."""
    stack = NetStack(NetStackConfig(tcp=TcpConfig(mss=8960, gso_size=60000)))
    key = FlowKey(APP, APP_PORT, REMOTE, REMOTE_PORT)
    options = TcpOptions(mss=app_mss, wscale=7, sack_permitted=True, timestamp=(1, 0))
    syn = TcpHeader(APP_PORT, REMOTE_PORT, APP_ISN, 0, SYN, 65535, options=options)
    stack.receive(memoryview(build_tcp_packet(APP, REMOTE, syn)), 0.0)
    conn = stack.tcp.accept(key, ISS, 0.0)
    stack.packets_to_send(0.0)
    ack = TcpHeader(*PORTS, (APP_ISN + 1) & 0xFFFFFFFF, ACK_NO, ACK, 4096, options=TS)
    stack.receive(memoryview(build_tcp_packet(APP, REMOTE, ack)), 0.0)
    assert conn.state is TcpState.ESTABLISHED
    return stack, conn


def test_a_super_segment_for_an_application_behind_a_smaller_mtu_names_its_packet_size() -> None:
    stack, conn = _gso_flow(1460)
    conn.send(bytes(40_000))
    [out] = stack.packets_to_send(0.01)
    assert isinstance(out, GsoPacket)
    assert out.packet_size == 1500
    packet = parse_packet_untrusted(memoryview(out.data))
    assert len(packet.payload) == 10 * (1460 - 12)  # the initial window, in one

    # An application whose MSS reaches the device's: plain packets, which
    # the device cuts at its own MTU.
    stack, conn = _gso_flow(8960)
    conn.send(bytes(40_000))
    packets = stack.packets_to_send(0.01)
    assert all(type(p) is bytes for p in packets)
    assert max(len(p) for p in packets) > 9000  # type: ignore[arg-type]


def _corrupt(packet: bytes) -> memoryview:
    raw = bytearray(packet)
    raw[-1] ^= 0x5A  # the last payload byte: only the TCP checksum can tell
    return memoryview(bytes(raw))


def test_checksums_are_skipped_only_for_trusted_sources() -> None:
    """Packets from the TUN's own address (the local host) skip verification;
    forwarded traffic from anyone else is still verified (docs/wire.md)."""
    app6 = bytes.fromhex("fd00" + "00" * 13 + "07")
    remote6 = bytes.fromhex("fd00" + "00" * 13 + "08")
    syn = TcpHeader(APP_PORT, REMOTE_PORT, APP_ISN, 0, SYN, 65535, options=TcpOptions(mss=1400))
    data = TcpHeader(APP_PORT, REMOTE_PORT, APP_ISN + 1, 0, ACK, 65535, options=TS)
    packets = [
        build_tcp_packet(APP, REMOTE, data, b"hello"),  # the fast parse
        build_tcp_packet(APP, REMOTE, syn, b"hello"),  # other options: the general parser
        build_tcp_packet(app6, remote6, syn, b"hello"),
    ]
    for trusted, accepted in (
        (frozenset(), 0),
        (frozenset({REMOTE, remote6}), 0),  # destinations, not sources
        (frozenset({APP}), 2),
        (frozenset({APP, app6}), 3),
    ):
        stack = NetStack(NetStackConfig(tcp=CONFIG.tcp, trusted_sources=trusted))
        for packet in packets:
            stack.receive(_corrupt(packet), 0.0)
        assert stack.counters["rx_malformed"] == 3 - accepted, trusted
    # Intact packets are taken whatever the setting.
    stack = NetStack(NetStackConfig(tcp=CONFIG.tcp))
    for packet in packets:
        stack.receive(memoryview(packet), 0.0)
    assert stack.counters["rx_malformed"] == 0


def test_a_batch_leaves_what_packets_one_by_one_leave() -> None:
    """`receive_batch` takes a flow's pure ACKs together; everything the
    stack then says and does is what `receive`, packet by packet, gives."""
    stacks = [NetStack(CONFIG), NetStack(CONFIG)]
    conns = [open_flow(stack, 0.0) for stack in stacks]
    flights = []
    for stack, conn in zip(stacks, conns, strict=True):
        conn.send(bytes(6000))
        flights.append(stack.packets_to_send(0.01))
    assert flights[0] == flights[1] and len(flights[0]) == 10
    base_seq = (APP_ISN + 1 + len(GREETING)) & 0xFFFFFFFF
    opts = TcpOptions(timestamp=(5, 0))

    def seg(
        ack_segments: int, flags: int = ACK, data: bytes = b"", port: int = APP_PORT, sent: int = 0
    ) -> bytes:
        ack = (ISS + 1 + ack_segments * 600 - 12 * ack_segments) & 0xFFFFFFFF
        seq = (base_seq + sent) & 0xFFFFFFFF
        hdr = TcpHeader(port, REMOTE_PORT, seq, ack, flags, 512, options=opts)
        return build_tcp_packet(APP, REMOTE, hdr, data)

    batch = [
        seg(2),
        seg(4),
        build_udp_packet(APP, REMOTE, 5353, 53, b"query"),
        seg(6, ACK | PSH, b"more"),  # data: the ACKs before it go first
        seg(6, sent=4),
        seg(8, sent=4),
        seg(10, sent=4),
        seg(1, port=APP_PORT + 1),  # an unknown flow: RST
        seg(2, port=APP_PORT + 1),
    ]
    one = [stacks[0].receive(memoryview(p), 0.02) for p in batch]
    together = stacks[1].receive_batch([(memoryview(p), False) for p in batch], 0.02)
    # The same events, but a connection once per run of ACKs, not per ACK.
    assert [e for e in one if e is not None] == [conns[0]] * 2 + [one[2]] + [conns[0]] * 4
    assert together == [one[2], conns[1], conns[1]]
    assert stacks[0].packets_to_send(0.02) == stacks[1].packets_to_send(0.02)
    assert stacks[0].counters == stacks[1].counters
    stats = [conn.statistics() for conn in conns]
    # 2 before 4, and 8 before 10 (6 repeats what the data segment acknowledged).
    assert (stats[0].acks_coalesced, stats[1].acks_coalesced) == (0, 2)
    assert stats[0] == stats[1]._replace(acks_coalesced=0)


def test_a_flight_goes_out_as_its_segments_built_one_by_one() -> None:
    """`packets_to_send` builds a run of full segments from their shared
    header bytes; the packets are those of each segment built alone (both
    checksum modes: tests/stack/wire/test_segment.py)."""
    stacks = [NetStack(CONFIG), NetStack(CONFIG)]
    conns = [open_flow(stack, 0.0) for stack in stacks]
    for conn in conns:
        conn.send(bytes(range(256)) * 30)
    packets = stacks[0].packets_to_send(0.01)
    expected = [
        build_tcp_packet(REMOTE, APP, hdr, payload)
        for _, hdr, payload in stacks[1].tcp.segments_to_send(0.01)
    ]
    assert packets == expected
    assert len(packets) == 10


def test_a_batch_takes_a_flows_data_in_a_row_as_one_by_one_would() -> None:
    """`receive_batch` hands a flow's data segments in a row over together;
    what the stack then says and does is what `receive`, packet by packet,
    gives, whatever comes between them (another flow, an ACK, a FIN)."""
    base_seq = (APP_ISN + 1 + len(GREETING)) & 0xFFFFFFFF
    ack = (ISS + 1) & 0xFFFFFFFF

    def seg(sent: int, flags: int = ACK, data: bytes = b"", port: int = APP_PORT) -> bytes:
        opts = TcpOptions(timestamp=(3 + sent, 0))
        hdr = TcpHeader(
            port, REMOTE_PORT, (base_seq + sent) & 0xFFFFFFFF, ack, flags, 512, options=opts
        )
        return build_tcp_packet(APP, REMOTE, hdr, data)

    other = APP_PORT + 1  # no connection: an RST for each of its segments
    batches = [
        [
            seg(0, data=b"a" * 100),
            seg(100, ACK | PSH, b"b" * 100),
            seg(0, data=b"x", port=other),  # another flow between
            seg(1, data=b"y", port=other),
            seg(200),  # the flow's pure ACK, after its data
            seg(200, data=b"c" * 100),
            seg(2, port=other),
            seg(300, ACK | PSH),  # no data: one by one
            seg(300, data=b"d" * 100),
            seg(400, ACK | FIN, b"f" * 10),  # a FIN ends the run
        ],
        [
            seg(3, data=b"z", port=other),
            seg(4, port=other),  # a pure ACK after the run
            seg(4, ACK | FIN, port=other),  # after its held ACK
            seg(5, data=b"w", port=other),
            seg(6, ACK | FIN, port=other),  # right after the run
        ],
        [seg(411, data=b"e")],  # a run at the end of a batch (past the FIN)
        [seg(7, data=b"v", port=other)],
    ]
    results = []
    for batch_mode in (False, True):
        stack = NetStack(CONFIG)
        conn = open_flow(stack, 0.0)
        events: list[object] = []
        sent: list[object] = []
        for batch in batches:
            if batch_mode:
                events += stack.receive_batch([(memoryview(p), False) for p in batch], 0.02)
            else:
                events += [e for p in batch if (e := stack.receive(memoryview(p), 0.02))]
            sent += stack.packets_to_send(0.02)
        data = []
        while (event := conn.next_event()) is not NEED_DATA:
            data.append(event)
        results.append(
            (
                set(map(id, events)) == {id(conn)},
                sent,
                stack.counters,
                conn.statistics(),
                data,
                conn.state,
            )
        )
    assert results[0] == results[1]
    whole = b"a" * 100 + b"b" * 100 + b"c" * 100 + b"d" * 100 + b"f" * 10
    assert results[1][4][0] == DataReceived(whole)
    assert results[1][5] is TcpState.CLOSE_WAIT
    assert results[1][0] and results[1][2]["rx_packets"] > 10


# What a packet of a random batch may be, for one live flow and one unknown.
_BATCH_KINDS = ["data", "data", "data", "psh", "ack", "gap", "fin", "sack", "rst", "old ts"]


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(_BATCH_KINDS), st.booleans(), st.integers(1, 300)),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_batch_leaves_what_packets_one_by_one_leave(
    batches: list[list[tuple[str, bool, int]]],
) -> None:
    """Random batches of data, ACKs, FINs, SACKs, RSTs and gaps of a live
    flow and an unknown one: batches and packets one by one give the same
    packets (in the same order within each flow; flows do not depend on
    each other), counters, statistics, data and state."""
    base_seq = (APP_ISN + 1 + len(GREETING)) & 0xFFFFFFFF
    ack = (ISS + 1) & 0xFFFFFFFF
    packets = []
    sent = {APP_PORT: 0, APP_PORT + 1: 0}
    tsval = 3
    for batch in batches:
        built = []
        for kind, live, size in batch:
            port = APP_PORT if live else APP_PORT + 1
            tsval += 1
            flags, data, at, sack = ACK, bytes([size & 0xFF]) * size, sent[port], ()
            if kind == "psh":
                flags |= PSH
            elif kind == "ack":
                data = b""
            elif kind == "gap":
                at += 1000
            elif kind == "fin":
                flags |= FIN
            elif kind == "sack":
                sack = ((ack, (ack + 1) & 0xFFFFFFFF),)
            elif kind == "rst":
                flags, data = RST, b""
            ts = ((tsval - 100) & 0xFFFFFFFF if kind == "old ts" else tsval, 0)
            hdr = TcpHeader(
                port,
                REMOTE_PORT,
                (base_seq + at) & 0xFFFFFFFF,
                ack,
                flags,
                512,
                options=TcpOptions(sack_blocks=sack, timestamp=ts),
            )
            built.append(build_tcp_packet(APP, REMOTE, hdr, data))
            if kind != "gap":
                sent[port] += len(data)
        packets.append(built)
    results = []
    for batch_mode in (False, True):
        stack = NetStack(CONFIG)
        conn = open_flow(stack, 0.0)
        out: dict[bytes, list[object]] = {}
        for batch in packets:
            if batch_mode:
                stack.receive_batch([(memoryview(p), False) for p in batch], 0.02)
            else:
                for p in batch:
                    stack.receive(memoryview(p), 0.02)
            for packet in stack.packets_to_send(0.02):
                assert isinstance(packet, bytes)
                out.setdefault(packet[22:24], []).append(packet)  # by the application's port
        data = []
        while (event := conn.next_event()) is not NEED_DATA:
            data.append(event)
        results.append((out, stack.counters, conn.statistics(), data, conn.state))
    assert results[0] == results[1]


# -- fragments: reassembly in, fragmentation out ---------------------------

APP6 = b"\xfd\x00" + bytes(13) + b"\x02"
REMOTE6 = b"\xfc\x00" + bytes(13) + b"\x05"
PING = bytes(range(256)) * 78 + bytes(32)  # `ping -s 20000`: 20,000 octets of data


def _received(stack: NetStack, fragments: list[bytes], now: float = 0.0) -> list[object]:
    events = [stack.receive(memoryview(f), now) for f in fragments]
    return [e for e in events if e is not None]


def _reassembled(packets: list[bytes | GsoPacket]) -> bytes:
    """Put output fragments back together with a store of their own."""
    store = FragmentStore()
    wholes = [store.receive(memoryview(p), 0.0) for p in packets]  # type: ignore[arg-type]
    [whole] = [w for w in wholes if w is not None]
    return whole


@pytest.mark.parametrize(("app", "remote"), [(APP, REMOTE), (APP6, REMOTE6)], ids=["v4", "v6"])
def test_a_fragmented_ping_gets_a_fragmented_reply(app: bytes, remote: bytes) -> None:
    v6 = len(app) == 16
    request = build_icmp_packet(
        app, remote, icmp.ICMP6_ECHO_REQUEST if v6 else icmp.ICMP_ECHO_REQUEST, 0, 0x00070001, PING
    )
    # The kernel cuts it at the device MTU (9000); tun2sx's own is 1500 here.
    fragments = fragment_packet(request, 9000, ident=0x4242)
    stack = NetStack(NetStackConfig(mtu=1500))
    assert _received(stack, fragments) == []
    packets = stack.packets_to_send(0.0)
    assert len(packets) == 14 and all(len(p) <= 1500 for p in packets)  # type: ignore[arg-type]
    reply = parse_packet_untrusted(memoryview(_reassembled(packets)))  # checksums verified
    assert (reply.src, reply.dst, bytes(reply.payload)) == (remote, app, PING)
    assert isinstance(reply.l4, IcmpHeader) and reply.l4.rest == 0x00070001
    counters = stack.counters
    assert counters["rx_fragments"] == 3 and counters["frag_reassembled"] == 1
    assert counters["icmp_echo_replies"] == 1 and counters["tx_fragmented"] == 1


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize(("app", "remote"), [(APP, REMOTE), (APP6, REMOTE6)], ids=["v4", "v6"])
def test_a_large_udp_datagram_arrives_and_a_large_reply_goes_out_in_fragments(
    app: bytes, remote: bytes, partial: bool
) -> None:
    datagram = build_udp_packet(app, remote, 40000, 7, PING)
    stack = NetStack(NetStackConfig(mtu=1500, partial_checksum=partial))
    [event] = _received(stack, fragment_packet(datagram, 1500, ident=9))
    assert event == UdpDatagram(app, 40000, remote, 7, PING)
    stack.send_udp(remote, 7, app, 40000, PING)
    packets = stack.packets_to_send(0.0)
    assert all(len(p) <= 1500 for p in packets)  # type: ignore[arg-type]
    # The whole checksum even with offload: fragments cannot be finished by it.
    reply = parse_packet_untrusted(memoryview(_reassembled(packets)), verify_checksum=True)
    assert bytes(reply.payload) == PING
    # A datagram that fits still leaves its checksum to the offload.
    stack.send_udp(remote, 7, app, 40000, b"small")
    [small] = stack.packets_to_send(0.0)
    assert type(small) is bytes
    ok = True
    try:
        parse_packet_untrusted(memoryview(small))
    except BadPacket:
        ok = False
    assert ok is not partial


def test_each_fragmented_datagram_gets_its_own_identification() -> None:
    stack = NetStack(NetStackConfig(mtu=1500))
    for _ in range(2):
        stack.send_udp(REMOTE, 7, APP, 40000, PING[:3000])
    idents = {p[4:6] for p in stack.packets_to_send(0.0)}  # type: ignore[index]
    assert len(idents) == 2


def test_a_reassembled_datagram_with_a_bad_checksum_is_malformed() -> None:
    datagram = bytearray(build_udp_packet(APP, REMOTE, 40000, 7, PING))
    datagram[-1] ^= 0xFF
    stack = NetStack()
    # The kernel vouching for each fragment does not vouch for the whole.
    events = [
        stack.receive(memoryview(f), 0.0, checksum_trusted=True)
        for f in fragment_packet(bytes(datagram), 1500, ident=1)
    ]
    assert not any(events)
    assert stack.counters["frag_reassembled"] == 1 and stack.counters["rx_malformed"] == 1


def test_reassembly_time_outs_join_the_deadline_and_send_time_exceeded() -> None:
    stack = NetStack(CONFIG)
    live = open_flow(stack, 0.0)
    stack.packets_to_send(0.0)
    tcp_deadline = stack.tcp.next_deadline()
    assert tcp_deadline is not None and stack.next_deadline() == tcp_deadline
    request = build_icmp_packet(APP6, REMOTE6, icmp.ICMP6_ECHO_REQUEST, 0, 1, PING)
    first, *_ = fragment_packet(request, 9000, ident=5)
    stack.receive(memoryview(first), 0.0)
    assert stack.next_deadline() == tcp_deadline  # TCP's comes first
    assert stack.handle_timeout(tcp_deadline) == [live]
    while (deadline := stack.tcp.next_deadline()) is not None and deadline < 60.0:
        stack.handle_timeout(deadline)
    stack.packets_to_send(59.0)
    assert stack.next_deadline() == 60.0
    assert stack.handle_timeout(60.0) == []
    [error] = stack.packets_to_send(60.0)
    parsed = parse_packet_untrusted(memoryview(error))  # type: ignore[arg-type]
    assert (parsed.src, parsed.dst) == (REMOTE6, APP6)
    assert isinstance(parsed.l4, IcmpHeader)
    assert (parsed.l4.type, parsed.l4.code) == (icmp.ICMP6_TIME_EXCEEDED, 1)
    assert bytes(parsed.payload) == first[: len(parsed.payload)]
    assert stack.counters["frag_timed_out"] == 1 and stack.counters["icmp_errors_sent"] == 1


def test_has_output_covers_queued_packets_and_held_fragments() -> None:
    stack = NetStack(CONFIG)
    assert not stack.has_output()
    open_flow(stack, 0.0)
    assert stack.has_output()
    stack.packets_to_send(0.0)
    assert not stack.has_output()
    request = build_icmp_packet(APP6, REMOTE6, icmp.ICMP6_ECHO_REQUEST, 0, 1, PING)
    first, *rest = fragment_packet(request, 9000, ident=5)
    stack.receive(memoryview(first), 0.0)
    # Nothing to send, but a reassembly deadline now exists.
    assert stack.packets_to_send(0.0) == [] and stack.has_output()
    for fragment in rest:
        stack.receive(memoryview(fragment), 0.0)
    assert stack.has_output()  # the echo reply is queued
    assert len(stack.packets_to_send(0.0)) >= 1
    assert not stack.has_output()


def test_packets_by_flow_are_packets_to_send_in_groups_under_their_keys() -> None:
    """A writer that paces one flow's run (tun2sx's engine) gets each flow's
    packets together under its key and the rest under None; joined, the
    groups are exactly what `packets_to_send` gives for the same state."""
    stacks = [NetStack(CONFIG), NetStack(CONFIG)]
    conns = [open_flow(stack, 0.0) for stack in stacks]
    ping = build_icmp_packet(APP, REMOTE, icmp.ICMP_ECHO_REQUEST, 0, 1, b"ping")
    for stack, conn in zip(stacks, conns, strict=True):
        stack.packets_to_send(0.0)  # the ACK of the greeting
        assert stack.receive(memoryview(ping), 0.0) is None  # answered by the stack
        conn.send(bytes(range(256)) * 30)
    groups = stacks[0].packets_by_flow(0.01)
    assert [key for key, _ in groups] == [None, conns[0].key]
    assert len(groups[0][1]) == 1 and len(groups[1][1]) == 10
    assert [p for _, packets in groups for p in packets] == stacks[1].packets_to_send(0.01)
    assert stacks[0].packets_by_flow(0.01) == []


def test_the_moved_deadline_reports_a_new_earlier_deadline_once_and_held_fragments() -> None:
    stack = NetStack(CONFIG)
    open_flow(stack, 0.0)
    stack.packets_to_send(0.0)
    tcp_deadline = stack.tcp.next_deadline()
    # The flow's first deadline was pushed by that output: reported once.
    assert tcp_deadline is not None
    assert stack.take_moved_deadline() == tcp_deadline
    assert stack.take_moved_deadline() is None
    request = build_icmp_packet(APP6, REMOTE6, icmp.ICMP6_ECHO_REQUEST, 0, 1, PING)
    first, *_ = fragment_packet(request, 9000, ident=5)
    stack.receive(memoryview(first), 30.0)
    # Reassembly's deadline is not tracked: asked for as long as it is held.
    assert stack.packets_to_send(30.0) == []
    assert stack.take_moved_deadline() == 90.0
    assert stack.take_moved_deadline() == 90.0
