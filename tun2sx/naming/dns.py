"""The fake-IP DNS server's logic, without I/O, plus DNS-over-TCP forwarding.

Every port-53 query the TUN sees is answered here (DNS hijack).
`FakeDns.handle_query_untrusted` decides, per query, between two outcomes:

* a ready response: A from the IPv4 fake pool, AAAA from the IPv6 pool (an
  empty NOERROR when that pool is disabled), PTR of a fake address with its
  name; TTL 1, so a cached fake address is re-asked for soon;
* "forward this upstream": names the fake-IP filter sends to real
  resolution, and query types fake IPs cannot stand for (TXT, MX, SRV, PTR of
  real addresses, ...). `forward_query` does that with DNS over TCP through
  an outbound's `connect_tcp`, because every outbound carries TCP while not
  every one carries UDP.

HTTPS/SVCB queries for faked names get an empty answer by default: their
address hints would hand the application real addresses and bypass the fake
IP, and an empty answer makes clients fall back to A/AAAA.

Malformed input raises `BadDnsQuery` only. When the 12-byte header was
readable and the message is a query, the error carries a FORMERR response
the runtime may send (stub resolvers then fail fast instead of retrying);
responses and unreadable headers are dropped, never answered, so two
resolvers cannot ping-pong errors.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct
from typing import TYPE_CHECKING

import attrs
import trio

from outbounds.base import Destination, Outbound, OutboundError
from tun2sx.naming.fakeip import FakeIpFilter, FakeIpStore, normalize_name

if TYPE_CHECKING:
    from dnslib import AAAA, A, DNSRecord

log = logging.getLogger("tun2sx.dns")

__all__ = [
    "BadDnsQuery",
    "DnsAnswer",
    "DnsForward",
    "DnsReply",
    "DnsStatistics",
    "DnsTcpFramer",
    "DnsUpstreamError",
    "FakeDns",
    "forward_query",
    "truncate_for_udp",
]

#   0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
# |                      ID                       |
# |QR|   Opcode  |AA|TC|RD|RA| Z|AD|CD|   RCODE   |
# |   QDCOUNT   |   ANCOUNT   |   NSCOUNT   |   ARCOUNT   |
_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_CD = 0x0010
_OPCODE_MASK = 0x7800

RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4

_TYPE_A = 1
_TYPE_AAAA = 28
_TYPE_PTR = 12
_TYPE_OPT = 41
_TYPE_SVCB = 64
_TYPE_HTTPS = 65
_CLASS_IN = 1
_EDNS_UDP_SIZE = 1232  # The DNS flag day 2020 recommendation.

# Labels that may be faked: host names and service labels. Anything else
# (spaces, dots inside a label, binary) goes upstream untouched, so a strange
# name never reaches an outbound as a "host".
_HOST_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")


class BadDnsQuery(ValueError):
    """Untrusted bytes that are not a usable DNS query.

    Attributes:
        formerr: A FORMERR response to send, or None when nothing should be sent.
    """

    def __init__(self, message: str, formerr: bytes | None = None) -> None:
        super().__init__(message)
        self.formerr = formerr


class DnsUpstreamError(Exception):
    """Forwarding a query upstream failed (outbound, timeout or bad response)."""


@attrs.frozen
class DnsReply:
    """A response ready to send back to the application."""

    data: bytes


@attrs.frozen
class DnsForward:
    """The query must be resolved for real: send `query` upstream unchanged.

    Attributes:
        query: The original query bytes.
        name: The normalized query name (for logs and routing).
        qtype: The numeric query type.
    """

    query: bytes
    name: str
    qtype: int


DnsAnswer = DnsReply | DnsForward


@attrs.define(slots=True)
class DnsStatistics:
    queries: int = 0
    fake_answers: int = 0
    empty_answers: int = 0
    ptr_answers: int = 0
    forwarded: int = 0
    malformed: int = 0
    store_errors: int = 0


_U16 = struct.Struct("!H")
_QTYPE_QCLASS = struct.Struct("!HH")
_ANSWER_HEAD = struct.Struct("!HHHIH")  # name pointer, type, class, TTL, RDLENGTH
_OPT_START = b"\x00\x00\x29"  # root owner name, type OPT (41)
# Our OPT record: root name, type OPT, the UDP size we take, extended
# RCODE 0, version 0, no flags, no options.
_OUR_OPT = b"\x00" + struct.pack("!HHIH", _TYPE_OPT, _EDNS_UDP_SIZE, 0, 0)


def _plain_name(data: bytes) -> tuple[list[bytes], int]:
    """Read the question's name at offset 12 if every label is a host label.

    Returns the labels and the offset just past the name, or ([], -1) when
    the name is compressed, empty, too long or has another kind of label.
    """
    labels: list[bytes] = []
    pos = _HEADER.size
    end = len(data)
    while pos < end:
        length = data[pos]
        if length == 0:
            if not labels or pos - _HEADER.size > 254:
                return [], -1
            return labels, pos + 1
        if length > 63:
            return [], -1
        label = data[pos + 1 : pos + 1 + length]
        if len(label) != length or not _HOST_LABEL.fullmatch(label):
            return [], -1
        labels.append(label)
        pos += 1 + length
    return [], -1


def _header_response(query_flags: int, qid: int, rcode: int) -> bytes:
    """A header-only response keeping the opcode, RD and CD of the query."""
    flags = _QR | _RA | (query_flags & (_OPCODE_MASK | _RD | _CD)) | rcode
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)


def _reverse_pointer_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a PTR name stands for, or None if it is not a full one."""
    if name.endswith(".in-addr.arpa"):
        parts = name[: -len(".in-addr.arpa")].split(".")
        if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts):
            try:
                return ipaddress.IPv4Address(".".join(reversed(parts)))
            except ValueError:
                return None
    elif name.endswith(".ip6.arpa"):
        nibbles = name[: -len(".ip6.arpa")].split(".")
        if len(nibbles) == 32 and all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            return ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
    return None


def _packed(reply: DNSRecord) -> bytes:
    """Serialize a reply; dnslib parses some names it then cannot write back."""
    try:
        return bytes(reply.pack())
    except Exception as exc:  # dnslib raises assorted types here.
        header = reply.header
        formerr = _HEADER.pack(
            header.id,
            _QR | _RA | (header.bitmap & (_OPCODE_MASK | _RD | _CD)) | RCODE_FORMERR,
            0,
            0,
            0,
            0,
        )
        raise BadDnsQuery(f"question cannot be echoed: {exc}", formerr) from None


class FakeDns:
    """Answers queries from the fake-IP store, or says to forward them.

    Args:
        store: The fake-IP table.
        fake_filter: Names that must resolve for real; None for none.
        ttl: TTL of fake answers (short, so clients re-ask and refresh recency).
        empty_qtypes: Types answered with an empty NOERROR for faked names.
    """

    __slots__ = ("_empty_qtypes", "_filter", "_stats", "store", "ttl")

    def __init__(
        self,
        store: FakeIpStore,
        fake_filter: FakeIpFilter | None = None,
        *,
        ttl: int = 1,
        empty_qtypes: frozenset[int] = frozenset({_TYPE_HTTPS, _TYPE_SVCB}),
    ) -> None:
        self.store = store
        self._filter = fake_filter
        self.ttl = ttl
        self._empty_qtypes = empty_qtypes
        self._stats = DnsStatistics()

    def set_filter(self, fake_filter: FakeIpFilter | None) -> None:
        """Answer the names `fake_filter` matches for real from the next query
        on (a configuration reload); addresses already handed out stay."""
        self._filter = fake_filter

    def statistics(self) -> DnsStatistics:
        """A snapshot of the counters."""
        return attrs.evolve(self._stats)

    def handle_query_untrusted(self, data: bytes) -> DnsAnswer:
        """Decide how to answer one DNS query message.

        Args:
            data: The query as received (UDP payload or one TCP frame).

        Returns:
            `DnsReply` with the response, or `DnsForward` for real resolution.

        Raises:
            BadDnsQuery: The message is not a usable query (see `formerr`).
        """
        self._stats.queries += 1
        try:
            return self._handle(data)
        except BadDnsQuery:
            self._stats.malformed += 1
            raise
        except self.store.errors as exc:
            # The table's file is locked too long by another worker, or the
            # disk failed: this query fails, the program and the flows do not.
            self._stats.store_errors += 1
            log.warning("fake-IP DNS: the fake-IP table failed (%s); answering SERVFAIL", exc)
            failed = self.servfail(data)
            if failed is None:  # pragma: no cover - _handle already checked the header
                raise BadDnsQuery("fake-IP table failed") from exc
            return DnsReply(failed)

    def _handle(self, data: bytes) -> DnsAnswer:
        if len(data) < _HEADER.size:
            raise BadDnsQuery("shorter than a DNS header")
        qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if flags & _QR:
            raise BadDnsQuery("a response, not a query")
        if flags & _OPCODE_MASK:
            return DnsReply(_header_response(flags, qid, RCODE_NOTIMP))
        if qdcount == 1 and not ancount and not nscount and arcount <= 1:
            plain = self._plain_answer(data, qid, flags, arcount)
            if plain is not None:
                return plain
        formerr = _header_response(flags, qid, RCODE_FORMERR)
        if qdcount != 1:
            raise BadDnsQuery(f"{qdcount} questions, expected 1", formerr)
        # Imported here, not with the module: the plain path above answers
        # nearly every query, and dnslib costs about 0.5 MiB resident.
        from dnslib import AAAA, A, DNSRecord

        try:
            record = DNSRecord.parse(data)
        except Exception as exc:  # dnslib raises assorted types on bad input.
            raise BadDnsQuery(f"unparsable query: {exc}", formerr) from None
        question = record.q
        labels: tuple[bytes, ...] = question.qname.label
        qtype: int = question.qtype
        name = normalize_name(b".".join(labels).decode("ascii", "replace"))
        fakeable = bool(labels) and all(_HOST_LABEL.fullmatch(label) for label in labels)
        if question.qclass != _CLASS_IN or not fakeable:
            return self._forward(data, name, qtype)
        if qtype == _TYPE_PTR:
            return self._ptr(data, record, name, qtype)
        if self._filter is not None and self._filter.matches(name):
            return self._forward(data, name, qtype)
        if qtype == _TYPE_A:
            return self._fake(record, A(str(self.store.allocate(name, socket.AF_INET))))
        if qtype == _TYPE_AAAA:
            if not self.store.v6_enabled:
                return self._empty(record)
            return self._fake(record, AAAA(str(self.store.allocate(name, socket.AF_INET6))))
        if qtype in self._empty_qtypes:
            return self._empty(record)
        return self._forward(data, name, qtype)

    def _plain_answer(self, data: bytes, qid: int, flags: int, arcount: int) -> DnsReply | None:
        """Answer a plain A/AAAA query for a fakeable name without dnslib.

        Nearly every query an application sends is one question for a host
        name, maybe with an EDNS OPT record; dnslib's parse and pack take
        about 130 us of that, a dozen times the rest, and an application
        that resolves per connection asks twice (A and AAAA). The response
        is byte for byte what the general path builds (tests compare them);
        anything else (compression, other types or classes, filtered names,
        extra records, trailing bytes) returns None for the general path.
        """
        labels, end = _plain_name(data)
        if end < 0 or end + 4 > len(data):
            return None
        qtype, qclass = _QTYPE_QCLASS.unpack_from(data, end)
        if qclass != _CLASS_IN or (qtype != _TYPE_A and qtype != _TYPE_AAAA):
            return None
        question_end = end + 4
        if arcount:
            # Only a lone OPT record filling the rest of the message.
            if data[question_end : question_end + 3] != _OPT_START or question_end + 11 > len(data):
                return None
            (rdlen,) = _U16.unpack_from(data, question_end + 9)
            if question_end + 11 + rdlen != len(data):
                return None
        elif question_end != len(data):
            return None
        name = normalize_name(b".".join(labels).decode("ascii"))
        if self._filter is not None and self._filter.matches(name):
            return None
        stats = self._stats
        if qtype == _TYPE_A:
            rdata = self.store.allocate(name, socket.AF_INET).packed
        elif self.store.v6_enabled:
            rdata = self.store.allocate(name, socket.AF_INET6).packed
        else:
            rdata = b""
        reply_flags = _QR | _RA | (flags & (_RD | _CD))
        parts = [
            _HEADER.pack(qid, reply_flags, 1, 1 if rdata else 0, 0, arcount),
            data[_HEADER.size : question_end],
        ]
        if rdata:
            stats.fake_answers += 1
            # The owner name points back at the question's (offset 12).
            parts.append(_ANSWER_HEAD.pack(0xC00C, qtype, _CLASS_IN, self.ttl, len(rdata)))
            parts.append(rdata)
        else:
            stats.empty_answers += 1
        if arcount:
            parts.append(_OUR_OPT)
        return DnsReply(b"".join(parts))

    def _forward(self, data: bytes, name: str, qtype: int) -> DnsForward:
        self._stats.forwarded += 1
        return DnsForward(data, name, qtype)

    def _response(self, query: DNSRecord, rcode: int = 0) -> DNSRecord:
        from dnslib import EDNS0, DNSHeader, DNSRecord  # only after a parse: see _handle

        header = query.header
        reply = DNSRecord(
            DNSHeader(id=header.id, qr=1, ra=1, rd=header.rd, cd=header.cd, rcode=rcode),
            q=query.q,
        )
        if any(rr.rtype == _TYPE_OPT for rr in query.ar):
            reply.add_ar(EDNS0(udp_len=_EDNS_UDP_SIZE))
        return reply

    def _fake(self, query: DNSRecord, rdata: A | AAAA) -> DnsReply:
        from dnslib import RR, A  # only after a parse: see _handle

        reply = self._response(query)
        qtype = _TYPE_A if isinstance(rdata, A) else _TYPE_AAAA
        reply.add_answer(RR(query.q.qname, qtype, ttl=self.ttl, rdata=rdata))
        self._stats.fake_answers += 1
        return DnsReply(_packed(reply))

    def _empty(self, query: DNSRecord) -> DnsReply:
        self._stats.empty_answers += 1
        return DnsReply(_packed(self._response(query)))

    def _ptr(self, data: bytes, query: DNSRecord, name: str, qtype: int) -> DnsAnswer:
        from dnslib import PTR, RR  # only after a parse: see _handle

        ip = _reverse_pointer_address(name)
        if ip is None or not self.store.contains(ip):
            return self._forward(data, name, qtype)
        mapped = self.store.lookup_ip(ip)
        if mapped is None:
            # A fake address nobody was given: upstream cannot know it either.
            return DnsReply(_packed(self._response(query, RCODE_NXDOMAIN)))
        reply = self._response(query)
        reply.add_answer(RR(query.q.qname, _TYPE_PTR, ttl=self.ttl, rdata=PTR(mapped + ".")))
        self._stats.ptr_answers += 1
        return DnsReply(_packed(reply))

    @staticmethod
    def servfail(query: bytes) -> bytes | None:
        """A SERVFAIL for `query` (when forwarding failed), or None if unreadable."""
        if len(query) < _HEADER.size:
            return None
        qid, flags = struct.unpack_from("!HH", query)
        if flags & _QR:
            return None
        from dnslib import DNSHeader, DNSRecord  # see _handle

        try:
            record = DNSRecord.parse(query)
        except Exception:  # dnslib raises assorted types on bad input.
            return _header_response(flags, qid, RCODE_SERVFAIL)
        header = record.header
        reply = DNSRecord(
            DNSHeader(id=qid, qr=1, ra=1, rd=header.rd, cd=header.cd, rcode=RCODE_SERVFAIL),
            q=record.q,
        )
        try:
            return bytes(reply.pack())
        except Exception:  # dnslib parses some names it cannot write back.
            return _header_response(flags, qid, RCODE_SERVFAIL)


def truncate_for_udp(response: bytes, limit: int = 512) -> bytes:
    """Fit an upstream (TCP) response into a UDP reply of at most `limit` bytes.

    Oversized responses become header + question with TC set, which tells
    the client to retry over TCP (RFC 1035 4.2.1, RFC 7766).
    """
    if len(response) <= limit or len(response) < _HEADER.size:
        return response
    from dnslib import DNSRecord  # see FakeDns._handle

    try:
        record = DNSRecord.parse(response)
        header = record.header
        header.tc = 1
        # One question at most: anything more cannot be a sane reply anyway.
        return bytes(DNSRecord(header, questions=record.questions[:1]).pack())
    except Exception:  # dnslib raises assorted types on bad input.
        qid, flags = struct.unpack_from("!HH", response)
        return _HEADER.pack(qid, flags | _TC, 0, 0, 0, 0)


class DnsTcpFramer:
    """Splits a DNS-over-TCP byte stream into messages (2-byte length prefix).

    A client may pipeline several queries on one connection (RFC 7766), and a
    frame may arrive in pieces; this buffers accordingly.

    Args:
        max_buffer: Bytes that may wait unparsed before the peer is cut off.
    """

    __slots__ = ("_buffer", "max_buffer")

    def __init__(self, max_buffer: int = 4 * 65537) -> None:
        self._buffer = bytearray()
        self.max_buffer = max_buffer

    @staticmethod
    def frame(message: bytes) -> bytes:
        """Prefix `message` with its length. Raises ValueError above 65535 bytes."""
        if len(message) > 0xFFFF:
            raise ValueError(f"DNS message of {len(message)} bytes does not fit TCP framing")
        return struct.pack("!H", len(message)) + message

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer stream bytes.

        Raises:
            BadDnsQuery: The peer sent more than `max_buffer` unconsumed bytes.
        """
        self._buffer += data
        if len(self._buffer) > self.max_buffer:
            raise BadDnsQuery("too much unconsumed DNS-over-TCP data")

    def next_message(self) -> bytes | None:
        """The next whole message, or None until more bytes arrive."""
        if len(self._buffer) < 2:
            return None
        (length,) = struct.unpack_from("!H", self._buffer)
        if len(self._buffer) < 2 + length:
            return None
        message = bytes(self._buffer[2 : 2 + length])
        del self._buffer[: 2 + length]
        return message


async def forward_query(
    query: bytes, upstream: Destination, outbound: Outbound, *, timeout: float = 5.0
) -> bytes:
    """Resolve `query` for real with DNS over TCP through `outbound`.

    Args:
        query: The query bytes (as from `DnsForward.query`).
        upstream: The resolver, e.g. Destination(IPv4Address("1.1.1.1"), 53).
        outbound: Carries the TCP connection (so upstream DNS is proxied too).
        timeout: Seconds for connect, query and response together.

    Returns:
        The response message, its ID checked against the query's.

    Raises:
        DnsUpstreamError: Connect failed, timeout, broken stream or a bad response.
    """
    if len(query) < _HEADER.size:
        raise DnsUpstreamError("query shorter than a DNS header")
    with trio.move_on_after(timeout):
        try:
            stream = await outbound.connect_tcp(upstream)
        except OutboundError as exc:
            raise DnsUpstreamError(f"cannot reach DNS server {upstream}: {exc}") from exc
        async with stream:
            framer = DnsTcpFramer()
            try:
                await stream.send_all(DnsTcpFramer.frame(query))
                # Each read brings at least one byte; a response is <= 65537.
                for _ in range(2 + 0xFFFF):
                    response = framer.next_message()
                    if response is not None:
                        return _check_response(query, response, upstream)
                    data = await stream.receive_some(0xFFFF)
                    if not data:
                        break
                    framer.receive_data(data)
            except trio.BrokenResourceError as exc:
                raise DnsUpstreamError(f"DNS server {upstream} broke the connection") from exc
            raise DnsUpstreamError(f"DNS server {upstream} closed without a complete answer")
    raise DnsUpstreamError(f"DNS server {upstream} did not answer within {timeout:g}s")


def _check_response(query: bytes, response: bytes, upstream: Destination) -> bytes:
    if len(response) < _HEADER.size:
        raise DnsUpstreamError(f"DNS server {upstream} sent a truncated header")
    (qid,) = struct.unpack_from("!H", query)
    rid, flags = struct.unpack_from("!HH", response)
    if rid != qid or not flags & _QR:
        raise DnsUpstreamError(f"DNS server {upstream} answered a different query")
    return response
