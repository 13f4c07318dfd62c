"""An outbound's whole set-up (connect, handshake, the proxy's reply) within
its one time-out, `SocketOptions.connect_timeout`, for every proxy kind.

The proxy here is a listening socket that never accepts: the kernel
completes the TCP handshake, and nothing is ever read or answered, as a
proxy whose own connect to the destination hangs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, Outbound, OutboundError
from outbounds.http import HttpOutbound
from outbounds.net import SocketOptions
from outbounds.shadowsocks import ShadowsocksOutbound
from outbounds.socks4 import Socks4Outbound
from outbounds.socks5 import Socks5Outbound

TARGET = Destination("target.example", 80)
CONNECT_TIMEOUT = 3.0

Make = Callable[[int, SocketOptions], Outbound]

HANDSHAKING: dict[str, Make] = {
    "socks5": lambda port, opts: Socks5Outbound("127.0.0.1", port, socket_options=opts),
    "socks5 pipelined": lambda port, opts: Socks5Outbound(
        "127.0.0.1", port, "me", "pw", socket_options=opts, pipeline=True
    ),
    "socks5 preconnect": lambda port, opts: Socks5Outbound(
        "127.0.0.1", port, socket_options=opts, preconnect=True
    ),
    "socks4a": lambda port, opts: Socks4Outbound("127.0.0.1", port, b"id", socket_options=opts),
    "http": lambda port, opts: HttpOutbound("127.0.0.1", port, socket_options=opts),
}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections the kernel completes and nobody serves."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("kind", sorted(HANDSHAKING))
async def test_a_silent_proxy_fails_the_flow_at_the_connect_timeout(
    silent_port: int, kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    outbound = HANDSHAKING[kind](silent_port, SocketOptions(connect_timeout=CONNECT_TIMEOUT))
    start = trio.current_time()
    with pytest.raises(OutboundError, match="did not answer") as info:
        await outbound.connect_tcp(TARGET)
    # What docs/usage.md promises the application: an ICMP host unreachable
    # (EHOSTUNREACH), at connect_timeout and not later.
    assert info.value.reply is FailureReply.HOST_UNREACHABLE
    assert info.value.proxy_failed
    assert trio.current_time() - start == pytest.approx(CONNECT_TIMEOUT, abs=0.01)


async def test_socks5_udp_associate_is_bounded_alike(
    silent_port: int, autojump_clock: trio.testing.MockClock
) -> None:
    outbound = Socks5Outbound(
        "127.0.0.1", silent_port, socket_options=SocketOptions(connect_timeout=CONNECT_TIMEOUT)
    )
    start = trio.current_time()
    with pytest.raises(OutboundError, match="did not answer") as info:
        await outbound.open_udp()
    assert info.value.reply is FailureReply.HOST_UNREACHABLE
    assert trio.current_time() - start == pytest.approx(CONNECT_TIMEOUT, abs=0.01)


async def test_shadowsocks_has_no_handshake_to_wait_for(
    silent_port: int, autojump_clock: trio.testing.MockClock
) -> None:
    # Its request rides with the first data, and the server answers only
    # with the destination's bytes: the set-up is the connect alone.
    outbound = ShadowsocksOutbound(
        "127.0.0.1",
        silent_port,
        "aes-128-gcm",
        "secret",
        socket_options=SocketOptions(connect_timeout=CONNECT_TIMEOUT),
    )
    start = trio.current_time()
    stream = await outbound.connect_tcp(TARGET)
    await stream.aclose()
    assert trio.current_time() - start < CONNECT_TIMEOUT
