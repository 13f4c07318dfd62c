"""The direct outbound on loopback: TCP with half-close, UDP to both families."""

from __future__ import annotations

import ipaddress
import os

import pytest
import trio

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.direct import DirectOutbound
from outbounds.net import SocketOptions
from tests.support import free_port, transfer_through


async def test_tcp_bulk_with_half_close(tcp_echo: Destination) -> None:
    payload = os.urandom(3 << 20)
    stream = await DirectOutbound().connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, payload) == payload


async def test_tcp_by_name_and_ipv6(tcp_echo: Destination, tcp_echo_v6: Destination) -> None:
    outbound = DirectOutbound(socket_options=SocketOptions(connect_timeout=5))
    for dest in (Destination("localhost", tcp_echo.port), tcp_echo_v6):
        stream = await outbound.connect_tcp(dest)
        async with stream:
            assert await transfer_through(stream, b"hi") == b"hi"


async def test_tcp_refused() -> None:
    dest = Destination(ipaddress.IPv4Address("127.0.0.1"), free_port())
    with pytest.raises(OutboundError) as info:
        await DirectOutbound().connect_tcp(dest)
    assert info.value.reply is FailureReply.RESET
    assert str(dest) in str(info.value)


async def test_udp_both_families(udp_echo: Destination, udp_echo_v6: Destination) -> None:
    session = await DirectOutbound().open_udp()
    try:
        for dest in (udp_echo, udp_echo_v6, Destination("127.0.0.1", udp_echo.port)):
            await session.send_to(b"ping " + str(dest).encode(), dest)
            with trio.fail_after(5):
                data, source = await session.receive_from()
            assert data == b"ping " + str(dest).encode()
            # Sources come back as plain addresses, IPv4 not IPv4-mapped.
            expected = udp_echo if dest.port == udp_echo.port else udp_echo_v6
            assert source == expected
        stats = session.statistics()
        assert (stats.sent, stats.received, stats.unresolved) == (3, 3, 0)
    finally:
        await session.aclose()
        await session.aclose()


async def test_udp_fast_path_resolves_a_name_once(udp_echo: Destination) -> None:
    session = await DirectOutbound().open_udp()
    try:
        named = Destination("localhost", udp_echo.port)
        with pytest.raises(trio.WouldBlock):
            session.send_to_nowait(b"by name", named)
        await session.send_to(b"by name", named)  # resolves, and remembers
        assert session.send_to_nowait(b"again", named)
        assert session.send_to_nowait(b"by address", udp_echo)
        got: list[tuple[bytes, Destination]] = []
        with trio.fail_after(5):
            while len(got) < 3:
                got += await session.receive_batch(16)
        assert sorted(data for data, _ in got) == [b"again", b"by address", b"by name"]
        # Replies from one peer share one source object (the runtime's mapping relies on it).
        assert len({id(source) for _, source in got}) == 1
        assert session.statistics().sent == 3
        assert session.drops() == (0, 0, 0)
    finally:
        await session.aclose()
