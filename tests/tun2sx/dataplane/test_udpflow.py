"""UDP sessions at packet rates: the engine over a fake TUN and a fake outbound.

The device is a stand-in with `read_batch`/`write` (the test hands it
batches of IP packets and reads what the engine wrote); the outbound's
session records which task sent each datagram and how, and serves replies
the test queues. Time is trio's autojump clock; nothing sleeps to hide a
race.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, OutboundError, UdpDrops, UdpSession
from stack.fragments import FragmentStore
from stack.netstack import NetStack, NetStackConfig
from stack.wire.fragment import fragment_packet
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import build_udp_packet, parse_packet_untrusted
from stack.wire.udp import UdpHeader
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import RxPacket
from tun2sx.dataplane.udpflow import RECEIVE_BATCH, SETUP_QUEUE
from tun2sx.naming.router import Router

APP = socket.inet_aton("10.0.0.2")
REMOTE = socket.inet_aton("198.51.100.7")
REMOTE_DEST = Destination(ipaddress.IPv4Address("198.51.100.7"), 443)
APP_PORT = 40000


class FakeTun:
    """Batches in from the test, packets out to a list."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[list[RxPacket]](100)
        self.written: list[bytes] = []

    def feed(self, *packets: bytes) -> None:
        self._send.send_nowait([RxPacket(memoryview(p), False) for p in packets])

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        return []  # nothing held outside read_batch

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        return await self._receive.receive()

    def write(self, packet: bytes) -> None:
        self.written.append(bytes(packet))

    def udp_written(self) -> list[tuple[bytes, int, bytes]]:
        """(source address, source port, payload) of each UDP packet written."""
        out = []
        for raw in self.written:
            pkt = parse_packet_untrusted(memoryview(raw))
            if isinstance(pkt.l4, UdpHeader):
                assert (pkt.dst, pkt.l4.dst_port) == (APP, APP_PORT)
                out.append((pkt.src, pkt.l4.src_port, bytes(pkt.payload)))
        return out


class FakeSession:
    """A UDP session that records every send and the task that made it."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room  # datagrams the "socket buffer" takes before it is full
        self.unresolved: set[str] = set()  # names send_to_nowait cannot send yet
        self.sent: list[tuple[bytes, Destination, str, trio.lowlevel.Task]] = []
        self.send_full = 0
        self.replies: list[tuple[bytes, Destination]] = []
        self.replies_ready = trio.Event()
        self.ended = trio.Event()
        self.closed = False
        self.receive_error: OutboundError | None = None  # raised by receive_batch once set
        self.send_error: OutboundError | None = None  # raised by send_to_nowait once set

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        if self.send_error is not None:
            raise self.send_error
        if isinstance(dest.host, str) and dest.host in self.unresolved:
            raise trio.WouldBlock
        if self.room <= 0:
            self.send_full += 1
            return False
        self.room -= 1
        self.sent.append((data, dest, "nowait", trio.lowlevel.current_task()))
        return True

    async def send_to(self, data: bytes, dest: Destination) -> None:
        await trio.sleep(0.05)  # a resolver's round trip
        if isinstance(dest.host, str):
            self.unresolved.discard(dest.host)
        self.sent.append((data, dest, "wait", trio.lowlevel.current_task()))

    def reply(self, *items: tuple[bytes, Destination]) -> None:
        self.replies.extend(items)
        self.replies_ready.set()

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        await self.replies_ready.wait()
        if self.receive_error is not None:
            raise self.receive_error
        batch, self.replies = self.replies[:limit], self.replies[limit:]
        if not self.replies:
            self.replies_ready = trio.Event()
        return batch

    async def receive_from(self) -> tuple[bytes, Destination]:
        raise NotImplementedError

    async def wait_ended(self) -> None:
        await self.ended.wait()
        raise OutboundError(FailureReply.RESET, "the proxy ended the association")

    def drops(self) -> UdpDrops:
        return UdpDrops(self.send_full, 7, 0)

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class FakeOutbound:
    """Opens `FakeSession`s; `gate` holds the set-up (a UDP ASSOCIATE) open."""

    name = "fake"

    def __init__(self, room: int = 1 << 30, fail: bool = False) -> None:
        self.gate = trio.Event()
        self.gate.set()
        self.sessions: list[FakeSession] = []
        self._room = room
        self._fail = fail

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        raise NotImplementedError

    async def open_udp(self) -> UdpSession:
        await self.gate.wait()
        if self._fail:
            raise OutboundError(FailureReply.HOST_UNREACHABLE, "proxy unreachable")
        session = FakeSession(self._room)
        self.sessions.append(session)
        return session


class CountingEngine(Engine):
    """The engine, counting its flushes (one per batch is the promise)."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def datagram(payload: bytes, dst: bytes = REMOTE, port: int = 443) -> bytes:
    return build_udp_packet(APP, dst, APP_PORT, port, payload)


@pytest.fixture
async def running(
    nursery: trio.Nursery, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[CountingEngine, FakeTun, FakeOutbound]]:
    kwargs = getattr(request, "param", {})
    device = FakeTun()
    outbound = FakeOutbound(**kwargs)
    engine = CountingEngine(
        device,  # type: ignore[arg-type]
        NetStack(NetStackConfig()),
        Router(outbound),
        config=EngineConfig(udp_idle_timeout=30.0),
    )
    await nursery.start(engine.run)
    yield engine, device, outbound


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_the_reader_sends_each_datagram_itself_once_the_session_is_open(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(datagram(b"first"))
    await settle()
    [session] = outbound.sessions
    device.feed(*(datagram(b"d%d" % i) for i in range(100)))
    await settle()
    assert [data for data, *_ in session.sent] == [b"first"] + [b"d%d" % i for i in range(100)]
    # Every datagram after set-up went out without waiting, and all from one
    # task: the reader's, not a session task fed through a channel.
    hot = session.sent[1:]
    assert {how for _, _, how, _ in hot} == {"nowait"}
    tasks = {task for *_, task in hot}
    assert len(tasks) == 1
    assert tasks.pop().name.endswith("Engine.run")  # the reader runs in the engine's task
    assert all(dest == REMOTE_DEST for _, dest, _, _ in session.sent)
    stats = engine.statistics()
    assert stats["udp_datagrams_up"] == 101
    assert stats["udp_sessions"] == 1


async def test_a_batch_of_replies_is_one_flush_mapped_to_the_address_used(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(datagram(b"hello"))
    await settle()
    [session] = outbound.sessions
    flushes = engine.flushes
    other = Destination(ipaddress.IPv4Address("203.0.113.9"), 3478)  # full-cone: anyone
    session.reply(*((b"r%d" % i, REMOTE_DEST) for i in range(200)), (b"cone", other))
    await settle()
    # One flush per batch the session handed over, not one per datagram.
    assert engine.flushes == flushes + -(-201 // RECEIVE_BATCH)
    got = device.udp_written()
    assert got[:200] == [(REMOTE, 443, b"r%d" % i) for i in range(200)]
    assert got[200] == (other.host.packed, 3478, b"cone")  # type: ignore[union-attr]
    assert engine.statistics()["udp_datagrams_down"] == 201


async def test_datagrams_wait_in_a_bounded_queue_during_set_up(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    outbound.gate = trio.Event()  # the handshake is under way
    device.feed(*(datagram(b"q%d" % i) for i in range(SETUP_QUEUE + 10)))
    await settle()
    assert outbound.sessions == []
    assert engine.statistics()["udp_setup_queue_drops"] == 10
    outbound.gate.set()
    await settle()
    [session] = outbound.sessions
    # What fitted goes out in order once the session is open.
    assert [data for data, *_ in session.sent] == [b"q%d" % i for i in range(SETUP_QUEUE)]


@pytest.mark.parametrize("running", [{"room": 5}], indirect=True)
async def test_a_full_send_buffer_drops_and_counts_even_after_the_session_ends(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(*(datagram(b"x%d" % i) for i in range(12)))
    await settle()
    [session] = outbound.sessions
    assert len(session.sent) == 5
    stats = engine.statistics()
    assert (stats["udp_send_drops"], stats["udp_datagrams_up"]) == (7, 5)
    assert stats["udp_receive_drops"] == 7  # what the session's socket reports
    # Idle for the timeout: the session ends, its drops stay in the totals.
    await trio.sleep(31)
    stats = engine.statistics()
    assert session.closed and stats["udp_sessions"] == 0
    assert (stats["udp_send_drops"], stats["udp_receive_drops"]) == (7, 7)


async def test_traffic_keeps_a_session_alive_and_idleness_ends_it(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(datagram(b"a"))
    await settle()
    [session] = outbound.sessions
    for _ in range(5):  # 100 s of traffic every 20 s: never idle for 30
        await trio.sleep(20)
        device.feed(datagram(b"b"))
        await settle()
    assert not session.closed
    session.reply((b"r", REMOTE_DEST))  # replies count as traffic too
    await trio.sleep(25)
    await settle()
    assert not session.closed
    await trio.sleep(10)
    assert session.closed
    assert engine.statistics()["udp_sessions"] == 0
    # The application's next datagram opens a new session.
    device.feed(datagram(b"again"))
    await settle()
    assert len(outbound.sessions) == 2


async def test_a_name_to_resolve_waits_in_order_without_stalling_the_reader(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(datagram(b"open"))
    await settle()
    [session] = outbound.sessions
    named = Destination("quic.example", 443)
    session.unresolved.add("quic.example")
    engine.destination_for = lambda addr, port: named  # type: ignore[method-assign]
    engine.udp.sessions[(APP, APP_PORT)].dests.clear()
    device.feed(*(datagram(b"n%d" % i) for i in range(3)))
    await trio.sleep(1)  # the resolver's round trip
    assert [(d, how) for d, _, how, _ in session.sent[1:]] == [
        (b"n0", "wait"),
        (b"n1", "nowait"),
        (b"n2", "nowait"),
    ]


async def test_the_association_ending_ends_the_session(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(datagram(b"a"))
    await settle()
    [session] = outbound.sessions
    session.ended.set()
    await settle()
    assert session.closed
    stats = engine.statistics()
    assert stats["udp_sessions"] == 0
    assert stats.get("udp_session_errors", 0) == 0  # an expected end, not a bug


@pytest.mark.parametrize("running", [{"fail": True}], indirect=True)
async def test_an_outbound_that_fails_answers_icmp_unreachable(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    outbound.gate = trio.Event()  # the proxy answers only after three more datagrams
    device.feed(*(datagram(b"%d" % i) for i in range(4)))
    await settle()
    outbound.gate.set()
    await settle()
    [raw] = device.written
    pkt = parse_packet_untrusted(memoryview(raw))
    assert (pkt.src, pkt.dst, raw[9]) == (REMOTE, APP, 1)  # ICMP from the destination
    assert (pkt.l4.type, pkt.l4.code) == (3, 1)  # type: ignore[union-attr]
    stats = engine.statistics()
    assert stats["udp_sessions"] == 0
    assert stats["udp_session_end_drops"] == 4  # the first answered, none sent


BIG = bytes(range(256)) * 80  # 20,480 octets: fragments both ways at 1500


async def test_a_fragmented_datagram_goes_out_whole_and_its_large_reply_in_fragments(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, outbound = running
    device.feed(*fragment_packet(datagram(BIG), 1500, ident=3))
    await settle()
    [session] = outbound.sessions
    assert [data for data, *_ in session.sent] == [BIG]
    session.reply((BIG[::-1], REMOTE_DEST))
    await settle()
    assert len(device.written) == 14 and all(len(p) <= 1500 for p in device.written)
    store = FragmentStore()
    [whole] = [w for p in device.written if (w := store.receive(memoryview(p), 0.0))]
    reply = parse_packet_untrusted(memoryview(whole))
    assert (reply.src, reply.dst, bytes(reply.payload)) == (REMOTE, APP, BIG[::-1])
    assert engine.statistics()["frag_reassembled"] == 1


async def test_the_timer_gives_up_on_a_datagram_and_sends_time_exceeded(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
) -> None:
    engine, device, _ = running
    app6, remote6 = b"\xfd" + bytes(14) + b"\x02", b"\xfc" + bytes(14) + b"\x05"
    first = fragment_packet(build_udp_packet(app6, remote6, 1, 2, BIG), 1500, ident=3)[0]
    device.feed(first)
    await settle()
    start = trio.current_time()
    await trio.sleep(59.9)
    assert device.written == []
    await trio.sleep(0.2)
    [error] = device.written
    parsed = parse_packet_untrusted(memoryview(error))
    assert isinstance(parsed.l4, IcmpHeader) and (parsed.l4.type, parsed.l4.code) == (3, 1)
    assert (parsed.src, parsed.dst) == (remote6, app6)
    assert engine.statistics()["frag_timed_out"] == 1
    assert trio.current_time() - start < 61


def icmp_written(device: FakeTun) -> list[tuple[bytes, int, int, bytes]]:
    """(source, type, code, quoted packet) of each ICMP error written."""
    out = []
    for raw in device.written:
        pkt = parse_packet_untrusted(memoryview(raw))
        if raw[9] == 1:
            assert pkt.dst == APP
            out.append((pkt.src, pkt.l4.type, pkt.l4.code, bytes(pkt.payload)))  # type: ignore[union-attr]
    return out


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (FailureReply.PORT_UNREACHABLE, 3),
        (FailureReply.RESET, 3),
        (FailureReply.HOST_UNREACHABLE, 1),
        (FailureReply.NET_UNREACHABLE, 0),
    ],
)
async def test_a_relay_failing_mid_session_is_one_line_and_an_icmp_error(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
    caplog: pytest.LogCaptureFixture,
    reply: FailureReply,
    code: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    engine, device, outbound = running
    device.feed(datagram(b"a"))
    await settle()
    [session] = outbound.sessions
    session.receive_error = OutboundError(reply, "receiving from the SOCKS5 UDP relay: refused")
    session.reply((b"", REMOTE_DEST))
    await settle()
    # The application's socket hears of it, from the peer it sent to.
    [(src, type_, got_code, quoted)] = icmp_written(device)
    assert (src, type_, got_code) == (REMOTE, 3, code)
    assert quoted[12:20] == APP + REMOTE  # the quoted IPv4 header's addresses
    assert int.from_bytes(quoted[22:24], "big") == 443  # ... and destination port
    assert session.closed and engine.statistics()["udp_sessions"] == 0
    assert engine.statistics().get("udp_session_errors", 0) == 0
    # One line naming the application's endpoint; no traceback, nothing above INFO.
    records = [r for r in caplog.records if r.name.startswith("tun2sx")]
    assert [r.getMessage() for r in records] == [
        "UDP session 10.0.0.2:40000 ended: receiving from the SOCKS5 UDP relay: refused"
    ]
    assert all(r.exc_info is None and r.levelno <= logging.INFO for r in records)


async def test_a_send_failing_mid_session_answers_that_datagram(
    autojump_clock: trio.testing.MockClock,
    running: tuple[CountingEngine, FakeTun, FakeOutbound],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    engine, device, outbound = running
    device.feed(datagram(b"a"))
    await settle()
    [session] = outbound.sessions
    session.send_error = OutboundError(FailureReply.HOST_UNREACHABLE, "no route")
    device.feed(datagram(b"second", port=8443))
    await settle()
    [(src, type_, code, quoted)] = icmp_written(device)
    assert (src, type_, code) == (REMOTE, 3, 1)
    assert int.from_bytes(quoted[22:24], "big") == 8443
    assert session.closed and engine.statistics()["udp_sessions"] == 0
    assert "UDP session 10.0.0.2:40000 ended: no route" in caplog.text
