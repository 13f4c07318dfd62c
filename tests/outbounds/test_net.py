"""The socket boundary: loop-avoidance options, error translation, the streams."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import os
import select
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from outbounds.base import Destination, FailureReply, OutboundError, reply_for_oserror
from outbounds.net import (
    PrefixedStream,
    SocketOptions,
    TcpSocketStream,
    _connect,
    open_tcp,
    open_udp_socket,
)
from tests.support import free_port, require_tcp_inq, transfer_through

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


async def test_a_connection_made_before_connect_returns_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over loopback the handshake ends inside connect: no wait, no SO_ERROR."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def no_wait(sock: object) -> None:
        raise AssertionError("waited for a connection that was already made")

    monkeypatch.setattr("outbounds.net._wait_writable", no_wait)
    with listener:
        stream = await open_tcp(LOCALHOST, port, SocketOptions())
        accepted, _ = listener.accept()
        with accepted:
            assert stream.send_nowait(b"x") == 1
            assert accepted.recv(1) == b"x"
        stream.close_now()
    # Still a cancel point: a cancelled caller does not connect.
    with trio.CancelScope() as scope:
        scope.cancel()
        await open_tcp(LOCALHOST, port, SocketOptions())
    assert scope.cancelled_caught


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


@contextlib.contextmanager
def _unanswered_port() -> Iterator[int]:
    """A loopback port whose listener's accept queue is full: SYNs go unanswered."""
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
            yield port
        finally:
            for s in fillers:
                s.close()


async def test_connect_timeout(autojump_clock: trio.abc.Clock) -> None:
    """A listener whose accept queue is full stops answering SYNs: a timeout."""
    with _unanswered_port() as port:
        with pytest.raises(OutboundError, match="timed out") as info:
            await open_tcp(LOCALHOST, port, SocketOptions(connect_timeout=3))
        assert info.value.reply is FailureReply.HOST_UNREACHABLE


def _socketpair() -> tuple[TcpSocketStream, TcpSocketStream]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return TcpSocketStream(a), TcpSocketStream(b)


async def test_prefixed_stream_replays_then_reads() -> None:
    inner, peer = _socketpair()
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
    a, b = _socketpair()
    return PrefixedStream(a, b""), PrefixedStream(b, b"")


async def test_prefixed_stream_replays_first_without_waiting_too() -> None:
    """The calls that do not wait see the bytes read ahead first, as receive_some does."""
    inner, peer = _socketpair()
    stream = PrefixedStream(inner, b"early")
    with trio.testing.assert_no_checkpoints():
        assert stream.receive_nowait(3) == b"ear"
        assert stream.receive_nowait(100) == b"ly"
        assert stream.receive_nowait(100) is None
        assert stream.send_nowait(b"req", eof=True) == 3
    assert await peer.receive_some() == b"req"
    assert await peer.receive_some() == b""  # the EOF went with the data
    await peer.send_all(b"answer")
    assert await PrefixedStream(inner, b"<").receive_after_wait(100) == b"<"
    assert await stream.receive_after_wait(100) == b"answer"
    stream.close_now()
    assert inner.socket.fileno() == -1
    peer.close_now()


async def test_prefixed_stream_conformance() -> None:
    await trio.testing.check_half_closeable_stream(_socketpair_streams, None)


async def _tcp_pair() -> tuple[TcpSocketStream, TcpSocketStream]:
    """A stream from `open_tcp` and the accepted end, both `TcpSocketStream`s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = await open_tcp(LOCALHOST, listener.getsockname()[1], SocketOptions())
        # The handshake is complete, so the connection is already queued.
        accepted, _ = listener.accept()
    accepted.setblocking(False)
    return client, TcpSocketStream(accepted)


async def _fill(stream: TcpSocketStream) -> None:
    """Send until the socket buffers are full and `send_all` blocks."""

    async def sender() -> None:
        while True:
            await stream.send_all(b"x" * 10000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def _clogged_tcp_pair() -> tuple[TcpSocketStream, TcpSocketStream]:
    left, right = await _tcp_pair()
    await _fill(left)
    await _fill(right)
    return left, right


async def test_tcp_stream_conformance() -> None:
    await trio.testing.check_half_closeable_stream(_tcp_pair, _clogged_tcp_pair)


async def test_tcp_stream_over_open_tcp_is_nodelay_and_closes_at_once() -> None:
    client, server = await _tcp_pair()
    assert client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    client.close_now()
    server.close_now()
    assert client.socket.fileno() == server.socket.fileno() == -1
    client.close_now()  # idempotent


def _reset(stream: TcpSocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.close_now()


async def test_reset_is_broken_with_the_oserror_as_cause() -> None:
    """Callers map failures by the OSError behind the stream error (see socks5)."""
    client, server = await _tcp_pair()
    _reset(server)
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.receive_some()
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert info.value.__cause__.errno == errno.ECONNRESET
    # The connection is gone: sending fails the same way.
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.send_all(b"late")
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno in (errno.EPIPE, errno.ECONNRESET)
    await client.aclose()


async def test_reset_while_waiting_is_broken() -> None:
    client, server = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reset_when_blocked, server)
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some()
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await client.aclose()


async def _reset_when_blocked(stream: TcpSocketStream) -> None:
    await trio.testing.wait_all_tasks_blocked()
    _reset(stream)


async def test_concurrent_use_is_busy() -> None:
    client, server = await _tcp_pair()
    await _fill(client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_some)
        nursery.start_soon(client.send_all, b"more")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await client.receive_some()
        with pytest.raises(trio.BusyResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.BusyResourceError):
            await client.send_eof()
        with pytest.raises(trio.BusyResourceError):
            await client.wait_send_all_might_not_block()
        nursery.cancel_scope.cancel()
    # Cancelled waits release the stream for the next user.
    await server.send_all(b"y")
    assert await client.receive_some() == b"y"
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("close", ["aclose", "close_now"])
async def test_close_wakes_waiters_with_closed(close: str) -> None:
    client, server = await _tcp_pair()
    await _fill(client)
    errors: list[BaseException] = []

    async def use(op: Callable[[], Awaitable[object]]) -> None:
        try:
            await op()
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(use, client.receive_some)
        nursery.start_soon(use, functools.partial(client.send_all, b"z" * 100_000))
        await trio.testing.wait_all_tasks_blocked()
        if close == "aclose":
            await client.aclose()
        else:
            client.close_now()
    assert len(errors) == 2
    for op in (client.receive_some, functools.partial(client.send_all, b"x"), client.send_eof):
        with pytest.raises(trio.ClosedResourceError):
            await op()
    await server.aclose()


async def test_send_eof_then_receive() -> None:
    client, server = await _tcp_pair()
    await client.send_all(b"request")
    await client.send_eof()
    await client.send_eof()  # idempotent
    with pytest.raises(trio.ClosedResourceError, match="EOF"):
        await client.send_all(b"more")
    received = b""
    while data := await server.receive_some():
        received += data
    assert received == b"request"
    await server.send_all(b"reply")
    await server.send_eof()
    assert await client.receive_some() == b"reply"
    assert await client.receive_some() == b""
    await client.aclose()
    await server.aclose()


async def test_operations_that_do_not_wait_still_checkpoint() -> None:
    client, server = await _tcp_pair()
    await server.send_all(b"ready")
    await trio.testing.wait_all_tasks_blocked()
    with trio.testing.assert_checkpoints():
        await client.send_all(b"fits in the buffer")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await client.receive_some()
    # Cancelled before the read: nothing was consumed.
    with trio.testing.assert_checkpoints():
        assert await client.receive_some() == b"ready"
    await client.aclose()
    await server.aclose()


async def test_large_send_completes_across_partial_sends() -> None:
    client, server = await _tcp_pair()
    payload = bytes(range(256)) * 16384  # 4 MiB: more than any socket buffer
    received = bytearray()

    async def drain() -> None:
        while data := await server.receive_some():
            received.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        # Views of wider items: progress is counted in bytes, not items.
        await client.send_all(memoryview(b"head").cast("I"))
        await client.send_all(memoryview(payload).cast("I"))
        await client.send_eof()
    assert received == b"head" + payload
    await client.aclose()
    await server.aclose()


async def test_send_nowait_takes_what_fits_and_never_yields() -> None:
    client, server = await _tcp_pair()
    with trio.testing.assert_no_checkpoints():
        assert client.send_nowait(b"hello") == 5
        client.send_eof_nowait()
        client.send_eof_nowait()  # idempotent, like send_eof
    assert await _receive_until_eof(server) == b"hello"
    with pytest.raises(trio.ClosedResourceError):
        client.send_nowait(b"after eof")
    # A full socket takes nothing (the caller falls back to send_all).
    await _fill(server)
    taken = 0
    while (n := server.send_nowait(b"y" * 65536)) > 0:
        taken += n
    assert server.send_nowait(b"y") == 0
    await client.aclose()
    await server.aclose()


async def test_send_nowait_with_eof_shuts_down_only_when_all_was_taken() -> None:
    client, server = await _tcp_pair()
    await _fill(client)
    assert client.send_nowait(b"x" * 65536, eof=True) < 65536
    got = []

    async def drain() -> None:
        got.append(await _receive_until_eof(server))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await client.send_all(b"tail")  # the write side is still open
        await client.send_eof()
    assert got[0].endswith(b"tail")
    other, peer = await _tcp_pair()
    assert other.send_nowait(b"last", eof=True) == 4
    assert await _receive_until_eof(peer) == b"last"
    for stream in (client, server, other, peer):
        stream.close_now()


async def _receive_until_eof(stream: TcpSocketStream) -> bytes:
    got = b""
    while chunk := await stream.receive_some():
        got += chunk
    return got


async def test_send_nowait_is_busy_during_send_all_and_broken_after_reset() -> None:
    client, server = await _tcp_pair()
    await _fill(client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"more")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            client.send_nowait(b"x")
        with pytest.raises(trio.BusyResourceError):
            client.send_eof_nowait()
        nursery.cancel_scope.cancel()
    _reset(server)
    # On loopback the RST has arrived by the time close() returns.
    with pytest.raises(trio.BrokenResourceError) as info:
        client.send_nowait(b"z")
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await client.aclose()


async def test_receive_nowait_reports_nothing_data_and_eof_without_yielding() -> None:
    client, server = await _tcp_pair()
    with trio.testing.assert_no_checkpoints():
        assert client.receive_nowait(100) is None
    await server.send_all(b"reply")
    await server.send_eof()
    await trio.testing.wait_all_tasks_blocked()  # loopback: delivered already
    with trio.testing.assert_no_checkpoints():
        assert client.receive_nowait(3) == b"rep"
        assert client.receive_nowait(100) == b"ly"
        assert client.receive_nowait(100) == b""
    await client.aclose()
    await server.aclose()


def _loopback_stream() -> tuple[socket.socket, socket.socket, TcpSocketStream]:
    """A loopback connection: the peer's blocking socket, and the accepted
    one, non-blocking, with the stream over it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    accepted.setblocking(False)
    return peer, accepted, TcpSocketStream(accepted)


_TCP_CLOSE_WAIT = 8  # tcpi_state, the first byte of TCP_INFO


def _wait_arrived(sock: socket.socket, queued: int, fin: bool) -> None:
    """Until `queued` bytes (and the FIN, with `fin`) sit in `sock`'s
    receive queue: loopback usually delivers within the send, not always."""
    for _ in range(10000):
        count = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if count == queued and (not fin or state == _TCP_CLOSE_WAIT):
            return
        select.select([], [], [], 0.001)
    raise AssertionError(f"{queued} bytes (fin={fin}) never arrived")


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(1, 3000)),
            st.tuples(st.just("receive"), st.integers(1, 4000)),
        ),
        max_size=12,
    ),
    fin=st.booleans(),
)
def test_receive_drained_agrees_with_a_look_that_finds_nothing(
    steps: list[tuple[str, int]], fin: bool
) -> None:
    """The splice skips its look for more right after a receive when the
    receive is known to have drained the socket; it must be known only
    when that look would have found nothing: no data and no EOF. Every
    receive is checked against a peek, with nothing arriving in between."""
    require_tcp_inq()
    peer, accepted, stream = _loopback_stream()
    queued = 0
    with peer:
        for i, (action, size) in enumerate([*steps, ("fin", 0), ("receive", 5000)]):
            if action == "send":
                peer.sendall(bytes([i]) * size)
                queued += size
            elif action == "fin":
                if fin:
                    peer.shutdown(socket.SHUT_WR)
            else:
                _wait_arrived(accepted, queued, fin and action == "receive" and i == len(steps) + 1)
                data = stream.receive_nowait(size)
                if data is None:
                    assert queued == 0 and not (fin and i == len(steps) + 1)
                    continue
                queued -= len(data)
                try:
                    rest = accepted.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    rest = None
                assert stream.receive_drained() == (rest is None), (data, rest, queued)
        stream.close_now()


def test_a_prefix_served_says_nothing_of_the_socket_behind_it() -> None:
    """A handshake's read took the proxy's reply and the answer's first
    bytes (left over as the prefix) and drained the socket then; the rest
    of the answer and the EOF came after. A receive served from the prefix
    must not claim the socket drained: the splice would skip its look and
    send the EOF a round later."""
    require_tcp_inq()
    peer, accepted, inner = _loopback_stream()
    with peer:
        peer.sendall(b"REPLYbanner")
        _wait_arrived(accepted, 11, fin=False)
        assert inner.receive_nowait(100) == b"REPLYbanner"
        assert inner.receive_drained()
        stream = PrefixedStream(inner, b"banner")
        peer.sendall(b"rest")
        peer.shutdown(socket.SHUT_WR)
        _wait_arrived(accepted, 4, fin=True)
        assert stream.receive_nowait(3) == b"ban"
        assert not stream.receive_drained()
        assert stream.receive_nowait(100) == b"ner"
        assert not stream.receive_drained()
        assert stream.receive_nowait(100) == b"rest"
        assert not stream.receive_drained()  # the EOF is behind it
        assert stream.receive_nowait(100) == b""
    stream.close_now()


async def test_receive_nowait_is_busy_while_receiving_and_broken_after_reset() -> None:
    client, server = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            client.receive_nowait(1)
        with pytest.raises(trio.BusyResourceError):
            await client.receive_after_wait(1)
        nursery.cancel_scope.cancel()
    _reset(server)
    with pytest.raises(trio.BrokenResourceError) as info:
        client.receive_nowait(1)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await client.aclose()


async def test_receive_after_wait_waits_then_reads() -> None:
    client, server = await _tcp_pair()

    async def answer() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await server.send_all(b"answer")
        await server.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        assert await client.receive_after_wait(100) == b"answer"
    assert await client.receive_after_wait(100) == b""
    # Data already there: the wait ends at once.
    await client.send_all(b"x")
    assert await server.receive_after_wait(100) == b"x"
    client.close_now()
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_after_wait(1)
    await server.aclose()


async def test_receive_after_wait_is_woken_by_a_close_and_a_reset() -> None:
    client, server = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reset_when_blocked, server)
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_after_wait(1)

    await client.aclose()
    client, server = await _tcp_pair()

    async def close_when_blocked() -> None:
        await trio.testing.wait_all_tasks_blocked()
        client.close_now()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_when_blocked)
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_after_wait(1)
    await server.aclose()


async def test_an_earlier_enclosing_deadline_wins_over_the_connect_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Under a caller's earlier deadline the caller's scope ends the connect."""
    with _unanswered_port() as port:
        with trio.move_on_after(1) as scope:
            await open_tcp(LOCALHOST, port, SocketOptions(connect_timeout=3))
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(1)


# --- early data and TCP Fast Open --------------------------------------------------


@pytest.mark.parametrize("fast_open", [False, True])
async def test_early_data_is_the_first_thing_the_server_reads(
    nursery: trio.Nursery, fast_open: bool
) -> None:
    # This namespace's Fast Open server side is off (the kernel default),
    # so with `fast_open` the connect falls back and the data still comes.
    got: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while len(data) < 5:
                data += await stream.receive_some(5 - len(data))
            got.append(data)
            await stream.send_all(b"world")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    for _ in range(2):  # the second one would hold a cookie, if the server gave one
        stream = await open_tcp(
            "127.0.0.1", port, SocketOptions(), early_data=b"hello", fast_open=fast_open
        )
        async with stream:
            assert await stream.receive_some(5) == b"world"
    assert got == [b"hello", b"hello"]


async def test_fast_open_connect_to_a_closed_port_is_refused_at_open() -> None:
    with pytest.raises(OutboundError, match=r"connecting to 127\.0\.0\.1:\d+ failed") as info:
        await open_tcp("127.0.0.1", free_port(), SocketOptions(), early_data=b"x", fast_open=True)
    assert info.value.reply is FailureReply.RESET


async def test_connect_with_early_data_to_a_closed_port_is_refused() -> None:
    with pytest.raises(OutboundError, match=r"connecting to 127\.0\.0\.1:\d+ failed") as info:
        await open_tcp("127.0.0.1", free_port(), SocketOptions(), early_data=b"x")
    assert info.value.reply is FailureReply.RESET


class _CountingSocket(socket.socket):
    """A socket that records which of its calls `_connect` made."""

    calls: list[str]

    def getpeername(self) -> object:
        self.calls.append("getpeername")
        return super().getpeername()

    def send(self, data: object, flags: int = 0) -> int:
        self.calls.append("send")
        return super().send(data, flags)  # type: ignore[arg-type]


async def test_early_data_to_a_peer_that_answered_at_once_is_one_send() -> None:
    # Over loopback the handshake is over before `connect` returns: the
    # send of the first message is what finds that out, no query before it.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = _CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.calls = []
        sock.setblocking(False)
        with sock:
            await _connect(sock, listener.getsockname(), b"hello")
            assert sock.calls == ["send"]
            peer, _ = listener.accept()
            with peer:
                assert peer.recv(5) == b"hello"
