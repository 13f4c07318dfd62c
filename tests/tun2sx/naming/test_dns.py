"""Fake-IP DNS: responses parsed back with dnslib, malformed input, TCP framing,
and forwarding through a real SOCKS5 proxy (microsocks) to a local TCP DNS server."""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dnslib import EDNS0, QTYPE, RCODE, RR, TXT, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from outbounds.base import Destination
from outbounds.direct import DirectOutbound
from outbounds.socks5 import Socks5Outbound
from tests.support import ServerProcess, free_port, require_binary, run_server
from tun2sx.naming.dns import (
    BadDnsQuery,
    DnsForward,
    DnsReply,
    DnsTcpFramer,
    DnsUpstreamError,
    FakeDns,
    forward_query,
    truncate_for_udp,
)
from tun2sx.naming.fakeip import FakeIpFilter, FakeIpStore, IPAddress


@pytest.fixture
def store() -> Iterator[FakeIpStore]:
    s = FakeIpStore()
    yield s
    s.close()


@pytest.fixture
def dns(store: FakeIpStore) -> FakeDns:
    return FakeDns(store, FakeIpFilter(["+.lan"]))


def query(name: str, qtype: str = "A", *, edns: bool = False, qid: int = 0x1234) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    return bytes(q.pack())


def reply_of(answer: object) -> DNSRecord:
    assert isinstance(answer, DnsReply)
    return DNSRecord.parse(answer.data)


def test_a_answer(dns: FakeDns) -> None:
    response = reply_of(dns.handle_query_untrusted(query("WWW.Example.com", edns=True)))
    assert response.header.id == 0x1234
    assert (response.header.qr, response.header.rd, response.header.ra) == (1, 1, 1)
    assert response.header.rcode == RCODE.NOERROR
    assert str(response.q.qname) == "WWW.Example.com."  # question echoed as asked
    [rr] = response.rr
    assert (rr.rtype, rr.ttl, str(rr.rdata)) == (QTYPE.A, 1, "198.18.0.1")
    assert [ar.rtype for ar in response.ar] == [QTYPE.OPT]
    # Same name, same answer; ip -> name works.
    again = reply_of(dns.handle_query_untrusted(query("www.example.com.")))
    assert str(again.rr[0].rdata) == "198.18.0.1"
    assert dns.store.lookup_ip(ipaddress.IPv4Address("198.18.0.1")) == "www.example.com"


def test_rd_flag_copied() -> None:
    q = DNSRecord.question("x.example")
    q.header.rd = 0
    response = reply_of(FakeDns(FakeIpStore()).handle_query_untrusted(bytes(q.pack())))
    assert (response.header.rd, response.header.ra) == (0, 1)


def test_aaaa_and_disabled_v6() -> None:
    response = reply_of(FakeDns(FakeIpStore()).handle_query_untrusted(query("a.example", "AAAA")))
    assert str(response.rr[0].rdata) == "fc00::1"
    no_v6 = FakeDns(FakeIpStore(v6_pool=None))
    empty = reply_of(no_v6.handle_query_untrusted(query("a.example", "AAAA")))
    assert (empty.header.rcode, empty.rr) == (RCODE.NOERROR, [])


def test_https_gets_empty_answer(dns: FakeDns) -> None:
    empty = reply_of(dns.handle_query_untrusted(query("a.example", "HTTPS")))
    assert (empty.header.rcode, empty.rr) == (RCODE.NOERROR, [])
    assert dns.statistics().empty_answers == 1


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("printer.lan", "A"),  # filtered
        ("lan", "AAAA"),
        ("example.com", "TXT"),
        ("example.com", "MX"),
        ("_sip._tcp.example.com", "SRV"),
        ("8.8.8.8.in-addr.arpa", "PTR"),  # not a fake address
        ("", "A"),  # the root
    ],
)
def test_forwarded(dns: FakeDns, name: str, qtype: str) -> None:
    data = query(name, qtype)
    answer = dns.handle_query_untrusted(data)
    assert isinstance(answer, DnsForward)
    assert answer.query == data and answer.qtype == getattr(QTYPE, qtype)


def test_strange_label_is_forwarded(dns: FakeDns) -> None:
    q = DNSRecord.question("x.example")
    q.q.qname.label = (b"we ird", b"example")
    assert isinstance(dns.handle_query_untrusted(bytes(q.pack())), DnsForward)


def test_ptr_of_fake_addresses(dns: FakeDns) -> None:
    dns.handle_query_untrusted(query("Mapped.example"))
    dns.handle_query_untrusted(query("Mapped.example", "AAAA"))
    v4 = reply_of(dns.handle_query_untrusted(query("1.0.18.198.in-addr.arpa", "PTR")))
    assert str(v4.rr[0].rdata) == "mapped.example."
    v6_name = ipaddress.IPv6Address("fc00::1").reverse_pointer
    v6 = reply_of(dns.handle_query_untrusted(query(v6_name, "PTR")))
    assert str(v6.rr[0].rdata) == "mapped.example."
    unknown = reply_of(dns.handle_query_untrusted(query("9.9.18.198.in-addr.arpa", "PTR")))
    assert (unknown.header.rcode, unknown.rr) == (RCODE.NXDOMAIN, [])


def test_malformed(dns: FakeDns) -> None:
    with pytest.raises(BadDnsQuery) as info:
        dns.handle_query_untrusted(b"\x12\x34")
    assert info.value.formerr is None

    response = DNSRecord.parse(query("a.example")).reply()
    with pytest.raises(BadDnsQuery, match="response") as info:
        dns.handle_query_untrusted(bytes(response.pack()))
    assert info.value.formerr is None

    truncated = query("a.example")[:-3]
    with pytest.raises(BadDnsQuery) as info:
        dns.handle_query_untrusted(truncated)
    assert info.value.formerr is not None
    formerr = DNSRecord.parse(info.value.formerr)
    assert (formerr.header.id, formerr.header.rcode, formerr.header.qr) == (0x1234, 1, 1)

    two = bytearray(query("a.example"))
    two[5] = 2
    with pytest.raises(BadDnsQuery, match="2 questions"):
        dns.handle_query_untrusted(bytes(two))
    assert dns.statistics().malformed == 4


def test_other_opcode_is_notimp(dns: FakeDns) -> None:
    q = DNSRecord.question("a.example")
    q.header.opcode = 2  # STATUS
    response = reply_of(dns.handle_query_untrusted(bytes(q.pack())))
    assert response.header.rcode == RCODE.NOTIMP


@given(st.binary(max_size=600))
def test_only_bad_dns_query_escapes(data: bytes) -> None:
    dns = FakeDns(FakeIpStore(v4_pool="10.99.0.0/28"), FakeIpFilter(["+.lan"]))
    with contextlib.suppress(BadDnsQuery):
        dns.handle_query_untrusted(data)
    FakeDns.servfail(data)
    truncate_for_udp(data, 12)


@given(st.binary(min_size=12, max_size=60), st.integers(0, 40))
def test_only_bad_dns_query_escapes_near_valid(prefix: bytes, cut: int) -> None:
    data = bytearray(query("some.name.example", "AAAA", edns=True))
    data[: len(prefix) // 4] = prefix[: len(prefix) // 4]
    with contextlib.suppress(BadDnsQuery):
        FakeDns(FakeIpStore()).handle_query_untrusted(bytes(data[: len(data) - cut]))


def test_servfail_and_truncation() -> None:
    q = query("big.example", "TXT")
    servfail = DNSRecord.parse(FakeDns.servfail(q))
    assert (servfail.header.rcode, servfail.header.id, str(servfail.q.qname)) == (
        RCODE.SERVFAIL,
        0x1234,
        "big.example.",
    )
    big = DNSRecord.parse(q).reply()
    for i in range(20):
        big.add_answer(RR("big.example", QTYPE.TXT, rdata=TXT("x" * 200 + str(i))))
    packed = bytes(big.pack())
    cut = DNSRecord.parse(truncate_for_udp(packed, 512))
    assert (cut.header.tc, cut.rr, str(cut.q.qname)) == (1, [], "big.example.")
    assert truncate_for_udp(packed, 65535) == packed


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_tcp_framer(byte_by_byte: bool) -> None:
    messages = [query("a.example"), query("b.example", "AAAA"), b""]
    stream = b"".join(DnsTcpFramer.frame(m) for m in messages) + b"\x00"  # trailing partial
    framer = DnsTcpFramer()
    got: list[bytes] = []
    chunks = [stream[i : i + 1] for i in range(len(stream))] if byte_by_byte else [stream]
    for chunk in chunks:
        framer.receive_data(chunk)
        while (message := framer.next_message()) is not None:
            got.append(message)
    assert got == messages
    with pytest.raises(ValueError):
        DnsTcpFramer.frame(b"x" * 65536)
    with pytest.raises(BadDnsQuery):
        DnsTcpFramer(max_buffer=10).receive_data(b"x" * 11)


# --- forwarding upstream ----------------------------------------------------------


async def _tcp_dns_server(behaviour: str, stream: trio.SocketStream) -> None:
    """A tiny DNS-over-TCP server: answers TXT with the query name."""
    async with stream:
        framer = DnsTcpFramer()
        while (data := await stream.receive_some()) and behaviour != "silent":
            framer.receive_data(data)
            while (message := framer.next_message()) is not None:
                request = DNSRecord.parse(message)
                response = request.reply()
                response.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("real answer")))
                if behaviour == "wrong-id":
                    response.header.id ^= 1
                if behaviour == "close-early":
                    await stream.send_all(DnsTcpFramer.frame(bytes(response.pack()))[:5])
                    return
                await stream.send_all(DnsTcpFramer.frame(bytes(response.pack())))
        if behaviour == "silent":
            await trio.sleep_forever()


async def start_dns_server(nursery: trio.Nursery, behaviour: str = "ok") -> Destination:
    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, functools.partial(_tcp_dns_server, behaviour), 0)
    return Destination(ipaddress.IPv4Address("127.0.0.1"), listeners[0].socket.getsockname()[1])


@pytest.fixture(scope="module")
def microsocks() -> Iterator[ServerProcess]:
    binary = require_binary("microsocks")
    port = free_port()
    with run_server([binary, "-i", "127.0.0.1", "-p", str(port)], "127.0.0.1", port) as server:
        yield server


async def test_forward_through_socks5(
    dns: FakeDns, microsocks: ServerProcess, nursery: trio.Nursery
) -> None:
    upstream = await start_dns_server(nursery)
    outbound = Socks5Outbound(microsocks.host, microsocks.port)
    answer = dns.handle_query_untrusted(query("Real.Example", "TXT", qid=77))
    assert isinstance(answer, DnsForward)
    response = DNSRecord.parse(await forward_query(answer.query, upstream, outbound))
    assert response.header.id == 77
    assert str(response.rr[0].rdata) == '"real answer"'


@pytest.mark.parametrize(
    ("behaviour", "complaint"),
    [("wrong-id", "different query"), ("close-early", "without a complete answer")],
)
async def test_forward_bad_upstreams(nursery: trio.Nursery, behaviour: str, complaint: str) -> None:
    upstream = await start_dns_server(nursery, behaviour)
    with pytest.raises(DnsUpstreamError, match=complaint):
        await forward_query(query("x.example", "TXT"), upstream, DirectOutbound())


async def test_forward_timeout(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    upstream = await start_dns_server(nursery, "silent")
    with pytest.raises(DnsUpstreamError, match="did not answer within 2s"):
        await forward_query(query("x.example", "TXT"), upstream, DirectOutbound(), timeout=2)


async def test_forward_unreachable() -> None:
    upstream = Destination(ipaddress.IPv4Address("127.0.0.1"), free_port())
    with pytest.raises(DnsUpstreamError, match="cannot reach DNS server"):
        await forward_query(query("x.example", "TXT"), upstream, DirectOutbound())
    with pytest.raises(DnsUpstreamError, match="shorter"):
        await forward_query(struct.pack("!H", 1), upstream, DirectOutbound())


def test_name_dnslib_cannot_write_back(dns: FakeDns) -> None:
    """Found by fuzzing: dnslib parses some labels it then refuses to pack."""
    corpus = Path(__file__).resolve().parents[3] / "fuzz" / "corpus" / "dns_query"
    data = (corpus / "regression-unpackable-label").read_bytes()
    with contextlib.suppress(BadDnsQuery):
        dns.handle_query_untrusted(data)
    servfail = FakeDns.servfail(data)
    assert servfail is not None and servfail[:2] == data[:2]


class _BrokenStore(FakeIpStore):
    """A table whose file cannot take another record: the disk is full."""

    def allocate(self, name: str, family: socket.AddressFamily) -> IPAddress:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failing_fake_ip_table_answers_servfail_not_a_crash(tmp_path: Path) -> None:
    dns = FakeDns(_BrokenStore(str(tmp_path / "fakeip.sqlite")))
    response = reply_of(dns.handle_query_untrusted(query("a.example")))
    assert (response.header.rcode, response.rr) == (RCODE.SERVFAIL, [])
    assert dns.statistics().store_errors == 1


_label = st.text("abcXYZ019_-", min_size=1, max_size=20)
_odd_label = st.sampled_from(["a b", "é", "a.b", "*"])


@st.composite
def _queries(draw: st.DrawFn) -> bytes:
    """Queries around the plain-query fast path: most take it, some must not."""
    labels = draw(st.lists(_label | _odd_label if draw(st.booleans()) else _label, max_size=4))
    qtype = getattr(QTYPE, draw(st.sampled_from(["A", "AAAA", "TXT"])))
    # An explicit header: dnslib's default id comes from `random`.
    q = DNSRecord(
        DNSHeader(id=draw(st.integers(0, 0xFFFF))), q=DNSQuestion(".".join(labels) or ".", qtype)
    )
    q.header.rd = draw(st.integers(0, 1))
    q.header.cd = draw(st.integers(0, 1))
    q.header.ad = draw(st.integers(0, 1))
    if draw(st.booleans()):
        q.add_ar(
            EDNS0(udp_len=draw(st.integers(512, 4096)), flags=draw(st.sampled_from(["", "do"])))
        )
    if draw(st.integers(0, 9)) == 0:
        q.add_ar(RR("extra.example", QTYPE.TXT, rdata=TXT("x")))
    data = bytes(q.pack())
    if draw(st.integers(0, 9)) == 0:
        data += b"\0"  # a trailing byte
    return data


class _GeneralPathOnly(FakeDns):
    def _plain_answer(self, data: bytes, qid: int, flags: int, arcount: int) -> None:
        return None


@given(_queries(), st.booleans(), st.sampled_from([None, ["+.lan", "x*"]]))
def test_plain_queries_are_answered_byte_for_byte_as_the_general_path(
    data: bytes, v6: bool, patterns: list[str] | None
) -> None:
    answers = []
    for kind in (FakeDns, _GeneralPathOnly):
        store = FakeIpStore(v6_pool="fc00::/18" if v6 else None)
        dns = kind(store, None if patterns is None else FakeIpFilter(patterns))
        try:
            answer: object = dns.handle_query_untrusted(data)
        except BadDnsQuery as exc:
            answer = ("bad", exc.formerr)
        answers.append((answer, dns.statistics()))
        store.close()
    assert answers[0] == answers[1]
