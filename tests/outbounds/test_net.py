"""The socket boundary: loop-avoidance options, error translation, PrefixedStream."""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket

import pytest
import trio
import trio.testing

from outbounds.base import Destination, FailureReply, OutboundError, reply_for_oserror
from outbounds.net import PrefixedStream, SocketOptions, open_tcp, open_udp_socket
from tests.support import free_port, transfer_through

LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (OSError(errno.ECONNREFUSED, "refused"), FailureReply.RESET),
        (OSError(errno.EHOSTUNREACH, "x"), FailureReply.HOST_UNREACHABLE),
        (OSError(errno.ENETUNREACH, "x"), FailureReply.NET_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "x"), FailureReply.HOST_UNREACHABLE),
        (TimeoutError(), FailureReply.HOST_UNREACHABLE),
        (OSError(errno.EACCES, "x"), FailureReply.ADMIN_PROHIBITED),
        (OSError(errno.EIO, "x"), FailureReply.RESET),
        (OSError("no errno"), FailureReply.RESET),
    ],
)
def test_oserror_table(error: OSError, reply: FailureReply) -> None:
    assert reply_for_oserror(error) is reply


def test_destination_validation() -> None:
    assert Destination.parse_host("[::1]", 53).host == ipaddress.IPv6Address("::1")
    assert Destination.parse_host("10.0.0.1", 1).host == ipaddress.IPv4Address("10.0.0.1")
    assert Destination.parse_host("example.com", 1).host == "example.com"
    assert str(Destination(ipaddress.IPv6Address("::1"), 53)) == "[::1]:53"
    with pytest.raises(ValueError):
        Destination("", 1)
    with pytest.raises(ValueError):
        Destination("a" * 256, 1)
    with pytest.raises(ValueError):
        Destination("a", 65536)
    with pytest.raises(ValueError):
        SocketOptions(connect_timeout=0)


async def test_refused_is_reset() -> None:
    with pytest.raises(OutboundError) as info:
        await open_tcp(LOCALHOST, free_port(), SocketOptions())
    assert info.value.reply is FailureReply.RESET
    assert "127.0.0.1" in str(info.value) and "refused" in str(info.value)


async def test_localhost_name_tries_every_address(nursery: trio.Nursery) -> None:
    """ "localhost" may list ::1 first; the IPv4-only listener must still be found."""
    listeners = await nursery.start(trio.serve_tcp, _close_at_once, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await open_tcp("localhost", port, SocketOptions())
    await stream.aclose()


async def _close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def test_protect_and_mark_applied_before_connect(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), _close_at_once, 0
    )
    port = listeners[0].socket.getsockname()[1]
    seen: list[tuple[int, bool]] = []

    def protect(fd: int) -> bool:
        probe = socket.socket(fileno=os.dup(fd))
        try:
            connected = True
            try:
                probe.getpeername()
            except OSError:
                connected = False
            seen.append((probe.getsockopt(socket.SOL_SOCKET, socket.SO_MARK), connected))
        finally:
            probe.close()
        return True

    opts = SocketOptions(fwmark=0x2A if os.geteuid() == 0 else None, protect=protect)
    stream = await open_tcp(LOCALHOST, port, opts)
    await stream.aclose()
    assert seen == [(0x2A if os.geteuid() == 0 else 0, False)]

    udp = open_udp_socket(socket.AF_INET, opts)
    udp.close()
    assert len(seen) == 2


async def test_protect_refusal() -> None:
    opts = SocketOptions(protect=lambda fd: False)
    with pytest.raises(OutboundError, match="protect") as info:
        await open_tcp(LOCALHOST, 9, opts)
    assert info.value.reply is FailureReply.NET_UNREACHABLE


async def test_bad_interface_is_refused() -> None:
    opts = SocketOptions(interface="no-such-if0")
    with pytest.raises(OutboundError, match="socket options"):
        await open_tcp(LOCALHOST, 9, opts)


async def test_connect_timeout(autojump_clock: trio.abc.Clock) -> None:
    """A listener whose accept queue is full stops answering SYNs: a timeout."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        # Fill the backlog with connections nobody accepts.
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                fillers.append(s)
            with pytest.raises(OutboundError, match="timed out") as info:
                await open_tcp(LOCALHOST, port, SocketOptions(connect_timeout=3))
            assert info.value.reply is FailureReply.HOST_UNREACHABLE
        finally:
            for s in fillers:
                s.close()


async def test_prefixed_stream_replays_then_reads() -> None:
    a, b = trio.socket.socketpair()
    inner, peer = trio.SocketStream(a), trio.SocketStream(b)
    stream = PrefixedStream(inner, b"hello")
    assert await stream.receive_some(2) == b"he"
    assert await stream.receive_some() == b"llo"
    await peer.send_all(b"world")
    assert await stream.receive_some() == b"world"
    with pytest.raises(ValueError):
        await PrefixedStream(inner, b"x").receive_some(0)
    await peer.aclose()
    assert await transfer_through(stream, b"") == b""
    await stream.aclose()


async def _socketpair_streams() -> tuple[PrefixedStream, PrefixedStream]:
    a, b = trio.socket.socketpair()
    return PrefixedStream(trio.SocketStream(a), b""), PrefixedStream(trio.SocketStream(b), b"")


async def test_prefixed_stream_conformance() -> None:
    await trio.testing.check_half_closeable_stream(_socketpair_streams, None)
