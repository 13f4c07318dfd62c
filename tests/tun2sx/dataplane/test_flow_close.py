"""The controller's close of a TCP flow, and a flow's place in the live-flow list.

A flow is listed (`Engine.flows`, what /connections shows) from its
connect until it ends, and then not; its bytes go to the totals. Closing
it (`FlowInfo.close`, what DELETE /connections does) resets both ends:
the application gets an RST, the outbound's peer a reset, never a FIN.
The splice takes the close itself, both while the upload runs in the
engine's wake-ups (an outbound socket) and in a task of its own (an
outbound that must wait to send, here in-memory streams).

The application is played over a socketpair "TUN" (tests.support.app).
"""

from __future__ import annotations

import gc
import socket

import pytest
import trio
import trio.testing

from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConnection
from stack.wire.tcp import ACK, RST, TcpHeader
from tests.support.app import APP_PORT, CONFIG, AppSide
from tests.support.outbounds import EchoOutbound, LoopbackOutbound
from tun2sx.dataplane.context import FlowInfo
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice
from tun2sx.naming.router import Router


async def _send(app: AppSide, conn: TcpConnection, data: bytes) -> None:
    conn.send(data)
    for hdr, payload in conn.segments_to_send(trio.current_time()):
        await app.send(hdr, payload)


async def _until_reset(app: AppSide) -> TcpHeader:
    """What the engine sends until its RST (ACKs and data may come first)."""
    with trio.fail_after(10):
        while True:
            hdr, _ = await app.receive()
            if hdr.flags & RST:
                return hdr


async def _echoing_server(listener: trio.SocketListener, results: dict[str, object]) -> None:
    server = await listener.accept()
    results["accepted"] = True
    try:
        while data := await server.receive_some(100):
            await server.send_all(data)
        results["end"] = "eof"
    except trio.BrokenResourceError as exc:
        results["end"] = type(exc.__cause__).__name__
    await server.aclose()


@pytest.mark.parametrize("outbound_kind", ["socket", "memory"])
async def test_a_closed_flow_resets_both_ends_and_leaves_the_list(outbound_kind: str) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    app = AppSide(trio.socket.from_stdlib_socket(theirs))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        if outbound_kind == "socket":
            outbound: object = LoopbackOutbound(listeners[0].socket.getsockname()[1])
            nursery.start_soon(_echoing_server, listeners[0], results)
        else:
            outbound = EchoOutbound(nursery)
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(outbound))  # type: ignore[arg-type]
        await nursery.start(engine.run)
        with trio.fail_after(10):
            conn = await app.handshake()
            await _send(app, conn, b"x")
            _, data = await app.receive()
            while not data:
                _, data = await app.receive()
            assert data == b"x"
            await trio.testing.wait_all_tasks_blocked()
            (info,) = engine.flows
            assert isinstance(info, FlowInfo)
            assert (info.app, info.bytes_up, info.bytes_down) == (f"10.0.0.2:{APP_PORT}", 1, 1)
            assert info.close()
            rst = await _until_reset(app)
            assert rst.dst_port == APP_PORT
            while engine.flows or engine.streams:
                await trio.sleep(0.01)
        stats = engine.statistics()
        if outbound_kind == "socket":
            with trio.fail_after(10):
                while "end" not in results:
                    await trio.sleep(0.01)
            # A reset, not the end of the data.
            assert results["end"] == "ConnectionResetError"
        nursery.cancel_scope.cancel()
    assert (stats["bytes_up"], stats["bytes_down"], stats["tcp_flows"]) == (1, 1, 0)
    assert stats.get("tcp_flow_errors", 0) == 0
    device.close()
    theirs.close()
    for listener in listeners:
        await listener.aclose()


async def test_a_flow_is_listed_while_open_and_gone_after_its_end() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    app = AppSide(trio.socket.from_stdlib_socket(theirs))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echoing_server, listeners[0], results)
        outbound = LoopbackOutbound(listeners[0].socket.getsockname()[1])
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(outbound))  # type: ignore[arg-type]
        await nursery.start(engine.run)
        with trio.fail_after(10):
            assert not engine.flows
            conn = await app.handshake()
            while "accepted" not in results:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert [info.app for info in engine.flows] == [f"10.0.0.2:{APP_PORT}"]
            conn.close()
            for hdr, payload in conn.segments_to_send(trio.current_time()):
                await app.send(hdr, payload)
            # The server's EOF comes back as our FIN; the application ACKs it.
            while True:
                hdr, _ = await app.receive()
                conn.segment_received(hdr, b"", trio.current_time())
                if conn.state.name in ("TIME_WAIT", "CLOSED"):
                    break
            for hdr, payload in conn.segments_to_send(trio.current_time()):
                assert hdr.flags & ACK
                await app.send(hdr, payload)
            while engine.flows or engine.streams:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert results["end"] == "eof"
    device.close()
    theirs.close()
    for listener in listeners:
        await listener.aclose()


async def test_a_finished_flow_leaves_no_cycle_behind() -> None:
    """A flow's objects are freed when it ends, not by the cyclic collector:
    a cycle per flow (its connection, streams, socket) costs every
    connection a share of a collector pass and holds memory until then."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    app = AppSide(trio.socket.from_stdlib_socket(theirs))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    results: dict[str, object] = {}
    ours_types = ("TcpConnection", "TcpStream", "TcpSocketStream", "_Splice", "FlowInfo")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echoing_server, listeners[0], results)
        outbound = LoopbackOutbound(listeners[0].socket.getsockname()[1])
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(outbound))  # type: ignore[arg-type]
        await nursery.start(engine.run)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            with trio.fail_after(10):
                assert await app.echo(b"x") == b"x"
                while engine.flows or engine.streams or "end" not in results:
                    await trio.sleep(0.01)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage if type(o).__name__ in ours_types]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        nursery.cancel_scope.cancel()
    assert left == []
    device.close()
    theirs.close()
    for listener in listeners:
        await listener.aclose()
