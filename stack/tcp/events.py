"""Values that cross the TCP stack's API: flow keys, events, statistics.

Events are what `TcpConnection.next_event` hands to the runtime; they are
small immutable NamedTuples so they cost little to build. `NEED_DATA` is a
sentinel (an enum member, so type checkers can narrow on it), as in h11.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from stack.wire.tcp import TcpHeader


class FlowKey(NamedTuple):
    """A TCP flow as seen from the TUN: the application's end and the remote end.

    Addresses are packed (4 bytes for IPv4, 16 for IPv6).
    """

    app_addr: bytes
    app_port: int
    remote_addr: bytes
    remote_port: int


class DataReceived(NamedTuple):
    """In-order bytes from the application, all that was buffered."""

    data: bytes


class EofReceived(NamedTuple):
    """The application sent FIN: no more data will come from it."""


class ConnectionReset(NamedTuple):
    """The connection was reset (RST received, or retransmissions gave up)."""


class Closed(NamedTuple):
    """Both directions are finished; the runtime may drop the flow."""


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA
"""`next_event` has nothing to report until more segments arrive."""

Event = DataReceived | EofReceived | ConnectionReset | Closed


class ConnectionRequest(NamedTuple):
    """A new SYN for a flow the demux does not know: accept or refuse it."""

    key: FlowKey
    syn: TcpHeader


class TcpStatistics(NamedTuple):
    """Counters of one connection (a snapshot)."""

    segments_in: int
    segments_out: int
    bytes_in: int
    bytes_out: int
    retransmits: int
    fast_retransmits: int
    sack_retransmits: int
    rto_timeouts: int
    dup_segments: int
    ooo_segments: int
    paws_drops: int
    window_probes: int
    challenge_acks: int
    tail_loss_probes: int
    rack_losses: int
    acks_coalesced: int
    challenge_acks_suppressed: int


class Counters:
    """The live counters of one connection, shared by its parts.

    Plain data with the fields of `TcpStatistics`: the sender, the receiver
    and the connection each count what they see, and `snapshot` is what
    `TcpConnection.statistics` returns.
    """

    __slots__ = TcpStatistics._fields

    def __init__(self) -> None:
        self.segments_in = self.segments_out = self.bytes_in = self.bytes_out = 0
        self.retransmits = self.fast_retransmits = self.sack_retransmits = 0
        self.rto_timeouts = self.dup_segments = self.ooo_segments = self.paws_drops = 0
        self.window_probes = self.challenge_acks = self.tail_loss_probes = 0
        self.rack_losses = self.acks_coalesced = self.challenge_acks_suppressed = 0

    def snapshot(self) -> TcpStatistics:
        """Return the counters as an immutable `TcpStatistics`."""
        return TcpStatistics(*(getattr(self, name) for name in TcpStatistics._fields))


class DemuxStatistics(NamedTuple):
    """Counters of the demultiplexer (a snapshot)."""

    connections: int
    pending: int
    half_open: int
    deadline_entries: int  # in the deadline heap, stale ones included
    connection_requests: int
    resets_sent: int
    syn_dropped_half_open: int
    syn_dropped_per_destination: int
    syn_dropped_per_source: int
    syn_evicted: int
    syn_refused_max_connections: int
