"""Outbound doubles: every flow to an in-memory echo, or to one loopback listener."""

from __future__ import annotations

import trio
import trio.testing

from outbounds.base import Destination, UdpSession
from outbounds.net import SocketOptions, open_tcp

__all__ = ["PROXY_PASSWORD", "PROXY_USER", "EchoOutbound", "LoopbackOutbound"]

# The credentials the test SOCKS5 servers (microsocks with -u/-P) require.
PROXY_USER = "tun2sx"
PROXY_PASSWORD = "s3cret:with@odd/chars"


class EchoOutbound:
    """Connects every flow to an in-memory echo (EOF answered with EOF)."""

    name = "echo"

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.destinations: list[Destination] = []

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        self.destinations.append(dest)
        ours, theirs = trio.testing.memory_stream_pair()

        async def echo() -> None:
            while data := await theirs.receive_some():
                await theirs.send_all(data)
            await theirs.send_eof()

        self._nursery.start_soon(echo)
        return ours

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


class LoopbackOutbound:
    """Connects every flow to one listener on the loopback, as a socket stream."""

    name = "loopback"

    def __init__(self, port: int) -> None:
        self.port = port

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        return await open_tcp("127.0.0.1", self.port, SocketOptions())

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError
