"""UDP sessions and DNS: datagrams from applications to the outbounds.

A session exists per application source endpoint (address, port) and is
full-cone: once open, replies from any remote endpoint reach the
application. Its task owns one outbound UDP session; it ends after
`udp_idle_timeout` without traffic. Datagrams wait in a bounded queue;
a full queue drops (and counts) rather than stalling the reader.

Datagrams to port 53 go to the DNS server (`dnsserve`) when DNS hijack is
on, never to a session.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

import trio

from outbounds.base import Destination, OutboundError
from stack.netstack import UdpDatagram
from stack.wire import icmp
from stack.wire.packet import build_udp_packet

if TYPE_CHECKING:
    from outbounds.base import UdpSession
    from tun2sx.dataplane.context import FlowContext, FlowInfo
    from tun2sx.dataplane.dnsserve import DnsServer

log = logging.getLogger("tun2sx.udp")

_QUEUE = 256


class _Session:
    __slots__ = (
        "app_addr",
        "app_port",
        "info",
        "last_to_by_port",
        "receive",
        "scope",
        "send",
        "sent_to",
    )

    def __init__(self, app_addr: bytes, app_port: int) -> None:
        self.app_addr = app_addr
        self.app_port = app_port
        self.send, self.receive = trio.open_memory_channel[tuple[bytes, int, bytes]](_QUEUE)
        self.scope = trio.CancelScope()
        # Replies come back with the address the proxy used, often the real
        # IP behind a fake one: map them to what the application sent to.
        self.sent_to: dict[tuple[str, int], bytes] = {}
        self.last_to_by_port: dict[int, bytes] = {}
        self.info: FlowInfo | None = None  # set once the outbound is open


class UdpFlows:
    """Runs the UDP sessions and the DNS answers of one engine."""

    def __init__(self, engine: FlowContext, dns_server: DnsServer) -> None:
        self._engine = engine
        self._dns_server = dns_server
        self.sessions: dict[tuple[bytes, int], _Session] = {}

    def datagram(self, dgram: UdpDatagram) -> None:
        """Route one datagram from an application (called by the reader)."""
        engine = self._engine
        if dgram.dst_port == 53 and engine.config.dns_hijack and engine.dns is not None:
            self._dns_server.datagram(dgram)
            return
        key = (dgram.src, dgram.src_port)
        session = self.sessions.get(key)
        if session is None:
            session = _Session(dgram.src, dgram.src_port)
            self.sessions[key] = session
            engine.nursery.start_soon(self._run_session, session)
        try:
            session.send.send_nowait((dgram.dst, dgram.dst_port, dgram.payload))
        except trio.WouldBlock:
            engine.counters["udp_queue_drops"] += 1

    # -- sessions ------------------------------------------------------------

    async def _run_session(self, session: _Session) -> None:
        engine = self._engine
        key = (session.app_addr, session.app_port)
        engine.counters["udp_sessions_started"] += 1
        try:
            with session.scope:
                session.scope.deadline = trio.current_time() + engine.config.udp_idle_timeout
                first = await session.receive.receive()
                dest = self._destination(session, first[0], first[1])
                if dest is None:
                    return
                outbound = engine.route(dest, "udp")
                if outbound is None:
                    self._unreachable(session, first, 13, 1)
                    return
                try:
                    upstream = await outbound.open_udp()
                except OutboundError as exc:
                    log.info("UDP session for %s via %s: %s", dest, outbound.name, exc)
                    self._unreachable(session, first, 1, 3)
                    return
                app = ipaddress.ip_address(session.app_addr)
                session.info = info = engine.open_flow(
                    "udp",
                    f"[{app}]:{session.app_port}"
                    if app.version == 6
                    else f"{app}:{session.app_port}",
                    dest,
                    engine.router.name_of(outbound),
                )
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._downlink, session, upstream)
                        await upstream.send_to(first[2], dest)
                        info.bytes_up += len(first[2])
                        await self._uplink(session, upstream)
                finally:
                    engine.close_flow(info)
                    await trio.aclose_forcefully(upstream)  # type: ignore[arg-type]
        except (OutboundError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("UDP session %s ended: %s", key, exc)
        except Exception:
            engine.counters["udp_session_errors"] += 1
            log.exception("UDP session %s failed", key)
        finally:
            self.sessions.pop(key, None)
            session.receive.close()

    def _touch(self, session: _Session) -> None:
        session.scope.deadline = trio.current_time() + self._engine.config.udp_idle_timeout

    def _destination(self, session: _Session, addr: bytes, port: int) -> Destination | None:
        dest = self._engine.destination_for(addr, port)
        if dest is None:
            log.warning(
                "UDP to %s:%d: fake IP has no host name; answering port unreachable",
                ipaddress.ip_address(addr),
                port,
            )
            self._engine.counters["udp_unknown_fake_ip"] += 1
            self._unreachable(session, (addr, port, b""), 3, 4)
            return None
        session.sent_to[(str(dest.host), port)] = addr
        session.last_to_by_port[port] = addr
        return dest

    async def _uplink(self, session: _Session, upstream: UdpSession) -> None:
        async for addr, port, payload in session.receive:
            self._touch(session)
            dest = self._destination(session, addr, port)
            if dest is not None:
                await upstream.send_to(payload, dest)
                if session.info is not None:
                    session.info.bytes_up += len(payload)

    async def _downlink(self, session: _Session, upstream: UdpSession) -> None:
        engine = self._engine
        while True:
            data, src = await upstream.receive_from()
            self._touch(session)
            addr = session.sent_to.get((str(src.host), src.port))
            if addr is None:
                addr = session.last_to_by_port.get(src.port)
            if addr is None:
                if isinstance(src.host, str):
                    engine.counters["udp_unmapped_replies"] += 1
                    continue
                addr = src.host.packed
            if len(addr) != len(session.app_addr):
                engine.counters["udp_unmapped_replies"] += 1
                continue
            engine.stack.send_udp(addr, src.port, session.app_addr, session.app_port, data)
            engine.flush()
            if session.info is not None:
                session.info.bytes_down += len(data)

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
