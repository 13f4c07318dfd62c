"""UDP sessions and DNS: datagrams from applications to the outbounds.

A session exists per application source endpoint (address, port) and is
full-cone: once open, replies from any remote endpoint reach the
application. It ends after `udp_idle_timeout` without traffic.

Datagrams move at packet rates, so neither direction has a channel or a
task switch per datagram (either costs more than the rest of a datagram's
way in CPython):

- Uplink: the engine's reader hands each datagram to its session, which
  sends it at once with the outbound's non-waiting send (SOCKS5 header or
  Shadowsocks encryption inline). Only while the session is being set up
  (the UDP ASSOCIATE handshake), or while a name is resolved (direct), do
  datagrams wait, in a small bounded queue; a full queue drops and counts.
- Downlink: the session's task waits until the outbound's socket is
  readable, takes every datagram waiting, turns each into a packet for the
  application, and flushes the engine once for the whole batch.

Every place a datagram can be lost has a counter (see `statistics`).

Datagrams to port 53 go to the DNS server (`dnsserve`) when DNS hijack is
on, never to a session.

A session whose first datagram goes to a QUIC port (`EngineConfig.sniff`)
is routed only once its QUIC Initials have given the ClientHello's name
(tun2sx.naming.quic), or the sniff time-out has passed: the datagrams wait
in the set-up queue meanwhile, as they would for the outbound's set-up.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import trio

from outbounds.base import Destination, FailureReply, OutboundError, UdpDrops, reply_for_oserror
from outbounds.group import open_udp_traced
from stack.netstack import UdpDatagram
from stack.wire import icmp
from stack.wire.packet import build_udp_packet
from tun2sx.dataplane.context import FlowRoute
from tun2sx.dataplane.loglimit import LogLimit
from tun2sx.naming.sniff import NEED_DATA, Sniffed, SniffResult

if TYPE_CHECKING:
    from outbounds.base import UdpSession
    from tun2sx.dataplane.context import FlowContext, FlowInfo
    from tun2sx.dataplane.dnsserve import DnsServer

log = logging.getLogger("tun2sx.udp")

# Datagrams held while a session is set up: a handshake's worth of a fast
# sender (a few ms at tens of thousands per second is more than the
# application would wait for anyway).
SETUP_QUEUE = 256
# Datagrams taken from the outbound's socket at once (its buffer is what
# absorbs a burst). Each batch is written into the TUN back to back and the
# kernel delivers it straight into the application's socket: 64 QUIC-sized
# datagrams (about 150 KB of kernel accounting) fit the default 208 KB
# receive buffer; 256 overflowed it while the application had no chance
# to read in between.
RECEIVE_BATCH = 64
# Fake-IP destinations a session remembers (one lookup each, not one per datagram).
_DEST_CACHE = 256
# The ICMP destination unreachable (v4 code, v6 code) an application gets
# when its session's outbound fails. A refusal or a dropped association is
# the UDP analogue of a TCP RST: port unreachable (ECONNREFUSED).
_ICMP_CODES = {
    FailureReply.RESET: (3, 4),
    FailureReply.PORT_UNREACHABLE: (3, 4),
    FailureReply.HOST_UNREACHABLE: (1, 3),
    FailureReply.NET_UNREACHABLE: (0, 0),
    FailureReply.ADMIN_PROHIBITED: (13, 1),
}
_EXPECTED_FAILURES = (OutboundError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Session:
    """One application endpoint's session: what the reader and its task share."""

    __slots__ = (
        "app_addr",
        "app_port",
        "dests",
        "info",
        "last_active",
        "last_src",
        "last_src_addr",
        "last_to_by_port",
        "pending",
        "scope",
        "sent_to",
        "upstream",
        "wakeup",
    )

    def __init__(self, app_addr: bytes, app_port: int, now: float) -> None:
        self.app_addr = app_addr
        self.app_port = app_port
        self.scope = trio.CancelScope()
        self.last_active = now
        # Set once the outbound is open; until then datagrams wait in `pending`.
        self.upstream: UdpSession | None = None
        self.pending: deque[tuple[bytes, int, bytes]] = deque()
        self.wakeup = trio.Event()  # set when `pending` gets a datagram
        # (address, port) the application used -> where it goes.
        self.dests: dict[tuple[bytes, int], Destination] = {}
        # Replies come back with the address the proxy used, often the real
        # IP behind a fake one: map them to what the application sent to.
        self.sent_to: dict[tuple[str, int], bytes] = {}
        self.last_to_by_port: dict[int, bytes] = {}
        # The last reply source and its mapping: a flow hears from one peer
        # for long stretches (the outbound hands back the same object).
        self.last_src: Destination | None = None
        self.last_src_addr = b""
        self.info: FlowInfo | None = None  # set once the outbound is open


class UdpFlows:
    """Runs the UDP sessions and the DNS answers of one engine."""

    def __init__(self, engine: FlowContext, dns_server: DnsServer) -> None:
        self._engine = engine
        self._dns_server = dns_server
        self._unknown_log = LogLimit()
        self.sessions: dict[tuple[bytes, int], _Session] = {}
        self.datagrams_up = 0  # handed to an outbound
        self.datagrams_down = 0  # turned into packets for applications
        self.setup_queue_drops = 0  # the set-up queue was full
        self.session_end_drops = 0  # still waiting when their session ended
        # Drops of sessions that ended (live ones are read on demand).
        self._ended_drops = UdpDrops()

    def statistics(self) -> dict[str, int]:
        """Datagram counts and drops of every session, ended or live."""
        send, receive, malformed = self._ended_drops
        for session in self.sessions.values():
            if session.upstream is not None:
                drops = session.upstream.drops()
                send += drops.send_full
                receive += drops.receive_overflow
                malformed += drops.malformed
        return {
            "udp_datagrams_up": self.datagrams_up,
            "udp_datagrams_down": self.datagrams_down,
            "udp_setup_queue_drops": self.setup_queue_drops,
            "udp_session_end_drops": self.session_end_drops,
            "udp_send_drops": send,
            "udp_receive_drops": receive,
            "udp_malformed_drops": malformed,
        }

    def datagram(self, dgram: UdpDatagram, now: float) -> None:
        """Route one datagram from an application (called by the reader)."""
        engine = self._engine
        if dgram.dst_port == 53 and engine.dns is not None and engine.config.answers_dns(dgram.dst):
            self._dns_server.datagram(dgram)
            return
        key = (dgram.src, dgram.src_port)
        session = self.sessions.get(key)
        if session is None:
            session = _Session(dgram.src, dgram.src_port, now)
            self.sessions[key] = session
            engine.nursery.start_soon(self._run_session, session)
        session.last_active = now
        upstream = session.upstream
        if upstream is None or session.pending:
            self._hold(session, dgram.dst, dgram.dst_port, dgram.payload)
            return
        dest = session.dests.get((dgram.dst, dgram.dst_port))
        if dest is None:
            dest = self._destination(session, dgram.dst, dgram.dst_port)
            if dest is None:
                return
        payload = dgram.payload
        try:
            sent = upstream.send_to_nowait(payload, dest)
        except trio.WouldBlock:
            self._hold(session, dgram.dst, dgram.dst_port, payload)
            return
        except OutboundError as exc:
            self.session_end_drops += 1
            self._fail(session, exc, (dgram.dst, dgram.dst_port, payload))
            return
        if sent:
            self.datagrams_up += 1
            info = session.info
            if info is not None:
                info.bytes_up += len(payload)

    def _hold(self, session: _Session, addr: bytes, port: int, payload: bytes) -> None:
        """Queue a datagram until the session can send it; drop if full."""
        if len(session.pending) >= SETUP_QUEUE:
            self.setup_queue_drops += 1
            return
        session.pending.append((addr, port, payload))
        session.wakeup.set()

    def _fail(
        self, session: _Session, exc: OutboundError, datagram: tuple[bytes, int, bytes]
    ) -> None:
        """End a session whose outbound failed while the reader sent."""
        log.info("UDP session %s ended: %s", _describe(session), exc)
        self._engine.counters["udp_send_errors"] += 1
        self._forget(session)
        session.scope.cancel()
        self._answer_failure(session, exc, datagram)

    def _answer_failure(
        self, session: _Session, exc: BaseException, datagram: tuple[bytes, int, bytes] | None
    ) -> None:
        """Tell the application its session's outbound failed: an ICMP error
        quoting `datagram`, or else a datagram to the last peer it sent to
        (a connected socket, the common case, hears only from that one)."""
        if datagram is None:
            if not session.dests:
                return
            addr, port = next(reversed(session.dests))
            datagram = (addr, port, b"")
        if isinstance(exc, OutboundError):
            reply = exc.reply
        elif isinstance(exc, OSError):
            reply = reply_for_oserror(exc)
        else:
            reply = FailureReply.RESET
        code4, code6 = _ICMP_CODES.get(reply, (3, 4))
        self._unreachable(session, datagram, code4, code6)

    def _forget(self, session: _Session) -> None:
        """Take a session out of the table (its task is ending): the next
        datagram from its application starts a new one."""
        key = (session.app_addr, session.app_port)
        if self.sessions.get(key) is session:
            del self.sessions[key]
        # Datagrams still waiting go nowhere (the first of a session whose
        # outbound failed was answered with an ICMP unreachable).
        self.session_end_drops += len(session.pending)
        session.pending.clear()

    # -- sessions ------------------------------------------------------------

    async def _run_session(self, session: _Session) -> None:
        engine = self._engine
        engine.counters["udp_sessions_started"] += 1
        upstream: UdpSession | None = None
        try:
            with session.scope:
                # The reader queued the first datagram when it started us.
                addr, port, payload = session.pending[0]
                dest = self._destination(session, addr, port)
                if dest is None:
                    return
                sniffed = None
                if engine.config.sniff.sniffs_quic(port, fake_ip=isinstance(dest.host, str)):
                    sniffed = await self._sniff_quic(session, addr, port)
                route_dest = dest
                if sniffed is None:
                    name, source = engine.real_names.known_name(dest.host, trio.current_time())
                else:
                    name, source = sniffed.host, "sniffed"
                    if engine.config.sniff.mode == "override":
                        dest = route_dest = Destination(sniffed.host, port)
                        session.dests[(addr, port)] = dest
                        session.sent_to[(sniffed.host, port)] = addr
                    elif isinstance(dest.host, str):
                        # A fake IP's name: the sniffed one decides the rules.
                        route_dest = Destination(sniffed.host, port)
                outbound, rule = engine.decide(route_dest, "udp", name)
                if outbound is None:
                    self._unreachable(session, (addr, port, payload), 13, 1)
                    return
                name = engine.router.name_of(outbound)
                with trio.move_on_at(session.last_active + engine.config.udp_idle_timeout):
                    try:
                        upstream, chain = await open_udp_traced(outbound, dest, name)
                    except OutboundError as exc:
                        log.info(
                            "UDP %s (%s) via %s: %s", _describe(session), dest, outbound.name, exc
                        )
                        self._answer_failure(session, exc, (addr, port, payload))
                        return
                if upstream is None:
                    return
                session.info = info = engine.open_flow(
                    "udp",
                    _describe(session),
                    dest,
                    engine.router.name_of(outbound),
                    FlowRoute(sniffed, source, rule, chain),
                )
                info.closer = session.scope.cancel
                session.upstream = upstream
                ended: list[BaseException] = []
                try:
                    async with trio.open_nursery() as nursery:
                        for part in (
                            self._downlink(session, upstream),
                            upstream.wait_ended(),
                            self._send_pending(session, upstream),
                        ):
                            nursery.start_soon(_until_failure, part, nursery.cancel_scope, ended)
                        await self._idle(session)
                        nursery.cancel_scope.cancel()
                finally:
                    engine.close_flow(info)
                if ended:
                    raise ended[0]
        except _EXPECTED_FAILURES as exc:
            # The outbound failed mid-session (a relay gone, a port refused):
            # one line, and the application hears of it as from a router.
            log.info("UDP session %s ended: %s", _describe(session), exc)
            self._answer_failure(session, exc, None)
        except Exception:
            engine.counters["udp_session_errors"] += 1
            log.exception("UDP session %s failed", _describe(session))
        finally:
            self._forget(session)
            session.upstream = None
            if upstream is not None:
                self._ended_drops = UdpDrops(
                    *(a + b for a, b in zip(self._ended_drops, upstream.drops(), strict=True))
                )
                await trio.aclose_forcefully(upstream)  # type: ignore[arg-type]

    async def _sniff_quic(self, session: _Session, addr: bytes, port: int) -> Sniffed | None:
        """The SNI of the QUIC Initials the session's first datagrams to
        (addr, port) carry; None when they are not QUIC or time runs out."""
        engine = self._engine
        # Imported here: only runs that sniff QUIC need it (start-up memory).
        from tun2sx.naming.quic import QuicSniffer

        sniffer = QuicSniffer()
        result: SniffResult = NEED_DATA
        fed = 0
        with trio.move_on_after(engine.config.sniff.timeout):
            while True:
                pending = session.pending
                while fed < len(pending) and result is NEED_DATA:
                    to_addr, to_port, payload = pending[fed]
                    fed += 1
                    if (to_addr, to_port) == (addr, port):
                        result = sniffer.feed(payload)
                if result is not NEED_DATA:
                    break
                session.wakeup = trio.Event()
                await session.wakeup.wait()
        if isinstance(result, Sniffed):
            engine.counters["sniffed_quic"] += 1
            return result
        engine.counters["sniff_misses"] += 1
        return None

    async def _idle(self, session: _Session) -> None:
        """Return once the session has been idle for `udp_idle_timeout`.

        Traffic only moves `last_active` (a float store, per datagram); this
        task re-arms itself when it wakes to find the session was used.
        """
        timeout = self._engine.config.udp_idle_timeout
        while True:
            deadline = session.last_active + timeout
            if trio.current_time() >= deadline:
                return
            await trio.sleep_until(deadline)

    async def _send_pending(self, session: _Session, upstream: UdpSession) -> None:
        """Send what waited for the session (set-up, or a name to resolve)."""
        pending = session.pending
        while True:
            while pending:
                addr, port, payload = pending[0]
                dest = session.dests.get((addr, port)) or self._destination(session, addr, port)
                if dest is not None:
                    try:
                        sent = upstream.send_to_nowait(payload, dest)
                    except trio.WouldBlock:
                        await upstream.send_to(payload, dest)
                        sent = True
                    if sent:
                        self.datagrams_up += 1
                        if session.info is not None:
                            session.info.bytes_up += len(payload)
                if pending:  # not cleared under us by a failure
                    pending.popleft()
            session.wakeup = trio.Event()
            await session.wakeup.wait()

    def _destination(self, session: _Session, addr: bytes, port: int) -> Destination | None:
        dest = self._engine.destination_for(addr, port)
        if dest is None:
            held = self._unknown_log.allow(trio.current_time())
            if held is not None:
                log.warning(
                    "UDP to %s: fake IP has no host name; answering port unreachable%s",
                    Destination(ipaddress.ip_address(addr), port),
                    LogLimit.suffix(held),
                )
            self._engine.counters["udp_unknown_fake_ip"] += 1
            self._unreachable(session, (addr, port, b""), 3, 4)
            return None
        if len(session.dests) >= _DEST_CACHE:
            session.dests.clear()
        session.dests[(addr, port)] = dest
        session.sent_to[(str(dest.host), port)] = addr
        session.last_to_by_port[port] = addr
        session.last_src = None  # the mapping of replies may have changed
        return dest

    def _reply_addr(self, session: _Session, src: Destination) -> bytes | None:
        """The address a reply from `src` must come from, as the application sees it."""
        addr = session.sent_to.get((str(src.host), src.port))
        if addr is None:
            addr = session.last_to_by_port.get(src.port)
        if addr is None:
            if isinstance(src.host, str):
                return None
            addr = src.host.packed
        if len(addr) != len(session.app_addr):
            return None
        return addr

    async def _downlink(self, session: _Session, upstream: UdpSession) -> None:
        engine = self._engine
        stack = engine.stack
        counters = engine.counters
        app_addr, app_port = session.app_addr, session.app_port
        while True:
            batch = await upstream.receive_batch(RECEIVE_BATCH)
            session.last_active = trio.current_time()
            size = 0
            for data, src in batch:
                if src is session.last_src:
                    addr = session.last_src_addr
                else:
                    mapped = self._reply_addr(session, src)
                    if mapped is None:
                        counters["udp_unmapped_replies"] += 1
                        continue
                    addr = session.last_src_addr = mapped
                    session.last_src = src
                stack.send_udp(addr, src.port, app_addr, app_port, data)
                size += len(data)
                self.datagrams_down += 1
            engine.flush()
            if session.info is not None:
                session.info.bytes_down += size

    def _unreachable(
        self, session: _Session, datagram: tuple[bytes, int, bytes], code4: int, code6: int
    ) -> None:
        """ICMP destination unreachable for a datagram we could not send."""
        engine = self._engine
        addr, port, payload = datagram
        original = build_udp_packet(session.app_addr, addr, session.app_port, port, payload)
        v4 = len(addr) == 4
        engine.stack.send_icmp_error(
            original,
            addr,
            icmp.ICMP_DEST_UNREACH if v4 else icmp.ICMP6_DEST_UNREACH,
            code4 if v4 else code6,
        )
        engine.flush()


def _describe(session: _Session) -> str:
    """The application's endpoint, as `addr:port` or `[v6]:port`."""
    app = ipaddress.ip_address(session.app_addr)
    if app.version == 6:
        return f"[{app}]:{session.app_port}"
    return f"{app}:{session.app_port}"


async def _until_failure(
    part: Awaitable[object], scope: trio.CancelScope, ended: list[BaseException]
) -> None:
    """Run one part of a session; an expected failure ends the whole session.

    The failure is handed back bare in `ended` (not wrapped in the
    nursery's exception group), so the session logs it as the end of one
    session, not as a bug.
    """
    try:
        await part
    except _EXPECTED_FAILURES as exc:
        ended.append(exc)
        scope.cancel()
