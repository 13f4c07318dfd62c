"""What a round trip on an open connection costs the engine, counted.

A 64-byte request and its echo are two wake-ups of tun2sx (the TUN, the
outbound's socket). Two of the engine's steps in them are counted here,
over a socketpair "TUN" (tests/support/app.py) and a loopback echo server:
a batch of one packet ends without a read that fails (`TunDevice.read_ready`
asks `poll(0)` instead), and a flush pulls the timer earlier from the
deadline the stack reports as moved, without asking for the next deadline
(only the timer task does, once per sleep).
"""

from __future__ import annotations

import socket

import trio

from stack.netstack import GsoPacket, NetStack, NetStackConfig
from stack.tcp import FlowKey
from tests.support.app import CONFIG, AppSide
from tests.support.outbounds import LoopbackOutbound
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice
from tun2sx.naming.router import Router

ROUNDS = 20


class _CountingTun(TunDevice):
    failed_reads = 0

    def _read_packet(self, fd: int, size: int) -> bytes:
        try:
            return super()._read_packet(fd, size)
        except BlockingIOError:
            self.failed_reads += 1
            raise


class _CountingStack(NetStack):
    heap_reads = 0
    collections = 0

    def next_deadline(self) -> float | None:
        self.heap_reads += 1
        return super().next_deadline()

    def packets_by_flow(self, now: float) -> list[tuple[FlowKey | None, list[bytes | GsoPacket]]]:
        self.collections += 1
        return super().packets_by_flow(now)


async def test_round_trips_fail_no_tun_read_and_leave_the_deadline_heap_alone() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = _CountingTun(ours.detach(), name="pair0", mtu=1500, offload=False)
    stack = _CountingStack(NetStackConfig(tcp=CONFIG))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    engine = Engine(device, stack, Router(LoopbackOutbound(listeners[0].socket.getsockname()[1])))

    async def echo_server() -> None:
        stream = await listeners[0].accept()
        while data := await stream.receive_some(1000):
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        nursery.start_soon(echo_server)
        with trio.fail_after(10), trio.socket.from_stdlib_socket(theirs) as app_sock:
            side = AppSide(app_sock)
            conn = await side.handshake()
            assert await side.exchange(conn, b"w" * 64, 64) == b"w" * 64  # warm
            failed, heap, collected = device.failed_reads, stack.heap_reads, stack.collections
            for i in range(ROUNDS):
                message = bytes([i]) * 64
                assert await side.exchange(conn, message, 64) == message
            failed = device.failed_reads - failed
            heap = stack.heap_reads - heap
            collected = stack.collections - collected
        nursery.cancel_scope.cancel()
    device.close()
    # Each round trip: the request's batch (one packet, no failed read),
    # the echo's flush (a data segment); the delayed ACK's timer may run
    # once or twice meanwhile, each time reading the heap once.
    assert collected >= ROUNDS, (failed, heap, collected)
    assert failed <= ROUNDS // 4, (failed, heap, collected)
    assert heap <= ROUNDS // 4, (failed, heap, collected)
