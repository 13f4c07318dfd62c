"""A flow through a proxy group records the member that carried it and the rule.

The engine runs on a `MemoryTun` under trio's autojump clock; the group is a
fallback whose first member's proxy is unreachable, so the first flow marks
it down (the passive check) and is refused, and the next goes to the second.
"""

from __future__ import annotations

import socket

import trio
import trio.testing

from outbounds.base import Destination, FailureReply, Outbound, OutboundError, UdpDrops, UdpSession
from outbounds.group import GroupSpec, build_groups
from stack.netstack import NetStack, NetStackConfig
from stack.wire.packet import build_tcp_packet, build_udp_packet
from stack.wire.tcp import ACK, RST, SYN, TcpHeader, TcpOptions
from tests.support.app import APP, MemoryTun
from tests.support.outbounds import EchoOutbound
from tun2sx.dataplane.engine import Engine
from tun2sx.naming.router import Router, RuleSet, parse_rules

REMOTE = socket.inet_aton("198.51.100.2")


class IdleSession:
    """A UDP session that sends into nothing and never hears back."""

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        return True

    async def send_to(self, data: bytes, dest: Destination) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def receive_from(self) -> tuple[bytes, Destination]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def wait_ended(self) -> None:
        await trio.sleep_forever()

    def drops(self) -> UdpDrops:
        return UdpDrops()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Unreachable:
    """A proxy that cannot be reached, for TCP and UDP."""

    name = "dead"

    def __init__(self) -> None:
        self.attempts = 0

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        raise OutboundError(FailureReply.RESET, "dead unreachable: refused", proxy_failed=True)

    async def open_udp(self) -> UdpSession:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        raise OutboundError(FailureReply.RESET, "dead unreachable: refused", proxy_failed=True)


class EchoWithUdp(EchoOutbound):
    async def open_udp(self) -> UdpSession:
        await trio.lowlevel.checkpoint()
        return IdleSession()


def syn(port: int) -> bytes:
    hdr = TcpHeader(port, 80, 1000, 0, SYN, 65535, options=TcpOptions(1400))
    return build_tcp_packet(APP, REMOTE, hdr, b"")


async def test_flows_record_the_member_and_the_rule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = MemoryTun()
    async with trio.open_nursery() as nursery:
        dead = Unreachable()
        named: dict[str, Outbound] = {"dead": dead, "live": EchoWithUdp(nursery)}
        group = build_groups([GroupSpec("auto", "fallback", ("dead", "live"))], named)["auto"]
        named["auto"] = group
        rules = parse_rules(["IP-CIDR,198.51.100.0/24,auto", "MATCH,live"], named.keys())
        engine = Engine(device, NetStack(NetStackConfig()), Router(None, RuleSet(rules), named))
        await nursery.start(engine.run)
        device.feed(syn(40001))
        with trio.fail_after(5):
            refused = await device.next_written()
        assert isinstance(refused.l4, TcpHeader) and refused.l4.flags & RST
        assert dead.attempts == 1 and not group.alive("dead") and group.now() == "live"
        device.feed(syn(40002))
        with trio.fail_after(5):
            answer = await device.next_written()
        assert isinstance(answer.l4, TcpHeader) and answer.l4.flags == SYN | ACK
        device.feed(build_udp_packet(APP, REMOTE, 5353, 53000, b"hello"))
        with trio.fail_after(5):
            while len(engine.flows) < 2:
                await trio.sleep(0.01)
        flows = sorted(engine.flows, key=lambda info: info.network)
        nursery.cancel_scope.cancel()
    assert dead.attempts == 1  # marked down: the later flows went straight to live
    assert [(f.network, f.outbound, f.chain, f.rule, f.rule_payload) for f in flows] == [
        ("tcp", "auto", ("live", "auto"), "IP-CIDR", "198.51.100.0/24"),
        ("udp", "auto", ("live", "auto"), "IP-CIDR", "198.51.100.0/24"),
    ]
