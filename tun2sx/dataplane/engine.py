"""The engine: the trio side of the stack, and the owner of every flow task.

One reader task drains the TUN in batches and feeds the sans-I/O `NetStack`;
after each batch it writes every packet the stack produced (so ACKs for a
whole batch go out together) and wakes the streams whose connections
changed. While other flows are active, a flow's run of packets (a
download's window) waits in the engine's write queue, which is written a
burst of `EngineConfig.write_burst` bytes per flow at the end of each trio
round, after every sparse flow's packet of the round, so the reader, the
timers and other flows get their turns in between. One timer task sleeps
until the stack's next deadline; the deadline is a cancel scope that
anything can pull earlier. Every TCP flow and UDP session is a task tree
under the engine's nursery, so nothing outlives it, and a flow's failure
ends that flow alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from outbounds.base import Destination
from stack.netstack import GsoPacket, NetStack, UdpDatagram
from stack.tcp import ConnectionRequest, FlowKey, TcpConnection
from tun2sx.dataplane.context import UNROUTED, ConnectTimes, EngineConfig, FlowInfo, FlowRoute
from tun2sx.dataplane.dnsserve import DnsServer
from tun2sx.dataplane.tcpflow import TcpFlows, TcpHandler
from tun2sx.dataplane.tun import TunError
from tun2sx.dataplane.udpflow import UdpFlows
from tun2sx.naming.realnames import RealNames
from tun2sx.naming.router import REJECT, rule_label

if TYPE_CHECKING:
    from outbounds.base import Outbound
    from tun2sx.dataplane.tcpstream import TcpStream
    from tun2sx.dataplane.tun import RxPacket, TunDevice
    from tun2sx.naming.dns import FakeDns
    from tun2sx.naming.fakeip import FakeIpStore
    from tun2sx.naming.router import Network, Router, Rule

log = logging.getLogger("tun2sx")

# How long a batch that showed other flows moving keeps reads at the share
# and runs of packets in bursts.
_CROWDED_FOR = 1.0
_WHOLE = 1 << 62  # no burst limit
# A run of one packet of at most this many octets is a sparse flow's.
_SPARSE_BYTES = 1600
# Rounds with nothing queued before the round's end is taken off again:
# a download's queue empties and fills again many times a second.
_ROUND_END_FOR = 1000
# Batches the stop reads to refuse what the device holds (a batch is at most
# `read_size` packets): a full queue of a few thousand, not a flood's tail.
_REFUSE_BATCHES = 64


def burst_end(packets: list[bytes | GsoPacket], budget: int) -> int:
    """How many of `packets` one burst of `budget` bytes writes.

    Packets go while fewer than `budget` bytes went before them, so a
    burst is at least one packet and at most one packet over the budget.
    Counted in bytes, not packets: what a TUN write costs is mostly the
    application's kernel receiving it, in that system call, and that grows
    with the bytes (a 64 KiB super-segment costs about as much as 40
    packets of 1500 octets).
    """
    sent = 0
    for i, packet in enumerate(packets):
        if sent >= budget:
            return i
        sent += len(packet.data) if type(packet) is GsoPacket else len(packet)
    return len(packets)


def _sparse(packets: list[bytes | GsoPacket]) -> bool:
    """Whether a flow's run is a sparse flow's: a round trip's answer, an
    ACK, a DNS reply, a game's or a call's packet (fq_codel's sparse flows
    use less than a quantum of about one packet per round)."""
    if len(packets) != 1:
        return False
    packet = packets[0]
    return type(packet) is not GsoPacket and len(packet) <= _SPARSE_BYTES


class _RoundEnd(trio.abc.Instrument):
    """Calls `write` when trio has run a round's ready tasks, before it polls."""

    def __init__(self, write: Callable[[], None]) -> None:
        self._write = write

    def before_io_wait(self, timeout: float) -> None:
        self._write()


class Engine:
    """Drives a `NetStack` from a TUN device and runs the flows.

    Args:
        device: the TUN device (or anything with `read_batch`, `read_ready`
            and `write`).
        stack: the sans-I/O network stack.
        router: picks the outbound for each destination.
        fakeip: the fake-IP store, or None when fake-IP DNS is off.
        dns: the fake-IP DNS answerer, or None.
        config: engine settings.
        tcp_handler: what runs a connected flow; by default `splice`, which
            copies both ways. Tests and embedders may run their own.
    """

    def __init__(
        self,
        device: TunDevice,
        stack: NetStack,
        router: Router,
        *,
        fakeip: FakeIpStore | None = None,
        dns: FakeDns | None = None,
        config: EngineConfig | None = None,
        tcp_handler: TcpHandler | None = None,
    ) -> None:
        self.device = device
        self.stack = stack
        self.router = router
        self.fakeip = fakeip
        self.dns = dns
        self.config = config or EngineConfig()
        # Names of real addresses from upstream answers (fake-IP-filtered names).
        self.real_names = RealNames()
        self.streams: dict[object, TcpStream] = {}
        self.counters: Counter[str] = Counter()
        self.flows: set[FlowInfo] = set()
        self.connect_times = ConnectTimes()
        # Set by the controller's mode (global, direct): every new flow
        # goes to the outbound of this name (REJECT: refused) instead of
        # the rules. A name, looked up in the router of the moment, so a
        # reload that replaces the router keeps the mode.
        self.override: str | None = None
        self._nursery: trio.Nursery | None = None
        self._timer_scope = trio.CancelScope()
        self._flush_deferred = False  # the read loop flushes at the end of its batch
        # Packets of flows past their burst, in order, per flow; written by
        # `_drain_loop`, which waits parked while this is empty.
        self._queued: dict[FlowKey, list[bytes | GsoPacket]] = {}
        self._drainer: trio.lowlevel.Task | None = None
        self._write_error: Exception | None = None
        # Installed while the queue is in use (`_write_round`); off, a
        # trio round costs nothing more (on, about 0.4 µs).
        self._round_end = _RoundEnd(self._write_round)
        self._round_end_on = False
        self._empty_rounds = 0
        self._crowded_until = -math.inf  # see read_size
        # trio.current_time() is three Python calls (the run context, the
        # runner, the clock); from `run` on, the clock's own method is one.
        # The engine asks several times a batch and once or twice a flush.
        self._now: Callable[[], float] = trio.current_time
        self.dns_server = DnsServer(self)
        self.tcp = TcpFlows(self, self.dns_server, tcp_handler)
        self.udp = UdpFlows(self, self.dns_server)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "engine is not running"
        return self._nursery

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Reports readiness through `task_status`."""
        self._now = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._drain_loop)
                task_status.started()
                try:
                    await self._read_loop()
                finally:
                    self.reset_all()
                    nursery.cancel_scope.cancel()
        finally:
            self._round_end_off()
            # What flows queued as they ended, after the last round's end.
            with contextlib.suppress(OSError):
                self._write_queued()

    # -- packets -----------------------------------------------------------

    async def _read_loop(self) -> None:
        device = self.device
        while True:
            self._take(await device.read_batch())
            # The flush reads the clock again: the packets it writes are
            # timed from when they leave (RACK judges losses by send times
            # within a quarter of a local RTT), not from the batch's start.
            self.flush()

    def _take(self, batch: list[RxPacket]) -> None:
        """Feed one batch read from the device to the stack and the flows."""
        now = self._now()
        touched: set[TcpConnection] = set()
        datagrams = False
        # Answers made while the batch is taken (DNS, SYNs failed at
        # once) and woken streams, which may take data out (the splice
        # does, right in `wake`), would each flush: one flush after
        # all of them instead.
        self._flush_deferred = True
        try:
            # One call per batch: the stack takes a flow's ACKs together.
            for event in self.stack.receive_batch(batch, now):
                if type(event) is TcpConnection:
                    touched.add(event)
                elif type(event) is ConnectionRequest:
                    self.tcp.start(event)
                elif type(event) is UdpDatagram:
                    self.udp.datagram(event, now)
                    datagrams = True
            if datagrams or len(touched) > 1:
                self._crowded_until = now + _CROWDED_FOR
            self._wake(touched)
        finally:
            self._flush_deferred = False

    def take_ready(self) -> None:
        """Take what the device holds now, without waiting for the reader.

        For a flow that just wrote a packet the application's kernel
        answers inline, within the write (a SYN-ACK's ACK, the ACK of our
        FIN): taken here, the answer costs no wake-up of the reader, no
        scheduler round and no re-arm of the device's registration. With
        the queue emptied before the scheduler next polls, the reader's
        level-triggered wait does not fire for it. Only for a flow alone
        (see below).
        """
        if self._flush_deferred:
            return  # inside the reader's own batch
        if len(self.streams) > 1:
            # Other flows are live: what the device holds is theirs too,
            # better taken in the reader's batches (one flush for many)
            # than in small ones here. With eight clients at once, taking
            # it here cost 5-8 % more CPU per connection.
            return
        try:
            batch = self.device.read_ready()
        except TunError:
            return  # the reader meets it too, and ends the engine
        if batch:
            self._take(batch)
            self.flush()

    def reset_all(self) -> None:
        """Send an RST on every TCP flow: the engine is going away.

        Without it applications retransmit into a TUN that no longer answers
        until their own timeouts (minutes): a hang.
        """
        for conn in list(self.stack.tcp.connections.values()):
            conn.abort()
        # The device may already be gone, or refuse a packet of the queue
        # (what ended the engine): the resets go out all the same.
        for step in (self._write_queued, self.flush, self._write_queued):
            with contextlib.suppress(OSError):
                step()

    def refuse_unread(self) -> None:
        """Refuse the SYNs the device took after the engine stopped, and
        those the SYN-flood limits dropped lately.

        Between the stop and the device's close (the flows and the
        controller end, the routes go), applications keep connecting, and
        a SYN nobody answers leaves its application in connect() until its
        own timeout: once the device is gone its kernel resends the SYN
        into no route. Called by whoever closes the device, just before.
        """
        with contextlib.suppress(TunError, OSError):
            now = self._now()
            tcp = self.stack.tcp
            # A read gives at most a batch; a SYN can be queued behind other
            # flows' segments. Bounded: applications keep sending meanwhile.
            for _ in range(_REFUSE_BATCHES):
                batch = self.device.read_ready()
                if not batch:
                    break
                for event in self.stack.receive_batch(batch, now):
                    if type(event) is ConnectionRequest and tcp.is_pending(event.key):
                        tcp.refuse(event.key, now)
                self._write_unqueued(now)
            # And the SYNs the flood limits dropped: their retries would
            # come after the device is gone.
            tcp.refuse_dropped(now)
            self._write_unqueued(now)

    def _write_unqueued(self, now: float) -> None:
        """Write what the stack has ready, all of it now (the engine has
        stopped: no rounds are left to write a queue in)."""
        write = self.device.write
        for _key, packets in self.stack.packets_by_flow(now):
            for packet in packets:
                write(packet)

    def flush(self) -> None:
        """Write the packets the stack has ready, and re-arm the timer.

        While other flows are active (see `read_size`), a flow's lone
        packet of up to `_SPARSE_BYTES` (an answer, an ACK) goes now,
        unless the flow has packets queued; any other run joins the write
        queue behind the flow's queued packets, so its packets leave in
        order, a burst per round at the round's end (`_write_round`).
        UDP and ICMP do not wait behind the queue: a round trip beside
        a download is one short step, not one behind the download's run.
        """
        if self._flush_deferred:
            return
        stack = self.stack
        if not stack.has_output():
            # Nothing queued and no deadline moved: about half the flushes
            # of a short flow (a step that only read, a last ACK).
            return
        write = self.device.write
        now = self._now()
        # Alone, a flow's run goes out whole: pacing it would cost a trip
        # through the scheduler per burst that nobody waits behind.
        burst = (self.config.write_burst or _WHOLE) if now < self._crowded_until else _WHOLE
        queued = self._queued
        for key, packets in stack.packets_by_flow(now):
            if queued and key in queued:
                queued[key] += packets
                continue
            if burst != _WHOLE and key is not None and not _sparse(packets):
                # Bulk: written at the end of this round, after every
                # sparse flow's packets of the round (`_write_round`).
                queued[key] = packets
                continue
            for packet in packets:
                write(packet)
        if queued:
            if not self._round_end_on:
                trio.lowlevel.add_instrument(self._round_end)
                self._round_end_on = True
            if self._drainer is not None:
                trio.lowlevel.reschedule(self._drainer)
                self._drainer = None
        # Only a deadline scheduled since the last look can be earlier than
        # the timer's (`_timer_loop` starts each sleep afresh): in a flow's
        # steady state deadlines move later, and the heap is not walked.
        deadline = stack.take_moved_deadline()
        if deadline is not None and deadline < self._timer_scope.deadline:
            self._timer_scope.deadline = deadline

    async def _drain_loop(self) -> None:
        """Keep trio's rounds turning while the queue holds packets, and
        raise a write error of `_write_round` in the engine's nursery."""
        queued = self._queued
        while True:
            if self._write_error is not None:
                raise self._write_error
            if queued:
                # A task ready to run makes trio poll without waiting: the
                # end of the round (`_write_round`) comes at once.
                await trio.lowlevel.checkpoint()
            else:
                self._drainer = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_drain)

    def _write_round(self) -> None:
        """Write a burst per queued flow, oldest flow first: trio has run
        every task that was ready in this round and is about to poll.

        Here, not in a task of its own, because trio runs a round's ready
        tasks in an order of its own choosing (in turn forwards or
        backwards): a task's burst would go before a round trip's answer
        in half the rounds. At the round's end it goes after every sparse
        flow's packet of the round, and the reader's next batch (the
        round trip's next request) comes right after it.
        """
        queued = self._queued
        if not queued:
            self._empty_rounds += 1
            if self._empty_rounds > _ROUND_END_FOR:
                self._round_end_off()
            return
        self._empty_rounds = 0
        if self._write_error is not None:
            return
        write = self.device.write
        # Read each round: a reload may change it (0: whole runs). Once the
        # others have gone quiet the queue goes whole: a flow alone is not
        # paced, even when its queue never emptied in between.
        burst = self.config.write_burst or _WHOLE
        if self._now() >= self._crowded_until:
            burst = _WHOLE
        try:
            for key, packets in list(queued.items()):
                # Off the queue before it is written: if a write raises
                # (and ends the engine), `reset_all` does not write the
                # burst's packets a second time.
                end = burst_end(packets, burst)
                run = packets[:end]
                if end < len(packets):
                    del packets[:end]
                else:
                    del queued[key]
                for packet in run:
                    write(packet)
        except Exception as exc:
            # Raised in the engine's nursery by `_drain_loop`, which is
            # ready to run whenever the queue held packets (trio would
            # drop an instrument that raised, and only log the error).
            self._write_error = exc
            if self._drainer is not None:
                trio.lowlevel.reschedule(self._drainer)
                self._drainer = None

    def _round_end_off(self) -> None:
        if self._round_end_on:
            trio.lowlevel.remove_instrument(self._round_end)
            self._round_end_on = False
            self._empty_rounds = 0

    def _abort_drain(self, _: object) -> trio.lowlevel.Abort:
        # The engine is ending: the last flush (`reset_all`) must not wake
        # a task that is gone; it writes the queue itself.
        self._drainer = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _write_queued(self) -> None:
        """Write the whole queue now (the engine is going away)."""
        write = self.device.write
        queued = self._queued
        while queued:
            # A flow at a time off the queue: if a write raises, the flushes
            # after it write the other flows' packets, then their resets.
            for packet in queued.pop(next(iter(queued))):
                write(packet)

    async def _timer_loop(self) -> None:
        stack = self.stack
        while True:
            deadline = stack.next_deadline()
            # What moved before this look is in `deadline`; flushes from now
            # on pull the sleep's end earlier for what moves after it.
            stack.take_moved_deadline()
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = trio.CancelScope()
            fired = stack.handle_timeout(self._now())
            self.flush()
            # Timers can retransmit, reset or close: the streams of the
            # connections whose timers ran re-check (only those can have
            # changed; walking every stream per timer is quadratic in flows).
            self._wake(fired)

    def _wake(self, conns: Iterable[TcpConnection]) -> None:
        """Wake the streams of `conns`; forget those that are finished."""
        streams = self.streams
        for conn in conns:
            stream = streams.get(conn.key)
            if stream is not None:
                stream.wake()
                if stream.finished:
                    del streams[conn.key]

    # -- destinations --------------------------------------------------------

    def destination_for(self, addr: bytes, port: int) -> Destination | None:
        """Map an address an application used back to what to connect to.

        A fake IP becomes its host name; an address in the fake pool that
        the store does not know gives None (the caller fails the flow fast,
        instead of letting it hang); any other address stays as it is.
        """
        fakeip = self.fakeip
        # The fake pool is checked on the packet's bytes: an address object
        # is built only for a real address, which the flow connects to.
        if fakeip is not None and fakeip.contains_packed(addr):
            try:
                name = fakeip.lookup_packed(addr)
            except fakeip.errors as exc:
                # The shared table's file was locked too long, or failed:
                # this flow fails fast like an unknown fake IP; others go on.
                self.counters["fakeip_store_errors"] += 1
                log.warning(
                    "fake-IP table lookup of %s failed: %s", ipaddress.ip_address(addr), exc
                )
                return None
            if name is None:
                return None
            return Destination(name, port)
        return Destination(ipaddress.ip_address(addr), port)

    def route(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> Outbound | None:
        """The router's choice for a flow; a real address is matched by
        `name` (a sniffed one) or else by the name a DNS answer gave it for
        (tun2sx.naming.realnames)."""
        return self.decide(dest, network, name)[0]

    def decide(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> tuple[Outbound | None, Rule | None]:
        """`route`, and the rule that decided (None: the default outbound,
        or the controller's mode, `override`, which passes the rules by)."""
        if self.override is not None:
            if self.override == REJECT:
                return None, None
            return self.router.outbounds.get(self.override, self.router.default), None
        if name is None and not isinstance(dest.host, str):
            name = self.real_names.name_for(dest.host, self._now())
        return self.router.decide(dest, network, name)

    def read_size(self) -> int:
        """The splice buffer for a flow alone, its share while others are active.

        Others are active when, within the last `_CROWDED_FOR` seconds, one
        batch from the TUN carried packets of two connections or a
        datagram: an idle connection beside a download
        (iperf3's control connection, a browser's idle keep-alives) does
        not make the download pay for steps nobody waits behind.
        """
        config = self.config
        crowded_until = self._crowded_until
        # A flow alone asks once per answer it waits for: no clock read
        # while nothing was crowded since the last look that found it over.
        if crowded_until != -math.inf:
            if self._now() < crowded_until:
                return config.splice_share
            self._crowded_until = -math.inf
        return config.splice_buffer

    def open_flow(
        self,
        network: str,
        app: str,
        dest: Destination,
        outbound: str,
        route: FlowRoute = UNROUTED,
    ) -> FlowInfo:
        """Register a connected flow for the statistics; `close_flow` it at the end."""
        sniffed, host_source, rule, chain = route
        kind, payload = rule_label(rule)
        info = FlowInfo(
            network,
            app,
            dest,
            outbound,
            self._now(),
            sniffed=None if sniffed is None else sniffed.host,
            host_source=host_source,
            rule=kind,
            rule_payload=payload,
            chain=chain,
        )
        self.flows.add(info)
        return info

    def close_flow(self, info: FlowInfo) -> None:
        """Forget a flow, keeping its bytes in the totals."""
        self.flows.discard(info)
        # Nothing is left to close; and a closer may refer back to `info`
        # (a splice's does), a cycle that would keep the flow's objects
        # until the cyclic collector ran.
        info.closer = None
        self.counters["bytes_up"] += info.bytes_up
        self.counters["bytes_down"] += info.bytes_down

    def statistics(self) -> dict[str, int]:
        """A snapshot of counters: flows, bytes, drops, errors, TUN traffic.

        One set for every reader (the /stats endpoint, the summary line,
        the embedding API's `stats()`): besides the counters, the device's
        ``tun_rx/tx_packets`` and ``tun_rx/tx_bytes``, ``flows`` (open TCP
        flows and UDP sessions) and ``drops`` (every ``*drops*`` counter).
        """
        stats: dict[str, int] = dict(self.stack.counters)
        # The demux's: SYNs dropped by the caps, evicted, refused; RSTs.
        demux = self.stack.tcp.statistics()
        for name in (
            "connection_requests",
            "resets_sent",
            "syn_dropped_half_open",
            "syn_dropped_per_destination",
            "syn_dropped_per_source",
            "syn_evicted",
            "syn_refused_max_connections",
        ):
            stats[name] = getattr(demux, name)
        stats["tcp_pending"] = demux.pending
        stats["tcp_half_open"] = demux.half_open
        stats.update(self.counters)
        # Live flows' bytes are not in the counters until they end.
        stats["bytes_up"] = self.counters["bytes_up"] + sum(f.bytes_up for f in self.flows)
        stats["bytes_down"] = self.counters["bytes_down"] + sum(f.bytes_down for f in self.flows)
        stats["tcp_flows"] = len(self.streams)
        stats["tcp_connections"] = len(self.stack.tcp.connections)
        stats["udp_sessions"] = len(self.udp.sessions)
        stats.update(self.udp.statistics())
        # Failed TUN reads and writes (each lost a packet), writes refused by
        # a full queue, and what the kernel dropped because we read too
        # slowly; a stand-in device may not count.
        device = self.device
        stats["tun_rx_errors"] = getattr(device, "statistics_rx_errors", 0)
        stats["tun_tx_errors"] = getattr(device, "statistics_tx_errors", 0)
        stats["tun_tx_drops"] = getattr(device, "statistics_tx_drops", 0)
        queue_drops = getattr(device, "queue_drops", None)
        stats["tun_queue_drops"] = queue_drops() if queue_drops is not None else 0
        for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
            stats[f"tun_{key}"] = getattr(device, key, 0)
        stats["flows"] = stats["tcp_flows"] + stats["udp_sessions"]
        stats["drops"] = sum(value for key, value in stats.items() if "drops" in key)
        return stats
