"""Loop avoidance has an effect on routing, not only on socket options.

`test_net` reads the options back from the socket; here the kernel must act
on them. Two servers answer on the same address, 10.50.0.2, each with its
own name:

    client ns ── vethA ── server "A" (10.50.0.2/24)    main table
              └─ vethB ── server "B" (10.60.0.2/24, 10.50.0.2 on lo)
                 fwmark 0x2a -> table 100: 10.50.0.2 via 10.60.0.2

A plain direct socket reaches A; one carrying the mark, or bound to vethB,
reaches B: just as tun2sx's own sockets must leave by the uplink while
everything else is routed into the TUN.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from outbounds.base import Destination
from outbounds.direct import DirectOutbound
from outbounds.net import SocketOptions
from tests.support import require
from tun2sx.lab.netns import Lab, Namespace, inside

pytestmark = pytest.mark.e2e

MARK = 0x2A
TARGET = Destination(ipaddress.IPv4Address("10.50.0.2"), 9000)


@attrs.frozen
class Bed:
    client: Namespace
    veth_b: str


async def serve_name(ns: Namespace, name: bytes, nursery: trio.Nursery) -> None:
    """Answer every TCP connection and UDP datagram on :9000 in `ns` with `name`."""
    with inside(ns):
        # Sockets belong to the namespace they were created in, whichever
        # thread later uses them.
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        datagrams = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await listener.bind(("10.50.0.2", 9000))
    listener.listen()
    await datagrams.bind(("10.50.0.2", 9000))

    async def tcp() -> None:
        with listener:
            while True:
                conn, _ = await listener.accept()
                with conn:
                    await conn.send(name)

    async def udp() -> None:
        with datagrams:
            while True:
                _, addr = await datagrams.recvfrom(2048)
                await datagrams.sendto(name, addr)

    nursery.start_soon(tcp)
    nursery.start_soon(udp)


@pytest.fixture
async def bed(nursery: trio.Nursery) -> AsyncIterator[Bed]:
    require()
    with Lab("t2sx-loop") as lab:
        client = lab.namespace("client")
        server_a = lab.namespace("a")
        server_b = lab.namespace("b")
        # Loose reverse-path filtering: B's replies come in on vethB while
        # the unmarked route back to 10.50.0.2 is vethA.
        for key in ("all", "default"):
            client.run(["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=2"])
        lab.link(client, ["10.50.0.1/24"], server_a, ["10.50.0.2/24"])
        _, veth_b = lab.link(server_b, ["10.60.0.2/24"], client, ["10.60.0.1/24"])
        server_b.run(["ip", "addr", "add", "10.50.0.2/32", "dev", "lo"])
        client.run(["ip", "route", "add", "10.50.0.2", "via", "10.60.0.2", "table", "100"])
        client.run(["ip", "rule", "add", "fwmark", hex(MARK), "lookup", "100", "priority", "100"])
        await serve_name(server_a, b"A", nursery)
        await serve_name(server_b, b"B", nursery)
        yield Bed(client, veth_b)
        nursery.cancel_scope.cancel()


def options(kind: str, bed: Bed) -> SocketOptions:
    if kind == "fwmark":
        return SocketOptions(fwmark=MARK)
    if kind == "interface":
        return SocketOptions(interface=bed.veth_b)
    return SocketOptions()


EXPECTED = [("plain", b"A"), ("fwmark", b"B"), ("interface", b"B")]


@pytest.mark.parametrize(("kind", "server"), EXPECTED)
async def test_tcp_reaches_the_server_the_options_select(
    bed: Bed, kind: str, server: bytes
) -> None:
    outbound = DirectOutbound(socket_options=options(kind, bed))
    with trio.fail_after(10):
        with inside(bed.client):
            stream = await outbound.connect_tcp(TARGET)
        async with stream:
            assert await stream.receive_some() == server


@pytest.mark.parametrize(("kind", "server"), EXPECTED)
async def test_udp_reaches_the_server_the_options_select(
    bed: Bed, kind: str, server: bytes
) -> None:
    outbound = DirectOutbound(socket_options=options(kind, bed))
    with trio.fail_after(10):
        with inside(bed.client):
            session = await outbound.open_udp()
        try:
            await session.send_to(b"who?", TARGET)
            data, source = await session.receive_from()
        finally:
            await session.aclose()
    assert (data, source) == (server, TARGET)


async def test_protect_that_marks_is_as_good_as_fwmark(bed: Bed) -> None:
    """An Android-style protect(fd) that marks the socket takes it around."""
    protected: list[int] = []

    def protect(fd: int) -> bool:
        sock = socket.socket(fileno=fd)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        finally:
            sock.detach()
        protected.append(fd)
        return True

    outbound = DirectOutbound(socket_options=SocketOptions(protect=protect))
    with trio.fail_after(10):
        with inside(bed.client):
            stream = await outbound.connect_tcp(TARGET)
        async with stream:
            assert await stream.receive_some() == b"B"
            assert protected == [stream.socket.fileno()]  # type: ignore[attr-defined]
