"""The timeline hooks still fit the flow code they wrap.

`bench timeline` wraps private methods of the flow code; when one of them
changes its arguments, every flow fails under the hooks and the bench
reports 0 connections/s. Here the hooks wrap an in-process engine (a
socketpair "TUN", the application played by tests.support.app) and one
connection goes through a SOCKS5 proxy that echoes: its waypoints must be
recorded in order, and the connection must work as without the hooks.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from outbounds import net, socks5
from outbounds.net import SocketOptions
from outbounds.socks5 import Socks5Outbound, build_reply, parse_request_untrusted
from stack.netstack import NetStack, NetStackConfig
from tests.bench import timeline_hooks
from tests.support.app import CONFIG, AppSide
from tun2sx.dataplane import engine as engine_module
from tun2sx.dataplane import tcpflow, tun
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice
from tun2sx.naming.router import Router

# Every place the hooks replace, so that the test can put the originals back.
_WRAPPED = [
    (tcpflow.TcpFlows, "start"),
    (tcpflow.TcpFlows, "_run_guarded"),
    (tcpflow.TcpFlows, "_accept"),
    (socks5.Socks5Outbound, "_take_spare"),
    (socks5, "open_tcp"),
    (tun.TunDevice, "write"),
    (engine_module.Engine, "run"),
    *(
        (net.TcpSocketStream, name)
        for name in (
            "receive_after_wait",
            "receive_some",
            "send_nowait",
            "send_eof_nowait",
            "close_now",
        )
    ),
]


async def _echoing_proxy(stream: trio.SocketStream) -> None:
    """A SOCKS5 server that answers the CONNECT itself and echoes."""
    buf = bytearray()
    while len(buf) < 2 or len(buf) < buf[1] + 2:
        buf += await stream.receive_some(512)
    del buf[: buf[1] + 2]
    await stream.send_all(b"\x05\x00")
    while (parsed := parse_request_untrusted(buf)) is None:
        buf += await stream.receive_some(512)
    await stream.send_all(build_reply(0, parsed[1]))
    del buf[: parsed[2]]
    if buf:
        await stream.send_all(bytes(buf))
    while data := await stream.receive_some(512):
        await stream.send_all(data)
    await stream.send_eof()


async def test_one_connection_records_its_waypoints(monkeypatch: pytest.MonkeyPatch) -> None:
    for owner, name in _WRAPPED:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    timeline_hooks.wrap()
    before = len(timeline_hooks.recorded()["flows"])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="pair0", mtu=1500, offload=False)
    app = AppSide(trio.socket.from_stdlib_socket(theirs))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), _echoing_proxy, 0
        )
        proxy = Socks5Outbound(
            "127.0.0.1",
            listeners[0].socket.getsockname()[1],
            socket_options=SocketOptions(connect_timeout=5),
        )
        engine = Engine(device, NetStack(NetStackConfig(tcp=CONFIG)), Router(proxy))
        await nursery.start(engine.run)
        with trio.fail_after(10):
            assert await app.echo(b"x") == b"x"
            while engine.streams or engine.flows:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    device.close()
    record = timeline_hooks.recorded()
    (events,) = record["flows"][before:]
    names = [name for name, _ in events]
    order = ["syn", "task", "dial", "connected", "syn-ack out", "end"]
    assert [name for name in names if name in order] == order, names
    assert {"proxy send", "proxy recv", "proxy close"} <= set(names), names
    stamps = [t for _, t in events]
    assert stamps == sorted(stamps)
    # The SYN-ACK, the echoed byte and the FIN at least went through the TUN.
    assert sum(name == "tun write" for name, _ in record["io"]) >= 3
