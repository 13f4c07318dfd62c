"""TCP flows: from an application's SYN to a spliced, proxied connection.

The application's SYN is held, unanswered, while the outbound connects, so
that what the outbound learns reaches the application as the right error:
a refused connection becomes an RST, an unreachable host or network an ICMP
destination unreachable, never a completed handshake followed by a silent
reset. Only when the outbound is connected does the stack answer SYN-ACK.

Then `splice` copies both ways. A flow to port 53 is served by the DNS
server instead, when DNS hijack is on.

A flow whose host name is to be sniffed (tun2sx.naming.sniff: TLS or
HTTP ports, `EngineConfig.sniff`) goes the other way round: its SYN is
accepted first, its first bytes are read for a bounded time, the name
found routes it (and, in override mode, is what the outbound connects
to), and the bytes read go to the outbound before the splice starts. The
handshake is then already done when the outbound fails, so such a failure
reaches the application as an RST, never as an ICMP error.

Under a SYN flood two things keep other flows going. A SYN the demux
evicts from its full half-open table (see `TcpDemux.take_evicted`) has its
dial cancelled at once. And a destination whose connects keep timing out
(`ConnectTimeouts`) gets new SYNs answered with the time-out's ICMP at
once, without a flow task or a dial, for a short back-off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from outbounds.base import Destination, FailureReply, NowaitStream, OutboundError
from outbounds.group import connect_tcp_traced
from stack.errors import LocalProtocolError
from stack.tcp import ConnectionRequest, FlowKey
from tun2sx.dataplane.context import FlowRoute
from tun2sx.dataplane.loglimit import LogLimit
from tun2sx.dataplane.splice import reset_socket, splice
from tun2sx.dataplane.tcpstream import TcpStream
from tun2sx.dataplane.timeouts import ConnectTimeouts
from tun2sx.naming.sniff import MAX_SNIFF_BYTES, NEED_DATA, Protocol, Sniffed, sniff_stream

if TYPE_CHECKING:
    from outbounds.base import Outbound
    from tun2sx.dataplane.context import FlowContext
    from tun2sx.dataplane.dnsserve import DnsServer

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
    app = _endpoint(key.app_addr, key.app_port)
    return f"{app} -> {_endpoint(key.remote_addr, key.remote_port)}"


def _endpoint(addr: bytes, port: int) -> str:
    if len(addr) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, addr)}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"


# Failure kinds whose lines are limited at once (outbound and message); past
# this the memory starts afresh (destinations' names can be in a message).
_FAILURE_KINDS = 256
_isns: list[int] = []


def _random_isn() -> int:
    """A random initial sequence number (RFC 6528: unpredictable).

    From the system's CSPRNG like `secrets.randbits`, but drawn 256 at a
    time: one system call per connection is a measurable cost.
    """
    if not _isns:
        _isns.extend(struct.unpack("256I", os.urandom(1024)))
    return _isns.pop()


TcpHandler = Callable[[TcpStream, trio.abc.HalfCloseableStream], Awaitable[None]]


class TcpFlows:
    """Starts and runs the TCP flows of one engine."""

    def __init__(
        self,
        engine: FlowContext,
        dns_server: DnsServer,
        handler: TcpHandler | None = None,
        timeouts: ConnectTimeouts | None = None,
    ) -> None:
        self._engine = engine
        self._dns_server = dns_server
        self._unknown_log = LogLimit()
        # A failing outbound's line, by outbound and what failed: an
        # application retrying into a dead proxy would write one a flow.
        self._failure_logs: dict[tuple[str, str], LogLimit] = {}
        self._handler = handler
        self._timeouts = ConnectTimeouts() if timeouts is None else timeouts
        # The flows whose SYN is still pending, by the scope of their dial.
        self._dialing: dict[FlowKey, trio.CancelScope] = {}

    def start(self, request: ConnectionRequest) -> None:
        """A new SYN: run its flow as a task of the engine.

        Only a new request can have evicted a pending SYN, so this is
        where the flows of evicted SYNs are stopped: before the new flow
        starts, which may be the same flow again.
        """
        engine = self._engine
        for key in engine.stack.tcp.take_evicted():
            scope = self._dialing.pop(key, None)
            if scope is not None:
                scope.cancel()
        key = request.key
        if not engine.stack.tcp.is_pending(key):
            return  # evicted by a later SYN of the same batch
        now = trio.current_time()
        if self._timeouts.failing((key.remote_addr, key.remote_port), now):
            engine.counters["tcp_connect_fast_failures"] += 1
            self._fail(request, FailureReply.HOST_UNREACHABLE)
            return
        # The held SYN's connect time-out counts from its arrival; the
        # deadline given at construction spares the setter's bookkeeping.
        scope = trio.CancelScope(deadline=now + engine.config.connect_timeout)
        self._dialing[key] = scope
        engine.nursery.start_soon(self._run_guarded, request, scope, now)

    async def _run_guarded(
        self, request: ConnectionRequest, scope: trio.CancelScope, now: float
    ) -> None:
        engine = self._engine
        engine.counters["tcp_flows_started"] += 1
        try:
            await self._run(request, scope, now)
        except Exception:
            # A bug in one flow must not take the others down: log it loudly
            # and reset this flow only.
            engine.counters["tcp_flow_errors"] += 1
            log.exception("TCP %s: flow failed", describe(request.key))
            stream = engine.streams.pop(request.key, None)
            if stream is not None:
                stream.abort()
        finally:
            # Absent, or ours: a SYN still pending for the key is this
            # flow's (after an eviction a later flow's scope is there).
            owner = self._dialing.get(request.key, scope) is scope
            if self._dialing.get(request.key) is scope:
                del self._dialing[request.key]
            if owner and engine.stack.tcp.is_pending(request.key):
                # Cut short with its SYN still held (the engine stops while
                # the outbound connects): its application waits in
                # connect() and would resend the SYN into a device about
                # to go until its own timeout. Refused, connect() fails now.
                engine.stack.tcp.refuse(request.key, trio.current_time())
                with contextlib.suppress(OSError):  # the device may be gone
                    engine.flush()

    async def _run(self, request: ConnectionRequest, scope: trio.CancelScope, now: float) -> None:
        """The held SYN's flow; `now` is when the SYN came (trio time): the
        dial's time-out counts from it."""
        engine = self._engine
        key = request.key
        if self._dialing.get(key) is not scope:
            # Evicted before it started (eviction takes the scope out of
            # `_dialing`; asking the scope itself reads the clock).
            return
        if (
            key.remote_port == 53
            and engine.dns is not None
            and engine.config.answers_dns(key.remote_addr)
        ):
            await self._serve_dns(request)
            return
        dest = engine.destination_for(key.remote_addr, key.remote_port)
        if dest is None:
            held = self._unknown_log.allow(trio.current_time())
            if held is not None:
                log.warning(
                    "TCP %s: fake IP has no host name (mapping lost or never handed out); "
                    "resetting%s",
                    describe(key),
                    LogLimit.suffix(held),
                )
            engine.counters["tcp_unknown_fake_ip"] += 1
            self._fail(request, FailureReply.RESET)
            return
        protocols = engine.config.sniff.stream_protocols(
            key.remote_port, fake_ip=isinstance(dest.host, str)
        )
        if protocols:
            await self._run_sniffed(request, scope, dest, protocols)
            return
        name, source = engine.real_names.known_name(dest.host, now)
        outbound, rule = engine.decide(dest, "tcp", name)
        if outbound is None:
            log.info("TCP %s (%s): rejected by rule", describe(key), dest)
            self._fail(request, FailureReply.RESET)
            return
        dialled = await self._dial(key, dest, outbound, scope, held=True)
        if dialled is None:
            return
        if isinstance(dialled, FailureReply):
            self._fail(request, dialled)
            return
        del self._dialing[key]
        upstream, chain = dialled
        if log.isEnabledFor(logging.DEBUG):
            # describe() formats two addresses: not worth it per flow unless shown.
            log.debug("TCP %s (%s) via %s: connected", describe(key), dest, outbound.name)
        try:
            stream = self._accept(request)
        except (KeyError, LocalProtocolError):
            # The pending SYN expired (or was flushed) while we dialled.
            await trio.aclose_forcefully(upstream)
            return
        await self._carry(
            key, stream, upstream, dest, outbound, FlowRoute(None, source, rule, chain)
        )

    async def _dial(
        self,
        key: FlowKey,
        dest: Destination,
        outbound: Outbound,
        scope: trio.CancelScope,
        *,
        held: bool,
    ) -> tuple[trio.abc.HalfCloseableStream, tuple[str, ...]] | FailureReply | None:
        """Connect to `dest` through `outbound` within the connect time-out.

        Both ways in (a held SYN, an accepted and sniffed flow) share this so
        that failures are logged, counted and remembered alike.

        Args:
            key: the flow, for log lines and the time-out memory.
            dest: where to connect.
            outbound: the outbound the rules chose.
            scope: the dial's cancel scope, its deadline the connect
                time-out (for a held SYN, from the SYN's arrival); for a
                held SYN it is the one the demux's eviction cancels.
            held: the flow is still a pending SYN in `_dialing`.

        Returns:
            The connected stream and the chain of outbounds it went
            through; on a failure (already logged and counted) the reply
            the application should get; None when the demux evicted the
            held SYN meanwhile (nothing is left to answer).
        """
        engine = self._engine
        upstream = None
        dialled = trio.current_time()  # the histogram's start: the dial's, not the SYN's
        try:
            with scope:
                upstream, chain = await connect_tcp_traced(
                    outbound, dest, engine.router.name_of(outbound)
                )
        except OutboundError as exc:
            if held and self._dialing.get(key) is not scope:
                return None
            self._log_failure(key, dest, outbound.name, str(exc))
            engine.counters["tcp_outbound_failed"] += 1
            return exc.reply
        if held and self._dialing.get(key) is not scope:
            # The demux evicted the SYN to make room for another flow's.
            engine.counters["tcp_dials_cancelled_evicted"] += 1
            if upstream is not None:
                await trio.aclose_forcefully(upstream)
            return None
        address = (key.remote_addr, key.remote_port)
        if upstream is None:
            self._log_failure(key, dest, outbound.name, "connect timed out")
            engine.counters["tcp_outbound_failed"] += 1
            self._timeouts.timed_out(address, trio.current_time())
            return FailureReply.HOST_UNREACHABLE
        self._timeouts.connected(address)
        # Per leaf outbound: the proxy a group picked, not the group.
        engine.connect_times.observe(chain[0], trio.current_time() - dialled)
        return upstream, chain

    def _log_failure(self, key: FlowKey, dest: Destination, outbound: str, what: str) -> None:
        """The flow's line for a failed outbound set-up: the first of its kind
        (outbound and failure) at once, then one per interval with the count
        it stands for."""
        limits = self._failure_logs
        limit = limits.get((outbound, what))
        if limit is None:
            if len(limits) >= _FAILURE_KINDS:
                limits.clear()
            limit = limits[outbound, what] = LogLimit()
        held = limit.allow(trio.current_time())
        if held is not None:
            log.info(
                "TCP %s (%s) via %s: %s%s",
                describe(key),
                dest,
                outbound,
                what,
                LogLimit.suffix(held),
            )

    async def _carry(
        self,
        key: FlowKey,
        stream: TcpStream,
        upstream: trio.abc.HalfCloseableStream,
        dest: Destination,
        outbound: Outbound,
        route: FlowRoute,
        first: bytes = b"",
    ) -> None:
        """Splice a connected flow until it ends; `first` (what sniffing
        read) goes to the outbound before anything else."""
        engine = self._engine
        app = _endpoint(key.app_addr, key.app_port)
        info = engine.open_flow("tcp", app, dest, engine.router.name_of(outbound), route)
        finished = False
        try:
            if first:
                # The controller's close cancels this scope: the flow then
                # ends as one cut short, with a reset to both ends.
                with trio.CancelScope() as cut:
                    info.closer = cut.cancel
                    try:
                        await upstream.send_all(first)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        log.info("TCP %s (%s): outbound broke: %s; reset", describe(key), dest, exc)
                        return  # unfinished: both ends are reset below
                if cut.cancelled_caught:
                    return
                info.bytes_up += len(first)
            if self._handler is None:
                # The splice takes the controller's close itself (it sets
                # `info.closer`): it breaks the flow, a reset to both ends,
                # with the cancel scope it has anyway; no scope of our own.
                await splice(stream, upstream, engine.config.splice_buffer, info, engine.read_size)
            else:
                with trio.CancelScope() as cut:
                    info.closer = cut.cancel
                    await self._handler(stream, upstream)
                if cut.cancelled_caught:
                    return
            finished = True
        finally:
            engine.close_flow(info)
            if not finished:
                # Cut short (the engine stopping, a bug): both ends get a
                # reset, never a FIN, which would make the cut look like
                # the end of the data.
                stream.abort()
                reset_socket(upstream)
            if isinstance(upstream, NowaitStream):
                upstream.close_now()
            else:
                await trio.aclose_forcefully(upstream)
            stream.close_now()
            if finished:
                # Our FIN went out in the last step: the application's
                # kernel ACKed it within that write.
                engine.take_ready()
            self._forget(key, stream)

    async def _run_sniffed(
        self,
        request: ConnectionRequest,
        scope: trio.CancelScope,
        dest: Destination,
        protocols: tuple[Protocol, ...],
    ) -> None:
        """Accept, read the first bytes for a name, then route and connect."""
        engine = self._engine
        key = request.key
        try:
            stream = self._accept(request)
        except (KeyError, LocalProtocolError):
            return  # the pending SYN expired meanwhile
        # Accepted: no longer a pending SYN that eviction could cancel.
        if self._dialing.get(key) is scope:
            del self._dialing[key]
        upstream: trio.abc.HalfCloseableStream | None = None
        try:
            first, sniffed = await self._sniff(stream, protocols)
            config = engine.config.sniff
            name: str | None
            route_dest = dest
            if sniffed is not None:
                engine.counters[f"sniffed_{sniffed.protocol.value}"] += 1
                name, source = sniffed.host, "sniffed"
                if config.mode == "override":
                    dest = route_dest = Destination(sniffed.host, dest.port)
                elif isinstance(dest.host, str):
                    # A fake IP's name: the sniffed one decides the rules.
                    route_dest = Destination(sniffed.host, dest.port)
            else:
                engine.counters["sniff_misses"] += 1
                name, source = engine.real_names.known_name(dest.host, trio.current_time())
            outbound, rule = engine.decide(route_dest, "tcp", name)
            if outbound is None:
                log.info("TCP %s (%s): rejected by rule; reset", describe(key), name or dest)
                stream.abort()
                return
            # A bare cancel scope rather than trio.fail_after (a generator
            # context manager), its deadline given at construction.
            scope = trio.CancelScope(deadline=trio.current_time() + engine.config.connect_timeout)
            dialled = await self._dial(key, dest, outbound, scope, held=False)
            if not isinstance(dialled, tuple):
                stream.abort()
                return
            upstream, chain = dialled
        except trio.BrokenResourceError:
            # The application reset while we read its first bytes.
            return
        finally:
            if upstream is None:
                stream.close_now()
                self._forget(key, stream)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "TCP %s (%s, %s %s) via %s: connected",
                describe(key),
                dest,
                source,
                name,
                outbound.name,
            )
        await self._carry(
            key, stream, upstream, dest, outbound, FlowRoute(sniffed, source, rule, chain), first
        )

    async def _sniff(
        self, stream: TcpStream, protocols: tuple[Protocol, ...]
    ) -> tuple[bytes, Sniffed | None]:
        """Read until the first bytes name a host, are not recognised, end,
        or the sniff time-out passes; return what was read and the name."""
        first = bytearray()
        result = None
        with trio.move_on_after(self._engine.config.sniff.timeout):
            while True:
                data = await stream.receive_some(MAX_SNIFF_BYTES - len(first))
                if not data:
                    break  # the application's EOF: the splice passes it on
                first += data
                found = sniff_stream(first, protocols)
                if found is not NEED_DATA:
                    result = found
                    break
        return bytes(first), result

    def _accept(self, request: ConnectionRequest) -> TcpStream:
        engine = self._engine
        conn = engine.stack.tcp.accept(request.key, _random_isn(), trio.current_time())
        stream = TcpStream(engine, conn)
        engine.streams[request.key] = stream
        engine.flush()
        # The SYN-ACK's ACK came back within the write: it completes the
        # handshake now rather than in a wake-up of the reader of its own.
        engine.take_ready()
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
        stream = self._accept(request)
        try:
            await self._dns_server.serve_stream(stream)
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
