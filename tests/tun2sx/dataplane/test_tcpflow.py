"""TCP flows under a SYN flood: evicted SYNs end their dials, dead
destinations fail fast, and what the demux turned away is in the stats.

The application is a `MemoryTun` the test feeds SYNs; the outbound never
answers (or answers for chosen destinations), under trio's autojump clock.
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, OutboundError, UdpSession
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import Packet, build_tcp_packet
from stack.wire.tcp import RST, SYN, TcpHeader, TcpOptions
from tests.support.app import APP, MemoryTun
from tests.support.outbounds import EchoOutbound
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.timeouts import ConnectTimeouts
from tun2sx.naming.router import Router

DEAD = socket.inet_aton("198.51.100.1")
LIVE = socket.inet_aton("198.51.100.2")


def syn(dst: bytes, port: int) -> bytes:
    hdr = TcpHeader(port, 80, 1000, 0, SYN, 65535, options=TcpOptions(1400))
    return build_tcp_packet(APP, dst, hdr, b"")


class DeadOrEcho:
    """Connects to `LIVE` echo; connects to anything else hang until cancelled.

    Attributes:
        dials: connects begun to a dead destination.
        cancelled: of those, how many were cancelled.
    """

    name = "dead-or-echo"

    def __init__(self, nursery: trio.Nursery) -> None:
        self._echo = EchoOutbound(nursery)
        self.dials = 0
        self.cancelled = 0

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        if str(dest.host) == socket.inet_ntoa(LIVE):
            return await self._echo.connect_tcp(dest)
        self.dials += 1
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1
        raise AssertionError("unreachable")

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


async def written(device: MemoryTun) -> Packet:
    with trio.fail_after(60):
        return await device.next_written()


async def test_an_evicted_syn_ends_its_dial_without_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = TcpConfig(max_half_open=2, max_pending_per_destination=2)
    device = MemoryTun()
    async with trio.open_nursery() as nursery:
        outbound = DeadOrEcho(nursery)
        engine = Engine(
            device,
            NetStack(NetStackConfig(tcp=config)),
            Router(outbound),
            config=EngineConfig(connect_timeout=10.0),
        )
        await nursery.start(engine.run)
        device.feed(syn(DEAD, 1), syn(DEAD, 2))
        await trio.testing.wait_all_tasks_blocked()
        assert (outbound.dials, outbound.cancelled) == (2, 0)
        # The table is full of one destination's SYNs: another's evicts the
        # oldest, whose dial ends at once, and it is answered (SYN-ACK).
        start = trio.current_time()
        device.feed(syn(LIVE, 3))
        answer = await written(device)
        assert trio.current_time() == start
        assert isinstance(answer.l4, TcpHeader) and answer.l4.dst_port == 3
        await trio.testing.wait_all_tasks_blocked()
        assert outbound.cancelled == 1
        stats = engine.statistics()
        # The evicted SYN gets no answer; the other dead one its ICMP at 10 s
        # (SYN-ACKs resent to the live flow's silent application aside).
        late = await written(device)
        while isinstance(late.l4, TcpHeader):
            late = await written(device)
        assert trio.current_time() == pytest.approx(start + 10.0)
        assert isinstance(late.l4, IcmpHeader)
        nursery.cancel_scope.cancel()
    assert stats["syn_evicted"] == 1
    assert stats["tcp_dials_cancelled_evicted"] == 1
    assert stats["tcp_pending"] == 1 and stats["tcp_half_open"] == 2
    assert stats.get("tcp_flow_errors", 0) == 0


async def test_a_syn_evicted_before_its_flow_started_never_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = TcpConfig(max_half_open=2, max_pending_per_destination=2)
    device = MemoryTun()
    async with trio.open_nursery() as nursery:
        outbound = DeadOrEcho(nursery)
        engine = Engine(device, NetStack(NetStackConfig(tcp=config)), Router(outbound))
        await nursery.start(engine.run)
        # One batch: the third SYN evicts the first before its task runs.
        device.feed(syn(DEAD, 1), syn(DEAD, 2), syn(LIVE, 3))
        answer = await written(device)
        assert isinstance(answer.l4, TcpHeader) and answer.l4.dst_port == 3
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        nursery.cancel_scope.cancel()
    assert (outbound.dials, outbound.cancelled) == (1, 1)  # the second's dial, at the end
    assert stats["syn_evicted"] == 1 and stats.get("tcp_flow_errors", 0) == 0


async def test_a_destination_whose_connects_keep_timing_out_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = MemoryTun()
    async with trio.open_nursery() as nursery:
        outbound = DeadOrEcho(nursery)
        engine = Engine(
            device, NetStack(), Router(outbound), config=EngineConfig(connect_timeout=3.0)
        )
        engine.tcp = type(engine.tcp)(
            engine, engine.dns_server, timeouts=ConnectTimeouts(threshold=2, backoff=5.0)
        )
        await nursery.start(engine.run)
        waits = []
        for port in (1, 2, 3, 4):
            start = trio.current_time()
            device.feed(syn(DEAD, port))
            packet = await written(device)
            assert isinstance(packet.l4, IcmpHeader)
            assert (packet.l4.type, packet.l4.code) == (3, 1)  # host unreachable
            waits.append(trio.current_time() - start)
        # After the back-off the next SYN dials again (and times out again).
        await trio.sleep(5.0)
        start = trio.current_time()
        device.feed(syn(DEAD, 5))
        await written(device)
        waits.append(trio.current_time() - start)
        # Another destination was never affected.
        device.feed(syn(LIVE, 6))
        synack = await written(device)
        stats = engine.statistics()
        nursery.cancel_scope.cancel()
    assert waits == pytest.approx([3.0, 3.0, 0.0, 0.0, 3.0])
    assert isinstance(synack.l4, TcpHeader)
    assert outbound.dials == 3
    assert stats["tcp_connect_fast_failures"] == 2


class Refusing:
    """A proxy that is down: every connect fails at once."""

    name = "down"

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        await trio.lowlevel.checkpoint()
        raise OutboundError(FailureReply.RESET, "proxy 10.0.0.1:1080 unreachable: refused")

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


async def test_an_application_retrying_into_a_dead_proxy_gets_a_line_per_interval_not_per_flow(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    device = MemoryTun()
    caplog.set_level(logging.INFO, logger="tun2sx")
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(), Router(Refusing()))
        await nursery.start(engine.run)
        answers = []
        for port in range(1, 51):
            device.feed(syn(DEAD, port))
            answers.append(await written(device))
        first = [r.getMessage() for r in caplog.records if "via down" in r.getMessage()]
        await trio.sleep(11.0)
        device.feed(syn(DEAD, 51))
        answers.append(await written(device))
        stats = engine.statistics()
        nursery.cancel_scope.cancel()
    # Every application still gets its answer (an RST), and every failure is counted.
    assert all(isinstance(a.l4, TcpHeader) and a.l4.flags & RST for a in answers)
    assert stats["tcp_outbound_failed"] == 51
    lines = [r.getMessage() for r in caplog.records if "via down" in r.getMessage()]
    assert len(first) == 1 and "unreachable" in first[0]
    assert len(lines) == 2
    assert "(49 more like it since the last such line)" in lines[1]
