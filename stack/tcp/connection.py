"""One TCP connection, passively opened: segments and time in, segments and events out.

`TcpConnection` is sans-I/O in the h11 / smoltcp shape. The runtime feeds
it the application's segments (`segment_received`), the outbound's bytes
(`send`, `close`, `abort`) and the passage of time (`handle_timeout`); it
collects segments for the application (`segments_to_send`), events for the
outbound (`next_event`) and the next deadline (`next_deadline`). Nothing
here reads a clock, draws a random number or does I/O.

Incoming segments are processed in the order of RFC 9293 section 3.10.7.4
(PAWS first, RFC 7323), with RFC 5961 hardening against blind RST, SYN and
ACK injection. The receive side lives in `rcv`, the send side in `snd`,
congestion control in `congestion`, time-based loss detection in `rack`,
deadlines in `timers` and what their expiry does in `expiry`, segment and
header building in `output`, and every state change goes through the table
in `state`.
"""

from __future__ import annotations

from stack.errors import LocalProtocolError
from stack.seq import MASK, seq_diff, seq_ge, seq_lt
from stack.tcp import expiry as _expiry
from stack.tcp import output as _output
from stack.tcp import rcv as _rcv
from stack.tcp.config import TcpConfig
from stack.tcp.congestion import DUP_THRESH, Congestion, Scoreboard
from stack.tcp.events import (
    NEED_DATA,
    Closed,
    ConnectionReset,
    DataReceived,
    EofReceived,
    Event,
    FlowKey,
    TcpStatistics,
    _Sentinel,
)
from stack.tcp.options import TIMESTAMP_OPTION_LEN, negotiate
from stack.tcp.rack import Rack
from stack.tcp.rcv import Receiver
from stack.tcp.snd import Sender
from stack.tcp.state import FINISHED, SENDING, Stimulus, TcpState, next_state
from stack.tcp.timers import RttEstimator, Timers
from stack.wire.tcp import ACK, FIN, RST, SYN, TcpHeader

_S = TcpState
_ESTABLISHED = _S.ESTABLISHED
_RECEIVING_DATA = frozenset({_S.ESTABLISHED, _S.FIN_WAIT_1, _S.FIN_WAIT_2})


class _Counters:
    __slots__ = TcpStatistics._fields

    def __init__(self) -> None:
        self.segments_in = self.segments_out = self.bytes_in = self.bytes_out = 0
        self.retransmits = self.fast_retransmits = self.sack_retransmits = 0
        self.rto_timeouts = self.dup_segments = self.ooo_segments = self.paws_drops = 0
        self.window_probes = self.challenge_acks = self.tail_loss_probes = 0
        self.rack_losses = 0

    def snapshot(self) -> TcpStatistics:
        return TcpStatistics(*(getattr(self, name) for name in TcpStatistics._fields))


class TcpConnection:
    """A passively opened TCP connection (RFC 9293), driven from outside.

    Attributes:
        key: the flow this connection serves.
        packet_limit: the largest IP packet this application can take when
            its MSS is below the device's (None otherwise): a GSO
            super-segment must be cut into packets of this size.
    """

    __slots__ = (
        "_aborted",
        "_ack_due",
        "_cc",
        "_closed_delivered",
        "_config",
        "_dirty",
        "_eof_delivered",
        "_heap_at",
        "_irs",
        "_iss",
        "_keepalive_sent",
        "_last_ack_sent",
        "_n",
        "_neg",
        "_probe_due",
        "_probes_unanswered",
        "_rack",
        "_rcv",
        "_reset_delivered",
        "_reset_seen",
        "_retries",
        "_rst_out",
        "_rtt",
        "_rtt_seq",
        "_rtt_time",
        "_rxt_mark",
        "_sb",
        "_snd",
        "_state",
        "_syn_options",
        "_synack_due",
        "_synack_retransmitted",
        "_synack_time",
        "_timers",
        "_tlp_count",
        "_tlp_due",
        "_ts_recent",
        "key",
        "packet_limit",
    )

    def __init__(
        self, key: FlowKey, syn: TcpHeader, iss: int, now: float, config: TcpConfig
    ) -> None:
        """Open passively from the application's SYN; a SYN-ACK is queued.

        Args:
            key: the flow.
            syn: the application's SYN header.
            iss: our initial sequence number (random, chosen by the caller).
            now: the current time in seconds.
            config: the stack's configuration.

        Raises:
            LocalProtocolError: `syn` is not a plain SYN.
        """
        if syn.flags & (SYN | ACK | RST | FIN) != SYN:
            raise LocalProtocolError("a connection opens only from a plain SYN")
        self.key = key
        self._config = config
        self._iss = iss & MASK
        self._irs = syn.seq
        self._state = _S.SYN_RECEIVED
        ipv6 = len(key.app_addr) == 16
        neg = self._neg = negotiate(syn.options, config, ipv6=ipv6)
        # An application behind a link with a smaller MTU than the device's
        # (a LAN behind a router) announced a smaller MSS: the device must
        # cut our GSO super-segments at that size, not at its own MTU.
        ts_len = TIMESTAMP_OPTION_LEN if neg.timestamps else 0
        wire = neg.snd_mss + ts_len
        self.packet_limit = wire + 20 + (40 if ipv6 else 20) if wire < config.mss else None
        self._syn_options = syn.options
        self._rcv = Receiver(
            config.rcv_buf, neg.rcv_mss, config.max_ooo_bytes, config.max_ooo_ranges
        )
        self._snd = Sender(config.snd_buf, syn.window)  # a SYN's window is never scaled
        self._cc = Congestion(neg.snd_mss, config.initial_cwnd_segments, config.loss_floor)
        self._sb = Scoreboard()
        self._rack = Rack()
        self._rtt = RttEstimator(config.rto_initial, config.rto_min, config.rto_max)
        self._timers = Timers()
        self._timers.handshake = now + config.syn_received_timeout
        ts = syn.options.timestamp
        self._ts_recent = ts[0] if ts is not None and neg.timestamps else 0
        self._last_ack_sent = 1
        self._synack_due = True
        self._synack_retransmitted = False
        self._tlp_due = False  # send a tail loss probe with the next output
        self._rxt_mark = 0  # SND.MAX when the head was last fast-retransmitted
        self._tlp_count = 0  # probes sent for this flight, until forward progress
        self._synack_time = now
        self._ack_due = False
        self._probe_due = False
        self._rst_out: TcpHeader | None = None
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._retries = 0
        self._probes_unanswered = 0
        self._keepalive_sent = 0
        self._reset_seen = False
        self._reset_delivered = False
        self._eof_delivered = False
        self._closed_delivered = False
        self._aborted = False
        self._dirty: set[TcpConnection] | None = None
        self._heap_at: float | None = None  # owned by the demux
        self._n = _Counters()

    # ----------------------------------------------------------------- queries

    @property
    def state(self) -> TcpState:
        """The RFC 9293 state."""
        return self._state

    def statistics(self) -> TcpStatistics:
        """Return a snapshot of this connection's counters."""
        return self._n.snapshot()

    def send_space(self) -> int:
        """Return how many bytes `send` would accept now."""
        if self._state not in SENDING:
            return 0
        return self._snd.space()

    def next_deadline(self) -> float | None:
        """Return when `handle_timeout` must next be called, or None."""
        return self._timers.earliest()

    # ----------------------------------------------------------- the outbound

    def send(self, data: bytes | memoryview) -> int:
        """Queue bytes from the outbound for the application.

        Returns:
            How many bytes were accepted into the bounded send buffer (0
            when it is full, or when the connection was reset or aborted).

        Raises:
            LocalProtocolError: `close` was already called.
        """
        if self._state not in SENDING:
            if self._snd.fin_at is not None:
                raise LocalProtocolError("send() after close()")
            return 0
        n = self._snd.queue(data)
        if n:
            self._changed()
        return n

    def close(self) -> None:
        """Send FIN after the buffered data (half-close: receiving goes on).

        Idempotent, and a no-op once the connection is reset or closed.
        """
        if self._state in SENDING:
            self._snd.queue_fin()
            self._state = next_state(self._state, Stimulus.CLOSE)
            self._changed()

    def abort(self) -> None:
        """Reset the connection now: an RST is queued and it closes."""
        if self._state is _S.CLOSED:
            return
        if self._state is not _S.TIME_WAIT:
            self._queue_rst()
        self._aborted = True
        self._rcv.discard()
        self._to_closed()

    def next_event(self) -> Event | _Sentinel:
        """Return the next event for the runtime, or NEED_DATA.

        DataReceived carries all in-order bytes buffered so far; taking
        them frees receive window. After EofReceived or ConnectionReset
        comes Closed, exactly once.
        """
        if self._reset_seen:
            if not self._reset_delivered:
                self._reset_delivered = True
                return ConnectionReset()
        elif not self._aborted:
            rcv = self._rcv
            if rcv.ready:
                data = rcv.take()
                if self._state in _RECEIVING_DATA and rcv.window_update_due():
                    self._ack_due = True
                    self._changed()
                return DataReceived(data)
            if rcv.fin_received and not self._eof_delivered:
                self._eof_delivered = True
                return EofReceived()
        if self._state in FINISHED and not self._closed_delivered:
            self._closed_delivered = True
            return Closed()
        return NEED_DATA

    # ------------------------------------------------------------------ input

    def segment_received(self, hdr: TcpHeader, payload: bytes | memoryview, now: float) -> None:
        """Process one segment from the application.

        Args:
            hdr: the parsed header (checksum already verified).
            payload: the segment's data.
            now: the current time in seconds.
        """
        state = self._state
        if state is _S.CLOSED:
            return
        n = self._n
        n.segments_in += 1
        self._changed()
        flags = hdr.flags
        rcv = self._rcv
        snd = self._snd
        neg = self._neg
        opts = hdr.options
        plen = len(payload)
        seq = rcv.nxt + seq_diff(hdr.seq, (self._irs + rcv.nxt) & MASK)
        # PAWS (RFC 7323 section 5.3): an old timestamp marks an old segment.
        ts = opts.timestamp if neg.timestamps else None
        if ts is not None and not flags & RST and seq_lt(ts[0], self._ts_recent):
            n.paws_drops += 1
            self._send_ack()
            return
        # Acceptability test (RFC 9293 section 3.10.7.4, first check).
        wnd = rcv.window()
        nxt = rcv.nxt
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        if seg_len == 0:
            ok = seq == nxt if wnd <= 0 else nxt <= seq < nxt + wnd
        else:
            last = seq + seg_len - 1
            ok = wnd > 0 and (nxt <= seq < nxt + wnd or nxt <= last < nxt + wnd)
        ack_only = False
        if not ok:
            if flags & RST:
                return
            if seg_len and seq + seg_len <= nxt:
                n.dup_segments += 1
                if flags & FIN and state is _S.TIME_WAIT:
                    # The peer's FIN again: our last ACK was lost. ACK it
                    # and restart TIME-WAIT (RFC 9293 3.10.7.4).
                    self._timers.time_wait = now + self._config.time_wait
            self._send_ack()
            # A zero window accepts no data, but its ACK still counts.
            if not (wnd <= 0 and seq == nxt and flags & ACK and not flags & SYN):
                return
            ack_only = True
        if flags & RST:
            # RFC 5961 section 3.2: only an exact match resets.
            if seq == nxt:
                self._reset()
            else:
                n.challenge_acks += 1
                self._send_ack()
            return
        if flags & SYN:
            # RFC 5961 section 4.2 (and a duplicate SYN in SYN-RECEIVED,
            # which this answers with the SYN-ACK again).
            n.challenge_acks += 1
            self._send_ack()
            return
        if not flags & ACK:
            return
        if ts is not None and seq_ge(ts[0], self._ts_recent) and seq <= self._last_ack_sent:
            self._ts_recent = ts[0]
        ack = snd.una + seq_diff(hdr.ack, (self._iss + snd.una) & MASK)
        if snd.una == 0:
            if not 0 < ack <= snd.max:
                # RFC 9293: an unacceptable ACK in SYN-RECEIVED gets <SEQ=SEG.ACK><RST>.
                key = self.key
                self._rst_out = TcpHeader(key.remote_port, key.app_port, hdr.ack, 0, RST, 0)
                return
            self._establish(hdr, seq, ack, now)
        elif ack > snd.max:
            self._send_ack()
            return
        elif ack < snd.una - snd.max_wnd:
            # RFC 5961 section 5.2: far too old to be a real acknowledgement.
            n.challenge_acks += 1
            self._send_ack()
            return
        else:
            self._process_ack(hdr, seq, ack, plen, now)
            if self._state is _S.CLOSED:
                return
        _expiry.rearm_idle(self, now)
        if ack_only or not (plen or flags & FIN):
            return
        if self._state in _RECEIVING_DATA:
            self._receive_data(seq, payload, bool(flags & FIN), now)
        else:
            # Data past the peer's FIN: nothing can be taken; just ACK.
            self._send_ack()

    def _establish(self, hdr: TcpHeader, seq: int, ack: int, now: float) -> None:
        snd = self._snd
        snd.ack(ack)
        snd.wnd = hdr.window << self._neg.snd_wscale
        snd.max_wnd = max(snd.max_wnd, snd.wnd)
        snd.wl1 = seq
        snd.wl2 = ack
        timers = self._timers
        timers.handshake = None
        timers.rto = None
        self._retries = 0
        ts = hdr.options.timestamp if self._neg.timestamps else None
        if ts is not None and ts[1]:
            self._rtt_sample_ts(ts[1], now)
        elif not self._synack_retransmitted:
            self._rtt.sample(now - self._synack_time)
        else:
            self._rtt.backoff = 0
        self._state = next_state(self._state, Stimulus.ACK_OF_SYN)

    def _process_ack(self, hdr: TcpHeader, seq: int, ack: int, plen: int, now: float) -> None:
        snd = self._snd
        neg = self._neg
        window = hdr.window << neg.snd_wscale
        window_changed = False
        if snd.wl1 < seq or (snd.wl1 == seq and snd.wl2 <= ack):
            window_changed = window != snd.wnd
            snd.wnd = window
            snd.wl1 = seq
            snd.wl2 = ack
            if window > snd.max_wnd:
                snd.max_wnd = window
            if window:
                self._timers.persist = None
        self._probes_unanswered = 0
        blocks = hdr.options.sack_blocks
        new_sacked = 0
        una_before = snd.una
        sacked_before = self._sb.sacked
        if blocks and neg.sack and snd.max > snd.una:
            base = snd.una
            wire_base = (self._iss + base) & MASK
            rel = [
                (base + seq_diff(left, wire_base), base + seq_diff(right, wire_base))
                for left, right in blocks
            ]
            new_sacked = self._sb.update(rel, ack, snd.max)
            self._check_lost_retransmit()
        advanced = ack > snd.una
        if advanced:
            self._on_new_ack(hdr, ack, now)
        elif snd.max > snd.una and (
            new_sacked or (not plen and not hdr.flags & FIN and not window_changed and not blocks)
        ):
            cc = self._cc
            lost = self._sb.lost_below((DUP_THRESH - 1) * neg.snd_mss) if neg.sack else 0
            if cc.on_dupack(neg.sack, lost > snd.una, snd.una, snd.max):
                self._rtt_seq = None
        if neg.sack and (advanced or new_sacked):
            delivered = snd.una - una_before + self._sb.sacked - sacked_before
            self._cc.on_delivered(delivered, max(snd.una, self._sb.high()), snd.max, now)
            self._rack_detect(now, delivered)

    def _rack_detect(self, now: float, delivered: int = 0) -> None:
        """Run RACK loss detection (RFC 8985) and act on what it finds.

        Called after an ACK that delivered something (`delivered` octets)
        and when the reordering timer fires. Octets RACK marks lost are
        resent by the SACK recovery machinery (entered here, once per
        window, as on a fast retransmit); a lost retransmission is resent
        again: the head at once, a hole by lowering HighRxt to it. In
        recovery, PRR then sets cwnd from what was delivered.
        """
        snd, cc, rack = self._snd, self._cc, self._rack
        before = max(cc.lost_below(self._sb, self._neg.snd_mss), snd.una)
        lost_rtx, deadline = rack.detect(snd.una, self._sb, now, before)
        cc.min_rtt = rack.min_rtt
        self._timers.rack = deadline
        cc.rack_lost = rack.lost_end
        sb = self._sb
        if rack.lost_end > before and rack.lost_end - before > sb.sacked_in(before, rack.lost_end):
            self._n.rack_losses += 1  # RACK found a loss DupThresh had not
        if lost_rtx and cc.in_recovery:
            self._n.rack_losses += len(lost_rtx)
            for start in lost_rtx:
                if start <= snd.una:
                    cc.rexmit_head = True
                else:
                    cc.high_rxt = min(cc.high_rxt, start)
        if not cc.in_recovery and rack.lost_end > snd.una >= cc.recover:
            cc.enter_recovery(snd.una, snd.max, True)
            self._rtt_seq = None
        if cc.in_recovery:
            cc.prr_ack(delivered, snd.pipe(cc, self._sb, True, self._neg.snd_mss))

    def _check_lost_retransmit(self) -> None:
        """Resend the head again when its fast retransmission was lost.

        Only an RTO would notice otherwise (RFC 6675 has no rule for it):
        the head stays unacknowledged while packets sent after its
        retransmission are SACKed. DupThresh of them arriving is taken as
        the retransmission being lost, as RACK (RFC 8985) would judge by time.
        """
        cc = self._cc
        mark = self._rxt_mark
        if not mark or not cc.in_recovery or cc.rexmit_head:
            return
        if self._sb.sacked_in(mark, self._snd.max) >= DUP_THRESH * self._neg.snd_mss:
            cc.rexmit_head = True
            self._rxt_mark = 0

    def _on_new_ack(self, hdr: TcpHeader, ack: int, now: float) -> None:
        snd = self._snd
        fin_was_acked = snd.fin_acked()
        acked = ack - snd.una
        snd.ack(ack)
        self._sb.ack(ack)
        ts = hdr.options.timestamp if self._neg.timestamps else None
        if ts is not None and ts[1]:
            self._rtt_sample_ts(ts[1], now)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
        # Forward progress ends any backoff, as in Linux.
        self._rtt.backoff = 0
        self._retries = 0
        self._cc.on_ack(acked, ack, snd.max - ack)
        timers = self._timers
        timers.rto = None if snd.max == ack else now + self._rtt.rto()
        timers.tlp = None
        self._tlp_count = 0
        self._rxt_mark = 0
        if not fin_was_acked and snd.fin_acked():
            self._state = next_state(self._state, Stimulus.ACK_OF_FIN)
            if self._state is _S.TIME_WAIT:
                self._enter_time_wait(now)
            elif self._state is _S.CLOSED:
                self._to_closed()

    def _rtt_sample_ts(self, tsecr: int, now: float) -> None:
        rtt_ms = (self._ts_now(now) - tsecr) & MASK
        if rtt_ms < 0x80000000:
            self._rtt.sample(rtt_ms / 1000)

    def _receive_data(self, seq: int, payload: bytes | memoryview, fin: bool, now: float) -> None:
        rcv = self._rcv
        n = self._n
        before = rcv.nxt
        result = rcv.receive(seq, payload, fin)
        n.bytes_in += rcv.nxt - before - (1 if result & _rcv.FIN_REACHED else 0)
        if result & (_rcv.OUT_OF_ORDER | _rcv.HOLE_FILLED) or rcv.has_out_of_order():
            # RFC 5681 section 4.2: segments out of order, or filling all
            # or part of a gap, are acknowledged at once (that drives the
            # peer's fast retransmit and keeps its SACK scoreboard fresh).
            if result & _rcv.OUT_OF_ORDER:
                n.ooo_segments += 1
            self._send_ack()
        elif not result & _rcv.ADVANCED:
            self._send_ack()  # nothing fitted in the window
        elif rcv.unacked >= 2 * self._neg.rcv_mss:
            self._send_ack()
        elif self._timers.delack is None:
            self._timers.delack = now + self._config.delayed_ack
        if result & _rcv.FIN_REACHED:
            self._state = next_state(self._state, Stimulus.FIN_RECEIVED)
            if self._state is _S.CLOSE_WAIT:
                # As in Linux, the FIN's ACK is a delayed ACK: a program
                # that closes in turn sends it with its own FIN, one packet
                # instead of two (and a TUN write costs as much as a packet).
                if self._timers.delack is None:
                    self._timers.delack = now + self._config.delayed_ack
            else:
                self._send_ack()
            if self._state is _S.TIME_WAIT:
                self._enter_time_wait(now)

    # ------------------------------------------------------------------- time

    def handle_timeout(self, now: float) -> None:
        """Run every timer whose deadline is at or before `now`."""
        _expiry.handle_timeout(self, now)

    # ----------------------------------------------------------------- output

    def segments_to_send(self, now: float) -> list[tuple[TcpHeader, bytes | bytearray]]:
        """Return every segment due now: data, ACKs, FIN, RST, retransmits, probes."""
        return _output.segments_to_send(self, now)

    def _ts_now(self, now: float) -> int:
        # The ISN doubles as the random timestamp offset (RFC 7323 5.4).
        return (int(now * 1000) + self._iss) & MASK

    # ---------------------------------------------------------------- helpers

    def _changed(self) -> None:
        if self._dirty is not None:
            self._dirty.add(self)

    def _send_ack(self) -> None:
        if self._snd.una == 0:
            self._synack_due = True  # before the handshake, the SYN-ACK is the ACK
        else:
            self._ack_due = True

    def _queue_rst(self) -> None:
        # SND.MAX: the peer has taken everything sent, or the RST lands in
        # its window and draws a challenge ACK at worst (RFC 5961).
        self._rst_out = TcpHeader(
            self.key.remote_port,
            self.key.app_port,
            (self._iss + self._snd.max) & MASK,
            (self._irs + self._rcv.nxt) & MASK,
            RST | ACK,
            0,
        )

    def _reset(self) -> None:
        self._reset_seen = self._state is not _S.TIME_WAIT
        self._rcv.discard()
        self._to_closed()

    def _give_up(self) -> None:
        self._queue_rst()
        self._reset()

    def _enter_time_wait(self, now: float) -> None:
        self._timers.clear()
        self._timers.time_wait = now + self._config.time_wait

    def _to_closed(self) -> None:
        if self._state is not _S.CLOSED:
            self._state = next_state(self._state, Stimulus.RESET)
        self._timers.clear()
        self._ack_due = self._probe_due = self._synack_due = False
        self._changed()
