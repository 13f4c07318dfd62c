"""Splice corner cases over a socketpair "TUN" and a real loopback outbound.

The splice moves the application's bytes on from the engine's wake-ups
and the outbound's from the flow's task, handing the upload to a task of
its own only when the outbound's buffer fills (a short exchange must need
no such task: that is the point). Two orders of events that broke that:
an application that writes everything before it reads (the download must
not wait for it while the upload has no task), and a server that answers
and then resets (the answer reaches the application first). No root
needed: the application is a `TcpConnection` of our own stack behind a
SOCK_SEQPACKET pair (tests/support/app.py).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio

from outbounds.base import Destination
from outbounds.net import TcpSocketStream
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import NEED_DATA, ConnectionReset, DataReceived, EofReceived
from stack.wire.tcp import FIN
from tests.support import require_tcp_inq
from tests.support.app import CONFIG, AppSide
from tests.support.outbounds import LoopbackOutbound
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice
from tun2sx.naming.router import Router


async def exchange(
    side: AppSide,
    payload: bytes,
    *,
    read_while_sending: bool,
    close: bool,
    send_after: float = 0.0,
) -> tuple[bytes, set[type]]:
    """The application: send `payload` (then FIN if `close`), collect what comes.

    It starts sending `send_after` seconds after the handshake. Without
    `read_while_sending` it takes no data until all of `payload` is queued,
    so its window closes meanwhile. Ends at EOF (after our FIN, if any) or
    at a reset.
    """
    conn = await side.handshake()
    start = trio.current_time() + send_after
    sent = 0
    received = bytearray()
    events: set[type] = set()
    while ConnectionReset not in events and not (
        EofReceived in events and (not close or conn.state.name in ("CLOSED", "TIME_WAIT"))
    ):
        now = trio.current_time()
        deadline = conn.next_deadline()
        if deadline is not None and deadline <= now:
            conn.handle_timeout(now)
        while now >= start and sent < len(payload) and (n := conn.send(memoryview(payload)[sent:])):
            sent += n
        if close and sent == len(payload):
            conn.close()
        for hdr, data in conn.segments_to_send(now):
            await side.send(hdr, data)
        wait = conn.next_deadline()
        wait = wait if wait is not None else now + 60
        if now < start:
            wait = min(wait, start)
        with trio.move_on_at(wait):
            hdr, data = await side.receive()
            conn.segment_received(hdr, data, trio.current_time())
        if read_while_sending or sent == len(payload):
            while (event := conn.next_event()) is not NEED_DATA:
                events.add(type(event))
                if isinstance(event, DataReceived):
                    received += event.data
    return bytes(received), events


@pytest.fixture
async def lab() -> AsyncIterator[tuple[AppSide, trio.MemoryReceiveChannel[trio.SocketStream]]]:
    """An engine on a socketpair device, flows to a loopback listener."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    send, receive = trio.open_memory_channel[trio.SocketStream](16)
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            while True:
                await send.send(await listeners[0].accept())

        nursery.start_soon(accept)
        port = listeners[0].socket.getsockname()[1]
        engine = Engine(
            device,
            NetStack(NetStackConfig(tcp=CONFIG)),
            Router(LoopbackOutbound(port)),
            config=EngineConfig(splice_buffer=16384),
        )
        await nursery.start(engine.run)
        with trio.socket.from_stdlib_socket(theirs) as app_sock:
            yield AppSide(app_sock), receive
        nursery.cancel_scope.cancel()
    device.close()


async def test_an_application_that_writes_everything_before_reading_is_not_deadlocked(
    lab: tuple[AppSide, trio.MemoryReceiveChannel[trio.SocketStream]],
) -> None:
    side, accepted = lab
    up = bytes(range(256)) * 32768  # 8 MiB: more than the sockets between hold
    down = b"d" * (4 << 20)
    got_up = bytearray()

    async def server() -> None:
        stream = await accepted.receive()
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                # Late, so the outbound's buffer fills while the download
                # already waits for the application's shut window.
                await trio.sleep(1.0)
                while chunk := await stream.receive_some(65536):
                    got_up.extend(chunk)

            nursery.start_soon(reader)
            await stream.send_all(down)
            await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with trio.fail_after(30):
            received, _ = await exchange(
                side, up, read_while_sending=False, close=True, send_after=0.3
            )
    assert received == down
    assert bytes(got_up) == up


async def test_an_answer_followed_by_a_reset_reaches_the_application_first(
    lab: tuple[AppSide, trio.MemoryReceiveChannel[trio.SocketStream]],
) -> None:
    side, accepted = lab
    answer = b"HTTP/1.1 413 Payload Too Large\r\n\r\n"

    async def server() -> None:
        stream = await accepted.receive()
        await stream.receive_some(100)
        await stream.send_all(answer)
        # Closed with the request unread and SO_LINGER 0: a reset right
        # behind the answer, often in the same read.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    # The reset is often read together with the answer, not always: a few
    # rounds, each a new flow.
    for _ in range(6):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with trio.fail_after(10):
                received, events = await exchange(
                    side, b"POST / HTTP/1.1\r\n\r\n", read_while_sending=True, close=False
                )
        assert received == answer
        assert ConnectionReset in events


class _SpawnRecorder(trio.abc.Instrument):
    """Every task started while installed, with the nursery it was started in."""

    def __init__(self) -> None:
        self.tasks: list[trio.lowlevel.Task] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.tasks.append(task)


async def test_a_short_exchange_costs_the_flow_one_task(
    lab: tuple[AppSide, trio.MemoryReceiveChannel[trio.SocketStream]],
) -> None:
    """The point of the wake-driven upload: a request and its answer move
    with one task per flow, no second one for the upload. Counted from the
    scheduler's side: every task the engine starts during the exchange,
    whatever its name or function."""
    side, accepted = lab

    async def server() -> None:
        stream = await accepted.receive()
        request = b""
        while not request.endswith(b"\r\n\r\n"):
            request += await stream.receive_some(100)
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nhi")
        await stream.aclose()

    spawned = _SpawnRecorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        trio.lowlevel.add_instrument(spawned)
        try:
            with trio.fail_after(10):
                received, _ = await exchange(
                    side, b"GET / HTTP/1.0\r\n\r\n", read_while_sending=True, close=True
                )
        finally:
            trio.lowlevel.remove_instrument(spawned)
    assert received == b"HTTP/1.0 200 OK\r\n\r\nhi"
    engine_tasks = [task for task in spawned.tasks if task.parent_nursery is not nursery]
    assert len(engine_tasks) == 1


class _CountingSocket(socket.socket):
    """A socket that counts the receives that found nothing."""

    empty_receives = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            return super().recv(bufsize, flags)
        except BlockingIOError:
            _CountingSocket.empty_receives += 1
            raise

    def recvmsg(self, *args: int) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]:
        try:
            return super().recvmsg(*args)
        except BlockingIOError:
            _CountingSocket.empty_receives += 1
            raise


class _CountingOutbound(LoopbackOutbound):
    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        stream = await super().connect_tcp(dest)
        assert isinstance(stream, TcpSocketStream)
        stream.socket = _CountingSocket(fileno=stream.socket.detach())
        return stream


async def test_an_answer_in_pieces_costs_no_empty_receive() -> None:
    """After passing a piece on, the download would look whether more came
    (so that an EOF right behind it leaves with it), but the receive that
    brought the piece said nothing was behind it (TCP_INQ): no look, and
    the next receive waits for the socket before reading instead of
    failing: a round trip's answer costs no receive that fails."""
    require_tcp_inq()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    _CountingSocket.empty_receives = 0
    pieces = [b"one", b"two", b"three"]
    async with trio.open_nursery() as nursery:
        engine = Engine(
            device,
            NetStack(NetStackConfig(tcp=CONFIG)),
            Router(_CountingOutbound(listeners[0].socket.getsockname()[1])),
            config=EngineConfig(splice_buffer=16384),
        )
        await nursery.start(engine.run)

        async def server() -> None:
            stream = await listeners[0].accept()
            assert await stream.receive_some(100) == b"go"
            for piece in pieces:
                # Apart, so that each is read alone.
                await trio.sleep(0.02)
                await stream.send_all(piece)
            await stream.aclose()

        nursery.start_soon(server)
        with trio.fail_after(10), trio.socket.from_stdlib_socket(theirs) as app_sock:
            received, events = await exchange(
                AppSide(app_sock), b"go", read_while_sending=True, close=True
            )
        nursery.cancel_scope.cancel()
    device.close()
    assert received == b"".join(pieces) and EofReceived in events
    assert _CountingSocket.empty_receives == 0


async def test_an_answer_with_its_eof_behind_it_leaves_in_one_segment(
    lab: tuple[AppSide, trio.MemoryReceiveChannel[trio.SocketStream]],
) -> None:
    """A server that answers and closes: both are in the outbound socket
    when the download reads, and the FIN goes in the answer's segment (the
    look for more after the answer is made, since the receive said that
    something, the EOF, was behind it)."""
    side, accepted = lab

    async def server() -> None:
        stream = await accepted.receive()
        assert await stream.receive_some(100) == b"ask"
        # Both at once, with no checkpoint between them for the flow to
        # read the answer alone.
        with socket.socket(fileno=os.dup(stream.socket.fileno())) as raw:
            raw.send(b"answer")
            raw.shutdown(socket.SHUT_WR)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with trio.fail_after(10):
            conn = await side.handshake()
            conn.send(b"ask")
            now = trio.current_time()
            for hdr, data in conn.segments_to_send(now):
                await side.send(hdr, data)
            while True:
                hdr, data = await side.receive()
                if data or hdr.flags & FIN:
                    break
    assert data == b"answer" and hdr.flags & FIN, (hdr, data)
