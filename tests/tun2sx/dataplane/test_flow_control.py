"""What the controller asks of the engine: closing a live flow resets it
toward the application, connect times are counted per outbound, and the
mode's override takes new flows past the rules."""

from __future__ import annotations

import socket
import uuid

import trio
import trio.testing

from outbounds.base import Destination
from stack.netstack import NetStack, NetStackConfig
from stack.wire.packet import Packet, build_tcp_packet
from stack.wire.tcp import ACK, RST, SYN, TcpHeader, TcpOptions
from tests.support.app import APP, MemoryTun
from tests.support.outbounds import EchoOutbound
from tun2sx.dataplane.engine import Engine
from tun2sx.naming.router import REJECT, Router, RuleSet, parse_rules

SERVER = socket.inet_aton("198.51.100.2")


async def written(device: MemoryTun) -> Packet:
    with trio.fail_after(60):
        return await device.next_written()


async def test_closing_a_flow_resets_it_toward_the_application(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = MemoryTun()
    async with trio.open_nursery() as nursery:
        echo = EchoOutbound(nursery)
        router = Router(echo, outbounds={"echo": echo}, default_name="echo")
        engine = Engine(device, NetStack(NetStackConfig()), router)
        await nursery.start(engine.run)
        syn = TcpHeader(40000, 80, 1000, 0, SYN, 65535, options=TcpOptions(1400))
        device.feed(build_tcp_packet(APP, SERVER, syn, b""))
        synack = (await written(device)).l4
        assert isinstance(synack, TcpHeader) and synack.flags & SYN
        ack = TcpHeader(40000, 80, 1001, synack.seq + 1, ACK, 65535)
        device.feed(build_tcp_packet(APP, SERVER, ack, b""))
        await trio.testing.wait_all_tasks_blocked()
        (info,) = engine.flows
        # Shaped as dashboards expect: a version-4 UUID.
        assert uuid.UUID(info.id).version == 4 and info.wall_started > 1e9
        buckets, total = engine.connect_times.by_outbound["echo"]
        assert sum(buckets) == 1 and total[0] >= 0
        assert info.close()
        reset = (await written(device)).l4
        assert isinstance(reset, TcpHeader) and reset.flags & RST
        assert reset.dst_port == 40000
        await trio.testing.wait_all_tasks_blocked()
        assert not engine.flows
        assert engine.statistics()["tcp_flows"] == 0
        nursery.cancel_scope.cancel()


def test_the_override_names_an_outbound_of_the_router_of_the_moment() -> None:
    a, b = EchoOutbound.__new__(EchoOutbound), EchoOutbound.__new__(EchoOutbound)
    outbounds = {"a": a, "b": b}
    rules = RuleSet(parse_rules(["DOMAIN,x.test,a"], outbounds))
    engine = Engine(MemoryTun(), NetStack(NetStackConfig()), Router(b, rules, outbounds))
    dest = Destination("x.test", 80)
    assert engine.route(dest, "tcp") is a
    engine.override = "b"
    assert engine.route(dest, "tcp") is b
    engine.override = REJECT
    assert engine.route(dest, "udp") is None
    # A reload replaced the router and the name is gone: the default.
    engine.router = Router(a, RuleSet(()), {"a": a})
    engine.override = "b"
    assert engine.route(dest, "tcp") is a
    engine.override = None
    assert engine.route(dest, "tcp") is a
