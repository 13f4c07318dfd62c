"""The direct outbound's resolver against a small DNS server on loopback."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from dnslib import CNAME, QTYPE, RR, A, DNSRecord

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.direct import ATTEMPT_DELAY, DirectOutbound, _interleaved, connect_staggered
from outbounds.net import SocketOptions
from outbounds.resolver import (
    MIN_TTL,
    BadDnsAnswer,
    DirectResolver,
    build_query,
    parse_nameserver,
    parse_reply_untrusted,
    resolv_conf_nameservers,
)
from tests.outbounds.dns_server import DnsServer, serve_dns
from tests.support import free_port, transfer_through

WEB = {"web.x.lan": ["10.0.0.5", "fd00::5"]}
V4, V6 = ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5")


async def start(nursery: trio.Nursery, server: DnsServer) -> Destination:
    address: Destination = await nursery.start(serve_dns, server)
    return address


async def test_udp_answer_gives_ipv4_then_ipv6(nursery: trio.Nursery) -> None:
    server = DnsServer(WEB)
    resolver = DirectResolver([await start(nursery, server)])
    assert await resolver.resolve("Web.X.Lan.") == [V4, V6]
    assert sorted(server.udp_queries) == [("web.x.lan", "A"), ("web.x.lan", "AAAA")]
    assert server.tcp_queries == []
    stats = resolver.statistics()
    assert (stats.queries, stats.tcp_queries, stats.malformed) == (2, 0, 0)


async def test_address_literal_is_not_looked_up(nursery: trio.Nursery) -> None:
    server = DnsServer(WEB)
    resolver = DirectResolver([await start(nursery, server)])
    assert await resolver.resolve("192.0.2.1") == [ipaddress.ip_address("192.0.2.1")]
    assert server.udp_queries == []


async def test_truncated_answer_is_asked_again_over_tcp(nursery: trio.Nursery) -> None:
    server = DnsServer(WEB, truncate_udp=True)
    resolver = DirectResolver([await start(nursery, server)])
    assert await resolver.resolve("web.x.lan") == [V4, V6]
    assert sorted(server.tcp_queries) == [("web.x.lan", "A"), ("web.x.lan", "AAAA")]
    assert resolver.statistics().tcp_queries == 2


async def test_timeout_moves_on_to_the_next_server(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    silent = DnsServer(WEB, silent=True)
    good = DnsServer(WEB)
    resolver = DirectResolver([await start(nursery, silent), await start(nursery, good)])
    started = trio.current_time()
    assert await resolver.resolve("web.x.lan") == [V4, V6]
    # One timeout each for A and AAAA, asked at the same time.
    assert trio.current_time() - started == pytest.approx(resolver.timeout)
    assert len(silent.udp_queries) == 2 and len(good.udp_queries) == 2
    assert resolver.statistics().timeouts == 2


async def test_no_answer_anywhere_is_one_line_naming_the_servers(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    servers = [await start(nursery, DnsServer(WEB, silent=True)) for _ in range(2)]
    resolver = DirectResolver(servers, attempts=2)
    with pytest.raises(OutboundError) as info:
        await resolver.resolve("web.x.lan")
    assert info.value.reply is FailureReply.HOST_UNREACHABLE
    message = str(info.value)
    assert "\n" not in message
    assert all(f"{server} did not answer within 2s" in message for server in servers)
    # Two rounds over two servers, for A and AAAA.
    assert resolver.statistics().timeouts == 8


async def test_servfail_and_garbage_move_on_and_count(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    failing = DnsServer(WEB, rcode=2)
    garbage = DnsServer(WEB, garbage=b"\x00\x01not dns")
    good = DnsServer(WEB)
    resolver = DirectResolver(
        [await start(nursery, failing), await start(nursery, garbage), await start(nursery, good)]
    )
    assert await resolver.resolve("web.x.lan") == [V4, V6]
    stats = resolver.statistics()
    assert stats.server_failures == 2
    # Bytes without our ID are not our reply: counted, and the wait for
    # the real one runs into the timeout.
    assert (stats.malformed, stats.timeouts) == (2, 2)


async def test_reply_with_our_id_but_bad_body_is_a_failed_lookup(nursery: trio.Nursery) -> None:
    class EchoingGarbage(DnsServer):
        def answer(self, query: bytes, *, udp: bool) -> bytes | None:
            super().answer(query, udp=udp)
            return query[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x07truncat"

    resolver = DirectResolver([await start(nursery, EchoingGarbage())])
    with pytest.raises(OutboundError, match="sent a bad reply"):
        await resolver.resolve("web.x.lan")
    assert resolver.statistics().malformed == 4  # two tries each of A and AAAA


async def test_ttl_cache(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    server = DnsServer(WEB, ttl=30)
    resolver = DirectResolver([await start(nursery, server)])
    assert await resolver.resolve("web.x.lan") == [V4, V6]
    await trio.sleep(29)
    assert await resolver.resolve("web.x.lan") == [V4, V6]
    assert len(server.udp_queries) == 2
    assert resolver.statistics().cache_hits == 1
    await trio.sleep(2)
    assert await resolver.resolve("web.x.lan") == [V4, V6]
    assert len(server.udp_queries) == 4


async def test_ttl_zero_is_kept_for_the_minimum(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    server = DnsServer(WEB, ttl=0)
    resolver = DirectResolver([await start(nursery, server)])
    await resolver.resolve("web.x.lan")
    await trio.sleep(MIN_TTL - 1)
    await resolver.resolve("web.x.lan")
    assert len(server.udp_queries) == 2
    await trio.sleep(1)
    await resolver.resolve("web.x.lan")
    assert len(server.udp_queries) == 4


async def test_nxdomain_is_cached_for_the_soa_negative_ttl(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    server = DnsServer(WEB, negative_ttl=10)
    address = await start(nursery, server)
    resolver = DirectResolver([address])
    for _ in range(2):
        with pytest.raises(OutboundError) as info:
            await resolver.resolve("nothing.x.lan")
        assert str(info.value) == (
            f"cannot resolve 'nothing.x.lan': no such name (NXDOMAIN from {address})"
        )
    assert len(server.udp_queries) == 2
    await trio.sleep(10)
    with pytest.raises(OutboundError):
        await resolver.resolve("nothing.x.lan")
    assert len(server.udp_queries) == 4


async def test_negative_answer_without_soa_is_not_cached(nursery: trio.Nursery) -> None:
    server = DnsServer(WEB, negative_ttl=None)
    resolver = DirectResolver([await start(nursery, server)])
    for _ in range(2):
        with pytest.raises(OutboundError, match="NXDOMAIN"):
            await resolver.resolve("nothing.x.lan")
    assert len(server.udp_queries) == 4


async def test_only_ipv4_is_fine_and_no_address_is_an_error(nursery: trio.Nursery) -> None:
    server = DnsServer({"v4.x.lan": ["10.0.0.4"], "empty.x.lan": []})
    resolver = DirectResolver([await start(nursery, server)])
    assert await resolver.resolve("v4.x.lan") == [ipaddress.ip_address("10.0.0.4")]
    with pytest.raises(OutboundError, match="has no IPv4 or IPv6 address"):
        await resolver.resolve("empty.x.lan")


async def test_cname_chain_is_followed(nursery: trio.Nursery) -> None:
    records = {"www.x.lan": ["CNAME:edge.x.lan"], "edge.x.lan": ["10.0.0.5"]}
    resolver = DirectResolver([await start(nursery, DnsServer(records))])
    assert await resolver.resolve("www.x.lan") == [V4]


async def test_concurrent_lookups_of_one_name_share_the_query(nursery: trio.Nursery) -> None:
    hold = trio.Event()
    server = DnsServer(WEB, hold=hold)
    resolver = DirectResolver([await start(nursery, server)])
    results: list[list[object]] = []

    async def one() -> None:
        results.append(list(await resolver.resolve("web.x.lan")))

    async with trio.open_nursery() as lookups:
        for _ in range(5):
            lookups.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
    assert results == [[V4, V6]] * 5
    assert len(server.udp_queries) == 2
    assert resolver.statistics().coalesced == 8


async def test_a_cancelled_asker_hands_the_lookup_over(nursery: trio.Nursery) -> None:
    hold = trio.Event()
    server = DnsServer(WEB, hold=hold)
    resolver = DirectResolver([await start(nursery, server)])
    results: list[object] = []
    async with trio.open_nursery() as lookups:
        asker = trio.CancelScope()

        async def first() -> None:
            with asker:
                await resolver.resolve("web.x.lan")

        async def second() -> None:
            results.append(await resolver.resolve("web.x.lan"))

        lookups.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        lookups.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        asker.cancel()
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
    assert results == [[V4, V6]]
    # The second task asked again once the first was gone.
    assert len(server.udp_queries) == 4


async def test_fake_ip_answers_are_refused(nursery: trio.Nursery) -> None:
    server = DnsServer({"web.x.lan": ["198.18.0.9"]})
    resolver = DirectResolver(
        [await start(nursery, server)], exclude=[ipaddress.ip_network("198.18.0.0/15")]
    )
    with pytest.raises(OutboundError, match=r"answered only with fake IPs \(198\.18\.0\.9\)"):
        await resolver.resolve("web.x.lan")
    assert resolver.statistics().fake_answers == 1


async def test_without_servers_the_error_names_the_option() -> None:
    with pytest.raises(OutboundError) as info:
        await DirectResolver([]).resolve("web.x.lan")
    assert info.value.reply is FailureReply.HOST_UNREACHABLE
    assert "--direct-dns" in str(info.value)


async def test_a_name_dns_cannot_carry_is_an_outbound_error(nursery: trio.Nursery) -> None:
    resolver = DirectResolver([await start(nursery, DnsServer(WEB))])
    with pytest.raises(OutboundError, match="not a valid DNS name"):
        await resolver.resolve("a" * 64 + ".x.lan")


async def test_direct_outbound_connects_to_what_its_resolver_answers(
    nursery: trio.Nursery, tcp_echo: Destination, udp_echo: Destination
) -> None:
    # A name only our server knows: the system resolver cannot have helped.
    server = DnsServer({"echo.direct.test": ["127.0.0.1"]})
    outbound = DirectOutbound(resolver=DirectResolver([await start(nursery, server)]))
    stream = await outbound.connect_tcp(Destination("echo.direct.test", tcp_echo.port))
    async with stream:
        assert await transfer_through(stream, b"hello") == b"hello"
    session = await outbound.open_udp()
    try:
        await session.send_to(b"ping", Destination("echo.direct.test", udp_echo.port))
        with trio.fail_after(5):
            data, source = await session.receive_from()
        assert (data, source) == (b"ping", udp_echo)
    finally:
        await session.aclose()
    with pytest.raises(OutboundError, match="NXDOMAIN") as info:
        await outbound.connect_tcp(Destination("missing.direct.test", tcp_echo.port))
    assert info.value.reply is FailureReply.HOST_UNREACHABLE


def test_parse_nameserver() -> None:
    assert parse_nameserver("192.168.1.1") == Destination(ipaddress.ip_address("192.168.1.1"), 53)
    assert parse_nameserver("10.0.0.1:5353").port == 5353
    assert parse_nameserver("fd00::1") == Destination(ipaddress.ip_address("fd00::1"), 53)
    assert parse_nameserver("[fd00::1]:54") == Destination(ipaddress.ip_address("fd00::1"), 54)
    for bad in ("dns.google", "10.0.0.1:0", "10.0.0.1:x", "[fd00::1", "[fd00::1]x", ""):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_resolv_conf_nameservers() -> None:
    text = (
        "# generated\nsearch lan\nnameserver 127.0.0.53\nnameserver  fd00::1 \n"
        "nameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n"
    )
    assert resolv_conf_nameservers(text) == [
        Destination(ipaddress.ip_address("127.0.0.53"), 53),
        Destination(ipaddress.ip_address("fd00::1"), 53),
        Destination(ipaddress.ip_address("fe80::1%eth0"), 53),
    ]


def _reply(qid: int) -> bytes:
    query = DNSRecord.parse(build_query("web.x.lan", QTYPE.A, qid))
    reply = query.reply()
    reply.add_answer(RR("web.x.lan", QTYPE.A, rdata=A("10.0.0.5"), ttl=60))
    return bytes(reply.pack())


def test_reply_parser_takes_whole_replies_only() -> None:
    data = _reply(7)
    parsed = parse_reply_untrusted(data, 7, "web.x.lan", QTYPE.A)
    assert (parsed.rcode, parsed.addresses, parsed.ttl) == (0, (V4,), 60)
    for wrong in (
        lambda: parse_reply_untrusted(data, 8, "web.x.lan", QTYPE.A),
        lambda: parse_reply_untrusted(data, 7, "other.x.lan", QTYPE.A),
        lambda: parse_reply_untrusted(data, 7, "web.x.lan", QTYPE.AAAA),
    ):
        with pytest.raises(BadDnsAnswer):
            wrong()
    # Every proper prefix, and random bytes, give BadDnsAnswer and nothing else.
    for end in range(len(data)):
        with pytest.raises(BadDnsAnswer):
            parse_reply_untrusted(data[:end], 7, "web.x.lan", QTYPE.A)
    for _ in range(300):
        junk = b"\x00\x07" + os.urandom(40)
        with contextlib.suppress(BadDnsAnswer):
            parse_reply_untrusted(junk, 7, "web.x.lan", QTYPE.A)


def test_reply_parser_follows_a_chain_in_any_order_and_stops_at_a_cycle() -> None:
    query = DNSRecord.parse(build_query("www.x.lan", QTYPE.A, 9))
    reply = query.reply()
    reply.add_answer(RR("edge.x.lan", QTYPE.A, rdata=A("10.0.0.5"), ttl=50))
    reply.add_answer(RR("mid.x.lan", QTYPE.CNAME, rdata=CNAME("edge.x.lan"), ttl=30))
    reply.add_answer(RR("www.x.lan", QTYPE.CNAME, rdata=CNAME("mid.x.lan"), ttl=90))
    reply.add_answer(RR("other.x.lan", QTYPE.A, rdata=A("10.9.9.9"), ttl=90))
    parsed = parse_reply_untrusted(bytes(reply.pack()), 9, "www.x.lan", QTYPE.A)
    assert (parsed.addresses, parsed.ttl) == ((V4,), 30)
    loop = query.reply()
    loop.add_answer(RR("www.x.lan", QTYPE.CNAME, rdata=CNAME("mid.x.lan"), ttl=90))
    loop.add_answer(RR("mid.x.lan", QTYPE.CNAME, rdata=CNAME("www.x.lan"), ttl=90))
    parsed = parse_reply_untrusted(bytes(loop.pack()), 9, "www.x.lan", QTYPE.A)
    assert parsed.addresses == ()


# --- connecting to what was resolved ---------------------------------------------


@contextlib.contextmanager
def unanswered(port: int) -> Iterator[None]:
    """127.0.0.1:`port` with a full accept queue: SYNs there go unanswered."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", port))
        full.listen(0)
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            yield
        finally:
            for filler in fillers:
                filler.close()


async def echo_on(nursery: trio.Nursery, host: str) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host=host))
    port: int = listeners[0].socket.getsockname()[1]
    return port


LOOP1, LOOP2 = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.2")


async def test_a_dead_address_costs_the_attempt_delay_not_the_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    port = await echo_on(nursery, "127.0.0.2")
    with unanswered(port):
        started = trio.current_time()
        stream = await connect_staggered([LOOP1, LOOP2], port, SocketOptions(connect_timeout=5))
        assert trio.current_time() - started == pytest.approx(ATTEMPT_DELAY)
    async with stream:
        assert stream.socket.getpeername() == ("127.0.0.2", port)
        assert await transfer_through(stream, b"hi") == b"hi"


async def test_a_refused_address_moves_on_at_once(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    port = await echo_on(nursery, "127.0.0.2")  # nothing on 127.0.0.1:port
    started = trio.current_time()
    stream = await connect_staggered([LOOP1, LOOP2], port, SocketOptions())
    assert trio.current_time() == started
    async with stream:
        assert stream.socket.getpeername() == ("127.0.0.2", port)


async def test_every_address_failing_is_the_last_error_or_a_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    port = free_port()
    with pytest.raises(OutboundError, match=r"127\.0\.0\.2") as info:
        await connect_staggered([LOOP1, LOOP2], port, SocketOptions())
    assert info.value.reply is FailureReply.RESET
    with unanswered(port), pytest.raises(OutboundError, match="timed out after 3s") as info:
        await connect_staggered([LOOP1, LOOP1], port, SocketOptions(connect_timeout=3))
    assert info.value.reply is FailureReply.HOST_UNREACHABLE


def test_attempt_order_is_ipv4_first_then_alternating() -> None:
    a, b = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    x, y, z = (ipaddress.ip_address(f"fd00::{i}") for i in (1, 2, 3))
    assert _interleaved([x, y, a, z, b]) == [a, x, b, y, z]
