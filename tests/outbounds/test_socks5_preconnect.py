"""`preconnect`: the next CONNECT's proxy connection is made and greeted ahead of it."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.socks5 import (
    SPARE_MAX_AGE,
    Socks5Outbound,
    build_reply,
    parse_request_untrusted,
    parse_socks5_url,
)

BOUND = Destination(ipaddress.IPv4Address("127.0.0.1"), 1)


class Proxy:
    """A SOCKS5 proxy that logs what each connection did, in accept order.

    Each connection's log holds "greeting", "request <host>:<port>" and
    "closed". Connections whose index is in `close_after_greeting` close
    right after answering the greeting (a proxy's idle timeout); those in
    `close_on_request` close when the request came, without a reply.
    """

    def __init__(self) -> None:
        self.connections: list[list[str]] = []
        self.close_after_greeting: set[int] = set()
        self.close_on_request: set[int] = set()
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), self._handle, 0
        )
        self.port = listeners[0].socket.getsockname()[1]

    async def _handle(self, stream: trio.SocketStream) -> None:
        log: list[str] = []
        self.connections.append(log)
        try:
            await self._serve(stream, len(self.connections) - 1, log)
        except trio.BrokenResourceError:
            log.append("closed")  # reset: a socket closed with our answer unread

    async def _serve(self, stream: trio.SocketStream, index: int, log: list[str]) -> None:
        async with stream:
            buf = bytearray()
            while len(buf) < 3:  # VER NMETHODS=1 NO_AUTH
                if not (data := await stream.receive_some()):
                    log.append("closed")
                    return
                buf += data
            del buf[:3]
            log.append("greeting")
            await stream.send_all(b"\x05\x00")
            if index in self.close_after_greeting:
                log.append("closed")
                return
            while (parsed := parse_request_untrusted(buf)) is None:
                if not (data := await stream.receive_some()):
                    log.append("closed")
                    return
                buf += data
            log.append(f"request {parsed[1]}")
            if index in self.close_on_request:
                log.append("closed")
                return
            await stream.send_all(build_reply(0, BOUND) + bytes(buf[parsed[2] :]))
            while data := await stream.receive_some():  # then an echo
                await stream.send_all(data)
            log.append("closed")


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> Proxy:
    server = Proxy()
    await server.start(nursery)
    return server


@pytest.fixture
def outbound(proxy: Proxy) -> Iterator[Socks5Outbound]:
    dialer = Socks5Outbound("127.0.0.1", proxy.port, preconnect=True)
    yield dialer
    dialer.close_spare()


async def _connect_and_echo(outbound: Socks5Outbound, port: int) -> None:
    stream = await outbound.connect_tcp(Destination("target.example", port))
    async with stream:
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
    await trio.testing.wait_all_tasks_blocked()


async def test_the_next_connect_goes_out_on_a_connection_greeted_ahead(
    proxy: Proxy, outbound: Socks5Outbound
) -> None:
    assert outbound.preconnect
    await _connect_and_echo(outbound, 1)
    # The first request's connection, and one greeted while it waited.
    assert proxy.connections == [
        ["greeting", "request target.example:1", "closed"],
        ["greeting"],
    ]
    await _connect_and_echo(outbound, 2)
    assert proxy.connections == [
        ["greeting", "request target.example:1", "closed"],
        ["greeting", "request target.example:2", "closed"],
        ["greeting"],  # ready for a third
    ]


async def test_without_preconnect_each_connect_makes_its_own_connection(proxy: Proxy) -> None:
    outbound = Socks5Outbound("127.0.0.1", proxy.port)
    assert not outbound.preconnect
    await _connect_and_echo(outbound, 1)
    await _connect_and_echo(outbound, 2)
    assert proxy.connections == [
        ["greeting", "request target.example:1", "closed"],
        ["greeting", "request target.example:2", "closed"],
    ]


async def test_a_ready_connection_the_proxy_closed_is_not_used(
    proxy: Proxy, outbound: Socks5Outbound
) -> None:
    proxy.close_after_greeting = {1}
    await _connect_and_echo(outbound, 1)
    assert proxy.connections[1] == ["greeting", "closed"]
    await _connect_and_echo(outbound, 2)
    assert proxy.connections[2] == ["greeting", "request target.example:2", "closed"]


async def test_a_ready_connection_closed_under_the_request_is_retried_on_a_new_one(
    proxy: Proxy, outbound: Socks5Outbound
) -> None:
    proxy.close_on_request = {1}
    await _connect_and_echo(outbound, 1)
    await _connect_and_echo(outbound, 2)
    assert proxy.connections[1] == ["greeting", "request target.example:2", "closed"]
    served = [log for log in proxy.connections if "request target.example:2" in log]
    assert served[-1] == ["greeting", "request target.example:2", "closed"]
    assert len(served) == 2  # the retry went out on a connection of its own


async def test_a_new_connection_that_closes_under_the_request_is_an_error(
    proxy: Proxy, outbound: Socks5Outbound
) -> None:
    proxy.close_on_request = {0, 1, 2}
    with pytest.raises(OutboundError, match="closed the connection during the handshake") as info:
        await outbound.connect_tcp(Destination("target.example", 1))
    assert info.value.reply is FailureReply.RESET


async def test_a_ready_connection_too_old_is_closed_unused(
    proxy: Proxy, outbound: Socks5Outbound, mock_clock: trio.testing.MockClock
) -> None:
    await _connect_and_echo(outbound, 1)
    mock_clock.jump(SPARE_MAX_AGE + 1)
    await _connect_and_echo(outbound, 2)
    assert proxy.connections[1] == ["greeting", "closed"]
    assert proxy.connections[2] == ["greeting", "request target.example:2", "closed"]


def test_url_flag() -> None:
    assert parse_socks5_url("socks5://127.0.0.1:1080?preconnect=1").preconnect
    assert not parse_socks5_url("socks5://127.0.0.1:1080?preconnect=0").preconnect
    both = parse_socks5_url("socks5://127.0.0.1:1080?pipeline=1&preconnect=1")
    assert both.pipeline and both.preconnect
    # A proxy given by name is resolved per connection: not made ready ahead.
    assert not parse_socks5_url("socks5://proxy.example:1080?preconnect=1").preconnect
    with pytest.raises(ValueError, match=r"preconnect=0\|1"):
        parse_socks5_url("socks5://127.0.0.1:1080?preconnect=yes")
