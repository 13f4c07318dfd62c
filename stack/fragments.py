"""IP reassembly: fragments in, whole datagrams out, in bounded memory.

The kernel fragments what an application sends through the TUN when it is
larger than the device MTU (`ping -s 20000`, a 20 kB UDP datagram), so the
stack must put the pieces together before TCP, UDP or ICMP can see them.
`FragmentStore` owns every datagram being reassembled: it keys fragments as
RFC 791 (source, destination, protocol, identification) and RFC 8200 4.5
(source, destination, identification) say, keeps each datagram's pieces
sorted by offset, and returns the whole packet when the last hole closes.

It is strict, because a fragment that rewrites bytes already received is
the classic way to show one thing to a filter and another to the
destination:

- any overlap discards the whole datagram (RFC 5722 for IPv6; the same for
  IPv4), and later fragments of it are dropped until its time-out ends,
  so they cannot start it afresh; an exact duplicate (same place, same
  bytes, RFC 8200 4.5) is only dropped itself;
- a first fragment that does not hold the whole header chain and the TCP,
  UDP or ICMP header is dropped (RFC 1858, RFC 7112);
- a last fragment that disagrees with what came before discards it.

An IPv6 fragment with offset 0 and no more to follow (an atomic fragment,
RFC 6946) is a whole packet and never touches the store.

Memory is charged per datagram and per held fragment (its data plus a
fixed overhead, so eight-octet fragments cost what they really hold in
Python) and bounded per source address and in total: a fragment that would
pass a limit first evicts the oldest other datagrams (of that source, then
of anyone); one that does not fit even then is refused with its datagram.

Time-outs run from the first fragment (30 s for IPv4, RFC 1122 3.3.2; 60 s
for IPv6, RFC 8200 4.5). When one ends and the first fragment had come, the
store asks for ICMP Time Exceeded, code 1, quoting it (RFC 792, RFC 8200).
Time is passed in; nothing here reads a clock or does I/O. Every outcome
is counted in the `Counter` the network layer shares with it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from typing import Final, NamedTuple

import attrs

from stack.errors import BadPacket
from stack.wire import icmp
from stack.wire.fragment import (
    Fragment,
    is_about_icmp_error,
    parse_fragment_untrusted,
    reassembled_packet,
    upper_layer,
)

# What a datagram being reassembled and each held fragment cost besides
# their data (the objects that hold them).
DATAGRAM_OVERHEAD: Final = 256
FRAGMENT_OVERHEAD: Final = 64
# How much of a first fragment the ICMP Time Exceeded quotes (the error's
# own limits: RFC 1812 4.3.2.3, RFC 4443 2.4(c)).
_QUOTE: Final = {4: 576 - 28, 6: 1280 - 48}
_TIME_EXCEEDED: Final = {4: icmp.ICMP_TIME_EXCEEDED, 6: icmp.ICMP6_TIME_EXCEEDED}
# Code 1 of both: fragment reassembly time exceeded.
REASSEMBLY_TIME_EXCEEDED: Final = 1


@attrs.frozen
class FragmentConfig:
    """Limits of reassembly.

    Attributes:
        timeout_v4: seconds from an IPv4 datagram's first fragment to giving up.
        timeout_v6: the same for IPv6.
        max_bytes: memory all datagrams being reassembled may hold.
        max_bytes_per_source: memory the datagrams of one source address may hold.
    """

    timeout_v4: float = 30.0
    timeout_v6: float = 60.0
    max_bytes: int = 4 * 1024 * 1024
    max_bytes_per_source: int = 1024 * 1024


class FragmentError(NamedTuple):
    """An ICMP error the network layer should send about a datagram.

    Attributes:
        original: the packet to quote (the first fragment, truncated).
        our_addr: the address the error comes from (the datagram's destination).
        type: the ICMP or ICMPv6 type.
        code: the code.
    """

    original: bytes
    our_addr: bytes
    type: int
    code: int


class _Datagram:
    """One datagram being reassembled (or, once `dead`, the tombstone of one
    discarded for an overlap)."""

    __slots__ = (
        "cost",
        "created",
        "dead",
        "deadline",
        "end",
        "head",
        "key",
        "pieces",
        "quote",
        "received",
        "src",
        "starts",
        "version",
    )

    def __init__(self, version: int, key: tuple[bytes, bytes, int, int], now: float, ttl: float):
        self.version = version
        self.key = key
        self.src = key[0]
        self.created = now
        self.deadline = now + ttl
        self.cost = 0
        self.dead = False
        self.end: int | None = None  # the data's length, once the last fragment came
        self.head = b""  # the first fragment's header part
        self.quote: bytes | None = None  # the first fragment, for the ICMP error
        self.pieces: list[tuple[int, int, bytes]] = []  # (start, stop, data), by start
        self.starts: list[int] = []
        self.received = 0


class _Source:
    __slots__ = ("cost", "datagrams")

    def __init__(self) -> None:
        self.cost = 0
        self.datagrams: dict[tuple[int, tuple[bytes, bytes, int, int]], _Datagram] = {}


class FragmentStore:
    """Reassembles IPv4 and IPv6 datagrams.

    Args:
        config: the limits.
        counters: where outcomes are counted (`frag_*`); the network layer
            passes its own so they show in its statistics.
    """

    __slots__ = ("_queues", "_sources", "config", "counters", "held_bytes")

    def __init__(
        self, config: FragmentConfig | None = None, counters: Counter[str] | None = None
    ) -> None:
        self.config = config or FragmentConfig()
        self.counters: Counter[str] = Counter() if counters is None else counters
        # Per version, in order of arrival, which is also deadline order.
        self._queues: dict[int, dict[tuple[bytes, bytes, int, int], _Datagram]] = {4: {}, 6: {}}
        self._sources: dict[bytes, _Source] = {}
        self.held_bytes = 0

    def __len__(self) -> int:
        """The number of datagrams held (tombstones included)."""
        return len(self._queues[4]) + len(self._queues[6])

    def receive(
        self, data: memoryview, now: float, *, verify_checksum: bool = True
    ) -> bytes | None:
        """Take one fragment; return the whole datagram when it completes it.

        Args:
            data: the fragment as read (an IPv4 packet with MF or an offset,
                or an IPv6 packet with a Fragment header).
            now: the current time in seconds.
            verify_checksum: verify the IPv4 header checksum.

        Returns:
            The reassembled packet, with no fragment flags or Fragment
            header, or None. It has not been checked beyond the IP layer.
        """
        counters = self.counters
        try:
            frag = parse_fragment_untrusted(data, verify_checksum=verify_checksum)
        except BadPacket:
            counters["frag_bad"] += 1
            return None
        version = frag.version
        if not frag.offset and not frag.more:
            counters["frag_atomic"] += 1
            return reassembled_packet(version, frag.head, bytes(frag.payload))
        reportable = False
        if not frag.offset:
            upper = upper_layer(version, frag.proto, frag.payload)
            if upper is None:
                counters["frag_tiny"] += 1
                return None
            reportable = _unicast(version, frag.src, frag.dst) and not is_about_icmp_error(
                version, *upper
            )
        queue = self._queues[version]
        key = (frag.src, frag.dst, frag.proto if version == 4 else -1, frag.ident)
        dg = queue.get(key)
        if dg is None:
            config = self.config
            ttl = config.timeout_v4 if version == 4 else config.timeout_v6
            dg = queue[key] = _Datagram(version, key, now, ttl)
            self._sources.setdefault(dg.src, _Source()).datagrams[(version, key)] = dg
        elif dg.dead:
            counters["frag_after_discard"] += 1
            return None
        return self._add(dg, frag, data, reportable)

    def _add(
        self, dg: _Datagram, frag: Fragment, data: memoryview, reportable: bool
    ) -> bytes | None:
        start = frag.offset
        stop = start + len(frag.payload)
        pieces = dg.pieces
        if frag.more:
            if dg.end is not None and stop > dg.end:
                self._discard(dg, "frag_bad")
                return None
        elif (dg.end is not None and dg.end != stop) or (pieces and pieces[-1][1] > stop):
            self._discard(dg, "frag_bad")
            return None
        i = bisect_right(dg.starts, start)
        if i and pieces[i - 1][1] > start:
            prev = pieces[i - 1]
            if prev[0] == start and prev[1] == stop and prev[2] == frag.payload:
                self.counters["frag_duplicates"] += 1
                return None
            self._discard(dg, "frag_overlaps")
            return None
        if i < len(pieces) and pieces[i][0] < stop:
            self._discard(dg, "frag_overlaps")
            return None
        quote = bytes(data[: _QUOTE[dg.version]]) if reportable else None
        cost = stop - start + FRAGMENT_OVERHEAD + (len(quote) if quote else 0)
        if not dg.cost:
            cost += DATAGRAM_OVERHEAD
        if not self._make_room(dg, cost):
            self._remove(dg)
            self.counters["frag_refused"] += 1
            return None
        self._charge(dg, cost)
        pieces.insert(i, (start, stop, bytes(frag.payload)))
        dg.starts.insert(i, start)
        dg.received += stop - start
        if not start:
            dg.head = frag.head
            dg.quote = quote
        if not frag.more:
            dg.end = stop
        if dg.received != dg.end:
            return None
        # No overlaps and nothing past the end: the pieces cover it all.
        self._remove(dg)
        try:
            packet = reassembled_packet(dg.version, dg.head, b"".join(p[2] for p in pieces))
        except ValueError:
            # The first fragment's header made it longer than 65,535 octets.
            self.counters["frag_bad"] += 1
            return None
        self.counters["frag_reassembled"] += 1
        return packet

    def _discard(self, dg: _Datagram, counter: str) -> None:
        """Drop a datagram's data, keeping a tombstone until its time-out."""
        self.counters[counter] += 1
        dg.dead = True
        dg.pieces = []
        dg.starts = []
        dg.quote = None
        self._charge(dg, DATAGRAM_OVERHEAD - dg.cost)

    def _charge(self, dg: _Datagram, cost: int) -> None:
        dg.cost += cost
        self._sources[dg.src].cost += cost
        self.held_bytes += cost

    def _remove(self, dg: _Datagram) -> None:
        del self._queues[dg.version][dg.key]
        source = self._sources[dg.src]
        del source.datagrams[(dg.version, dg.key)]
        source.cost -= dg.cost
        self.held_bytes -= dg.cost
        if not source.datagrams:
            del self._sources[dg.src]

    def _make_room(self, dg: _Datagram, cost: int) -> bool:
        """Evict the oldest other datagrams until `cost` more fits; False if
        it cannot fit even alone."""
        config = self.config
        source = self._sources[dg.src]
        while source.cost + cost > config.max_bytes_per_source:
            victim = _oldest_but(source.datagrams.values(), dg)
            if victim is None:
                return False
            self._evict(victim)
        while self.held_bytes + cost > config.max_bytes:
            candidates = [
                v for v in (_oldest_but(q.values(), dg) for q in self._queues.values()) if v
            ]
            if not candidates:
                return False
            self._evict(min(candidates, key=lambda v: v.created))
        return True

    def _evict(self, dg: _Datagram) -> None:
        self._remove(dg)
        self.counters["frag_evicted"] += 1

    def next_deadline(self) -> float | None:
        """When `handle_timeout` must next be called, or None."""
        # Asked after every batch the engine writes: nothing held is the rule.
        v4, v6 = self._queues[4], self._queues[6]
        if not v4:
            return next(iter(v6.values())).deadline if v6 else None
        first = next(iter(v4.values())).deadline
        if v6:
            return min(first, next(iter(v6.values())).deadline)
        return first

    def handle_timeout(self, now: float) -> list[FragmentError]:
        """Give up on every datagram whose time is up.

        Returns:
            The ICMP Time Exceeded (code 1) messages due: one per datagram
            given up whose first fragment had arrived, unless it was sent to
            a multicast or broadcast address, from no unicast address, or
            carried an ICMP error.
        """
        errors = []
        for version, queue in self._queues.items():
            while queue:
                dg = next(iter(queue.values()))
                if dg.deadline > now:
                    break
                self._remove(dg)
                if dg.dead:
                    continue
                self.counters["frag_timed_out"] += 1
                if dg.quote is not None:
                    errors.append(
                        FragmentError(
                            dg.quote, dg.key[1], _TIME_EXCEEDED[version], REASSEMBLY_TIME_EXCEEDED
                        )
                    )
        return errors


def _oldest_but(datagrams: Iterable[_Datagram], dg: _Datagram) -> _Datagram | None:
    """The first datagram in arrival order that is not `dg`."""
    for other in datagrams:
        if other is not dg:
            return other
    return None


def _unicast(version: int, src: bytes, dst: bytes) -> bool:
    """RFC 1122 3.2.2 / RFC 4443 2.4(e): errors only between unicast hosts."""
    if version == 4:
        return src[0] < 224 and dst[0] < 224 and src != b"\0\0\0\0"
    return src[0] != 0xFF and dst[0] != 0xFF and src != bytes(16)
