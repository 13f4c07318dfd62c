"""The direct outbound's own DNS resolver.

With fake-IP DNS the system resolver is usually tun2sx itself (resolv.conf
points into the TUN), so a direct flow to a host name cannot ask it: it would
get a fake address back and connect into the TUN again. `DirectResolver`
therefore talks to its own servers, through sockets made by `outbounds.net`
(fwmark, interface, `protect(fd)`), so its queries leave the host the way
the direct outbound's connections do.

What it does, and what it leaves out on purpose:

* A and AAAA are asked at once; IPv4 addresses come first in the result
  (the order the direct outbound tries them in).
* UDP with a per-try timeout, servers in order, `attempts` rounds; a
  truncated answer (TC) is asked again over TCP. No TCP after a UDP
  timeout: a server that drops UDP is the next server's turn.
* Answers are cached per (name, type) for their TTL, clamped to
  [`MIN_TTL`, `MAX_TTL`]; NXDOMAIN and "no data" are cached for the SOA
  negative TTL (RFC 2308), clamped to [`NEGATIVE_MIN_TTL`,
  `NEGATIVE_MAX_TTL`], and not at all without an SOA. Failures (timeouts,
  SERVFAIL) are not cached. The cache is an LRU of `cache_size` entries.
* Concurrent lookups of one name and type share one query; when the task
  that asks is cancelled, a waiting task asks again.
* Addresses inside `exclude` (the fake-IP pools) are dropped from answers: a
  loopback stub that forwards to tun2sx must not make the direct outbound
  connect to a fake address.

Bad input never raises anything but `OutboundError`: a reply that does not
parse, answers another question, or has an impossible record is counted
(`malformed`) and that server counts as failed. Every failure becomes an
`OutboundError(HOST_UNREACHABLE)` whose message is one line saying why.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import os
import socket
import struct
from collections.abc import Iterable, Sequence

import attrs
import trio

from .base import Destination, FailureReply, IPAddress, OutboundError
from .net import SocketOptions, open_tcp, open_udp_socket

__all__ = [
    "DEFAULT_DNS_PORT",
    "DirectResolver",
    "ResolverStatistics",
    "parse_nameserver",
    "resolv_conf_nameservers",
]

DEFAULT_DNS_PORT = 53
QUERY_TIMEOUT = 2.0  # seconds per UDP (or TCP) try of one server
ATTEMPTS = 2  # rounds over the server list
# A TTL of 0 would mean a query per connection; a day-long one would pin an
# address long after its owner moved it.
MIN_TTL = 5.0
MAX_TTL = 3600.0
NEGATIVE_MIN_TTL = 1.0
NEGATIVE_MAX_TTL = 60.0
CACHE_SIZE = 4096
_EDNS_UDP_SIZE = 1232
_MAX_MESSAGE = 65535

_RCODE_NOERROR = 0
_RCODE_NXDOMAIN = 3
_TYPE_A = 1
_TYPE_AAAA = 28
_TYPE_CNAME = 5
_TYPE_SOA = 6
_TYPE_NAMES = {_TYPE_A: "A", _TYPE_AAAA: "AAAA"}
_CLASS_IN = 1
_U16 = struct.Struct("!H")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_nameserver(text: str) -> Destination:
    """`ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT` as a server's address.

    Host names are refused: the resolver cannot resolve its own servers.

    Raises:
        ValueError: The message says what is wrong.
    """
    text = text.strip()
    host, port = text, DEFAULT_DNS_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected ADDRESS or ADDRESS:PORT, got {text!r}")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"expected an IP address with an optional :PORT, got {text!r} "
            "(a server cannot be named by a host name)"
        ) from None
    return Destination(address, port)


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"bad port in {whole!r}") from None
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port {port} in {whole!r} is outside 1..65535")
    return port


def resolv_conf_nameservers(text: str) -> list[Destination]:
    """The `nameserver` lines of a resolv.conf, in order; bad lines skipped."""
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                servers.append(Destination(ipaddress.ip_address(words[1]), DEFAULT_DNS_PORT))
            except ValueError:
                continue
    return servers


@attrs.define(slots=True)
class ResolverStatistics:
    """Counters; `DirectResolver.statistics()` returns a copy."""

    lookups: int = 0
    cache_hits: int = 0
    coalesced: int = 0
    queries: int = 0
    tcp_queries: int = 0
    timeouts: int = 0
    malformed: int = 0
    server_failures: int = 0
    failures: int = 0
    fake_answers: int = 0


class BadDnsAnswer(ValueError):
    """A reply that is not a usable answer to our question."""


@attrs.frozen
class _Outcome:
    """What one (name, type) lookup gave.

    No addresses and no `failure` is a negative answer from `server` ("no
    data", or NXDOMAIN when `nxdomain`); `failure` says why no server gave
    an answer at all. `expires` is the trio time the outcome may be used
    until (not after now: not cached).
    """

    addresses: tuple[IPAddress, ...]
    expires: float
    server: str = ""
    nxdomain: bool = False
    failure: str | None = None


@attrs.frozen
class _Reply:
    """A parsed reply: the checked facts the resolver needs."""

    rcode: int
    truncated: bool
    addresses: tuple[IPAddress, ...]
    ttl: float  # of the answer records used; negative TTL for NXDOMAIN/no data
    has_soa: bool


def build_query(name: str, qtype: int, qid: int) -> bytes:
    """A recursive query with an EDNS OPT record (so UDP answers may be large).

    Raises:
        OutboundError: `name` cannot be written as a DNS name.
    """
    # dnslib is imported by the first query, not with the module: the direct
    # outbound always exists, but only flows it takes by name need DNS.
    from dnslib import EDNS0, DNSQuestion, DNSRecord

    try:
        record = DNSRecord(q=DNSQuestion(name, qtype))
        record.header.id = qid
        record.header.rd = 1
        record.add_ar(EDNS0(udp_len=_EDNS_UDP_SIZE))
        return bytes(record.pack())
    except Exception as exc:  # dnslib raises assorted types on bad labels.
        raise OutboundError(
            FailureReply.HOST_UNREACHABLE, f"cannot resolve {name!r}: not a valid DNS name ({exc})"
        ) from None


def parse_reply_untrusted(data: bytes, qid: int, name: str, qtype: int) -> _Reply:
    """Check a reply against our question and pull out the addresses.

    Follows CNAMEs from `name`; only A/AAAA records owned by the name or
    its chain count. The TTL is the smallest of the records used.

    Raises:
        BadDnsAnswer: Unparsable, another ID or question, or a bad record.
    """
    if len(data) < 12:
        raise BadDnsAnswer("shorter than a DNS header")
    if _U16.unpack_from(data)[0] != qid:
        raise BadDnsAnswer("another query's ID")
    from dnslib import CNAME, SOA, DNSLabel, DNSRecord  # see build_query

    try:
        record = DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises assorted types on bad input.
        raise BadDnsAnswer(f"unparsable: {exc}") from None
    header = record.header
    if not header.qr or header.opcode != 0:
        raise BadDnsAnswer("not a response to a standard query")
    if len(record.questions) != 1:
        raise BadDnsAnswer(f"{len(record.questions)} questions in the reply")
    question = record.q
    # The name as dnslib writes it (IDNA, escapes), to compare like with like.
    name = _normalize(str(DNSLabel(name)))
    if (
        _normalize(str(question.qname)) != name
        or question.qtype != qtype
        or question.qclass != _CLASS_IN
    ):
        raise BadDnsAnswer("the reply is for another question")
    aliases: dict[str, tuple[str, float]] = {}
    for rr in record.rr:
        if rr.rtype == _TYPE_CNAME and rr.rclass == _CLASS_IN and isinstance(rr.rdata, CNAME):
            aliases.setdefault(_normalize(str(rr.rname)), (_normalize(str(rr.rdata.label)), rr.ttl))
    # Follow the chain from the question's name; a cycle ends it.
    owners = {name}
    ttl = math.inf
    link = aliases.get(name)
    while link is not None and link[0] not in owners:
        owners.add(link[0])
        ttl = min(ttl, link[1])
        link = aliases.get(link[0])
    addresses: list[IPAddress] = []
    for rr in record.rr:
        if rr.rtype != qtype or rr.rclass != _CLASS_IN:
            continue
        if _normalize(str(rr.rname)) not in owners:
            continue
        try:
            address = ipaddress.ip_address(str(rr.rdata))
        except ValueError:
            raise BadDnsAnswer(f"bad {_TYPE_NAMES.get(qtype, qtype)} record {rr.rdata!s}") from None
        if (address.version == 4) != (qtype == _TYPE_A):
            raise BadDnsAnswer(f"a {_TYPE_NAMES.get(qtype, qtype)} record holds {address}")
        if address not in addresses:
            addresses.append(address)
        ttl = min(ttl, rr.ttl)
    has_soa = False
    if not addresses:
        # RFC 2308 section 5: the negative TTL is the smaller of the SOA's
        # own TTL and its MINIMUM field.
        for rr in record.auth:
            if rr.rtype == _TYPE_SOA and isinstance(rr.rdata, SOA):
                has_soa = True
                ttl = min(ttl, rr.ttl, rr.rdata.times[4])
    return _Reply(
        header.rcode, bool(header.tc), tuple(addresses), 0.0 if ttl == math.inf else ttl, has_soa
    )


def _normalize(name: str) -> str:
    lowered = name.encode("utf-8", "surrogateescape").lower().decode("utf-8", "surrogateescape")
    return lowered[:-1] if lowered.endswith(".") else lowered


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class _Pending:
    """One lookup in flight; waiters read `outcome` once `done` is set."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: _Outcome | None = None  # None after done: the asker was cancelled


class DirectResolver:
    """Resolves names for the direct outbound with its own servers.

    Args:
        servers: The servers (IP address and port), asked in order.
        socket_options: Loop avoidance for the query sockets.
        timeout: Seconds per try of one server.
        attempts: Rounds over `servers` before giving up.
        exclude: Networks whose addresses are dropped from answers (the
            fake-IP pools).
        cache_size: Names and types kept in the cache.
    """

    __slots__ = (
        "_cache",
        "_cache_size",
        "_exclude",
        "_pending",
        "_stats",
        "attempts",
        "servers",
        "socket_options",
        "timeout",
    )

    def __init__(
        self,
        servers: Sequence[Destination],
        socket_options: SocketOptions | None = None,
        *,
        timeout: float = QUERY_TIMEOUT,
        attempts: int = ATTEMPTS,
        exclude: Iterable[IPNetwork] = (),
        cache_size: int = CACHE_SIZE,
    ) -> None:
        for server in servers:
            if isinstance(server.host, str):
                raise ValueError(f"DNS server {server} is not an IP address")
        self.servers = tuple(servers)
        self.socket_options = socket_options or SocketOptions()
        self.timeout = timeout
        self.attempts = attempts
        self._exclude = tuple(exclude)
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, int], _Outcome] = collections.OrderedDict()
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._stats = ResolverStatistics()

    def __repr__(self) -> str:
        return f"<DirectResolver {', '.join(map(str, self.servers)) or 'without servers'}>"

    def statistics(self) -> ResolverStatistics:
        """A copy of the counters."""
        return attrs.evolve(self._stats)

    async def resolve(self, host: str) -> list[IPAddress]:
        """The addresses of `host`, IPv4 first, then IPv6.

        Raises:
            OutboundError: HOST_UNREACHABLE, with one line saying why (no
                such name, no address, no server answered, no server).
        """
        self._stats.lookups += 1
        name = _normalize(host)
        try:
            return [ipaddress.ip_address(name)]
        except ValueError:
            pass
        if not self.servers:
            self._stats.failures += 1
            raise OutboundError(
                FailureReply.HOST_UNREACHABLE,
                f"cannot resolve {name!r}: the direct outbound has no DNS server "
                "(set --direct-dns or dns.direct)",
            )
        # Checked here, so a bad name fails before any task is started.
        build_query(name, _TYPE_A, 0)
        now = trio.current_time()
        v4 = self._cached(name, _TYPE_A, now)
        v6 = self._cached(name, _TYPE_AAAA, now)
        if v4 is None or v6 is None:
            results: dict[int, _Outcome] = {}

            async def lookup(qtype: int) -> None:
                results[qtype] = await self._lookup(name, qtype)

            async with trio.open_nursery() as nursery:
                if v4 is None:
                    nursery.start_soon(lookup, _TYPE_A)
                if v6 is None:
                    nursery.start_soon(lookup, _TYPE_AAAA)
            v4 = v4 or results[_TYPE_A]
            v6 = v6 or results[_TYPE_AAAA]
        else:
            self._stats.cache_hits += 1
        addresses = [*v4.addresses, *v6.addresses]
        if addresses:
            return addresses
        self._stats.failures += 1
        raise OutboundError(FailureReply.HOST_UNREACHABLE, _failure(name, v4, v6))

    def _cached(self, name: str, qtype: int, now: float) -> _Outcome | None:
        key = (name, qtype)
        outcome = self._cache.get(key)
        if outcome is None:
            return None
        if outcome.expires <= now:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return outcome

    async def _lookup(self, name: str, qtype: int) -> _Outcome:
        """One (name, type): from the cache, a lookup in flight, or the servers."""
        key = (name, qtype)
        while True:
            cached = self._cached(name, qtype, trio.current_time())
            if cached is not None:
                return cached
            pending = self._pending.get(key)
            if pending is None:
                break
            self._stats.coalesced += 1
            await pending.done.wait()
            if pending.outcome is not None:
                return pending.outcome
            # The task that asked was cancelled: ask again (or wait for a
            # newer asker that got there first).
        pending = self._pending[key] = _Pending()
        try:
            outcome = await self._ask(name, qtype)
            pending.outcome = outcome
            if outcome.expires > trio.current_time():
                self._cache[key] = outcome
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return outcome
        finally:
            del self._pending[key]
            pending.done.set()

    async def _ask(self, name: str, qtype: int) -> _Outcome:
        """Ask the servers in turn until one gives a usable answer."""
        # Each server's last problem, in server order, is what a user needs.
        problems: dict[str, str] = {}
        for _attempt in range(self.attempts):
            for server in self.servers:
                reply, problem = await self._ask_server(server, name, qtype)
                if reply is not None:
                    return self._outcome(reply, server)
                problems[str(server)] = f"{server} {problem}"
        return _Outcome((), -math.inf, failure="; ".join(problems.values()))

    def _outcome(self, reply: _Reply, server: Destination) -> _Outcome:
        now = trio.current_time()
        if reply.rcode == _RCODE_NXDOMAIN or not reply.addresses:
            expires = (
                now + _clamp(reply.ttl, NEGATIVE_MIN_TTL, NEGATIVE_MAX_TTL)
                if reply.has_soa
                else -math.inf
            )
            nxdomain = reply.rcode == _RCODE_NXDOMAIN
            return _Outcome((), expires, server=str(server), nxdomain=nxdomain)
        usable = tuple(a for a in reply.addresses if not any(a in net for net in self._exclude))
        if not usable:
            self._stats.fake_answers += 1
            return _Outcome(
                (),
                -math.inf,
                failure=f"{server} answered only with fake IPs "
                f"({', '.join(map(str, reply.addresses))}): does it forward to tun2sx?",
            )
        return _Outcome(usable, now + _clamp(reply.ttl, MIN_TTL, MAX_TTL), server=str(server))

    async def _ask_server(
        self, server: Destination, name: str, qtype: int
    ) -> tuple[_Reply | None, str]:
        """One try of one server: the reply, or None and what went wrong."""
        # The system's CSPRNG, as `secrets.randbits` (whose import brings hashlib and
        # OpenSSL's libcrypto, about 4 MiB resident, for this one call).
        qid = int.from_bytes(os.urandom(2), "big")
        query = build_query(name, qtype, qid)
        self._stats.queries += 1
        try:
            data = await self._udp_exchange(server, query)
            if data is None:
                self._stats.timeouts += 1
                return None, f"did not answer within {self.timeout:g}s"
            reply = parse_reply_untrusted(data, qid, name, qtype)
            if reply.truncated:
                self._stats.tcp_queries += 1
                data = await self._tcp_exchange(server, query)
                if data is None:
                    self._stats.timeouts += 1
                    return None, f"did not answer over TCP within {self.timeout:g}s"
                reply = parse_reply_untrusted(data, qid, name, qtype)
        except BadDnsAnswer as exc:
            self._stats.malformed += 1
            return None, f"sent a bad reply ({exc})"
        except OutboundError as exc:
            self._stats.server_failures += 1
            return None, f"failed: {exc}"
        except OSError as exc:
            self._stats.server_failures += 1
            return None, f"failed: {exc.strerror or exc}"
        if reply.rcode not in (_RCODE_NOERROR, _RCODE_NXDOMAIN):
            self._stats.server_failures += 1
            return None, f"answered {_rcode_name(reply.rcode)}"
        return reply, ""

    async def _udp_exchange(self, server: Destination, query: bytes) -> bytes | None:
        """Send `query` over UDP; the first reply with its ID, None on timeout."""
        assert not isinstance(server.host, str)
        family = socket.AF_INET if server.host.version == 4 else socket.AF_INET6
        sock = open_udp_socket(family, self.socket_options)
        try:
            with trio.move_on_after(self.timeout):
                sock.connect((str(server.host), server.port))
                await sock.send(query)
                while True:
                    data = await sock.receive()
                    # A connected socket only hears from the server; a stray
                    # datagram with another ID (a late reply) is not ours.
                    if len(data) >= 2 and data[:2] == query[:2]:
                        return data
                    self._stats.malformed += 1
        finally:
            sock.close()
        return None

    async def _tcp_exchange(self, server: Destination, query: bytes) -> bytes | None:
        """Send `query` over TCP (RFC 7766 framing); the reply, None on timeout."""
        assert not isinstance(server.host, str)
        with trio.move_on_after(self.timeout):
            stream = await open_tcp(server.host, server.port, self.socket_options)
            try:
                await stream.send_all(_U16.pack(len(query)) + query)
                buffer = bytearray()
                while len(buffer) < 2 or len(buffer) < 2 + _U16.unpack_from(buffer)[0]:
                    chunk = await stream.receive_some(_MAX_MESSAGE)
                    if not chunk:
                        raise BadDnsAnswer("the server closed before a whole reply")
                    buffer += chunk
                return bytes(buffer[2 : 2 + _U16.unpack_from(buffer)[0]])
            except trio.BrokenResourceError as exc:
                raise OutboundError(FailureReply.RESET, "the TCP connection broke") from exc
            finally:
                stream.close_now()
        return None


def _rcode_name(rcode: int) -> str:
    names = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 5: "REFUSED"}
    return names.get(rcode, f"RCODE {rcode}")


def _failure(name: str, v4: _Outcome, v6: _Outcome) -> str:
    """One line for a lookup that gave no address."""
    for outcome in (v4, v6):
        if outcome.nxdomain:
            return f"cannot resolve {name!r}: no such name (NXDOMAIN from {outcome.server})"
    for outcome in (v4, v6):
        if outcome.failure is not None:
            return f"cannot resolve {name!r}: {outcome.failure}"
    return f"cannot resolve {name!r}: it has no IPv4 or IPv6 address (answer from {v4.server})"
