"""The network-layer demultiplexer: IP packets in, transport events out.

`NetStack` parses each packet read from the TUN, hands TCP segments to the
TCP demultiplexer, turns UDP datagrams into events for the program, answers
ICMP echo requests itself (the outbound protocols cannot carry ICMP), and
builds every packet that goes back towards the applications. It counts what
it drops, by reason, instead of raising: one bad packet must never cost
another flow anything.

Like the rest of `stack`, it does no I/O: the runtime feeds it bytes and
time, and writes out what `packets_to_send` returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import attrs

from stack.errors import BadPacket
from stack.fragments import FragmentConfig, FragmentStore
from stack.tcp import ConnectionRequest, FlowKey, TcpConfig, TcpConnection, TcpDemux
from stack.wire import icmp
from stack.wire.fragment import fragment_packet
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import (
    Packet,
    build_icmp_error,
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    parse_packet_untrusted,
)
from stack.wire.segment import TcpTemplate, parse_plain_tcp_untrusted, source_address
from stack.wire.tcp import ACK, PSH, DataRun, TcpHeader
from stack.wire.udp import UdpHeader

_ACK_PSH = ACK | PSH

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58


@attrs.frozen
class NetStackConfig:
    """Settings of the network layer.

    Attributes:
        tcp: the TCP settings, shared by every connection.
        partial_checksum: write TCP/UDP packets with only the pseudo-header
            sum (the TUN offload finishes the checksum).
        answer_ping: reply to ICMP/ICMPv6 echo requests locally.
        ttl: TTL / hop limit of the packets we build.
        trusted_sources: source addresses (packed) whose packets' checksums
            are not verified: the TUN's own addresses, which only the local
            host sends from, and whose packets the local kernel
            checksummed itself (docs/wire.md). Empty: verify everything.
        mtu: the device MTU: a UDP or ICMP packet we build that is longer
            goes out in fragments (TCP segments never are: GSO cuts them).
        fragments: the reassembly limits.
    """

    tcp: TcpConfig = attrs.field(factory=TcpConfig)
    partial_checksum: bool = False
    answer_ping: bool = True
    ttl: int = 64
    trusted_sources: frozenset[bytes] = frozenset()
    mtu: int = 1500
    fragments: FragmentConfig = attrs.field(factory=FragmentConfig)


class GsoPacket(NamedTuple):
    """A TCP super-segment to be cut into IP packets of at most `packet_size`
    octets by the device (its MTU is larger than the application's)."""

    data: bytes
    packet_size: int


# Templates are per address pair (application and destination); past this
# many the table starts again, so it cannot grow without bound.
_MAX_TEMPLATES = 4096
_tuple_new = tuple.__new__

# No segment's payload is cut below this (the stack's floor on a peer's MSS):
# ACKs and other short segments skip the connection lookup.
_MIN_MSS = 64


class UdpDatagram(NamedTuple):
    """A UDP datagram from an application.

    Attributes:
        src: the application's address (packed, 4 or 16 bytes).
        src_port: the application's port.
        dst: the destination address the application used.
        dst_port: the destination port.
        payload: the datagram's payload (a copy, safe to keep).
    """

    src: bytes
    src_port: int
    dst: bytes
    dst_port: int
    payload: bytes


class NetStack:
    """Parses packets, dispatches them, and collects the packets to send.

    `receive` returns at most one event per packet: a `ConnectionRequest`
    (a new TCP SYN for the program to dial and then `accept`/`refuse`), the
    `TcpConnection` a segment touched (so the program can wake whoever waits
    on it), a `UdpDatagram`, or None.
    """

    __slots__ = (
        "_ident",
        "_out",
        "_templates",
        "_trusted",
        "config",
        "counters",
        "fragments",
        "tcp",
    )

    def __init__(self, config: NetStackConfig | None = None) -> None:
        self.config = config or NetStackConfig()
        self.tcp = TcpDemux(self.config.tcp)
        self._out: list[bytes | GsoPacket] = []
        self._templates: dict[tuple[bytes, bytes], TcpTemplate] = {}
        self._trusted = self.config.trusted_sources
        self.counters: Counter[str] = Counter()
        self.fragments = FragmentStore(self.config.fragments, self.counters)
        self._ident = 0  # of the datagrams we fragment

    def receive(
        self, data: memoryview, now: float, *, checksum_trusted: bool = False
    ) -> ConnectionRequest | TcpConnection | UdpDatagram | None:
        """Take one IP packet from the TUN.

        Args:
            data: the packet.
            now: the current time in seconds.
            checksum_trusted: the kernel vouched for the checksums.
        """
        self.counters["rx_packets"] += 1
        item = self._take(data, checksum_trusted, now)
        if item is None or isinstance(item, UdpDatagram):
            return item
        key, hdr, payload = item
        return self.tcp.segment_received(key, hdr, payload, now)

    def receive_batch(
        self, packets: Iterable[tuple[memoryview, bool]], now: float
    ) -> list[ConnectionRequest | TcpConnection | UdpDatagram]:
        """Take a batch of IP packets read from the TUN together.

        Each packet is handled as `receive` would, in order, except that
        the pure ACKs of a flow (no data, no SACK blocks) wait until
        another segment of that flow or the end of the batch, and then go
        to the demux together: a connection may take a run of cumulative
        ACKs at once (`TcpConnection.acks_received`). A download brings an
        ACK per second segment, and when the engine falls behind, a TUN
        read holds many ACKs of the same flow.

        Args:
            packets: (packet, checksum_trusted) pairs, in arrival order.
            now: the current time in seconds.

        Returns:
            The events `receive` would have returned, without the Nones;
            a connection may appear more than once.
        """
        events: list[ConnectionRequest | TcpConnection | UdpDatagram] = []
        tcp = self.tcp
        take = self._take_general
        sources = self._trusted
        held: dict[FlowKey, list[TcpHeader]] = {}
        # The data segments of one flow in a row, delivered together.
        data_key: FlowKey | None = None
        flow_data: list[tuple[TcpHeader, bytes | memoryview]] = []
        acks_event = None
        count = 0
        for data, trusted in packets:
            count += 1
            # The common TCP packet without the call `_take` would add.
            try:
                seg = parse_plain_tcp_untrusted(data, not trusted, sources)
            except BadPacket:
                seg = None  # `_take_general` decides and counts
            if seg is not None:
                src, dst, hdr, payload = seg
                if (
                    data_key is not None
                    and payload
                    and (src, hdr[0], dst, hdr[1]) == data_key
                    and (hdr[4] == ACK or hdr[4] == _ACK_PSH)
                    and not hdr[8][3]
                ):
                    # More data of the flow in a row (as below, without
                    # making its key: a plain tuple compares the same).
                    flow_data.append((hdr, payload))
                    continue
                key = _tuple_new(FlowKey, (src, hdr.src_port, dst, hdr.dst_port))
            else:
                item = take(data, trusted, now)
                if item is None:
                    continue
                if isinstance(item, UdpDatagram):
                    events.append(item)
                    continue
                key, hdr, payload = item
            if not payload:
                if hdr.flags == ACK and not hdr.options.sack_blocks:
                    if data_key is not None and key == data_key:
                        # The flow's data so far comes first.
                        event = tcp.data_received_run(key, flow_data, now) or acks_event
                        if event is not None:
                            events.append(event)
                        data_key = None
                    run = held.get(key)
                    if run is None:
                        held[key] = [hdr]
                    else:
                        run.append(hdr)
                    continue
            elif hdr.flags in (ACK, _ACK_PSH) and not hdr.options.sack_blocks:
                if key == data_key:
                    flow_data.append((hdr, payload))
                    continue
                if data_key is not None:
                    event = tcp.data_received_run(data_key, flow_data, now) or acks_event
                    if event is not None:
                        events.append(event)
                run = held.pop(key, None)
                # The flow's earlier ACKs come first (one event for both).
                acks_event = None if run is None else tcp.acks_received(key, run, now)
                data_key = key
                flow_data = [(hdr, payload)]
                continue
            if data_key is not None and key == data_key:
                event = tcp.data_received_run(key, flow_data, now) or acks_event
                if event is not None:
                    events.append(event)
                data_key = None
            event = None
            run = held.pop(key, None)
            if run is not None:
                # The flow's earlier ACKs come first: order within a flow
                # is kept (flows do not depend on each other).
                event = tcp.acks_received(key, run, now)
            event = tcp.segment_received(key, hdr, payload, now) or event
            if event is not None:
                events.append(event)
        if data_key is not None:
            event = tcp.data_received_run(data_key, flow_data, now) or acks_event
            if event is not None:
                events.append(event)
        for key, run in held.items():
            if len(run) == 1:
                event = tcp.segment_received(key, run[0], b"", now)
            else:
                event = tcp.acks_received(key, run, now)
            if event is not None:
                events.append(event)
        self.counters["rx_packets"] += count
        return events

    def _take(
        self, data: memoryview, checksum_trusted: bool, now: float
    ) -> tuple[FlowKey, TcpHeader, memoryview] | UdpDatagram | None:
        """Parse one packet: a TCP segment to route, a UDP datagram, or None.

        ICMP is answered here and every drop counted.
        """
        try:
            seg = parse_plain_tcp_untrusted(data, not checksum_trusted, self._trusted)
        except BadPacket:
            seg = None  # `_take_general` decides and counts
        if seg is None:
            return self._take_general(data, checksum_trusted, now)
        # The common TCP packet, parsed without the values only the general
        # path needs.
        src, dst, hdr, payload = seg
        return _tuple_new(FlowKey, (src, hdr.src_port, dst, hdr.dst_port)), hdr, payload

    def _take_general(
        self, data: memoryview, checksum_trusted: bool, now: float
    ) -> tuple[FlowKey, TcpHeader, memoryview] | UdpDatagram | None:
        """`_take` for a packet the plain TCP parse did not take."""
        verify = not checksum_trusted
        trusted = self._trusted
        try:
            if verify and trusted and source_address(data) in trusted:
                verify = False
            pkt = parse_packet_untrusted(data, verify_checksum=verify)
        except BadPacket as exc:
            if "fragment" not in str(exc):
                self.counters["rx_malformed"] += 1
                return None
            self.counters["rx_fragments"] += 1
            whole = self._reassemble(data, now, checksum_trusted)
            if whole is None:
                return None
            pkt = whole
        l4 = pkt.l4
        counters = self.counters
        if type(l4) is TcpHeader:
            return FlowKey(pkt.src, l4.src_port, pkt.dst, l4.dst_port), l4, pkt.payload
        if type(l4) is UdpHeader:
            counters["rx_udp"] += 1
            return UdpDatagram(pkt.src, l4.src_port, pkt.dst, l4.dst_port, bytes(pkt.payload))
        if type(l4) is IcmpHeader:
            self._icmp(pkt.src, pkt.dst, pkt.version, l4, pkt.payload)
            return None
        counters["rx_unsupported"] += 1
        return None

    def _icmp(
        self, src: bytes, dst: bytes, version: int, hdr: IcmpHeader, payload: memoryview
    ) -> None:
        request = icmp.ICMP_ECHO_REQUEST if version == 4 else icmp.ICMP6_ECHO_REQUEST
        reply = icmp.ICMP_ECHO_REPLY if version == 4 else icmp.ICMP6_ECHO_REPLY
        if hdr.type == request and hdr.code == 0 and self.config.answer_ping:
            self.counters["icmp_echo_replies"] += 1
            self._queue(
                build_icmp_packet(dst, src, reply, 0, hdr.rest, payload, ttl=self.config.ttl)
            )
        else:
            # Errors from applications, neighbour discovery and the like
            # concern no flow we proxy.
            self.counters["rx_icmp_ignored"] += 1

    def send_udp(
        self, src: bytes, src_port: int, dst: bytes, dst_port: int, payload: bytes
    ) -> None:
        """Queue a UDP datagram towards an application (`dst` is the app)."""
        config = self.config
        # Fragments need the whole checksum: the offload finishes it only in
        # a packet that holds the entire datagram.
        partial = config.partial_checksum and len(payload) + 48 <= config.mtu
        self._queue(
            build_udp_packet(
                src, dst, src_port, dst_port, payload, ttl=config.ttl, partial_checksum=partial
            )
        )

    def send_icmp_error(
        self, original: bytes | memoryview, our_addr: bytes, type_: int, code: int
    ) -> None:
        """Queue an ICMP error quoting `original`, sent from `our_addr`."""
        self.counters["icmp_errors_sent"] += 1
        self._queue(build_icmp_error(original, our_addr, type_, code))

    def _queue(self, packet: bytes) -> None:
        """Queue a UDP or ICMP packet; one longer than the MTU is fragmented.

        A packet of ours that fits carries DF (an atomic datagram, RFC
        6864); a longer one goes out as the kernel sends its own large
        datagrams: IPv4 fragments with DF clear, or IPv6 fragments with a
        Fragment header, one identification per datagram.
        """
        mtu = self.config.mtu
        if len(packet) <= mtu:
            self._out.append(packet)
            return
        self._ident = ident = (self._ident + 1) & 0xFFFFFFFF
        self.counters["tx_fragmented"] += 1
        self._out.extend(fragment_packet(packet, mtu, ident))

    def _reassemble(self, data: memoryview, now: float, checksum_trusted: bool) -> Packet | None:
        """Hand a fragment to the store; parse the datagram it completes."""
        whole = self.fragments.receive(data, now, verify_checksum=not checksum_trusted)
        if whole is None:
            return None
        try:
            # The checksums covering the whole datagram are checked here.
            return parse_packet_untrusted(memoryview(whole))
        except BadPacket:
            self.counters["rx_malformed"] += 1
            return None

    def next_deadline(self) -> float | None:
        """When `handle_timeout` must next be called (TCP timers and
        reassembly time-outs), or None."""
        deadline = self.tcp.next_deadline()
        fragments = self.fragments.next_deadline()
        if fragments is not None and (deadline is None or fragments < deadline):
            return fragments
        return deadline

    def take_moved_deadline(self) -> float | None:
        """The earliest deadline that may have come since the previous
        call (`TcpDemux.take_moved_deadline`; any reassembly in progress
        counts, its deadlines are not tracked), or None.

        For a runtime that sleeps until `next_deadline`: call it once
        right after `next_deadline`, then after each `packets_by_flow` or
        `packets_to_send`; a value earlier than the sleep's end must cut
        the sleep short. Nothing else moves a deadline earlier.
        """
        deadline = self.tcp.take_moved_deadline()
        fragments = self.fragments.next_deadline()
        if fragments is not None and (deadline is None or fragments < deadline):
            return fragments
        return deadline

    def handle_timeout(self, now: float) -> list[TcpConnection]:
        """Run the timers that are due: TCP's and reassembly's (which may
        queue ICMP Time Exceeded messages).

        Returns:
            The connections whose timers ran (see `TcpDemux.handle_timeout`).
        """
        for error in self.fragments.handle_timeout(now):
            self.send_icmp_error(*error)
        return self.tcp.handle_timeout(now)

    def rebuild_syn(self, request: ConnectionRequest) -> bytes:
        """The application's SYN as a packet, for quoting in an ICMP error."""
        key = request.key
        return build_tcp_packet(key.app_addr, key.remote_addr, request.syn, b"")

    def has_output(self) -> bool:
        """Whether `packets_to_send` may return packets, or `next_deadline`
        may have changed, since they were last called.

        False means neither has: the runtime, which collects the output
        after every step that may have made some, skips both then.
        Datagrams being reassembled count as a possible change (their
        deadlines are not tracked here), as does any queued packet.
        """
        return bool(self._out) or self.tcp.has_output() or len(self.fragments) > 0

    def packets_to_send(self, now: float) -> list[bytes | GsoPacket]:
        """Every packet due now: TCP output of all connections plus queued
        UDP and ICMP packets.

        A TCP super-segment (TcpConfig.gso_size) for an application whose
        MSS is below the device's comes as a `GsoPacket` naming the packet
        size to cut it into; every other packet is plain bytes.
        """
        out: list[bytes | GsoPacket] = []
        for _, packets in self.packets_by_flow(now):
            out += packets
        return out

    def packets_by_flow(self, now: float) -> list[tuple[FlowKey | None, list[bytes | GsoPacket]]]:
        """`packets_to_send`, in groups: each TCP flow's packets together,
        under its key, and the queued UDP and ICMP packets under None.

        For a writer that must not let one flow's long run of segments hold
        up another's (tun2sx.dataplane.engine): the groups concatenated are
        `packets_to_send`; a flow's key may come in more than one group
        (its RST from the demultiplexer, its segments), in order.
        """
        groups: list[tuple[FlowKey | None, list[bytes | GsoPacket]]] = []
        if self._out:
            groups.append((None, self._out))
            self._out = []
        tcp = self.tcp
        templates = self._templates
        # Without GSO no segment is longer than its peer's MSS: no lookup.
        gso = self.config.tcp.gso_size is not None
        last_key = None
        out: list[bytes | GsoPacket] = []
        for key, hdr, payload in tcp.output(now):
            if key is not last_key:
                # A connection's segments come together, with one key object.
                last_key = key
                out = []
                groups.append((key, out))
                pair = (key.remote_addr, key.app_addr)
                found = templates.get(pair)
                template = self._template(pair) if found is None else found
            if isinstance(hdr, DataRun):
                # Full segments in a row (never GSO super-segments).
                out += template.build_run(hdr)
                continue
            packet = template.build(hdr, payload)
            if gso and len(payload) > _MIN_MSS:
                # (The read-only view of the connections is built only here:
                # a flush of small segments does not need it.)
                conn = tcp.connections.get(key)
                limit = None if conn is None else conn.packet_limit
                if limit is not None and len(packet) > limit:
                    out.append(GsoPacket(packet, limit))
                    continue
            out.append(packet)
        return groups

    def _template(self, pair: tuple[bytes, bytes]) -> TcpTemplate:
        templates = self._templates
        if len(templates) >= _MAX_TEMPLATES:
            templates.clear()
        config = self.config
        template = templates[pair] = TcpTemplate(
            pair[0], pair[1], ttl=config.ttl, partial_checksum=config.partial_checksum
        )
        return template
