"""`splice` end to end: a kernel client through the TUN, a kernel server behind.

The application is a kernel TCP socket in a private namespace whose packets
reach our stack through a TUN; the outbound is a `TcpSocketStream` to a
listener on the namespace's loopback, so both of the splice's paths run:
the upload from the engine's wake-ups, and the upload task it falls back to
when the outbound's buffer is full. Each test checks exact bytes, the
half-close in both orders, or that a reset on one side resets the other.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from tests.support import require
from tests.support.outbounds import LoopbackOutbound
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import open_tun
from tun2sx.lab.netns import Lab, inside
from tun2sx.naming.router import Router

pytestmark = pytest.mark.e2e

# Two streams: the application's kernel socket, and the server's accepted one.
PairMaker = Callable[[], Awaitable[tuple[trio.SocketStream, trio.SocketStream]]]


class Harness:
    """Makes connected pairs through one engine."""

    def __init__(self, engine: Engine, make: PairMaker) -> None:
        self.engine = engine
        self.make = make


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    require()
    with Lab("t2sx-splice") as lab:
        ns = lab.namespace("splice")
        with inside(ns):
            device = open_tun("tun0", mtu=1500, offload=True, addresses=("10.78.0.1/24",))
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        accepted = trio.open_memory_channel[trio.SocketStream](16)

        async def accept_loop() -> None:
            while True:
                await accepted[0].send(await listeners[0].accept())

        nursery.start_soon(accept_loop)
        port = listeners[0].socket.getsockname()[1]
        stack = NetStack(NetStackConfig(tcp=TcpConfig(mss=1460), partial_checksum=True))
        engine = Engine(
            device,
            stack,
            Router(LoopbackOutbound(port)),
            config=EngineConfig(splice_buffer=16384),
        )
        await nursery.start(engine.run)
        app_port = 2000

        async def make() -> tuple[trio.SocketStream, trio.SocketStream]:
            nonlocal app_port
            app_port += 1
            with inside(ns):
                app = await trio.open_tcp_stream("10.78.0.9", app_port)
            return app, await accepted[1].receive()

        yield Harness(engine, make)
        nursery.cancel_scope.cancel()
        device.close()


async def _receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while chunk := await stream.receive_some():
        got += chunk
    return bytes(got)


async def test_request_then_response_with_half_close(harness: Harness) -> None:
    app, server = await harness.make()
    await app.send_all(b"GET / HTTP/1.0\r\n\r\n")
    await app.send_eof()
    assert await _receive_until_eof(server) == b"GET / HTTP/1.0\r\n\r\n"
    await server.send_all(b"HTTP/1.0 200 OK\r\n\r\nx")
    await server.send_eof()
    assert await _receive_until_eof(app) == b"HTTP/1.0 200 OK\r\n\r\nx"
    await app.aclose()
    await server.aclose()


async def test_server_closes_first_and_the_application_goes_on_sending(
    harness: Harness,
) -> None:
    app, server = await harness.make()
    await server.send_all(b"banner")
    await server.send_eof()
    assert await _receive_until_eof(app) == b"banner"
    for i in range(5):
        await app.send_all(b"line %d\n" % i)
        await trio.sleep(0.01)
    await app.send_eof()
    assert await _receive_until_eof(server) == b"".join(b"line %d\n" % i for i in range(5))


async def test_an_upload_larger_than_the_outbound_buffers_arrives_exactly(
    harness: Harness,
) -> None:
    app, server = await harness.make()
    payload = bytes(range(256)) * 32768  # 8 MiB
    download = b"d" * 300_000
    got = b""

    async def server_side() -> None:
        nonlocal got
        # Not reading at first fills the outbound's buffers: the upload
        # must wait for room, with the download going on meanwhile.
        await server.send_all(download)
        await server.send_eof()
        await trio.sleep(0.3)
        got = await _receive_until_eof(server)

    async def upload() -> None:
        await app.send_all(payload)
        await app.send_eof()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            nursery.start_soon(upload)
            assert await _receive_until_eof(app) == download
    assert got == payload
    stats = harness.engine.statistics()
    assert (stats["bytes_up"], stats["bytes_down"]) == (len(payload), len(download))


async def test_an_application_reset_resets_the_outbound(harness: Harness) -> None:
    app, server = await harness.make()
    await app.send_all(b"hello")
    assert await server.receive_some() == b"hello"
    app.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await app.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        while await server.receive_some():
            pass


async def test_an_outbound_reset_resets_the_application(harness: Harness) -> None:
    app, server = await harness.make()
    await server.send_all(b"hello")
    assert await app.receive_some() == b"hello"
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server.aclose()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        while await app.receive_some():
            pass
