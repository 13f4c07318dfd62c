"""Datagrams to a fake IP nobody handed out: every one counted, few logged."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
import trio.testing

from stack.netstack import NetStack, NetStackConfig
from stack.wire.packet import build_udp_packet
from tests.support.app import MemoryTun
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.loglimit import LogLimit
from tun2sx.naming.fakeip import FakeIpStore
from tun2sx.naming.router import Router

APP = socket.inet_aton("10.0.0.2")
UNKNOWN_FAKE = socket.inet_aton("198.18.7.7")  # in the pool, never handed out


def test_the_first_line_goes_out_then_one_per_interval_with_the_count() -> None:
    limit = LogLimit(10.0)
    assert limit.allow(0.0) == 0
    assert [limit.allow(t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert limit.allow(10.0) == 3
    assert limit.allow(10.5) is None
    assert limit.allow(25.0) == 1
    assert LogLimit.suffix(3) == " (3 more like it since the last such line)"
    assert LogLimit.suffix(0) == ""


async def test_a_stale_application_does_not_fill_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An application that kept a fake IP across a restart of tun2sx sends to
    it, packet after packet: each gets its ICMP and is counted; the log
    says so once, then once every ten seconds with the count."""
    caplog.set_level(logging.WARNING, logger="tun2sx.udp")
    device = MemoryTun()
    engine = Engine(
        device,  # type: ignore[arg-type]
        NetStack(NetStackConfig()),
        Router(None),
        fakeip=FakeIpStore(":memory:"),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for port in range(40000, 40100):
            device.feed(build_udp_packet(APP, UNKNOWN_FAKE, port, 443, b"stale"))
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(100):
            assert (await device.next_written()).dst == APP  # each its ICMP error
        assert engine.statistics()["udp_unknown_fake_ip"] == 100
        lines = [r.getMessage() for r in caplog.records if "no host name" in r.getMessage()]
        assert len(lines) == 1
        await trio.sleep(10)
        device.feed(build_udp_packet(APP, UNKNOWN_FAKE, 41000, 443, b"stale"))
        await trio.testing.wait_all_tasks_blocked()
        lines = [r.getMessage() for r in caplog.records if "no host name" in r.getMessage()]
        assert len(lines) == 2 and "(99 more like it" in lines[1]
        nursery.cancel_scope.cancel()
