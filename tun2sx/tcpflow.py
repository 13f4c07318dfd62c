"""TCP flows: from an application's SYN to a spliced, proxied connection.

The application's SYN is held, unanswered, while the outbound connects, so
that what the outbound learns reaches the application as the right error:
a refused connection becomes an RST, an unreachable host or network an ICMP
destination unreachable, never a completed handshake followed by a silent
reset. Only when the outbound is connected does the stack answer SYN-ACK.

Then the flow copies both ways with half-close: the application's FIN
becomes `send_eof` on the outbound and the outbound's EOF becomes our FIN.
A reset on either side resets the other.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from outbounds.base import FailureReply, OutboundError
from outbounds.net import close_now
from stack.errors import LocalProtocolError
from stack.tcp import ConnectionRequest, FlowKey
from tun2sx.tcpstream import TcpStream

if TYPE_CHECKING:
    from tun2sx.engine import Engine, FlowInfo

log = logging.getLogger("tun2sx.tcp")

# ICMP codes per failure, (v4 type/code, v6 type/code).
_ICMP_FOR_REPLY = {
    FailureReply.HOST_UNREACHABLE: ((3, 1), (1, 3)),
    FailureReply.NET_UNREACHABLE: ((3, 0), (1, 0)),
    FailureReply.PORT_UNREACHABLE: ((3, 3), (1, 4)),
    FailureReply.ADMIN_PROHIBITED: ((3, 13), (1, 1)),
}


def describe(key: FlowKey) -> str:
    """`app:port -> dst:port`, for log lines."""
    app = socket.inet_ntop(
        socket.AF_INET if len(key.app_addr) == 4 else socket.AF_INET6, key.app_addr
    )
    dst = socket.inet_ntop(
        socket.AF_INET if len(key.remote_addr) == 4 else socket.AF_INET6, key.remote_addr
    )
    return f"{app}:{key.app_port} -> {dst}:{key.remote_port}"


TcpHandler = Callable[[TcpStream, trio.abc.HalfCloseableStream], Awaitable[None]]


class TcpFlows:
    """Starts and runs the TCP flows of one engine."""

    def __init__(self, engine: Engine, handler: TcpHandler | None = None) -> None:
        self._engine = engine
        self._handler = handler

    def start(self, request: ConnectionRequest) -> None:
        """A new SYN: run its flow as a task of the engine."""
        self._engine.nursery.start_soon(self._run_guarded, request)

    async def _run_guarded(self, request: ConnectionRequest) -> None:
        engine = self._engine
        engine.counters["tcp_flows_started"] += 1
        try:
            await self._run(request)
        except Exception:
            # A bug in one flow must not take the others down: log it loudly
            # and reset this flow only.
            engine.counters["tcp_flow_errors"] += 1
            log.exception("TCP %s: flow failed", describe(request.key))
            stream = engine.streams.pop(request.key, None)
            if stream is not None:
                stream.abort()

    async def _run(self, request: ConnectionRequest) -> None:
        engine = self._engine
        key = request.key
        if engine.config.dns_hijack and engine.dns is not None and key.remote_port == 53:
            await self._serve_dns(request)
            return
        dest = engine.destination_for(key.remote_addr, key.remote_port)
        if dest is None:
            log.warning(
                "TCP %s: fake IP has no host name (mapping lost or never handed out); resetting",
                describe(key),
            )
            engine.counters["tcp_unknown_fake_ip"] += 1
            self._fail(request, FailureReply.RESET)
            return
        outbound = engine.router.route(dest, "tcp")
        if outbound is None:
            log.info("TCP %s (%s): rejected by rule", describe(key), dest)
            self._fail(request, FailureReply.RESET)
            return
        upstream = None
        try:
            # A bare cancel scope rather than trio.fail_after (a generator
            # context manager): this runs once per connection.
            with trio.CancelScope(deadline=trio.current_time() + engine.config.connect_timeout):
                upstream = await outbound.connect_tcp(dest)
        except OutboundError as exc:
            log.info("TCP %s (%s) via %s: %s", describe(key), dest, outbound.name, exc)
            engine.counters["tcp_outbound_failed"] += 1
            self._fail(request, exc.reply)
            return
        if upstream is None:
            log.info("TCP %s (%s) via %s: connect timed out", describe(key), dest, outbound.name)
            engine.counters["tcp_outbound_failed"] += 1
            self._fail(request, FailureReply.HOST_UNREACHABLE)
            return
        if log.isEnabledFor(logging.DEBUG):
            # describe() formats two addresses: not worth it per flow unless shown.
            log.debug("TCP %s (%s) via %s: connected", describe(key), dest, outbound.name)
        try:
            stream = self._accept(request)
        except (KeyError, LocalProtocolError):
            # The pending SYN expired (or was flushed) while we dialled.
            await trio.aclose_forcefully(upstream)
            return
        app = describe(key).partition(" -> ")[0]
        info = engine.open_flow("tcp", app, dest, engine.router.name_of(outbound))
        try:
            if self._handler is None:
                await splice(stream, upstream, engine.config.splice_buffer, info)
            else:
                await self._handler(stream, upstream)
        finally:
            engine.close_flow(info)
            if not close_now(upstream):
                await trio.aclose_forcefully(upstream)
            stream.close_now()
            self._forget(key, stream)

    def _accept(self, request: ConnectionRequest) -> TcpStream:
        engine = self._engine
        conn = engine.stack.tcp.accept(request.key, secrets.randbits(32), trio.current_time())
        stream = TcpStream(engine, conn)
        engine.streams[request.key] = stream
        engine.flush()
        return stream

    def _fail(self, request: ConnectionRequest, reply: FailureReply) -> None:
        """Answer a held SYN with the error the outbound reported."""
        engine = self._engine
        now = trio.current_time()
        codes = _ICMP_FOR_REPLY.get(reply)
        if codes is None:
            engine.stack.tcp.refuse(request.key, now)
        else:
            v4, v6 = codes
            type_, code = v4 if len(request.key.app_addr) == 4 else v6
            engine.stack.tcp.forget_pending(request.key)
            engine.stack.send_icmp_error(
                engine.stack.rebuild_syn(request), request.key.remote_addr, type_, code
            )
        engine.flush()

    async def _serve_dns(self, request: ConnectionRequest) -> None:
        """DNS over TCP to port 53: answered by the fake-IP DNS, locally."""
        engine = self._engine
        stream = self._accept(request)
        try:
            await engine.udp.serve_dns_stream(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self._forget(request.key, stream)

    def _forget(self, key: FlowKey, stream: TcpStream) -> None:
        """Drop a closed stream whose connection is already gone.

        The engine forgets a stream when a packet or timer touches its
        connection after the flow closed it; when the connection died
        first (the application's last ACK came while the outbound was
        still closing), nothing will touch it again, so the flow does it.
        """
        streams = self._engine.streams
        if stream.finished and streams.get(key) is stream:
            del streams[key]


async def splice(
    app: TcpStream,
    upstream: trio.abc.HalfCloseableStream,
    bufsize: int,
    info: FlowInfo | None = None,
) -> None:
    """Copy both ways until both sides have sent EOF, or either breaks.

    A break on one side (reset, error) resets the other: the application
    gets an RST, the outbound socket is closed with SO_LINGER 0 when it is a
    plain socket, so both ends learn the flow failed rather than ended.
    """
    broken = False

    async def pump(
        src: trio.abc.ReceiveStream,
        dst: trio.abc.HalfCloseableStream,
        cancel: trio.CancelScope,
        up: bool,
    ) -> None:
        nonlocal broken
        # Streams that can send without a checkpoint do so first: every
        # receive here already yields, and a short flow spends a good part
        # of its CPU on trips through the scheduler.
        send_nowait = getattr(dst, "send_nowait", None)
        send_eof_nowait = getattr(dst, "send_eof_nowait", None)
        try:
            while True:
                data = await src.receive_some(bufsize)
                if not data:
                    break
                sent = 0 if send_nowait is None else send_nowait(data)
                if sent < len(data):
                    await dst.send_all(memoryview(data)[sent:] if sent else data)
                # Counted once sent, per chunk of up to `bufsize`: cheap.
                if info is not None:
                    if up:
                        info.bytes_up += len(data)
                    else:
                        info.bytes_down += len(data)
            if send_eof_nowait is None:
                await dst.send_eof()
            else:
                send_eof_nowait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            broken = True
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, app, upstream, nursery.cancel_scope, True)
        # The other direction runs in this task: one task spawn less per flow.
        await pump(upstream, app, nursery.cancel_scope, False)
    if broken:
        app.abort()
        _reset_socket(upstream)


def _reset_socket(stream: trio.abc.Stream) -> None:
    sock = getattr(stream, "socket", None)
    if sock is not None:
        # Close with RST instead of FIN so the far side sees a failure.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
