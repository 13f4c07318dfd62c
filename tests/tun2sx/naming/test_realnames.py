"""Names of real addresses: a fake-IP-filtered name still meets domain rules."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from dnslib import AAAA, QTYPE, RR, A, DNSRecord

from outbounds.base import Destination, FailureReply, OutboundError, UdpSession
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from stack.wire.packet import build_tcp_packet, build_udp_packet, parse_packet_untrusted
from stack.wire.tcp import RST, SYN, TcpHeader, TcpOptions
from stack.wire.udp import UdpHeader
from tun2sx.dataplane.engine import Engine, EngineConfig
from tun2sx.dataplane.tun import TunDevice
from tun2sx.naming.dns import FakeDns
from tun2sx.naming.fakeip import FakeIpFilter, FakeIpStore
from tun2sx.naming.realnames import RealNames
from tun2sx.naming.router import DIRECT, Router, RuleSet, parse_rules

NAS = ipaddress.ip_address("192.168.7.7")
NAS6 = ipaddress.ip_address("fd00::7")


def response(name: str, ttl: int = 60, *, rcode: int = 0) -> bytes:
    reply = DNSRecord.question(name, "A").reply()
    reply.header.rcode = rcode
    if rcode == 0:
        reply.add_answer(RR(name, QTYPE.A, rdata=A(str(NAS)), ttl=ttl))
        reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(str(NAS6)), ttl=ttl))
    return bytes(reply.pack())


def test_records_every_address_for_the_question_name() -> None:
    names = RealNames()
    assert names.record_response_untrusted(response("NAS.x.lan."), now=0.0) == 2
    assert names.name_for(NAS, 10.0) == "nas.x.lan"
    assert names.name_for(NAS6, 10.0) == "nas.x.lan"
    assert names.name_for(ipaddress.ip_address("192.168.7.8"), 10.0) is None


def test_known_name_says_where_the_name_came_from() -> None:
    names = RealNames()
    names.record_response_untrusted(response("nas.x.lan"), now=0.0)
    assert names.known_name(NAS, 10.0) == ("nas.x.lan", "dns")
    assert names.known_name(ipaddress.ip_address("192.168.7.8"), 10.0) == (None, "none")
    # A fake IP's flow carries its name as the host already.
    assert names.known_name("www.example.com", 10.0) == (None, "fake-ip")


def test_entries_last_the_ttl_but_at_least_the_floor() -> None:
    names = RealNames(floor=300, ceiling=3600)
    names.record_response_untrusted(response("short.x.lan", ttl=5), now=0.0)
    assert names.name_for(NAS, 299.0) == "short.x.lan"
    assert names.name_for(NAS, 300.0) is None
    names.record_response_untrusted(response("long.x.lan", ttl=100_000), now=0.0)
    assert names.name_for(NAS, 3599.0) == "long.x.lan"
    assert names.name_for(NAS, 3600.0) is None


def test_newest_answer_wins_and_the_table_is_bounded() -> None:
    names = RealNames(capacity=2)
    names.record_response_untrusted(response("a.x.lan"), now=0.0)
    names.record_response_untrusted(response("b.x.lan"), now=0.0)
    assert names.name_for(NAS, 1.0) == "b.x.lan"
    assert names.statistics().size == 2
    other = DNSRecord.question("c.x.lan", "A").reply()
    other.add_answer(RR("c.x.lan", QTYPE.A, rdata=A("10.1.1.1"), ttl=60))
    names.record_response_untrusted(bytes(other.pack()), now=0.0)
    # NAS came first in the least recent answer and is gone.
    assert names.name_for(NAS, 1.0) is None
    assert names.name_for(NAS6, 1.0) == "b.x.lan"
    assert names.statistics().size == 2


def test_errors_and_garbage_record_nothing() -> None:
    names = RealNames()
    assert names.record_response_untrusted(response("gone.x.lan", rcode=3), now=0.0) == 0
    data = response("nas.x.lan")
    for end in range(len(data)):
        names.record_response_untrusted(data[:end], now=0.0)
    assert names.record_response_untrusted(DNSRecord.question("q.x.lan").pack(), now=0.0) == 0
    assert names.statistics().recorded == 0
    assert names.statistics().malformed > 0


def test_router_matches_the_name_and_the_address_first_rule_wins() -> None:
    rules = RuleSet(
        parse_rules(
            ["IP-CIDR,192.168.7.0/24,REJECT", "DOMAIN-SUFFIX,x.lan,DIRECT", "MATCH,DIRECT"],
            [],
        )
    )
    dest = Destination(NAS, 445)
    assert rules.first_match(dest, "tcp", "nas.x.lan") == 0
    other = Destination(ipaddress.ip_address("10.0.0.1"), 445)
    assert rules.first_match(other, "tcp", "nas.x.lan") == 1
    assert rules.first_match(other, "tcp") == 2


# --- through the engine ---------------------------------------------------------

APP = socket.inet_aton("10.0.0.2")
DNS_ADDR = socket.inet_aton("198.18.0.2")
UPSTREAM = Destination(ipaddress.ip_address("192.0.2.53"), 53)


class Recording:
    """An outbound that notes each destination and refuses it; answers DNS over TCP."""

    def __init__(self, name: str, nursery: trio.Nursery) -> None:
        self.name = name
        self.tcp: list[Destination] = []
        self._nursery = nursery

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        if dest == UPSTREAM:
            ours, theirs = trio.testing.memory_stream_pair()
            self._nursery.start_soon(self._dns, theirs)
            return ours
        self.tcp.append(dest)
        raise OutboundError(FailureReply.RESET, "recorded")

    async def _dns(self, stream: trio.abc.Stream) -> None:
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            data += await stream.receive_some()
        query = DNSRecord.parse(data[2:])
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(str(NAS)), ttl=60))
        packed = bytes(reply.pack())
        await stream.send_all(struct.pack("!H", len(packed)) + packed)

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


@pytest.fixture
async def pair() -> AsyncIterator[tuple[int, trio.socket.SocketType]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()  # the device owns and closes it
    with trio.socket.from_stdlib_socket(theirs) as app_sock:
        yield fd, app_sock


async def test_a_filtered_name_meets_its_domain_rule_and_keeps_its_address(
    pair: tuple[int, trio.socket.SocketType],
) -> None:
    fd, app_sock = pair
    device = TunDevice(fd, name="fake0", mtu=1500, offload=False)
    store = FakeIpStore(":memory:")
    dns = FakeDns(store, FakeIpFilter(["+.x.lan"]))
    async with trio.open_nursery() as nursery:
        proxy, direct = Recording("proxy", nursery), Recording("direct", nursery)
        rules = RuleSet(parse_rules(["DOMAIN-SUFFIX,x.lan,DIRECT"], ["proxy"]))
        router = Router(proxy, rules, {DIRECT: direct, "proxy": proxy})
        engine = Engine(
            device,
            NetStack(NetStackConfig(tcp=TcpConfig(mss=1400))),
            router,
            fakeip=store,
            dns=dns,
            config=EngineConfig(dns_upstream=UPSTREAM),
        )
        await nursery.start(engine.run)
        # The application asks for the filtered name: it goes upstream (over
        # the proxy, as the upstream's route says) and the real address comes back.
        query = DNSRecord.question("nas.x.lan", "A").pack()
        await app_sock.send(build_udp_packet(APP, DNS_ADDR, 5353, 53, query))
        with trio.fail_after(10):
            packet = parse_packet_untrusted(memoryview(await app_sock.recv(70000)))
        assert isinstance(packet.l4, UdpHeader)
        assert [str(rr.rdata) for rr in DNSRecord.parse(bytes(packet.payload)).rr] == [str(NAS)]
        # It connects to that address: the domain rule decides, the address is kept.
        syn = TcpHeader(40000, 445, 1000, 0, SYN, 65535, options=TcpOptions(1400))
        await app_sock.send(build_tcp_packet(APP, NAS.packed, syn))
        with trio.fail_after(10):
            packet = parse_packet_untrusted(memoryview(await app_sock.recv(70000)))
        assert isinstance(packet.l4, TcpHeader) and packet.l4.flags & RST
        nursery.cancel_scope.cancel()
    device.close()
    store.close()
    assert direct.tcp == [Destination(NAS, 445)]
    assert proxy.tcp == []
