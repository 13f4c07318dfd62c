"""A small authoritative DNS server for tests, over UDP and TCP on one port.

It answers A and AAAA from a dict, NXDOMAIN (with or without an SOA) for
names it does not know, and has switches for the ways a real server
misbehaves: truncate every UDP answer, never answer, answer with an rcode,
answer with garbage, hold answers until the test lets them go. It records
every question it gets, per transport, so tests can count queries.

Run as a program it serves a zone until killed (the end-to-end tests start
it in a namespace; each question is printed on a line of its own):

    python -m tests.outbounds.dns_server --bind 10.200.0.2 --record web.x.lan=10.200.0.2
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import struct
from collections.abc import Mapping, Sequence

import attrs
import trio
from dnslib import AAAA, CNAME, QTYPE, RR, SOA, A, DNSRecord

from outbounds.base import Destination

_U16 = struct.Struct("!H")


@attrs.define
class DnsServer:
    """What the server answers, and what it was asked.

    Attributes:
        records: name -> addresses (IPv4 and IPv6 mixed) or a CNAME target
            written as "CNAME:target".
        ttl: TTL of answer records.
        negative_ttl: TTL of the SOA in negative answers; None: no SOA.
        truncate_udp: answer every UDP query with TC set and no records.
        silent: never answer.
        rcode: answer every query with this rcode and no records.
        garbage: answer every query with these bytes.
        hold: when set, answers wait until this event is set.
        udp_queries / tcp_queries: (name, type name) per question received.
    """

    records: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    ttl: int = 60
    negative_ttl: int | None = 30
    truncate_udp: bool = False
    silent: bool = False
    rcode: int | None = None
    garbage: bytes | None = None
    hold: trio.Event | None = None
    udp_queries: list[tuple[str, str]] = attrs.field(factory=list)
    tcp_queries: list[tuple[str, str]] = attrs.field(factory=list)
    verbose: bool = False

    def answer(self, query: bytes, *, udp: bool) -> bytes | None:
        """The reply to one query message (None: no reply)."""
        request = DNSRecord.parse(query)
        name = str(request.q.qname).rstrip(".").lower()
        qtype = request.q.qtype
        (self.udp_queries if udp else self.tcp_queries).append((name, QTYPE.get(qtype)))
        if self.verbose:
            print(f"query {name} {QTYPE.get(qtype)} {'udp' if udp else 'tcp'}", flush=True)
        if self.silent:
            return None
        if self.garbage is not None:
            return self.garbage
        reply = request.reply()
        if self.rcode is not None:
            reply.header.rcode = self.rcode
            return bytes(reply.pack())
        if udp and self.truncate_udp:
            reply.header.tc = 1
            return bytes(reply.pack())
        owner = name
        while True:
            values = self.records.get(owner)
            if values is None:
                break
            if len(values) == 1 and values[0].startswith("CNAME:"):
                target = values[0][len("CNAME:") :]
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=self.ttl))
                owner = target
                continue
            for value in values:
                address = ipaddress.ip_address(value)
                if address.version == 4 and qtype == QTYPE.A:
                    reply.add_answer(RR(owner, QTYPE.A, rdata=A(value), ttl=self.ttl))
                elif address.version == 6 and qtype == QTYPE.AAAA:
                    reply.add_answer(RR(owner, QTYPE.AAAA, rdata=AAAA(value), ttl=self.ttl))
            break
        if not reply.rr:
            if name not in self.records:
                reply.header.rcode = 3  # NXDOMAIN
            if self.negative_ttl is not None:
                soa = SOA("ns.test", "admin.test", (1, 3600, 600, 86400, self.negative_ttl))
                reply.add_auth(RR("test", QTYPE.SOA, rdata=soa, ttl=3600))
        return bytes(reply.pack())

    async def _reply_later(self, send: trio.socket.SocketType, data: bytes, peer: object) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await send.sendto(data, peer)

    async def serve_udp(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                query, peer = await sock.recvfrom(65535)
                data = self.answer(query, udp=True)
                if data is not None:
                    nursery.start_soon(self._reply_later, sock, data, peer)

    async def serve_tcp_stream(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            while chunk := await stream.receive_some(65535):
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + _U16.unpack_from(buffer)[0]:
                    size = _U16.unpack_from(buffer)[0]
                    data = self.answer(buffer[2 : 2 + size], udp=False)
                    buffer = buffer[2 + size :]
                    if data is None:
                        continue
                    if self.hold is not None:
                        await self.hold.wait()
                    await stream.send_all(_U16.pack(len(data)) + data)


async def open_dns_server_sockets(
    host: str, port: int = 0
) -> tuple[trio.socket.SocketType, trio.SocketListener, int]:
    """A UDP socket and a TCP listener on one port of `host` (any free one for 0)."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    for _ in range(50):
        udp = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        await udp.bind((host, port))
        chosen = udp.getsockname()[1]
        tcp = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        try:
            await tcp.bind((host, chosen))
        except OSError as exc:
            udp.close()
            tcp.close()
            if exc.errno != errno.EADDRINUSE or port:
                raise
            continue
        tcp.listen(16)
        return udp, trio.SocketListener(tcp), chosen
    raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")


async def serve_dns(
    server: DnsServer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[Destination] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `server` on `host` until cancelled; reports its address."""
    udp, listener, chosen = await open_dns_server_sockets(host, port)
    with udp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_udp, udp)
            await nursery.start(trio.serve_listeners, server.serve_tcp_stream, [listener])
            task_status.started(Destination(ipaddress.ip_address(host), chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description="serve a tiny DNS zone over UDP and TCP")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--record", action="append", default=[], metavar="NAME=ADDRESS")
    args = parser.parse_args()
    records: dict[str, list[str]] = {}
    for item in args.record:
        name, _, address = item.partition("=")
        records.setdefault(name.lower(), []).append(address)
    trio.run(serve_dns, DnsServer(records, verbose=True), args.bind, args.port)


if __name__ == "__main__":
    main()
