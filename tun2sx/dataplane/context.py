"""What a flow may use of the engine that runs it.

The engine owns the TUN, the stack, the streams table and the nursery; a
flow (`tcpflow`, `udpflow`, `dnsserve`) gets a `FlowContext`, the narrow
view it needs: the settings, the counters, the stack to send with, the
router, a way to flush and to start tasks, and the bookkeeping of live
flows. The flow modules import this module, never the engine, so the
engine can import them without a circle.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import attrs

from outbounds.base import Destination
from tun2sx.naming.sniff import SniffConfig

if TYPE_CHECKING:
    import trio

    from outbounds.base import Outbound
    from stack.netstack import NetStack
    from tun2sx.dataplane.tcpstream import TcpStream
    from tun2sx.naming.dns import FakeDns
    from tun2sx.naming.realnames import RealNames
    from tun2sx.naming.router import Network, Router, Rule
    from tun2sx.naming.sniff import Sniffed


class FlowRoute(NamedTuple):
    """How a flow was routed, for its FlowInfo: the same four facts for a
    TCP flow and a UDP session."""

    sniffed: Sniffed | None  # the host name read from the flow's first bytes
    host_source: str  # where the host name came from (FlowInfo.host_source)
    rule: Rule | None  # None: the default outbound decided
    chain: tuple[str, ...] | None  # the outbounds it went through, leaf first


UNROUTED = FlowRoute(None, "none", None, None)


@attrs.frozen
class EngineConfig:
    """Runtime knobs of the engine (the stack's own are in NetStackConfig).

    Attributes:
        connect_timeout: how long a flow's SYN is held while the outbound
            connects; then the application gets an ICMP host unreachable.
        udp_idle_timeout: a UDP session ends after this long without traffic.
        dns_hijack: answer every DNS query (port 53, UDP and TCP) ourselves.
        dns_addresses: our own addresses inside the TUN (packed), where
            DNS is answered with or without `dns_hijack`: the address users
            point their resolver at must not go silent when hijacking is off.
        dns_upstream: where queries that are not answered with a fake IP
            go, through the outbound, over TCP.
        splice_buffer: bytes read at once from either side of a flow.
        splice_share: bytes a flow reads at once while other flows are
            active: its writing on is one step of the engine's one thread,
            and a short one lets another flow's round trip through sooner.
        write_burst: while other flows are active (as for
            `splice_share`), the bytes one flow writes to the TUN in one
            step of the engine (at least one packet; a super-segment
            counts its whole length); the rest of a longer run waits for
            the next rounds, so others' packets are read and written in
            between (tun2sx.dataplane.engine). 0: whole runs.
        max_dns_forwards: concurrent upstream DNS queries; more are dropped.
        sniff: which flows' first bytes are read for a host name, and
            what the name is used for (tun2sx.naming.sniff).
    """

    connect_timeout: float = 10.0
    udp_idle_timeout: float = 60.0
    dns_hijack: bool = True
    dns_addresses: frozenset[bytes] = frozenset()
    dns_upstream: Destination = attrs.field(
        factory=lambda: Destination(ipaddress.IPv4Address("1.1.1.1"), 53)
    )
    splice_buffer: int = 256 * 1024
    splice_share: int = 64 * 1024
    write_burst: int = 48 * 1024
    max_dns_forwards: int = 256
    sniff: SniffConfig = attrs.field(factory=SniffConfig)

    def answers_dns(self, address: bytes) -> bool:
        """Whether a port-53 query to `address` (packed) is ours to answer."""
        return self.dns_hijack or address in self.dns_addresses


_flow_numbers = itertools.count(1)
_prefix = ""


def _id_prefix() -> str:
    """Random for each process: workers are forked, and a prefix from
    before the fork would repeat in every worker (hence the reset)."""
    global _prefix
    if not _prefix:
        # A UUID version 4's first ten bytes, from os.urandom rather than
        # the uuid module (which start-up memory need not carry).
        raw = bytearray(os.urandom(10))
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        h = raw.hex()
        _prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-"
    return _prefix


def _forget_prefix() -> None:
    global _prefix
    _prefix = ""


os.register_at_fork(after_in_child=_forget_prefix)


class FlowInfo:
    """What the stats endpoint shows of one live flow; the flow keeps it current.

    Attributes:
        network: "tcp" or "udp".
        app: the application's endpoint, ``addr:port``.
        destination: where the flow goes (a host name when it came through
            a fake IP).
        outbound: the name of the outbound carrying it.
        started: trio time the flow was connected.
        bytes_up: bytes from the application to the outbound.
        bytes_down: bytes from the outbound to the application.
        sniffed: the host name read from the flow's first bytes (TLS SNI,
            HTTP Host, QUIC SNI), or None.
        host_source: where the host name that routed the flow came from:
            "fake-ip", "sniffed", "dns" (a real address a DNS answer gave
            for a name, tun2sx.naming.realnames) or "none".
        rule: the type of the rule that chose the outbound ("DOMAIN-SUFFIX",
            "IP-CIDR", ...), "Match" for a MATCH rule or the default
            (tun2sx.naming.router.rule_label).
        rule_payload: the rule's value ("example.com"; "" for Match).
        chain: the outbounds the flow went through, as Clash's `chains`:
            the leaf outbound first, then the proxy groups that led to it,
            the outermost (the rule's target) last; one name without groups.
        number: the flow's number in this process (its `id` is made from it).
        wall_started: Unix time the flow was connected (shown as its start).
        closer: ends the flow with a reset toward the application (TCP) or
            ends the session (UDP); set by the flow once it can be closed.
    """

    __slots__ = (
        "app",
        "bytes_down",
        "bytes_up",
        "chain",
        "closer",
        "destination",
        "host_source",
        "network",
        "number",
        "outbound",
        "rule",
        "rule_payload",
        "sniffed",
        "started",
        "wall_started",
    )

    def __init__(
        self,
        network: str,
        app: str,
        destination: Destination,
        outbound: str,
        started: float,
        *,
        sniffed: str | None = None,
        host_source: str = "none",
        rule: str = "Match",
        rule_payload: str = "",
        chain: tuple[str, ...] | None = None,
    ) -> None:
        self.network = network
        self.app = app
        self.destination = destination
        self.outbound = outbound
        self.started = started
        self.bytes_up = 0
        self.bytes_down = 0
        self.sniffed = sniffed
        self.host_source = host_source
        self.rule = rule
        self.rule_payload = rule_payload
        self.chain = (outbound,) if chain is None else chain
        self.number = next(_flow_numbers)
        self.wall_started = time.time()
        self.closer: Callable[[], None] | None = None

    @property
    def id(self) -> str:
        """The flow's name in the controller API, shaped as a UUID.

        A random prefix per process and the flow's number, written out
        only when asked: a `uuid4()` per flow made `FlowInfo()` take 5.6 µs
        instead of 0.2-0.3 µs; with the count it takes 0.2-0.45 µs (timeit).
        """
        return f"{_id_prefix()}{self.number:012x}"

    def close(self) -> bool:
        """Ask the flow to end now (a reset toward the application).

        Returns:
            False when the flow cannot be closed (yet).
        """
        if self.closer is None:
            return False
        self.closer()
        return True


# Upper bounds (seconds) of the connect-time histogram's buckets: from a
# proxy on this machine (well under a millisecond) to the connect timeout.
CONNECT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ConnectTimes:
    """A histogram of outbound connect times, per outbound name.

    Each outbound has one count per bucket of `CONNECT_BUCKETS` (not
    cumulative; the Prometheus exposition adds them up), a last bucket
    for longer ones, the sum and the count.
    """

    __slots__ = ("by_outbound",)

    def __init__(self) -> None:
        self.by_outbound: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, outbound: str, seconds: float) -> None:
        """Count one connect of `outbound` that took `seconds`."""
        entry = self.by_outbound.get(outbound)
        if entry is None:
            entry = self.by_outbound[outbound] = ([0] * (len(CONNECT_BUCKETS) + 1), [0.0])
        entry[0][bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
        entry[1][0] += seconds


class FlowContext(Protocol):
    """The engine as its flows see it.

    Attributes:
        config: the engine's settings.
        counters: event counters shown by the statistics.
        stack: the sans-I/O stack, to accept, refuse and send with.
        router: picks the outbound for a destination.
        dns: the fake-IP DNS answerer, or None when it is off.
        real_names: which name each real address was answered for (DNS
            answers forwarded upstream record here; routing reads it).
        streams: the live TCP streams by flow key; a flow adds its stream
            when it accepts and removes it once finished.
        connect_times: how long outbound connects took, per outbound.
    """

    config: EngineConfig
    counters: Counter[str]
    stack: NetStack
    router: Router
    dns: FakeDns | None
    real_names: RealNames
    streams: dict[object, TcpStream]
    connect_times: ConnectTimes

    @property
    def nursery(self) -> trio.Nursery:
        """Where flows start their tasks."""
        ...

    def flush(self) -> None:
        """Write what the stack has ready for the applications."""
        ...

    def take_ready(self) -> None:
        """Take the packets the device holds now, without waiting (after a
        write the application's kernel answers inline)."""
        ...

    def destination_for(self, addr: bytes, port: int) -> Destination | None:
        """What an application's destination address means (None: unknown fake IP)."""
        ...

    def route(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> Outbound | None:
        """The outbound for a flow (None: rejected by rule); `name`, when
        given, is the host name domain rules match for an address."""
        ...

    def decide(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> tuple[Outbound | None, Rule | None]:
        """`route`, and the rule that decided (None: the default outbound)."""
        ...

    def read_size(self) -> int:
        """How much a flow should read at once now (see `splice_share`)."""
        ...

    def open_flow(
        self,
        network: str,
        app: str,
        dest: Destination,
        outbound: str,
        route: FlowRoute = UNROUTED,
    ) -> FlowInfo:
        """Register a connected flow for the statistics."""
        ...

    def close_flow(self, info: FlowInfo) -> None:
        """Forget a flow, keeping its bytes in the totals."""
        ...
