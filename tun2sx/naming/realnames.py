"""Which host name a real address was answered for, so domain rules still apply.

A name in the fake-IP filter is resolved for real: its query goes upstream
and the application gets the real address. A flow to that address carries
no name, so without more it would meet only IP rules, and a rule such as
`DOMAIN-SUFFIX,lan,DIRECT` would never see `nas.lan`. `RealNames` remembers,
from each upstream answer passed back to an application, which name each
A/AAAA address in it was given for; when a flow to a real address starts,
the router matches domain rules against that name as well as IP rules
against the address (the first matching rule still wins).

The outbound still receives the address, not the name: the application was
given that address and the filter exists so that it is used (a LAN name
that only the local resolver knows, a captive portal). So the direct
outbound does not resolve a second time, and a proxy connects to the same
address. For a fake IP it is the other way round only because the fake
address stands for nothing but the name.

Entries live as long as the answer's TTL, but at least `floor` seconds
(applications and stub caches keep answers longer than their TTL, and a
flow often starts a while after the lookup) and at most `ceiling`; the
table keeps the `capacity` most recent addresses. A newer answer naming an
address replaces the older one. Each worker process has its own table: with
`--workers`, a flow may land in a worker that did not see the answer, and
then only IP rules apply to it, as before.
"""

from __future__ import annotations

import collections
import ipaddress

import attrs

from tun2sx.naming.fakeip import normalize_name

__all__ = ["RealNames", "RealNamesStatistics"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CAPACITY = 16384
FLOOR = 300.0
CEILING = 86400.0
_CLASS_IN = 1
_ADDRESS_TYPES = (1, 28)  # A, AAAA


@attrs.define(slots=True)
class RealNamesStatistics:
    """Counters and the table size; `statistics()` returns a copy."""

    answers: int = 0
    recorded: int = 0
    malformed: int = 0
    hits: int = 0
    size: int = 0


class RealNames:
    """Real addresses handed out in DNS answers, and the names they were for.

    Args:
        capacity: addresses kept (least recently answered dropped first).
        floor: shortest time an address is kept, seconds.
        ceiling: longest time an address is kept, seconds.
    """

    __slots__ = ("_entries", "_stats", "capacity", "ceiling", "floor")

    def __init__(
        self, capacity: int = CAPACITY, *, floor: float = FLOOR, ceiling: float = CEILING
    ) -> None:
        self.capacity = capacity
        self.floor = floor
        self.ceiling = ceiling
        self._entries: collections.OrderedDict[IPAddress, tuple[str, float]] = (
            collections.OrderedDict()
        )
        self._stats = RealNamesStatistics()

    def statistics(self) -> RealNamesStatistics:
        """A copy of the counters."""
        stats = attrs.evolve(self._stats)
        stats.size = len(self._entries)
        return stats

    def record_response_untrusted(self, response: bytes, now: float) -> int:
        """Remember the addresses of one DNS response for its question's name.

        A response that does not parse is counted and ignored: it only
        means no name for those addresses.

        Args:
            response: the upstream's response, as sent to the application.
            now: the current time (trio's clock).

        Returns:
            How many addresses were recorded.
        """
        # Only forwarded answers (fake-IP-filtered names, other query types)
        # get here: dnslib loads with the first, not with the program.
        from dnslib import DNSRecord

        try:
            record = DNSRecord.parse(response)
            header = record.header
            if not header.qr or header.rcode != 0 or len(record.questions) != 1:
                return 0
            name = normalize_name(str(record.q.qname))
            answers = [
                (ipaddress.ip_address(str(rr.rdata)), float(rr.ttl))
                for rr in record.rr
                if rr.rtype in _ADDRESS_TYPES and rr.rclass == _CLASS_IN
            ]
        except Exception:  # dnslib and ipaddress raise assorted types on bad input.
            self._stats.malformed += 1
            return 0
        if not name or not answers:
            return 0
        self._stats.answers += 1
        entries = self._entries
        for address, ttl in answers:
            entries[address] = (name, now + max(self.floor, min(self.ceiling, ttl)))
            entries.move_to_end(address)
        while len(entries) > self.capacity:
            entries.popitem(last=False)
        self._stats.recorded += len(answers)
        return len(answers)

    def known_name(self, host: str | IPAddress, now: float) -> tuple[str | None, str]:
        """The name a flow to `host` routes by before any sniffing, and its
        source as the controller shows it (`host_source`).

        A fake IP's flow already carries its name as `host` (a string):
        (None, "fake-ip"). A real address: the name it was answered for and
        "dns", or (None, "none").
        """
        if isinstance(host, str):
            return None, "fake-ip"
        name = self.name_for(host, now)
        return name, "none" if name is None else "dns"

    def name_for(self, address: IPAddress, now: float) -> str | None:
        """The name `address` was last answered for, while that answer lasts."""
        entry = self._entries.get(address)
        if entry is None:
            return None
        name, expires = entry
        if expires <= now:
            del self._entries[address]
            return None
        self._stats.hits += 1
        return name
