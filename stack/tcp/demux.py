"""The TCP demultiplexer: 4-tuples to connections, new SYNs to the runtime.

`TcpDemux` plays the listener for every address and port: a SYN for an
unknown flow becomes a `ConnectionRequest` the runtime answers with
`accept` (after dialing the outbound) or `refuse`; segments of known flows
go to their `TcpConnection`; anything else gets an RST built by the rules
of RFC 9293 section 3.10.7.1 (never an RST in reply to an RST).

It is built for many flows: connections that may have output are kept in a
dirty set, so `segments_to_send` never scans idle flows. The demux adds a
connection itself after every segment and timer it hands over; for the
runtime's own calls (`send`, `close`, `abort`, taking data) each connection
gets a callable from the demux at `accept` and calls it. Deadlines live in
a heap with lazy invalidation: the demux records the deadline it scheduled
each connection for, an entry is pushed only when a connection's deadline
moves earlier, entries that no longer match the record are skipped when
popped, and a deadline that moved later simply costs one early wake-up.
Both the set and the record are the demux's alone: a connection knows
neither.

Caps: when pending SYNs plus SYN-RECEIVED connections reach
`max_half_open`, new SYNs are dropped silently (the application retries
its SYN, as with a full SYN backlog); when all flows reach
`max_connections`, a new SYN is answered with RST so the application fails
fast instead of hanging. So that a flood towards one destination (address
and port) or from one source address cannot take every half-open slot,
pending SYNs are also capped per destination and per source, and when the
half-open cap is reached a SYN whose destination (or source) has clearly
fewer pending SYNs than the most represented one evicts that one's oldest
pending SYN. The runtime learns of evictions from `take_evicted` and ends
their flows. Every drop, refusal and eviction is counted.
"""

from __future__ import annotations

import heapq
import itertools
import types
from collections.abc import Hashable, Mapping
from typing import cast

from stack.errors import LocalProtocolError
from stack.seq import MASK
from stack.tcp.config import TcpConfig
from stack.tcp.connection import TcpConnection
from stack.tcp.events import ConnectionRequest, DemuxStatistics, FlowKey
from stack.tcp.groups import PendingGroups
from stack.tcp.options import Negotiated, negotiate
from stack.tcp.state import TcpState
from stack.wire.tcp import ACK, FIN, RST, SYN, DataRun, TcpHeader

_CONTROL = SYN | ACK | RST | FIN
_MAX_QUEUED_RSTS = 4096  # beyond this, RSTs for unknown flows are dropped
# SYNs the flood limits dropped, kept to refuse when the stack stops
# (`refuse_dropped`), at most this many, the newest; and only those younger
# than a Linux client's SYN retries (about 127 s).
_MAX_DROPPED_SYNS = 1024
_DROPPED_SYN_LIFE = 130.0
_MAX_NEGOTIATED = 64  # negotiations kept by the options offered


class TcpDemux:
    """Maps flows to connections and hands new SYNs to the runtime."""

    __slots__ = (
        "_by_destination",
        "_by_source",
        "_config",
        "_connections",
        "_counters",
        "_dirty",
        "_dropped",
        "_evicted",
        "_half_open",
        "_heap",
        "_moved",
        "_negotiated",
        "_pending",
        "_rsts",
        "_scheduled",
        "_tiebreak",
    )

    def __init__(self, config: TcpConfig) -> None:
        """Create an empty demultiplexer.

        Args:
            config: the configuration every connection gets.
        """
        self._config = config
        self._connections: dict[FlowKey, TcpConnection] = {}
        self._pending: dict[FlowKey, TcpHeader] = {}
        # The pending SYNs by destination (address and port) and by source
        # address, for the per-group caps and eviction.
        self._by_destination = PendingGroups()
        self._by_source = PendingGroups()
        self._evicted: list[FlowKey] = []
        # SYNs dropped by the caps, oldest first, with when (`refuse_dropped`).
        self._dropped: dict[FlowKey, tuple[TcpHeader, float]] = {}
        self._half_open: set[TcpConnection] = set()
        self._dirty: set[TcpConnection] = set()
        self._heap: list[tuple[float, int, TcpConnection]] = []
        # The deadline each connection's live heap entry is for.
        self._scheduled: dict[TcpConnection, float] = {}
        # The earliest deadline pushed since `take_moved_deadline` last
        # answered: the runtime's timer need only look at that.
        self._moved: float | None = None
        self._tiebreak = itertools.count()
        self._negotiated: dict[tuple[object, ...], Negotiated] = {}
        self._rsts: list[tuple[FlowKey, TcpHeader, bytes | bytearray | memoryview]] = []
        self._counters = {
            "connection_requests": 0,
            "resets_sent": 0,
            "syn_dropped_half_open": 0,
            "syn_dropped_per_destination": 0,
            "syn_dropped_per_source": 0,
            "syn_evicted": 0,
            "syn_refused_max_connections": 0,
        }

    @property
    def connections(self) -> Mapping[FlowKey, TcpConnection]:
        """Live connections by flow (read-only; closed ones are removed)."""
        return types.MappingProxyType(self._connections)

    def statistics(self) -> DemuxStatistics:
        """Return a snapshot of the demux counters."""
        return DemuxStatistics(
            connections=len(self._connections),
            pending=len(self._pending),
            half_open=self._half_open_count(),
            deadline_entries=len(self._heap),
            **self._counters,
        )

    def segment_received(
        self, key: FlowKey, hdr: TcpHeader, payload: bytes | memoryview, now: float
    ) -> ConnectionRequest | TcpConnection | None:
        """Route one segment from the application.

        Returns:
            The connection the segment went to; a `ConnectionRequest` for a
            new SYN; None when the segment was ignored or answered with RST.
        """
        control = hdr.flags & _CONTROL
        conn = self._connections.get(key)
        if conn is not None:
            if control == SYN and conn.reopened_by(hdr):
                # A new incarnation of the flow ends TIME-WAIT early (RFC
                # 6191, RFC 1122 4.2.2.13); an older SYN is the old
                # connection's to answer, as any segment in TIME-WAIT.
                self._drop(conn)
            else:
                conn.segment_received(hdr, payload, now)
                self._dirty.add(conn)
                return conn
        if key in self._pending:
            if control == SYN:
                self._pending[key] = hdr  # keep the latest SYN
            return None
        if control == SYN:
            if len(self._connections) + len(self._pending) >= self._config.max_connections:
                self._counters["syn_refused_max_connections"] += 1
                self._reply_rst(key, hdr, len(payload))
                return None
            config = self._config
            destination = (key.remote_addr, key.remote_port)
            if self._by_destination.size(destination) >= config.max_pending_per_destination:
                self._counters["syn_dropped_per_destination"] += 1
                self._note_dropped(key, hdr, now)
                return None
            if self._by_source.size(key.app_addr) >= config.max_pending_per_source:
                self._counters["syn_dropped_per_source"] += 1
                self._note_dropped(key, hdr, now)
                return None
            if self._half_open_count() >= config.max_half_open and not self._evict_for(key):
                self._counters["syn_dropped_half_open"] += 1
                self._note_dropped(key, hdr, now)
                return None
            self._add_pending(key, hdr)
            self._counters["connection_requests"] += 1
            return ConnectionRequest(key, hdr)
        if not control & RST:
            self._reply_rst(key, hdr, len(payload))
        return None

    def acks_received(
        self, key: FlowKey, hdrs: list[TcpHeader], now: float
    ) -> ConnectionRequest | TcpConnection | None:
        """Route segments without data of one flow that arrived together.

        A batch's pure ACKs of a connection go to its `acks_received`,
        which may take a run of cumulative ACKs at once; for anything else
        each goes through `segment_received`.

        Returns:
            As `segment_received` does, for the last of them.
        """
        conn = self._connections.get(key)
        if conn is not None and conn.state is not TcpState.TIME_WAIT:
            # (In TIME-WAIT a SYN may replace the connection: one by one.)
            conn.acks_received(hdrs, now)
            self._dirty.add(conn)
            return conn
        result = None
        for hdr in hdrs:
            result = self.segment_received(key, hdr, b"", now)
        return result

    def data_received_run(
        self,
        key: FlowKey,
        segments: list[tuple[TcpHeader, bytes | memoryview]],
        now: float,
    ) -> ConnectionRequest | TcpConnection | None:
        """Route data segments of one flow that arrived together.

        A batch's data segments of a connection (ACK, perhaps PSH; no SYN
        that could replace it) go to its `data_received_run`; for a flow
        without a connection each goes through `segment_received`.

        Returns:
            As `segment_received` does, for the last of them.
        """
        conn = self._connections.get(key)
        if conn is not None:
            conn.data_received_run(segments, now)
            self._dirty.add(conn)
            return conn
        result = None
        for hdr, payload in segments:
            result = self.segment_received(key, hdr, payload, now)
        return result

    def accept(self, key: FlowKey, iss: int, now: float) -> TcpConnection:
        """Accept a pending SYN: the connection enters SYN-RECEIVED.

        Args:
            key: the flow of a `ConnectionRequest`.
            iss: our random initial sequence number.
            now: the current time.

        Raises:
            LocalProtocolError: no SYN is pending for `key`.
        """
        syn = self._pop_pending(key)
        # Connections whose SYNs offered the same options share one
        # negotiation (it is never changed): a lookup instead of a dozen
        # calls per connection. The options an application's stack sends
        # are few; a flood of varied ones only empties the table.
        opts = syn.options
        ipv6 = len(key.app_addr) == 16
        offered = (opts.mss, opts.wscale, opts.sack_permitted, opts.timestamp is None, ipv6)
        negotiated = self._negotiated
        neg = negotiated.get(offered)
        if neg is None:
            if len(negotiated) >= _MAX_NEGOTIATED:
                negotiated.clear()
            neg = negotiated[offered] = negotiate(opts, self._config, ipv6)
        conn = TcpConnection(key, syn, iss, now, self._config, self._changed, neg)
        self._connections[key] = conn
        self._half_open.add(conn)
        self._dirty.add(conn)
        return conn

    def refuse(self, key: FlowKey, now: float) -> None:
        """Refuse a pending SYN with RST (connection refused).

        Raises:
            LocalProtocolError: no SYN is pending for `key`.
        """
        syn = self._pop_pending(key)
        self._reply_rst(key, syn, 0)

    def refuse_dropped(self, now: float) -> None:
        """Refuse with RST the SYNs the flood limits dropped lately.

        For the stack's stop: a dropped SYN's application retries it, and
        once the device is gone the retry goes nowhere, leaving it in
        connect() until its own time-out. A SYN since taken up (pending or
        connected) is its flow's to answer; one older than the client's
        retries is left alone. The memory is emptied.
        """
        dropped, self._dropped = self._dropped, {}
        for key, (syn, when) in dropped.items():
            if now - when > _DROPPED_SYN_LIFE:
                continue
            if key in self._pending or key in self._connections:
                continue
            self._reply_rst(key, syn, 0)

    def _note_dropped(self, key: FlowKey, syn: TcpHeader, now: float) -> None:
        dropped = self._dropped
        dropped.pop(key, None)  # a retry moves to the newest end
        if len(dropped) >= _MAX_DROPPED_SYNS:
            del dropped[next(iter(dropped))]
        dropped[key] = (syn, now)

    def forget_pending(self, key: FlowKey) -> None:
        """Drop a pending SYN without answering (the runtime did, with ICMP)."""
        if key in self._pending:
            self._remove_pending(key)

    def is_pending(self, key: FlowKey) -> bool:
        """Whether a SYN for `key` waits for `accept`, `refuse` or `forget_pending`."""
        return key in self._pending

    def take_evicted(self) -> list[FlowKey]:
        """Return the pending SYNs evicted since the last call, and forget them.

        An evicted SYN is no longer pending: `accept`, `refuse` and
        `forget_pending` treat it as unknown. The runtime should stop
        whatever it was doing for it (dialing its outbound).
        """
        evicted = self._evicted
        self._evicted = []
        return evicted

    def has_output(self) -> bool:
        """Whether `segments_to_send` may return anything or `next_deadline`
        may have moved since they were last called.

        False means neither has changed: a caller that just collected the
        output can skip both (a flow's step often changes nothing).
        """
        return bool(self._rsts or self._dirty)

    def segments_to_send(
        self, now: float
    ) -> list[tuple[FlowKey, TcpHeader, bytes | bytearray | memoryview]]:
        """Return every segment due now, from all connections and the demux."""
        return cast(
            list[tuple[FlowKey, TcpHeader, bytes | bytearray | memoryview]],
            self._collect(now, False),
        )

    def output(
        self, now: float
    ) -> list[tuple[FlowKey, TcpHeader | DataRun, bytes | bytearray | memoryview]]:
        """`segments_to_send`, with runs of full segments as `DataRun` items
        (`TcpConnection.output`)."""
        return self._collect(now, True)

    def _collect(
        self, now: float, runs: bool
    ) -> list[tuple[FlowKey, TcpHeader | DataRun, bytes | bytearray | memoryview]]:
        out: list[tuple[FlowKey, TcpHeader | DataRun, bytes | bytearray | memoryview]]
        out = list(self._rsts)
        self._rsts = []
        dirty = self._dirty
        if dirty:
            for conn in list(dirty):
                key = conn.key
                segments = conn.output(now) if runs else conn.segments_to_send(now)
                for hdr, payload in segments:
                    out.append((key, hdr, payload))
                if conn.state is TcpState.CLOSED:
                    self._drop(conn)
                else:
                    self._schedule(conn)
            dirty.clear()
        return out

    def next_deadline(self) -> float | None:
        """Return when `handle_timeout` must next be called, or None.

        It may be early (a deadline that moved later is found out only
        when it comes), never late.
        """
        for conn in self._dirty:
            if conn.state is not TcpState.CLOSED:
                self._schedule(conn)
        heap = self._heap
        scheduled = self._scheduled
        while heap and scheduled.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def take_moved_deadline(self) -> float | None:
        """The earliest deadline scheduled since the previous call, or None.

        For a timer that sleeps until `next_deadline`: asked once after it
        reads `next_deadline` (to start afresh), then after each output
        collection (`output`, `segments_to_send`, which schedule the
        connections that changed), it says whether the timer must wake
        earlier, without walking the heap. None means no deadline came
        before what the timer already had. Like `next_deadline` it may be
        early, never late; `next_deadline` alone may schedule connections
        that changed since the last collection (seen here on the next call).
        """
        moved = self._moved
        self._moved = None
        return moved

    def handle_timeout(self, now: float) -> list[TcpConnection]:
        """Run the timers of every connection whose deadline has come.

        Returns:
            The connections whose timers ran: only they can have changed
            state, so the program need look at no other (with ten thousand
            flows, waking every one on each timer costs more than the
            traffic).
        """
        heap = self._heap
        scheduled = self._scheduled
        dirty = self._dirty
        fired = []
        while heap and heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(heap)
            if scheduled.get(conn) != deadline:
                continue  # stale entry
            del scheduled[conn]
            conn.handle_timeout(now)
            dirty.add(conn)
            fired.append(conn)
        if len(heap) > 2 * len(self._connections) + 64:
            self._heap = [entry for entry in heap if scheduled.get(entry[2]) == entry[0]]
            heapq.heapify(self._heap)
        return fired

    # ---------------------------------------------------------------- helpers

    def _changed(self, conn: TcpConnection) -> None:
        # A connection dropped here (closed, or a TIME-WAIT replaced by a
        # new incarnation of its flow) may still be called by its stream:
        # it must not come back.
        if self._connections.get(conn.key) is conn:
            self._dirty.add(conn)

    def _schedule(self, conn: TcpConnection) -> None:
        deadline = conn.next_deadline()
        scheduled = self._scheduled
        if deadline is None:
            scheduled.pop(conn, None)
        else:
            at = scheduled.get(conn)
            if at is None or deadline < at:
                scheduled[conn] = deadline
                heapq.heappush(self._heap, (deadline, next(self._tiebreak), conn))
                moved = self._moved
                if moved is None or deadline < moved:
                    self._moved = deadline

    def _drop(self, conn: TcpConnection) -> None:
        del self._connections[conn.key]
        self._half_open.discard(conn)
        self._dirty.discard(conn)
        self._scheduled.pop(conn, None)

    def _pop_pending(self, key: FlowKey) -> TcpHeader:
        if key not in self._pending:
            raise LocalProtocolError(f"no pending SYN for {key}")
        return self._remove_pending(key)

    def _add_pending(self, key: FlowKey, hdr: TcpHeader) -> None:
        self._pending[key] = hdr
        self._by_destination.add((key.remote_addr, key.remote_port), key)
        self._by_source.add(key.app_addr, key)

    def _remove_pending(self, key: FlowKey) -> TcpHeader:
        hdr = self._pending.pop(key)
        self._by_destination.remove((key.remote_addr, key.remote_port), key)
        self._by_source.remove(key.app_addr, key)
        return hdr

    def _evict_for(self, key: FlowKey) -> bool:
        """Make room for `key`'s SYN in a full half-open table, if it is fair.

        The oldest pending SYN of the destination with the most pending
        SYNs goes when `key`'s destination has at least two fewer (one
        fewer would only swap which of the two is ahead); failing that,
        the same by source. Returns whether a SYN was evicted.
        """
        own: Hashable
        for groups, own in (
            (self._by_destination, (key.remote_addr, key.remote_port)),
            (self._by_source, key.app_addr),
        ):
            largest = groups.largest()
            if largest is None:
                return False  # the table is full of SYN-RECEIVED connections
            group, size = largest
            if groups.size(own) + 1 < size:
                victim = groups.oldest(group)
                self._remove_pending(victim)
                self._evicted.append(victim)
                self._counters["syn_evicted"] += 1
                return True
        return False

    def _half_open_count(self) -> int:
        stale = [c for c in self._half_open if c.state is not TcpState.SYN_RECEIVED]
        self._half_open.difference_update(stale)
        return len(self._pending) + len(self._half_open)

    def _reply_rst(self, key: FlowKey, hdr: TcpHeader, plen: int) -> None:
        if len(self._rsts) >= _MAX_QUEUED_RSTS:
            return
        if hdr.flags & ACK:
            rst = TcpHeader(key.remote_port, key.app_port, hdr.ack, 0, RST, 0)
        else:
            seg_len = plen + (1 if hdr.flags & SYN else 0) + (1 if hdr.flags & FIN else 0)
            ack = (hdr.seq + seg_len) & MASK
            rst = TcpHeader(key.remote_port, key.app_port, 0, ack, RST | ACK, 0)
        self._rsts.append((key, rst, b""))
        self._counters["resets_sent"] += 1
