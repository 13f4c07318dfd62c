"""`TcpStream` against trio's stream conformance suite, over a real TUN.

The other end of every pair is a kernel TCP socket in a private network
namespace whose packets go through a TUN into our stack, so the suite
exercises the stream, the engine and the sans-I/O connection together.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from outbounds.base import Destination, UdpSession
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from tests.support import require
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tcpstream import TcpStream
from tun2sx.dataplane.tun import open_tun
from tun2sx.lab.netns import Lab, inside
from tun2sx.naming.router import Router

pytestmark = pytest.mark.e2e

StreamMaker = Callable[[], Awaitable[tuple[trio.abc.HalfCloseableStream, TcpStream]]]


class NullOutbound:
    """Connects every flow to nothing: the test takes the app stream itself."""

    name = "null"

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        left, _right = trio.testing.memory_stream_pair()
        return left

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


@pytest.fixture
async def stream_maker(nursery: trio.Nursery) -> AsyncIterator[StreamMaker]:
    require()
    with Lab("t2sx-stream") as lab:
        ns = lab.namespace("stream")
        with inside(ns):
            device = open_tun("tun0", mtu=1500, offload=True, addresses=("10.77.0.1/24",))
            send, receive = trio.open_memory_channel[TcpStream](1)

            async def capture(app: TcpStream, upstream: trio.abc.HalfCloseableStream) -> None:
                await send.send(app)
                await trio.sleep_forever()

            stack = NetStack(NetStackConfig(tcp=TcpConfig(mss=1460), partial_checksum=True))
            engine = Engine(device, stack, Router(NullOutbound()), tcp_handler=capture)
            await nursery.start(engine.run)
            port = 1000

            async def make() -> tuple[trio.abc.HalfCloseableStream, TcpStream]:
                nonlocal port
                port += 1
                with inside(ns):
                    kernel = await trio.open_tcp_stream("10.77.0.9", port)
                return kernel, await receive.receive()

            yield make
            nursery.cancel_scope.cancel()
        device.close()


async def test_half_closeable_stream_conformance(stream_maker: StreamMaker) -> None:
    await trio.testing.check_half_closeable_stream(stream_maker, None)


async def test_reversed_pair_conformance(stream_maker: StreamMaker) -> None:
    async def reversed_maker() -> tuple[TcpStream, trio.abc.HalfCloseableStream]:
        kernel, ours = await stream_maker()
        return ours, kernel

    await trio.testing.check_half_closeable_stream(reversed_maker, None)


async def _receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    got = b""
    while chunk := await stream.receive_some():
        got += chunk
    return got


async def test_send_nowait_queues_without_yielding(stream_maker: StreamMaker) -> None:
    """The splice's checkpoint-free sends: what the send buffer takes goes
    out in order, EOF follows, and misuse fails as send_all's would."""
    kernel, ours = await stream_maker()
    payload = bytes(range(256)) * 64
    with trio.testing.assert_no_checkpoints():
        assert ours.send_nowait(payload[:1000]) == 1000
        assert ours.send_nowait(memoryview(payload)[1000:]) == len(payload) - 1000
        ours.send_eof_nowait()
        ours.send_eof_nowait()  # idempotent
    assert await _receive_until_eof(kernel) == payload
    with pytest.raises(trio.ClosedResourceError):
        ours.send_nowait(b"after eof")
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        ours.send_eof_nowait()
    await kernel.aclose()


async def test_send_nowait_with_eof_sends_the_fin_with_the_data(stream_maker: StreamMaker) -> None:
    kernel, ours = await stream_maker()
    with trio.testing.assert_no_checkpoints():
        assert ours.send_nowait(b"response", eof=True) == len(b"response")
    assert await _receive_until_eof(kernel) == b"response"
    with pytest.raises(trio.ClosedResourceError):
        ours.send_nowait(b"after eof")
    ours.send_eof_nowait()  # already sent: nothing more
    await ours.aclose()
    await kernel.aclose()


async def test_receive_nowait_and_the_wake_callback(stream_maker: StreamMaker) -> None:
    """What the splice's upload uses: data, EOF and reset, never a checkpoint."""
    kernel, ours = await stream_maker()
    wakes = trio.lowlevel.ParkingLot()
    ours.set_wake_callback(wakes.unpark_all)
    with trio.testing.assert_no_checkpoints():
        assert ours.receive_nowait(100) is None
    await kernel.send_all(b"request")
    got = b""
    while len(got) < 7:
        with trio.testing.assert_no_checkpoints():
            chunk = ours.receive_nowait(4)
        if chunk is None:
            await wakes.park()
        else:
            got += chunk
    assert got == b"request"
    await kernel.send_eof()
    while (chunk := ours.receive_nowait(100)) is None:
        await wakes.park()
    assert chunk == b""
    ours.set_wake_callback(None)
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        ours.receive_nowait(1)
    await kernel.aclose()


async def test_receive_nowait_after_a_reset_is_broken(stream_maker: StreamMaker) -> None:
    kernel, ours = await stream_maker()
    kernel.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    woken = trio.Event()
    ours.set_wake_callback(woken.set)
    await kernel.aclose()
    await woken.wait()
    with pytest.raises(trio.BrokenResourceError):
        ours.receive_nowait(1)
    ours.set_wake_callback(None)
    await ours.aclose()
