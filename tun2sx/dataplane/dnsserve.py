"""DNS served inside the TUN: every query to port 53, over UDP and TCP.

What it owns: answering queries with the fake-IP DNS, and the queries it
cannot answer itself (anything but plain A/AAAA for a name that gets a fake
address), which go upstream over TCP through the outbound chosen for the
upstream server, without blocking anything else. It counts what it answers,
what was malformed, and what it had to drop (`max_dns_forwards`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from stack.netstack import UdpDatagram
from tun2sx.naming.dns import (
    BadDnsQuery,
    DnsReply,
    DnsTcpFramer,
    DnsUpstreamError,
    FakeDns,
    forward_query,
    truncate_for_udp,
)

if TYPE_CHECKING:
    from tun2sx.dataplane.context import FlowContext
    from tun2sx.dataplane.tcpstream import TcpStream

log = logging.getLogger("tun2sx.udp")

_DNS_TCP_IDLE = 30.0


class DnsServer:
    """Answers the DNS queries that arrive through the TUN."""

    def __init__(self, engine: FlowContext) -> None:
        self._engine = engine
        self._dns_forwards = 0

    def _answer_local(self, query: bytes) -> tuple[bytes | None, bool]:
        """Answer from the fake-IP DNS: (response or None, needs upstream)."""
        engine = self._engine
        assert engine.dns is not None
        try:
            answer = engine.dns.handle_query_untrusted(query)
        except BadDnsQuery as exc:
            engine.counters["dns_bad_queries"] += 1
            return exc.formerr, False
        engine.counters["dns_queries"] += 1
        if type(answer) is DnsReply:
            return answer.data, False
        return None, True

    def datagram(self, dgram: UdpDatagram) -> None:
        """Answer one query datagram (called by the reader)."""
        engine = self._engine
        response, upstream = self._answer_local(dgram.payload)
        if response is not None:
            engine.stack.send_udp(dgram.dst, 53, dgram.src, dgram.src_port, response)
            engine.flush()
        if not upstream:
            return
        if self._dns_forwards >= engine.config.max_dns_forwards:
            engine.counters["dns_forward_drops"] += 1
            return
        self._dns_forwards += 1
        engine.nursery.start_soon(self._forward_udp, dgram)

    async def _forward_udp(self, dgram: UdpDatagram) -> None:
        engine = self._engine
        try:
            response = await self.forward(dgram.payload)
            if response is not None:
                response = truncate_for_udp(response)
                engine.stack.send_udp(dgram.dst, 53, dgram.src, dgram.src_port, response)
                engine.flush()
        finally:
            self._dns_forwards -= 1

    async def forward(self, query: bytes) -> bytes | None:
        """Resolve a query upstream through the outbound.

        A failure answers SERVFAIL at once, so the application does not sit
        out its resolver timeout; None only for an unreadable query.
        """
        engine = self._engine
        upstream = engine.config.dns_upstream
        outbound = engine.router.route(upstream, "tcp")
        if outbound is None:
            return FakeDns.servfail(query)
        try:
            response = await forward_query(query, upstream, outbound)
        except DnsUpstreamError as exc:
            engine.counters["dns_forward_failures"] += 1
            log.info("DNS upstream %s via %s: %s", upstream, outbound.name, exc)
            return FakeDns.servfail(query)
        engine.real_names.record_response_untrusted(response, trio.current_time())
        return response

    async def serve_stream(self, stream: TcpStream) -> None:
        """Answer length-prefixed DNS queries on one TCP connection."""
        framer = DnsTcpFramer()
        while True:
            data = b""
            with trio.move_on_after(_DNS_TCP_IDLE):
                data = await stream.receive_some()
            if not data:
                break
            try:
                framer.receive_data(data)
            except ValueError:
                return
            while (query := framer.next_message()) is not None:
                response, upstream = self._answer_local(query)
                if upstream:
                    response = await self.forward(query)
                if response is None:
                    return
                await stream.send_all(DnsTcpFramer.frame(response))
        await stream.send_eof()
