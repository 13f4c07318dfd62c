"""The SOCKS5 outbound against real servers: microsocks and Dante on 127.0.0.1."""

from __future__ import annotations

import functools
import ipaddress
import os
import socket

import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.net import SocketOptions
from outbounds.socks5 import Socks5Outbound
from tests.support import ServerProcess, free_port, require_binary, run_server, transfer_through
from tests.support.outbounds import PROXY_PASSWORD, PROXY_USER

MEGABYTES = 4


def _payload(size: int) -> bytes:
    # Not a repeating short pattern, so a lost or reordered chunk is noticed.
    return os.urandom(size)


def _outbound(server: ServerProcess, **kwargs: str) -> Socks5Outbound:
    return Socks5Outbound(server.host, server.port, **kwargs)


@pytest.fixture(params=["microsocks", "danted"])
def proxy(request: pytest.FixtureRequest) -> Socks5Outbound:
    server: ServerProcess = request.getfixturevalue(request.param)
    return _outbound(server)


async def test_bulk_both_ways(proxy: Socks5Outbound, tcp_echo: Destination) -> None:
    payload = _payload(MEGABYTES << 20)
    stream = await proxy.connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, payload, half_close=False) == payload


async def test_bulk_with_half_close(danted: ServerProcess, tcp_echo: Destination) -> None:
    """Our EOF reaches the server, and data still flows back after it."""
    payload = _payload(MEGABYTES << 20)
    stream = await _outbound(danted).connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, payload) == payload


async def test_domain_and_ipv6_targets(
    proxy: Socks5Outbound, tcp_echo: Destination, tcp_echo_v6: Destination
) -> None:
    for dest in (Destination("localhost", tcp_echo.port), tcp_echo_v6):
        message = b"hello " + str(dest).encode()
        stream = await proxy.connect_tcp(dest)
        async with stream:
            assert await transfer_through(stream, message, half_close=False) == message


async def test_refused_target_is_reset(proxy: Socks5Outbound) -> None:
    closed = Destination(ipaddress.IPv4Address("127.0.0.1"), free_port())
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(closed)
    assert info.value.reply is FailureReply.RESET
    assert str(closed) in str(info.value)


async def test_pipelined_handshake_through_dante(
    danted: ServerProcess, tcp_echo: Destination
) -> None:
    """Dante reads ahead: greeting and CONNECT in one write work, refusals too."""
    proxy = Socks5Outbound(danted.host, danted.port, pipeline=True)
    stream = await proxy.connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, b"pipelined", half_close=False) == b"pipelined"
    closed = Destination(ipaddress.IPv4Address("127.0.0.1"), free_port())
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(closed)
    assert info.value.reply is FailureReply.RESET


async def test_pipelined_handshake_fails_on_a_one_message_reader(
    microsocks: ServerProcess, tcp_echo: Destination
) -> None:
    """microsocks reads one message per recv and loses the request sent with
    the greeting: it never answers, so pipelining must stay opt-in."""
    proxy = Socks5Outbound(
        microsocks.host,
        microsocks.port,
        pipeline=True,
        socket_options=SocketOptions(connect_timeout=1),
    )
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(tcp_echo)
    assert "did not answer" in str(info.value)
    # The same proxy without pipelining answers.
    stream = await _outbound(microsocks).connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, b"one by one", half_close=False) == b"one by one"


async def test_username_password(microsocks_auth: ServerProcess, tcp_echo: Destination) -> None:
    good = _outbound(microsocks_auth, username=PROXY_USER, password=PROXY_PASSWORD)
    stream = await good.connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, b"auth", half_close=False) == b"auth"

    for outbound in (
        _outbound(microsocks_auth, username=PROXY_USER, password="wrong"),
        _outbound(microsocks_auth),
    ):
        with pytest.raises(OutboundError) as info:
            await outbound.connect_tcp(tcp_echo)
        assert info.value.reply is FailureReply.RESET
        assert "SOCKS5 proxy" in str(info.value)


async def test_url_with_credentials(microsocks_auth: ServerProcess, tcp_echo: Destination) -> None:
    url = f"socks5://{PROXY_USER}:s3cret%3Awith%40odd%2Fchars@127.0.0.1:{microsocks_auth.port}"
    stream = await Socks5Outbound.from_url(url).connect_tcp(tcp_echo)
    await stream.aclose()


async def test_half_closeable_stream_conformance(
    danted: ServerProcess, nursery: trio.Nursery
) -> None:
    """trio's own stream test suite, run on a stream that crosses Dante."""
    accepted: trio.MemorySendChannel[trio.SocketStream]
    accepted, accepted_rx = trio.open_memory_channel[trio.SocketStream](1)

    async def hand_over(stream: trio.SocketStream) -> None:
        await accepted.send(stream)
        await trio.sleep_forever()  # The test owns and closes the stream.

    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, hand_over, 0)
    target = Destination(ipaddress.IPv4Address("127.0.0.1"), listeners[0].socket.getsockname()[1])
    outbound = _outbound(danted)

    async def make_pair() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        client = await outbound.connect_tcp(target)
        return client, await accepted_rx.receive()

    await trio.testing.check_half_closeable_stream(make_pair, None)


async def test_udp_associate(danted: ServerProcess, udp_echo: Destination) -> None:
    session = await _outbound(danted).open_udp()
    try:
        for i in range(5):
            payload = b"datagram %d " % i + os.urandom(1000)
            await session.send_to(payload, udp_echo)
            with trio.fail_after(5):
                data, source = await session.receive_from()
            assert (data, source) == (payload, udp_echo)
    finally:
        await session.aclose()


async def test_udp_associate_ends_with_session(
    danted: ServerProcess, udp_echo: Destination
) -> None:
    """Closing the session closes the control connection; a new one works."""
    for _ in range(2):
        session = await _outbound(danted).open_udp()
        async with trio.open_nursery():
            await session.send_to(b"x", udp_echo)
            with trio.fail_after(5):
                assert (await session.receive_from())[0] == b"x"
        await session.aclose()


async def test_proxy_on_ipv6_loopback(tcp_echo: Destination) -> None:
    binary = require_binary("microsocks")
    port = free_port(socket.AF_INET6)
    with run_server([binary, "-i", "::1", "-p", str(port)], "::1", port):
        outbound = Socks5Outbound.from_url(f"socks5://[::1]:{port}")
        stream = await outbound.connect_tcp(tcp_echo)
        async with stream:
            assert await transfer_through(stream, b"via v6", half_close=False) == b"via v6"


@pytest.mark.parametrize("server", ["danted", "microsocks", "microsocks_auth"])
async def test_preconnect_through_real_proxies(
    request: pytest.FixtureRequest, server: str, tcp_echo: Destination
) -> None:
    """A connection greeted ahead and used for a later request works with
    Dante and with microsocks (which reads one message per recv: the greeting
    and the request come in separate writes, as without preconnect), and with
    a password (the credentials go when the connection is taken)."""
    proxy: ServerProcess = request.getfixturevalue(server)
    credentials = (
        {"username": PROXY_USER, "password": PROXY_PASSWORD} if server.endswith("auth") else {}
    )
    outbound = Socks5Outbound(proxy.host, proxy.port, preconnect=True, **credentials)
    try:
        for i in range(3):
            stream = await outbound.connect_tcp(tcp_echo)
            async with stream:
                data = f"preconnected {i}".encode()
                assert await transfer_through(stream, data, half_close=False) == data
    finally:
        outbound.close_spare()
