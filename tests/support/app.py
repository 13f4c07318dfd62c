"""The application behind a socketpair "TUN", played by our own stack.

Engine tests without root put a real `TunDevice` on one end of a
SOCK_SEQPACKET socketpair (one message per packet, like a TUN) and play the
application on the other end with the stack's own `TcpConnection`: opened
from the engine's SYN-ACK (TCP is symmetric once established), it
retransmits what a test loses and checks what the engine sends.
"""

from __future__ import annotations

import socket

import trio

from stack.tcp import (
    NEED_DATA,
    Closed,
    ConnectionReset,
    DataReceived,
    EofReceived,
    FlowKey,
    TcpConfig,
    TcpConnection,
)
from stack.wire.packet import Packet, build_tcp_packet, parse_packet_untrusted
from stack.wire.tcp import ACK, RST, SYN, TcpHeader, TcpOptions
from tun2sx.dataplane.tun import RxPacket

__all__ = [
    "APP",
    "APP_ISN",
    "APP_PORT",
    "CONFIG",
    "REMOTE",
    "REMOTE_PORT",
    "AppSide",
    "MemoryTun",
]

APP = socket.inet_aton("10.0.0.2")
REMOTE = socket.inet_aton("198.51.100.7")
APP_PORT, REMOTE_PORT = 40000, 7
APP_ISN = 0xFFFFF000
CONFIG = TcpConfig(mss=1400)


class AppSide:
    """The application behind the TUN: IP packets in and out of the socketpair."""

    def __init__(
        self, sock: trio.socket.SocketType, remote: bytes = REMOTE, remote_port: int = REMOTE_PORT
    ) -> None:
        self.sock = sock
        self.remote = remote
        self.remote_port = remote_port

    async def send(self, hdr: TcpHeader, payload: bytes | bytearray | memoryview = b"") -> None:
        await self.sock.send(build_tcp_packet(APP, self.remote, hdr, payload))

    async def receive(self) -> tuple[TcpHeader, bytes]:
        packet = parse_packet_untrusted(memoryview(await self.sock.recv(70000)))
        assert isinstance(packet.l4, TcpHeader), packet
        assert (packet.src, packet.dst) == (self.remote, APP)
        return packet.l4, bytes(packet.payload)

    async def handshake(self) -> TcpConnection:
        """SYN until the engine answers (faults eat some); then the app's connection."""
        syn = TcpHeader(
            APP_PORT, self.remote_port, APP_ISN, 0, SYN, 65535, options=TcpOptions(1400)
        )
        while True:
            await self.send(syn)
            with trio.move_on_after(1.0):
                synack, _ = await self.receive()
                break
        assert synack.flags == SYN | ACK and synack.ack == APP_ISN + 1, synack
        now = trio.current_time()
        # The app's side, opened from the SYN-ACK seen as a SYN; its own
        # SYN-ACK is dropped and the engine's ACK of it is made up here.
        mirror = FlowKey(self.remote, self.remote_port, APP, APP_PORT)
        conn = TcpConnection(mirror, synack._replace(flags=SYN, ack=0), APP_ISN, now, CONFIG)
        conn.segments_to_send(now)
        iss_next = (synack.seq + 1) & 0xFFFFFFFF
        conn.segment_received(
            TcpHeader(self.remote_port, APP_PORT, iss_next, APP_ISN + 1, ACK, synack.window),
            b"",
            now,
        )
        # Our ACK of the SYN-ACK; if a fault eats it, the first data segment
        # (or the app's answer to a repeated SYN-ACK) completes the handshake.
        await self.send(TcpHeader(APP_PORT, self.remote_port, APP_ISN + 1, iss_next, ACK, 65535))
        return conn

    async def echo(self, payload: bytes) -> bytes:
        """Send `payload`, close, and return everything received until EOF and Closed."""
        conn = await self.handshake()
        sent = 0
        received = bytearray()
        events: set[type] = set()
        while not {EofReceived, Closed} <= events:
            now = trio.current_time()
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn.handle_timeout(now)
            while sent < len(payload) and (n := conn.send(memoryview(payload)[sent:])):
                sent += n
            if sent == len(payload) and Closed not in events:
                conn.close()
            while (event := conn.next_event()) is not NEED_DATA:
                events.add(type(event))
                if isinstance(event, DataReceived):
                    received += event.data
            for hdr, data in conn.segments_to_send(now):
                await self.send(hdr, data)
            wait = conn.next_deadline()
            with trio.move_on_at(wait if wait is not None else now + 60):
                hdr, data = await self.receive()
                conn.segment_received(hdr, data, trio.current_time())
        return bytes(received)

    async def exchange(self, conn: TcpConnection, payload: bytes, want: int) -> bytes:
        """Send `payload` on an open connection and read until `want` bytes
        came back, or the engine reset or closed it (then what came)."""
        received = bytearray()
        sent = 0
        while len(received) < want:
            now = trio.current_time()
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn.handle_timeout(now)
            while sent < len(payload) and (n := conn.send(memoryview(payload)[sent:])):
                sent += n
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, DataReceived):
                    received += event.data
                elif isinstance(event, ConnectionReset | Closed):
                    return bytes(received)
            for hdr, data in conn.segments_to_send(now):
                await self.send(hdr, data)
            if len(received) >= want:
                break
            wait = conn.next_deadline()
            with trio.move_on_at(wait if wait is not None else now + 30):
                hdr, data = await self.receive()
                if hdr.flags & RST:
                    return bytes(received)
                conn.segment_received(hdr, data, trio.current_time())
        return bytes(received)


class MemoryTun:
    """A stand-in device: the test feeds packets, and takes what was written.

    Enough of `TunDevice` for the engine and `serve`: no file descriptor,
    no offload, no counters of its own.
    """

    name = "mem0"
    mtu = 1500
    offload = False

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[list[RxPacket]](100)
        self._written_send, self._written = trio.open_memory_channel[bytes](1000)

    def feed(self, *packets: bytes) -> None:
        self._send.send_nowait([RxPacket(memoryview(p), False) for p in packets])

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        return []  # nothing held outside read_batch

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        return await self._receive.receive()

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        self._written_send.send_nowait(bytes(packet))

    async def next_written(self) -> Packet:
        """The next packet the engine wrote, parsed."""
        return parse_packet_untrusted(memoryview(await self._written.receive()))

    def close(self) -> None:
        pass
