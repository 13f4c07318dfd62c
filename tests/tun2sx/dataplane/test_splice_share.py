"""A flow reads no more at once than the engine's share while others are open."""

from __future__ import annotations

import socket

import trio
import trio.testing

from stack.netstack import NetStack, NetStackConfig
from stack.wire.packet import build_udp_packet
from tun2sx.control.app import splice_share
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.splice import splice
from tun2sx.dataplane.tun import RxPacket
from tun2sx.naming.router import Router

APP = socket.inet_aton("10.0.0.2")
REMOTE = socket.inet_aton("198.51.100.7")


class _Recording(trio.abc.HalfCloseableStream):
    """A stream that notes the size of every read asked of it."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.asked: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _copy_through(read_size: object, payload: bytes) -> tuple[bytes, list[int | None]]:
    app_side, app_peer = trio.testing.memory_stream_pair()
    up_inner, up_peer = trio.testing.memory_stream_pair()
    upstream = _Recording(up_inner)
    got = bytearray()

    async def peers() -> None:
        await app_peer.send_eof()
        await up_peer.send_all(payload)
        await up_peer.send_eof()
        while chunk := await app_peer.receive_some():
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers)
        await splice(app_side, upstream, 65536, None, read_size)  # type: ignore[arg-type]
    return bytes(got), upstream.asked


async def test_reads_follow_the_share_and_never_exceed_the_buffer() -> None:
    payload = bytes(range(256)) * 400
    got, asked = await _copy_through(lambda: 1000, payload)
    assert got == payload
    assert asked and set(asked) == {1000}
    got, asked = await _copy_through(lambda: 1 << 20, payload)
    assert got == payload
    assert set(asked) == {65536}


class _ScriptedTun:
    """A device whose reads return the batches a test hands it."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[list[RxPacket]](1)
        self.written: list[object] = []

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        return []  # nothing held outside read_batch

    async def read_batch(self) -> list[RxPacket]:
        return await self.receive.receive()

    def write(self, packet: object) -> None:
        self.written.append(packet)


async def test_a_flow_reads_its_share_for_a_while_after_others_moved(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A datagram (a call, a game) through the TUN makes a download's reads
    short for a second; with nothing else moving they are whole again."""
    config = EngineConfig(splice_buffer=256 * 1024, splice_share=32 * 1024)
    device = _ScriptedTun()
    engine = Engine(device, NetStack(NetStackConfig()), Router(None), config=config)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert engine.read_size() == 256 * 1024
        datagram = build_udp_packet(APP, REMOTE, 40000, 9999, b"ping")
        await device.send.send([RxPacket(memoryview(datagram), False)])
        await trio.testing.wait_all_tasks_blocked()
        assert engine.read_size() == 32 * 1024
        await trio.sleep(0.9)
        assert engine.read_size() == 32 * 1024
        await trio.sleep(0.2)
        assert engine.read_size() == 256 * 1024
        nursery.cancel_scope.cancel()


def test_without_offload_the_share_is_a_dozen_packets() -> None:
    """Every packet is a write of its own without offload: the share (what
    others wait behind) is counted in packets there, in bytes with offload."""
    assert splice_share(9000, offload=True) == 64 * 1024
    assert splice_share(1500, offload=False) == 12 * 1460
    assert splice_share(576, offload=False) == 16 * 1024
    assert splice_share(8500, offload=False) == 64 * 1024
