"""SOCKS4/4a: the codec (whole, byte by byte, trailing data), its URL, the
dialer against a scripted proxy, and Dante on the loopback."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.handshake import NEED_DATA
from outbounds.net import SocketOptions
from outbounds.socks4 import (
    Socks4ClientConnection,
    Socks4Outbound,
    Socks4ProtocolError,
    Socks4Reply,
    Unsendable,
    build_request,
    parse_socks4_url,
)
from outbounds.url import parse_outbound_url
from tests.support import ServerProcess

V4 = Destination(ipaddress.IPv4Address("192.0.2.7"), 443)
NAME = Destination("example.com", 80)
GRANTED = bytes((0, 90)) + struct.pack("!H", 0) + bytes(4)


def test_requests_as_the_protocol_draws_them() -> None:
    assert build_request(V4, b"bob", names=False) == b"\x04\x01\x01\xbb\xc0\x00\x02\x07bob\x00"
    # SOCKS4a: 0.0.0.1 says a name follows the user id.
    assert build_request(NAME, b"", names=True) == (
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00example.com\x00"
    )
    # An address is sent as an address through SOCKS4a too.
    assert build_request(V4, b"", names=True) == build_request(V4, b"", names=False)


@pytest.mark.parametrize(
    ("dest", "names", "reply", "complaint"),
    [
        (Destination(ipaddress.IPv6Address("::1"), 80), True, FailureReply.NET_UNREACHABLE, "IPv6"),
        (NAME, False, FailureReply.HOST_UNREACHABLE, "socks4a://"),
        (Destination("a\x00b", 80), True, FailureReply.HOST_UNREACHABLE, "NUL"),
    ],
)
def test_what_socks4_cannot_carry_is_refused_with_its_reason(
    dest: Destination, names: bool, reply: FailureReply, complaint: str
) -> None:
    with pytest.raises(Unsendable, match=complaint) as info:
        Socks4ClientConnection(dest, names=names)
    assert info.value.reply is reply


@pytest.mark.parametrize("byte_by_byte", [False, True])
@pytest.mark.parametrize("trailing", [b"", b"220 smtp ready\r\n"])
@pytest.mark.parametrize("version", [0, 4])
def test_reply_whole_or_dripped_keeps_what_follows(
    byte_by_byte: bool, trailing: bytes, version: int
) -> None:
    conn = Socks4ClientConnection(V4, names=False)
    assert conn.data_to_send()[:2] == b"\x04\x01"
    data = bytes((version,)) + GRANTED[1:] + trailing
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    event: object = NEED_DATA
    for chunk in chunks:
        conn.receive_data(chunk)
        event = conn.next_event_untrusted()
        if event is not NEED_DATA:
            break
    assert event == Socks4Reply(90, Destination(ipaddress.IPv4Address(0), 0))
    assert conn.trailing_data == (b"" if byte_by_byte else trailing)


@pytest.mark.parametrize(
    ("code", "text"),
    [(91, "rejected or failed"), (92, "identd"), (93, "user id mismatch"), (17, "unknown")],
)
def test_refusals_are_resets_named_by_code(code: int, text: str) -> None:
    reply = Socks4Reply(code, V4)
    assert not reply.succeeded
    assert reply.failure() is FailureReply.RESET
    assert text in reply.describe()


def test_a_socks5_answer_is_a_protocol_error() -> None:
    conn = Socks4ClientConnection(V4, names=False)
    conn.receive_data(b"\x05\x00")
    with pytest.raises(Socks4ProtocolError, match="version 5"):
        conn.next_event_untrusted()


@given(st.binary(max_size=20))
def test_client_raises_only_its_error(data: bytes) -> None:
    conn = Socks4ClientConnection(NAME, names=True)
    conn.receive_data(data)
    with contextlib.suppress(Socks4ProtocolError):
        conn.next_event_untrusted()


def test_urls() -> None:
    plain = parse_socks4_url("socks4://alice@10.0.0.1:1080?tfo=1")
    assert (plain.name, plain.fast_open) == ("socks4 10.0.0.1:1080", True)
    assert parse_outbound_url("socks4a://proxy.test:1080").name == "socks4a proxy.test:1080"
    with pytest.raises(ValueError, match="no password") as info:
        parse_socks4_url("socks4://alice:secret@10.0.0.1:1080")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match=r"known: tfo=0\|1"):
        parse_socks4_url("socks4://10.0.0.1:1080?pipeline=1")


# --- the dialer ---------------------------------------------------------------------

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def start_fake_proxy(nursery: trio.Nursery, script: Script, *, names: bool) -> Socks4Outbound:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            # The request ends at its last NUL: one for SOCKS4, two for a 4a name.
            while request.count(b"\x00", 8) < (2 if request[4:7] == bytes(3) else 1):
                request += await stream.receive_some(1)
            await script(stream, request)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return Socks4Outbound(
        "127.0.0.1", port, b"id", names=names, socket_options=SocketOptions(connect_timeout=5)
    )


async def test_dialer_carries_server_first_bytes(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def script(stream: trio.SocketStream, request: bytes) -> None:
        seen.append(request)
        await stream.send_all(GRANTED + b"banner")
        assert await stream.receive_some() == b"ping"
        await stream.send_all(b"pong")

    proxy = await start_fake_proxy(nursery, script, names=True)
    stream = await proxy.connect_tcp(NAME)
    async with stream:
        assert await stream.receive_some() == b"banner"
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"pong"
    assert seen == [b"\x04\x01\x00\x50\x00\x00\x00\x01id\x00example.com\x00"]


async def test_dialer_maps_a_rejection(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(b"\x00\x5b" + bytes(6))

    proxy = await start_fake_proxy(nursery, script, names=False)
    with pytest.raises(OutboundError, match=r"could not reach 192\.0\.2\.7:443: rejected") as info:
        await proxy.connect_tcp(V4)
    assert info.value.reply is FailureReply.RESET


async def test_dialer_refuses_a_name_through_socks4_without_connecting() -> None:
    proxy = Socks4Outbound("127.0.0.1", 1, names=False)  # nothing listens: never dialled
    with pytest.raises(OutboundError, match="socks4a://") as info:
        await proxy.connect_tcp(NAME)
    assert info.value.reply is FailureReply.HOST_UNREACHABLE


async def test_udp_is_refused_as_port_unreachable() -> None:
    with pytest.raises(OutboundError, match="carries no UDP") as info:
        await Socks4Outbound("127.0.0.1", 1080).open_udp()
    assert info.value.reply is FailureReply.PORT_UNREACHABLE


# --- Dante ----------------------------------------------------------------------


# Dante 1.4 speaks SOCKS4 but not 4a: it connects to the 0.0.0.1 marker
# and answers 91; names are tested against the scripted proxy above.
@pytest.mark.parametrize("scheme", ["socks4", "socks4a"])
async def test_echo_through_dante(
    danted: ServerProcess, tcp_echo: Destination, scheme: str
) -> None:
    proxy = parse_outbound_url(f"{scheme}://tun2sx@127.0.0.1:{danted.port}")
    stream = await proxy.connect_tcp(tcp_echo)
    async with stream:
        await stream.send_all(b"x" * 100_000)
        await stream.send_eof()
        got = b""
        while data := await stream.receive_some():
            got += data
    assert got == b"x" * 100_000


async def test_dante_refusal_through_socks4(danted: ServerProcess) -> None:
    proxy = parse_outbound_url(f"socks4://127.0.0.1:{danted.port}")
    with pytest.raises(OutboundError, match="rejected or failed") as info:
        await proxy.connect_tcp(Destination(ipaddress.IPv4Address("127.0.0.1"), 1))
    assert info.value.reply is FailureReply.RESET
