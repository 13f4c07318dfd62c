"""The engine over a TUN whose reads fail: flows survive, errors are counted.

The device is a real `TunDevice` whose kernel side is a SOCK_SEQPACKET
socketpair (one message per packet, like a TUN) and whose read system call
fails now and then: EIO before the packet is taken, or EFAULT after the
kernel dequeued it (that packet is lost, as the kernel's would be). On the
far end of the pair the application is the stack's own `TcpConnection`,
opened from the engine's SYN-ACK (TCP is symmetric once established), so it
retransmits what the faults lose. The outbound echoes. No root needed.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from outbounds.base import Destination, UdpSession
from outbounds.net import SocketOptions, open_tcp
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import DataReceived, TcpConfig
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import build_tcp_packet, parse_packet_untrusted
from stack.wire.tcp import ACK, FIN, RST, SYN, TcpHeader, TcpOptions
from tests.support.app import APP, APP_ISN, APP_PORT, CONFIG, REMOTE, REMOTE_PORT, AppSide
from tests.support.outbounds import EchoOutbound
from tun2sx.control import app
from tun2sx.control.controller import Controller, Reply, Request
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import RxPacket, TunDevice, TunError
from tun2sx.naming.router import Router


class FaultyTun(TunDevice):
    """A TunDevice over one end of a socketpair whose reads fail by a seeded plan.

    Attributes:
        injected: how many reads were made to fail.
        gone: once set, every read fails as on a deleted TUN (EBADFD).
    """

    def __init__(self, fd: int, seed: int, *, eio: float = 0.0, lost: float = 0.0) -> None:
        super().__init__(fd, name="fake0", mtu=1500, offload=False)
        self._rng = random.Random(seed)
        self._eio = eio
        self._lost = lost
        self.injected = 0
        self.gone = False

    def _read_packet(self, fd: int, size: int) -> bytes:
        if self.gone:
            raise OSError(errno.EBADFD, os.strerror(errno.EBADFD))
        roll = self._rng.random()
        if roll < self._eio:
            self.injected += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        packet = os.read(fd, size)  # BlockingIOError when the queue is empty
        if roll < self._eio + self._lost:
            self.injected += 1
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        return packet


def _syn(port: int = APP_PORT) -> TcpHeader:
    """An application's SYN towards the remote end."""
    return TcpHeader(port, REMOTE_PORT, APP_ISN, 0, SYN, 65535, options=TcpOptions(1400))


# What a refusal of `_syn` acknowledges: the SYN.
_SYN_ACKED = (APP_ISN + 1) & 0xFFFFFFFF


@pytest.fixture
async def pair() -> AsyncIterator[tuple[int, trio.socket.SocketType]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()  # the device owns and closes it
    with trio.socket.from_stdlib_socket(theirs) as app_sock:
        yield fd, app_sock


async def test_a_flow_through_failing_reads_is_exact_and_the_errors_are_counted(
    autojump_clock: trio.testing.MockClock, pair: tuple[int, trio.socket.SocketType]
) -> None:
    fd, app_sock = pair
    device = FaultyTun(fd, seed=6, eio=0.08, lost=0.08)
    payload = random.Random(1).randbytes(300_000)
    async with trio.open_nursery() as nursery:
        outbound = EchoOutbound(nursery)
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(outbound))
        await nursery.start(engine.run)
        received = await AppSide(app_sock).echo(payload)
        stats = engine.statistics()
        nursery.cancel_scope.cancel()
    device.close()
    assert outbound.destinations == [Destination.parse_host("198.51.100.7", REMOTE_PORT)]
    assert received == payload
    assert (stats["bytes_up"], stats["bytes_down"]) == (len(payload), len(payload))
    # Every failed read is counted once, and the flow really went through
    # dozens of them (300 kB is over 200 segments from the application).
    assert device.injected >= 20
    assert device.statistics_rx_errors == device.injected
    assert stats["tun_rx_errors"] == device.injected
    # ... and the operator sees them on the stats endpoint.
    reply = await Controller(engine).answer(Request("GET", "/stats", {}, {"host": "127.0.0.1"}))
    assert isinstance(reply, Reply)
    assert json.loads(reply.body)["tun_rx_errors"] == device.injected


async def test_a_deleted_device_ends_serve_with_one_tun_error(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    fd, app_sock = pair
    device = FaultyTun(fd, seed=0)
    device.gone = True
    await app_sock.send(b"\x45")  # readable: the first read finds the device gone
    settings = app.Settings(fake_ip_db=":memory:", stats_interval=0, outbound="direct://")
    # A TunError wrapped in the nurseries' exception groups would reach the
    # command line as a traceback; serve hands it over bare.
    with (
        trio.fail_after(10),  # before the fix, reads failed (and were counted) for ever
        pytest.raises(TunError, match=r"^TUN device fake0 is gone \(deleted or closed\): "),
    ):
        await app.serve(settings, device=device, handle_signals=False)
    assert device.statistics_rx_errors == 0


class SilentOutbound:
    """A proxy that accepts and then never answers: the connect hangs."""

    name = "silent"

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


async def test_an_outbound_that_never_answers_ends_in_host_unreachable(
    autojump_clock: trio.testing.MockClock, pair: tuple[int, trio.socket.SocketType]
) -> None:
    """The held SYN is answered at connect_timeout with ICMP host
    unreachable quoting it, so the application's connect() fails then."""
    fd, app_sock = pair
    device = TunDevice(fd, name="fake0", mtu=1500, offload=False)
    config = EngineConfig(connect_timeout=3.0)
    async with trio.open_nursery() as nursery:
        stack = NetStack(NetStackConfig(tcp=CONFIG))
        engine = Engine(device, stack, Router(SilentOutbound()), config=config)
        await nursery.start(engine.run)
        app = AppSide(app_sock)
        start = trio.current_time()
        syn = _syn()
        await app.send(syn)
        with trio.fail_after(60):  # a hang fails the test instead of hanging it
            packet = parse_packet_untrusted(memoryview(await app_sock.recv(70000)))
        waited = trio.current_time() - start
        stats = engine.statistics()
        nursery.cancel_scope.cancel()
    device.close()
    assert isinstance(packet.l4, IcmpHeader), packet
    assert (packet.l4.type, packet.l4.code) == (3, 1)  # host unreachable
    assert (packet.src, packet.dst) == (REMOTE, APP)
    assert waited == pytest.approx(3.0, abs=0.1)
    assert stats["tcp_outbound_failed"] == 1


class LateReaderTun(TunDevice):
    """A device whose reader sees the engine stop only after every other task.

    On cancellation the engine's reader resets every connection, and the
    flows' tasks close their streams; which runs first is the scheduler's
    choice. This device makes it the flows, every time.
    """

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        try:
            return await super().read_batch(limit)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await trio.testing.wait_all_tasks_blocked()
            raise


class LoopbackEchoOutbound:
    """Connects every flow to an echo server on loopback: a real socket."""

    name = "loopback"

    def __init__(self, port: int) -> None:
        self._port = port

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        return await open_tcp("127.0.0.1", self._port, SocketOptions())

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def test_stopping_the_engine_resets_an_idle_flow(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """An established flow with nothing in flight gets an RST when the engine
    stops, never a FIN: `recv` returning b"" would make a cut-off transfer
    look complete. (The outbound is a real socket, so the splice takes its
    fast path, as in a real run.)"""
    fd, app_sock = pair
    device = LateReaderTun(fd, name="fake0", mtu=1500, offload=False)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1")
        )
        outbound = LoopbackEchoOutbound(listeners[0].socket.getsockname()[1])
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(outbound))
        await nursery.start(engine.run)
        app = AppSide(app_sock)
        conn = await app.handshake()
        # One byte echoed and acknowledged: the flow is spliced, and idle.
        assert conn.send(b"x") == 1
        with trio.fail_after(10):
            while conn.next_event().__class__ is not DataReceived:
                for hdr, data in conn.segments_to_send(trio.current_time()):
                    await app.send(hdr, data)
                hdr, data = await app.receive()
                conn.segment_received(hdr, data, trio.current_time())
        for hdr, data in conn.segments_to_send(trio.current_time()):
            await app.send(hdr, data)
        nursery.cancel_scope.cancel()
    device.close()
    with trio.fail_after(10):
        hdr, _ = await app.receive()
    assert hdr.flags & RST and not hdr.flags & FIN, hdr


async def test_stopping_the_engine_refuses_a_syn_held_while_its_outbound_connects(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """A SYN held while the outbound connects is no connection yet, but its
    application waits in connect(): the stop answers it with an RST, as it
    resets the connections. Unanswered, the application's kernel resends
    the SYN into a device that is gone until its own timeout (two minutes
    on Linux)."""
    fd, app_sock = pair
    device = TunDevice(fd, name="fake0", mtu=1500, offload=False)
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(SilentOutbound()))
        await nursery.start(engine.run)
        app = AppSide(app_sock)
        syn = _syn()
        await app.send(syn)
        with trio.fail_after(10):
            while engine.statistics()["tcp_pending"] != 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    device.close()
    with trio.fail_after(10):
        hdr, _ = await app.receive()
    assert (hdr.flags & (RST | ACK), hdr.ack) == (RST | ACK, _SYN_ACKED), hdr


class UnreadTun(TunDevice):
    """A device whose reader never gets a batch: what arrives stays in it."""

    async def read_batch(self, limit: int = 256) -> list[RxPacket]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_stopping_the_engine_refuses_a_syn_the_device_still_holds(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """A SYN that reached the device as the engine stopped, before the
    reader took it, is refused too, by whoever closes the device (as
    `serve` does): its application waits in connect() as well."""
    fd, app_sock = pair
    device = UnreadTun(fd, name="fake0", mtu=1500, offload=False)
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(SilentOutbound()))
        await nursery.start(engine.run)
        app = AppSide(app_sock)
        syn = _syn()
        await app.send(syn)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    engine.refuse_unread()
    device.close()
    with trio.fail_after(10):
        hdr, _ = await app.receive()
    assert (hdr.flags & (RST | ACK), hdr.ack) == (RST | ACK, _SYN_ACKED), hdr


async def test_a_syn_after_the_engine_stopped_is_refused_before_the_device_closes(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """Between the engine's stop and the device's close applications keep
    connecting; whoever closes the device refuses what it took meanwhile,
    and an old connection's segment gets its RST too."""
    fd, app_sock = pair
    device = TunDevice(fd, name="fake0", mtu=1500, offload=False)
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(SilentOutbound()))
        await nursery.start(engine.run)
        nursery.cancel_scope.cancel()
    app = AppSide(app_sock)
    syn = _syn()
    await app.send(syn)
    await app.send(TcpHeader(APP_PORT + 1, REMOTE_PORT, APP_ISN, 77, ACK, 65535))
    engine.refuse_unread()
    device.close()
    with trio.fail_after(10):
        answers = [(await app.receive())[0] for _ in range(2)]
    assert sorted((h.dst_port, h.flags, h.ack) for h in answers) == [
        (APP_PORT, RST | ACK, _SYN_ACKED),
        (APP_PORT + 1, RST, 0),
    ]
    assert engine.statistics()["tcp_pending"] == 0


async def test_connections_split_ipv6_application_addresses_from_their_port(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """`/connections` gives an IPv6 application's address and port apart
    (the flow keeps `[fd88::2]:35768`, brackets and all, for TCP as for UDP)."""
    fd, app_sock = pair
    app6, remote6 = (
        socket.inet_pton(socket.AF_INET6, "fd88::2"),
        socket.inet_pton(socket.AF_INET6, "2001:db8::7"),
    )
    device = TunDevice(fd, name="fake0", mtu=1500, offload=False)
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(EchoOutbound(nursery)))
        await nursery.start(engine.run)
        syn = TcpHeader(35768, REMOTE_PORT, APP_ISN, 0, SYN, 65535, options=TcpOptions(1400))
        await app_sock.send(build_tcp_packet(app6, remote6, syn))
        with trio.fail_after(10):
            synack = parse_packet_untrusted(memoryview(await app_sock.recv(70000)))
        assert isinstance(synack.l4, TcpHeader) and synack.l4.flags == SYN | ACK
        get = Request("GET", "/connections", {}, {"host": "127.0.0.1"})
        reply = await Controller(engine).answer(get)
        nursery.cancel_scope.cancel()
    device.close()
    assert isinstance(reply, Reply)
    [row] = json.loads(reply.body)["connections"]
    meta = row["metadata"]
    assert (meta["sourceIP"], meta["sourcePort"]) == ("fd88::2", "35768")
    assert (meta["destinationIP"], meta["destinationPort"]) == ("2001:db8::7", str(REMOTE_PORT))


class _SmallBatches(TunDevice):
    """A device whose batches are a few packets: a queue of more than one."""

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        return super().read_ready(min(limit, 4))


async def test_a_syn_queued_behind_more_than_a_batch_is_refused_at_the_stop(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """On a busy machine the device holds more than one batch when the
    engine stops; a SYN behind the others' segments is refused too."""
    fd, app_sock = pair
    device = _SmallBatches(fd, name="fake0", mtu=1500, offload=False)
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(SilentOutbound()))
        await nursery.start(engine.run)
        nursery.cancel_scope.cancel()
    app = AppSide(app_sock)
    for i in range(10):  # segments of flows that are gone: each draws an RST
        await app.send(TcpHeader(APP_PORT + 1 + i, REMOTE_PORT, APP_ISN, 77, ACK, 65535))
    syn = _syn()
    await app.send(syn)
    engine.refuse_unread()
    device.close()
    with trio.fail_after(10):
        answers = [(await app.receive())[0] for _ in range(11)]
    assert (APP_PORT, RST | ACK, _SYN_ACKED) in {(h.dst_port, h.flags, h.ack) for h in answers}
    assert engine.statistics()["tcp_pending"] == 0


async def test_a_syn_a_cap_dropped_is_refused_at_the_stop_like_the_held_one(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    """More applications connecting to one destination than its cap of
    pending SYNs: the SYN over the cap was dropped (its application would
    retry), and at the stop both applications get connection refused;
    the retry would otherwise go into a device that is gone."""
    fd, app_sock = pair
    device = TunDevice(fd, name="fake0", mtu=1500, offload=False)
    config = TcpConfig(mss=1400, max_pending_per_destination=1)
    async with trio.open_nursery() as nursery:
        engine = Engine(device, NetStack(NetStackConfig(tcp=config)), Router(SilentOutbound()))
        await nursery.start(engine.run)
        app = AppSide(app_sock)
        for port in (APP_PORT, APP_PORT + 1):
            syn = _syn(port)
            await app.send(syn)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.statistics()["syn_dropped_per_destination"] == 1
        nursery.cancel_scope.cancel()
    engine.refuse_unread()
    device.close()
    with trio.fail_after(10):
        answers = [(await app.receive())[0] for _ in range(2)]
    assert sorted((h.dst_port, h.flags & (RST | ACK), h.ack) for h in answers) == [
        (APP_PORT, RST | ACK, _SYN_ACKED),
        (APP_PORT + 1, RST | ACK, _SYN_ACKED),
    ]
