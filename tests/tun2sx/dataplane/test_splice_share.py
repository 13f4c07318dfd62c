"""A flow reads no more at once than the engine's share while others are open."""

from __future__ import annotations

import trio
import trio.testing

from outbounds.base import Destination
from stack.netstack import NetStack, NetStackConfig
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.splice import splice
from tun2sx.naming.router import Router


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


async def test_the_engine_gives_a_lone_flow_the_whole_buffer_and_a_share_when_crowded() -> None:
    config = EngineConfig(splice_buffer=256 * 1024, splice_share=32 * 1024)
    engine = Engine(object(), NetStack(NetStackConfig()), Router(None), config=config)  # type: ignore[arg-type]
    dest = Destination("a.test", 80)
    first = engine.open_flow("tcp", "10.0.0.2:1", dest, "proxy")
    assert engine.read_size() == 256 * 1024
    second = engine.open_flow("udp", "10.0.0.2:2", dest, "proxy")  # a call, say
    assert engine.read_size() == 32 * 1024
    engine.close_flow(second)
    assert engine.read_size() == 256 * 1024
    engine.close_flow(first)
