"""The SOCKS5 dialer against a scripted in-process proxy (cases real servers never produce)."""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.net import SocketOptions, open_udp_socket
from outbounds.socks5 import (
    Command,
    Socks5Outbound,
    Socks5ProtocolError,
    Socks5UdpSession,
    build_reply,
    decode_udp_datagram_untrusted,
    encode_udp_datagram,
    parse_request_untrusted,
)
from tests.support import free_port

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
BOUND = Destination(LOOPBACK, 1)
TARGET = Destination("target.example", 80)

Script = Callable[[trio.SocketStream, Command, Destination], Awaitable[None]]


async def _read_request(stream: trio.SocketStream) -> tuple[Command, Destination]:
    buf = bytearray()
    while len(buf) < 3:  # greeting: VER NMETHODS METHOD
        buf += await stream.receive_some(1)
    buf += await stream.receive_some(buf[1] + 2 - len(buf)) if len(buf) < buf[1] + 2 else b""
    del buf[: buf[1] + 2]
    await stream.send_all(b"\x05\x00")
    for _ in range(300):
        parsed = parse_request_untrusted(buf)
        if parsed is not None:
            return parsed[0], parsed[1]
        buf += await stream.receive_some(1)
    raise AssertionError("request never completed")


async def start_fake_proxy(
    nursery: trio.Nursery, script: Script, host: str = "127.0.0.1"
) -> Socks5Outbound:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            command, dest = await _read_request(stream)
            await script(stream, command, dest)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host=host), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return Socks5Outbound(host, port, socket_options=SocketOptions(connect_timeout=5))


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (0x02, FailureReply.ADMIN_PROHIBITED),
        (0x03, FailureReply.NET_UNREACHABLE),
        (0x04, FailureReply.HOST_UNREACHABLE),
        (0x05, FailureReply.RESET),
        (0x06, FailureReply.HOST_UNREACHABLE),
        (0x01, FailureReply.RESET),
    ],
)
async def test_reply_codes_become_failures(
    nursery: trio.Nursery, code: int, reply: FailureReply
) -> None:
    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        await stream.send_all(build_reply(code, BOUND))

    proxy = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is reply
    assert "target.example:80" in str(info.value)


async def test_dripped_reply_and_early_data_are_kept(nursery: trio.Nursery) -> None:
    """Reply one byte at a time, then server-first data in the same segment."""

    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        assert (command, dest) == (Command.CONNECT, TARGET)
        reply = build_reply(0, BOUND)
        for i in range(len(reply) - 1):
            await stream.send_all(reply[i : i + 1])
        await stream.send_all(reply[-1:] + b"BANNER\r\n")
        assert await stream.receive_some() == b"ping"
        await stream.send_all(b"pong")

    proxy = await start_fake_proxy(nursery, script)
    stream = await proxy.connect_tcp(TARGET)
    async with stream:
        assert await stream.receive_some() == b"BANNER\r\n"
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"pong"


async def test_proxy_closes_mid_handshake(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        await stream.send_all(b"\x05\x00")  # half a reply

    proxy = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError, match="closed the connection") as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.RESET


async def test_proxy_reset_mid_handshake_names_the_os_error(nursery: trio.Nursery) -> None:
    """The stream's BrokenResourceError keeps the OSError, whose text reaches the message."""

    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    proxy = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError, match="dropped the connection: Connection reset") as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.RESET


async def test_garbage_reply(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    proxy = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError, match="broke the protocol"):
        await proxy.connect_tcp(TARGET)


async def test_silent_proxy_times_out(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        await trio.sleep_forever()

    proxy = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError, match="did not answer") as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.HOST_UNREACHABLE


async def test_an_earlier_enclosing_deadline_ends_a_silent_handshake(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The caller's scope, not the handshake timeout, ends it; the socket closes."""

    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        assert await stream.receive_some() == b""  # the dialer gave up and closed

    proxy = await start_fake_proxy(nursery, script)
    with trio.move_on_after(1) as scope:
        await proxy.connect_tcp(TARGET)
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(1)


async def test_proxy_down_names_the_proxy() -> None:
    port = free_port()
    proxy = Socks5Outbound("127.0.0.1", port, socket_options=SocketOptions(connect_timeout=5))
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(TARGET)
    assert str(info.value).startswith(f"SOCKS5 proxy 127.0.0.1:{port} unreachable")
    assert "refused" in str(info.value)


async def test_udp_relay_unspecified_address_and_drops(nursery: trio.Nursery) -> None:
    """BND 0.0.0.0 means "the proxy's address"; FRAG != 0 and junk are dropped."""
    relay = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await relay.bind(("127.0.0.1", 0))
    relay_port = relay.getsockname()[1]
    source = Destination("dns.example", 53)
    close_control = trio.Event()

    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        assert command is Command.UDP_ASSOCIATE
        await stream.send_all(build_reply(0, Destination(ipaddress.IPv4Address(0), relay_port)))
        data, client = await relay.recvfrom(65535)
        assert data == encode_udp_datagram(b"query", TARGET)
        fragment = bytearray(encode_udp_datagram(b"frag", source))
        fragment[2] = 1
        await relay.sendto(bytes(fragment), client)
        await relay.sendto(b"\x00\x00", client)
        await relay.sendto(encode_udp_datagram(b"answer", source), client)
        await close_control.wait()

    proxy = await start_fake_proxy(nursery, script)
    session = await proxy.open_udp()
    try:
        await session.send_to(b"query", TARGET)
        assert await session.receive_from() == (b"answer", source)
        stats = session.statistics()
        assert (stats.sent, stats.received) == (1, 1)
        assert (stats.dropped_fragments, stats.dropped_malformed) == (1, 1)
        close_control.set()
        with pytest.raises(OutboundError, match="control connection"):
            await session.receive_from()
    finally:
        await session.aclose()
        await session.aclose()
        relay.close()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (0x07, "does not offer UDP ASSOCIATE (no UDP through it): command not supported"),
        (0x02, "refused UDP ASSOCIATE: not allowed"),
    ],
)
async def test_a_refused_udp_associate_says_so(
    nursery: trio.Nursery, code: int, message: str
) -> None:
    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        await stream.send_all(build_reply(code, BOUND))

    proxy = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError) as info:
        await proxy.open_udp()
    assert str(info.value).startswith("SOCKS5 proxy 127.0.0.1:")
    assert str(info.value).endswith(f" {message}")
    assert "0.0.0.0" not in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_udp_associate_announces_an_address_of_the_proxy_connection_family(
    nursery: trio.Nursery, host: str
) -> None:
    """RFC 1928 says to send zeros when the client does not know its address;
    over IPv6 they must be IPv6 zeros: Dante refuses 0.0.0.0 from an IPv6
    client ("address type not supported") or hands back an IPv4 relay."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    relay = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    await relay.bind((host, 0))
    relay_port = relay.getsockname()[1]
    announced: list[Destination] = []
    unspecified = ipaddress.ip_address("::" if ":" in host else "0.0.0.0")

    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        announced.append(dest)
        await stream.send_all(build_reply(0, Destination(unspecified, relay_port)))
        data, client = await relay.recvfrom(65535)
        await relay.sendto(data, client)
        await trio.sleep_forever()

    proxy = await start_fake_proxy(nursery, script, host)
    session = await proxy.open_udp()
    try:
        await session.send_to(b"ping", TARGET)
        assert await session.receive_from() == (b"ping", TARGET)
    finally:
        await session.aclose()
        relay.close()
    assert announced == [Destination(unspecified, 0)]


async def test_udp_fast_path_batches_caches_and_counts(nursery: trio.Nursery) -> None:
    """send_to_nowait and receive_batch: one header per destination, one
    decoded source per peer, and every unusable datagram counted."""
    relay = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await relay.bind(("127.0.0.1", 0))
    relay_port = relay.getsockname()[1]
    source = Destination(ipaddress.IPv4Address("192.0.2.5"), 443)
    close_control = trio.Event()
    client: list[object] = []

    async def script(stream: trio.SocketStream, command: Command, dest: Destination) -> None:
        await stream.send_all(build_reply(0, Destination(LOOPBACK, relay_port)))
        for i in range(3):
            data, peer = await relay.recvfrom(65535)
            assert data == encode_udp_datagram(b"q%d" % i, TARGET)
        client.append(peer)
        reply = encode_udp_datagram(b"", source)
        fragment = bytearray(reply + b"frag")
        fragment[2] = 1  # same source, so the cached header must not let it through
        for datagram in (
            reply + b"a",
            bytes(fragment),
            reply[:6],  # truncated inside the address
            reply + b"b",
            b"\x00\x00\x00\x09junk",  # unknown address type
            reply + b"c",
        ):
            await relay.sendto(datagram, peer)
        await close_control.wait()

    proxy = await start_fake_proxy(nursery, script)
    session = await proxy.open_udp()
    try:
        for i in range(3):
            assert session.send_to_nowait(b"q%d" % i, TARGET) is True
        got: list[tuple[bytes, Destination]] = []
        while len(got) < 3:
            got += await session.receive_batch(100)
        assert got == [(b"a", source), (b"b", source), (b"c", source)]
        # One Destination object per peer: the runtime's reply mapping relies on it.
        assert got[0][1] is got[1][1] is got[2][1]
        assert session.drops().malformed == 3
        stats = session.statistics()
        assert (stats.sent, stats.received, stats.dropped_fragments) == (3, 3, 1)
        close_control.set()
        with trio.fail_after(5), pytest.raises(OutboundError, match="control connection"):
            await session.wait_ended()
    finally:
        await session.aclose()
        relay.close()


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    datagrams=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda frag, addr, port, data: b"\x00\x00" + bytes([frag]) + addr + port + data,
                st.sampled_from([0, 0, 0, 1]),
                st.sampled_from(
                    [b"\x01\xc0\x00\x02\x05", b"\x01\x0a\x00\x00\x01", b"\x04" + bytes(16)]
                ),
                st.sampled_from([b"\x01\xbb", b"\x00\x35"]),
                st.binary(max_size=20),
            ),
        ),
        max_size=20,
    )
)
def test_udp_batches_decode_like_the_codec(datagrams: list[bytes]) -> None:
    """Whatever the relay sends, the batch path (with its source cache)
    hands up exactly what the codec decodes, and counts the rest."""
    expected = []
    bad = 0
    for datagram in datagrams:
        try:
            frag, source, payload = decode_udp_datagram_untrusted(datagram)
        except Socks5ProtocolError:
            bad += 1
            continue
        if frag:
            bad += 1
            continue
        expected.append((payload, source))

    async def run() -> list[tuple[bytes, Destination]]:
        sock = open_udp_socket(socket.AF_INET, SocketOptions(udp_buffer=None))
        sock.bind(("127.0.0.1", 0))
        relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        relay.bind(("127.0.0.1", 0))
        sock.connect(relay.getsockname())
        relay.connect(sock.socket.getsockname())
        control, _peer = trio.testing.lockstep_stream_pair()
        session = Socks5UdpSession(control, sock)  # type: ignore[arg-type]
        got: list[tuple[bytes, Destination]] = []
        with relay:
            for datagram in datagrams:
                relay.send(datagram)
            relay.send(encode_udp_datagram(b"end", TARGET))
            while not got or got[-1] != (b"end", TARGET):
                got += await session.receive_batch(7)
        assert session.drops().malformed == bad
        sock.close()
        return got[:-1]

    assert trio.run(run) == expected
