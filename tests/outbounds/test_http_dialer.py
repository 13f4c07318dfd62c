"""The HTTP CONNECT dialer against a scripted in-process proxy."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.http import HttpOutbound
from outbounds.net import SocketOptions

TARGET = Destination("target.example", 80)

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def _read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(1)
        if not data:
            raise AssertionError("request never completed")
        head += data
    return head


async def start_fake_proxy(
    nursery: trio.Nursery, script: Script, **options: object
) -> tuple[HttpOutbound, list[bytes]]:
    requests: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            head = await _read_head(stream)
            requests.append(head)
            await script(stream, head)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return HttpOutbound(
        "127.0.0.1", port, socket_options=SocketOptions(connect_timeout=5), **options
    ), requests  # type: ignore[arg-type]


async def test_dripped_answer_then_server_first_bytes_reach_the_application(
    nursery: trio.Nursery,
) -> None:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        answer = b"HTTP/1.1 200 Connection established\r\n\r\n"
        for i in range(len(answer) - 1):
            await stream.send_all(answer[i : i + 1])
        await stream.send_all(answer[-1:] + b"220 ready\r\n")
        assert await stream.receive_some() == b"ping"
        await stream.send_all(b"pong")

    proxy, requests = await start_fake_proxy(nursery, script, username="me", password="pw")
    stream = await proxy.connect_tcp(TARGET)
    async with stream:
        assert await stream.receive_some() == b"220 ready\r\n"
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"pong"
    assert requests == [
        b"CONNECT target.example:80 HTTP/1.1\r\nHost: target.example:80\r\n"
        b"Proxy-Authorization: Basic bWU6cHc=\r\n\r\n"
    ]


@pytest.mark.parametrize(
    ("status", "reply"),
    [
        (403, FailureReply.ADMIN_PROHIBITED),
        (502, FailureReply.RESET),
        (503, FailureReply.RESET),
        (504, FailureReply.HOST_UNREACHABLE),
        (418, FailureReply.RESET),
    ],
)
async def test_refusals_become_failures(
    nursery: trio.Nursery, status: int, reply: FailureReply
) -> None:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(f"HTTP/1.1 {status} Nope\r\nContent-Length: 4\r\n\r\nbody".encode())

    proxy, _ = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is reply
    assert str(info.value).endswith(f"could not reach target.example:80: {status} Nope")


@pytest.mark.parametrize("status", [401, 407])
@pytest.mark.parametrize("credentials", [False, True])
async def test_auth_refusal_says_whether_credentials_are_missing_or_wrong(
    nursery: trio.Nursery, credentials: bool, status: int
) -> None:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(f"HTTP/1.1 {status} Unauthorized\r\n\r\n".encode())

    options = {"username": "u", "password": "wrong"} if credentials else {}
    proxy, _ = await start_fake_proxy(nursery, script, **options)
    with pytest.raises(OutboundError) as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.RESET
    message = str(info.value)
    assert ("rejected the credentials" if credentials else "wants credentials") in message
    assert "wrong" not in message


async def test_proxy_closing_mid_answer(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 Conn")

    proxy, _ = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError, match="closed the connection") as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.RESET


async def test_silent_proxy_times_out_as_unreachable(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        await trio.sleep_forever()

    proxy, _ = await start_fake_proxy(nursery, script)
    proxy.socket_options = SocketOptions(connect_timeout=0.2)
    with pytest.raises(OutboundError, match="did not answer") as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.HOST_UNREACHABLE


async def test_unusable_name_fails_before_connecting(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        raise AssertionError("nothing may reach the proxy")

    proxy, requests = await start_fake_proxy(nursery, script)
    with pytest.raises(OutboundError, match="cannot be sent") as info:
        await proxy.connect_tcp(Destination("a\r\nb", 80))
    assert info.value.reply is FailureReply.HOST_UNREACHABLE
    assert requests == []


async def test_proxy_down_is_reported_as_unreachable() -> None:
    # A port nobody listens on: the kernel refuses at once.
    proxy = HttpOutbound("127.0.0.1", 1)
    with pytest.raises(OutboundError, match="unreachable") as info:
        await proxy.connect_tcp(TARGET)
    assert info.value.reply is FailureReply.RESET


@pytest.mark.parametrize("fast_open", [False, True])
async def test_tfo_to_a_server_without_it_still_tunnels(
    nursery: trio.Nursery, fast_open: bool
) -> None:
    # This namespace's TFO server side is off (the default): with the
    # option, connects fall back and the request still arrives.
    async def script(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nhi")

    proxy, requests = await start_fake_proxy(nursery, script, fast_open=fast_open)
    for _ in range(3):
        stream = await proxy.connect_tcp(TARGET)
        async with stream:
            assert await stream.receive_some() == b"hi"
    assert len(requests) == 3


async def test_udp_is_refused_as_port_unreachable() -> None:
    with pytest.raises(OutboundError, match="carries no UDP") as info:
        await HttpOutbound("127.0.0.1", 8888).open_udp()
    assert info.value.reply is FailureReply.PORT_UNREACHABLE
