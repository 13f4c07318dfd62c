"""Packets a flow's own write got answered with are taken by the flow.

A TUN write hands the packet to the application's kernel, which answers
a SYN-ACK or a FIN with an ACK before the write returns. The flow that
wrote takes that ACK at once (`Engine.take_ready`) instead of leaving it
to a wake-up of the engine's reader. Played here over a socketpair
"TUN" whose application side answers within the write, as a kernel does.
"""

from __future__ import annotations

import socket

import trio
import trio.testing

from stack.netstack import GsoPacket, NetStack, NetStackConfig
from stack.wire.packet import build_tcp_packet, parse_packet_untrusted
from stack.wire.tcp import ACK, FIN, SYN, TcpHeader, TcpOptions
from tests.support.app import APP, APP_ISN, APP_PORT, CONFIG, REMOTE, REMOTE_PORT
from tests.support.outbounds import LoopbackOutbound
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import RxPacket, TunDevice
from tun2sx.naming.router import Router


class _AnsweringTun(TunDevice):
    """A device whose application ACKs a SYN-ACK or a FIN within the write;
    counts the batches the engine's reader gets."""

    def __init__(self, fd: int, peer: socket.socket) -> None:
        super().__init__(fd, name="pair0", mtu=1500, offload=False)
        self.peer = peer
        self.reader_batches = 0
        self.acked = 0  # the sequence number after the last SYN or FIN the application ACKed

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        batch = await super().read_batch(limit)
        self.reader_batches += 1
        return batch

    def write(self, packet: bytes | bytearray | memoryview | GsoPacket) -> None:
        super().write(packet)
        assert not isinstance(packet, GsoPacket)
        hdr = parse_packet_untrusted(memoryview(bytes(packet))).l4
        assert isinstance(hdr, TcpHeader)
        if hdr.flags & (SYN | FIN):
            self.acked = (hdr.seq + 1) & 0xFFFFFFFF
            ack = TcpHeader(hdr.dst_port, REMOTE_PORT, hdr.ack, self.acked, ACK, 65535)
            self.peer.send(build_tcp_packet(APP, REMOTE, ack))


async def test_the_acks_of_our_syn_ack_and_fin_wake_no_reader() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = _AnsweringTun(ours.detach(), theirs)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(LoopbackOutbound(port)))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        syn = TcpHeader(APP_PORT, REMOTE_PORT, APP_ISN, 0, SYN, 65535, options=TcpOptions(1400))
        theirs.send(build_tcp_packet(APP, REMOTE, syn))
        with trio.fail_after(10):
            server = await listeners[0].accept()
            await trio.testing.wait_all_tasks_blocked()
            (conn,) = engine.stack.tcp.connections.values()
            # Established by the ACK the SYN-ACK's write brought, which
            # the reader never saw: its one batch was the SYN.
            assert conn.state.name == "ESTABLISHED"
            assert device.reader_batches == 1
            # The application closes; the server answers with its own close:
            # the flow's FIN gets its ACK within the write, and the flow ends.
            fin = TcpHeader(APP_PORT, REMOTE_PORT, APP_ISN + 1, device.acked, FIN | ACK, 65535)
            theirs.send(build_tcp_packet(APP, REMOTE, fin))
            assert await server.receive_some(10) == b""
            await server.aclose()
            while engine.stack.tcp.connections or engine.streams:
                await trio.sleep(0.01)
        assert device.reader_batches == 2  # the SYN, the application's FIN
        nursery.cancel_scope.cancel()
    device.close()
    theirs.close()
    for listener in listeners:
        await listener.aclose()


async def test_beside_another_live_flow_the_reader_takes_the_answer() -> None:
    """With other flows live, what the device holds is theirs too: the
    reader takes it in its batches, the flow that wrote does not."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = _AnsweringTun(ours.detach(), theirs)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(LoopbackOutbound(port)))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with trio.fail_after(10):
            for n, app_port in enumerate((APP_PORT, APP_PORT + 1)):
                syn = TcpHeader(
                    app_port, REMOTE_PORT, APP_ISN, 0, SYN, 65535, options=TcpOptions(1400)
                )
                theirs.send(build_tcp_packet(APP, REMOTE, syn))
                server = await listeners[0].accept()
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(server.receive_some, 10)
                assert len(engine.streams) == n + 1
            states = [conn.state.name for conn in engine.stack.tcp.connections.values()]
            assert states == ["ESTABLISHED", "ESTABLISHED"]
        # The first flow alone took its ACK; the second's woke the reader.
        assert device.reader_batches == 3
        nursery.cancel_scope.cancel()
    device.close()
    theirs.close()
    for listener in listeners:
        await listener.aclose()
