"""The send side of one connection: what the peer's ACKs mean and what leaves next.

`Sender` owns our send sequence space (SND.UNA, SND.NXT, SND.MAX, the
peer's window), the send buffer, congestion control and loss recovery
(`congestion`), the SACK scoreboard, RACK (`rack`), the RTT estimator and
the state of our SYN-ACK, of tail loss probes and of zero-window probes, as
gVisor's `sender` owns its fields. The connection hands it every acceptable
ACK (`establish`, `on_ack`), tells it when one of its deadlines passed
(`on_rto`, `on_tlp`, `on_rack_timer`, `on_persist`), and asks it for its
segments (`output`); their headers come from the `HeaderWriter` it is
given (`output.Output`). It arms and clears its own deadlines (RTO, tail
loss probe, persist, RACK's reordering timer) in the connection's shared
`timers.Timers`.

Positions are unwrapped ints counted from our ISN (the SYN is 0, the first
data octet 1); only SACK blocks and the timestamp echo arrive as wire
values.

`next_segment` is the one place that decides the next segment:
retransmissions of loss recovery first (the head on fast retransmit and
NewReno partial ACKs, then SACK holes per RFC 6675 NextSeg, lost by count
or by RACK's clock), then the regular stream at SND.NXT (new data, or
go-back-N after a timeout, skipping what the peer SACKed), limited by the
peer's window, by cwnd minus pipe, and by sender-side silly window
avoidance (RFC 9293 section 3.8.6.2.1).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from stack.seq import MASK, seq_diff
from stack.tcp.config import TcpConfig
from stack.tcp.congestion import DUP_THRESH, Congestion, Scoreboard
from stack.tcp.events import Counters
from stack.tcp.options import Negotiated
from stack.tcp.rack import Rack
from stack.tcp.sndbuf import SendBuffer
from stack.tcp.timers import MAX_TAIL_PROBES, RttEstimator, Timers, probe_timeout
from stack.wire.tcp import ACK, FIN, PSH, DataRun, TcpHeader

SegmentList = list[tuple[TcpHeader, bytes | bytearray | memoryview]]
# An output may carry a run of full segments as one item (`Output.run`).
OutputList = list[tuple[TcpHeader | DataRun, bytes | bytearray | memoryview]]
# NamedTuple's __new__ is a Python function: one Segment per segment sent.
_tuple_new = tuple.__new__

# Kinds of segment `next_segment` returns.
NEW = 0  # first transmission (or a retransmission after a timeout)
HEAD = 1  # fast retransmit of the first unacknowledged segment
HOLE = 2  # retransmission of a SACK hole during recovery


class HeaderWriter(Protocol):
    """What the sender needs of `output.Output`: headers, and their option length."""

    @property
    def sack_len(self) -> int:
        """Octets of SACK option on this output's headers."""

    def header(self, seq: int, flags: int) -> TcpHeader:
        """Return the header of a segment at send position `seq`."""

    def run(
        self,
        start: int,
        mss: int,
        payloads: list[bytes | memoryview],
        last_flags: int,
        out: OutputList,
    ) -> None:
        """Append full segments from send position `start` (the last with `last_flags`)."""


class Segment(NamedTuple):
    """One segment chosen to send: positions, length, FIN, and why."""

    start: int
    length: int
    fin: bool
    kind: int


class Sender:
    """Send sequence space, buffer and loss recovery of one connection.

    Attributes:
        una: oldest unacknowledged position (SND.UNA); 0 until our SYN is ACKed.
        nxt: next position of the regular stream (SND.NXT).
        max: highest position sent so far plus one.
        wnd: the peer's window, scaled (SND.WND).
        wl1: sequence number of the segment that last updated wnd.
        wl2: acknowledgement number of that segment.
        max_wnd: the largest window the peer ever offered.
        fin_at: position of our FIN once close() queued it.
        synack_due: the SYN-ACK must be (re)sent with the next output.
        probe_due: a zero-window or keep-alive probe goes with the next output.
    """

    __slots__ = (
        "_buf",
        "_cc",
        "_gso",
        "_iss",
        "_max_retries",
        "_mss",
        "_n",
        "_probes_unanswered",
        "_rack",
        "_retries",
        "_rtt",
        "_rtt_seq",
        "_rtt_time",
        "_rxt_mark",
        "_sack",
        "_sb",
        "_skipped_to",
        "_synack_retransmitted",
        "_synack_time",
        "_timers",
        "_tlp_count",
        "_tlp_due",
        "_ts",
        "_wscale",
        "fin_at",
        "max",
        "max_wnd",
        "nxt",
        "probe_due",
        "synack_due",
        "una",
        "wl1",
        "wl2",
        "wnd",
    )

    def __init__(
        self,
        config: TcpConfig,
        neg: Negotiated,
        iss: int,
        wnd: int,
        timers: Timers,
        counters: Counters,
        now: float,
    ) -> None:
        self.una = 0
        self.nxt = 1
        self.max = 1
        self.wnd = wnd  # from the SYN, whose window is never scaled
        self.wl1 = 0
        self.wl2 = 0
        self.max_wnd = wnd
        self.fin_at: int | None = None
        self.synack_due = True
        self.probe_due = False
        self._buf = SendBuffer(config.snd_buf)
        self._iss = iss
        self._mss = neg.snd_mss
        self._sack = neg.sack
        self._ts = neg.timestamps
        self._wscale = neg.snd_wscale
        self._gso = config.gso_size
        self._max_retries = config.max_retries
        self._cc = Congestion(neg.snd_mss, config.initial_cwnd_segments, config.loss_floor)
        self._sb = Scoreboard()
        self._rack = Rack()
        self._rtt = RttEstimator(config.rto_initial, config.rto_min, config.rto_max)
        self._timers = timers
        self._n = counters
        self._synack_retransmitted = False
        self._synack_time = now
        self._tlp_due = False  # send a tail loss probe with the next output
        self._tlp_count = 0  # probes sent for this flight, until forward progress
        self._rxt_mark = 0  # SND.MAX when the head was last fast-retransmitted
        self._rtt_seq: int | None = None  # Karn's timed segment (no timestamps)
        self._rtt_time = 0.0
        self._retries = 0  # consecutive RTO expiries
        self._probes_unanswered = 0
        # How far plain ACKs skipped before the one that stands for them
        # reached (0: none skipped).
        self._skipped_to = 0

    # ------------------------------------------------------------ the buffer

    def space(self) -> int:
        """Return how many bytes `queue` would accept now."""
        # Only asked before close(): the connection refuses send() after it.
        return self._buf.space()

    def queue(self, data: bytes | memoryview) -> int:
        """Append as much of `data` as the buffer takes; return the count."""
        return self._buf.queue(data)

    def queue_fin(self) -> None:
        """Place our FIN after the last queued octet."""
        self.fin_at = self._buf.end

    def fin_acked(self) -> bool:
        """Return True once the peer acknowledged our FIN."""
        return self.fin_at is not None and self.una > self.fin_at

    # -------------------------------------------------------------- the ACKs

    def establish(self, hdr: TcpHeader, seq: int, ack: int, now: float) -> None:
        """Take the ACK of our SYN-ACK (`ack` unwrapped, at least 1)."""
        self._advance(ack)
        self.wnd = hdr.window << self._wscale
        self.max_wnd = max(self.max_wnd, self.wnd)
        self.wl1 = seq
        self.wl2 = ack
        self._timers.rto = None
        self._retries = 0
        ts = hdr.options.timestamp if self._ts else None
        if ts is not None and ts[1]:
            self._sample_ts(ts[1], now)
        elif not self._synack_retransmitted:
            self._rtt.sample(now - self._synack_time)
        else:
            self._rtt.backoff = 0

    def plain_ack_range(self) -> tuple[int, int]:
        """Return (SND.UNA, limit): an ACK of `ack` (unwrapped) with SND.UNA < ack <= limit
        would only move SND.UNA on.

        That is a cumulative ACK of new data outside loss recovery, with
        nothing SACKed: no duplicate ACK to count, no scoreboard to update
        (in recovery or with SACKed data the limit is SND.UNA: none is).
        Such an ACK, followed in the same batch by another that acknowledges
        more, may be skipped (`skipped_ack`), the later one standing for both.
        Nor while RACK still tracks a retransmission, whose delivery or loss
        would be judged on the skipped ACK (none does outside recovery: the
        ACK that ends recovery delivers them all; the test is a guard).
        """
        una = self.una
        if self._cc.in_recovery or self._sb or (self._sack and self._rack.retransmitting()):
            return una, una
        return una, self.max

    def skipped_ack(self, hdr: TcpHeader, ack: int, now: float) -> None:
        """Take what a skipped plain ACK of `ack` gives beyond the later one's effect.

        Its window counts in MAX.SND.WND (RFC 5961 section 5.2), its
        timestamp echo is an RTT sample, taken in order as one by one, and
        the congestion window grows by what it acknowledges as one by one
        (slow start's min(acked, 2 MSS) per ACK, RFC 3465, or congestion
        avoidance's count, whichever is in force at this ACK). With SACK,
        what it delivers is counted as one by one (it may end a round of the
        delivery rate, `Congestion.on_delivered`) and RACK takes its RTT
        sample (the later ACK may end inside a segment and give none);
        nothing is SACKed and no retransmission is tracked
        (`plain_ack_range`), so RACK marks no loss on it.
        """
        una, skipped_to = self.una, self._skipped_to
        acked = ack - (una if una > skipped_to else skipped_to)
        self._skipped_to = ack
        cc = self._cc
        # Outside recovery `on_ack` only grows the window (SND.UNA and the
        # flight are the later ACK's business).
        cc.on_ack(acked, ack, 0)
        if self._sack:
            rack = self._rack
            cc.on_delivered(acked, ack, self.max, now)
            rack.cumulative_sample(ack, now)
            cc.min_rtt = rack.min_rtt
        window = hdr.window << self._wscale
        if window > self.max_wnd:
            self.max_wnd = window
        ts = hdr.options.timestamp if self._ts else None
        # `_sample_ts` written out: once per skipped ACK of a download.
        if (
            ts is not None
            and ts[1]
            and (rtt_ms := ((int(now * 1000) + self._iss) - ts[1]) & MASK) < 0x80000000
        ):
            self._rtt.sample(rtt_ms / 1000)

    def on_ack(self, hdr: TcpHeader, seq: int, ack: int, plen: int, now: float) -> bool:
        """Take an acceptable ACK after the handshake.

        Args:
            hdr: the segment's header (window, SACK blocks, timestamps).
            seq: its unwrapped sequence number (for the window update rule).
            ack: its unwrapped acknowledgement, within [SND.UNA - MAX.SND.WND, SND.MAX].
            plen: its payload length (a segment with data is no dupACK).
            now: the current time.

        Returns:
            True when this ACK is the first to cover our FIN.
        """
        window = hdr.window << self._wscale
        window_changed = False
        if self.wl1 < seq or (self.wl1 == seq and self.wl2 <= ack):
            window_changed = window != self.wnd
            self.wnd = window
            self.wl1 = seq
            self.wl2 = ack
            if window > self.max_wnd:
                self.max_wnd = window
            if window:
                self._timers.persist = None
        self._probes_unanswered = 0
        if (
            ack == self.max
            and ack > self.una
            and not hdr.options.sack_blocks
            and not self._cc.in_recovery
            and not self._sb
            and not (self._sack and self._rack.retransmitting())
        ):
            return self._ack_all(hdr, ack, now)
        return self._ack_general(hdr, ack, plen, now, window_changed)

    def _ack_general(
        self, hdr: TcpHeader, ack: int, plen: int, now: float, window_changed: bool
    ) -> bool:
        """`on_ack`'s work after the window update: any acceptable ACK."""
        blocks = hdr.options.sack_blocks
        sack = self._sack
        sb = self._sb
        una = self.una
        # Octets that ACKs skipped for this one delivered (`skipped_ack`).
        skipped_to = self._skipped_to
        new_sacked = 0
        sacked_before = sb.sacked
        if blocks and sack and self.max > una:
            wire_base = (self._iss + una) & MASK
            rel = [
                (una + seq_diff(left, wire_base), una + seq_diff(right, wire_base))
                for left, right in blocks
            ]
            new_sacked = sb.update(rel, ack, self.max)
            self._check_lost_retransmit()
        fin_acked = False
        advanced = ack > una
        if advanced:
            fin_acked = self._new_ack(hdr, ack, now)
        elif self.max > una and (
            new_sacked or (not plen and not hdr.flags & FIN and not window_changed and not blocks)
        ):
            lost = sb.lost_below((DUP_THRESH - 1) * self._mss) if sack else 0
            if self._cc.on_dupack(sack, lost > una, una, self.max):
                self._recovery_began()
        if sack and (advanced or new_sacked):
            base = una if una > skipped_to else skipped_to
            delivered = self.una - base + sb.sacked - sacked_before
            self._cc.on_delivered(delivered, max(self.una, sb.high()), self.max, now)
            self._rack_detect(now, delivered)
        return fin_acked

    def _ack_all(self, hdr: TcpHeader, ack: int, now: float) -> bool:
        """`on_ack`'s work for an ACK of everything sent, after the window update.

        The common ACK: a round trip's request ACKing the whole answer, the
        ACK of our FIN. Outside recovery, with nothing SACKed before it or
        in it and no retransmission tracked, the scoreboard stays empty,
        no duplicate ACK is counted, the congestion window only grows, the
        delivery round ends at `ack` at most, and RACK judges nothing lost
        (`Rack.all_delivered`), so no RTO, probe or reordering timer stays
        armed. The same state as `_new_ack` and `_rack_detect` leave
        (tests/stack/tcp/test_ack_all.py).
        """
        una = self.una
        fin_at = self.fin_at
        self._advance(ack)
        self._progress(hdr, ack, now)
        skipped_to = self._skipped_to
        base = una
        if skipped_to:
            # The skipped ACKs grew the window and counted their delivery
            # already (`skipped_ack`).
            self._skipped_to = 0
            if skipped_to > una:
                base = skipped_to
        cc = self._cc
        cc.on_ack(ack - (skipped_to or una), ack, 0)
        timers = self._timers
        timers.rto = timers.tlp = None
        self._tlp_count = 0
        self._rxt_mark = 0
        if self._sack:
            cc.on_delivered(ack - base, ack, ack, now)
            self._rack_all_delivered(ack, now)
        return fin_at is not None and una <= fin_at < ack

    def _advance(self, ack: int) -> None:
        self.una = ack
        self._buf.release(ack)
        if self.nxt < ack:
            self.nxt = ack

    def _new_ack(self, hdr: TcpHeader, ack: int, now: float) -> bool:
        fin_was_acked = self.fin_acked()
        acked = ack - self.una
        self._advance(ack)
        self._sb.ack(ack)
        self._progress(hdr, ack, now)
        if self._skipped_to:
            # The ACKs skipped for this one grew the window already
            # (`skipped_ack`): this one counts what it adds.
            acked = ack - self._skipped_to
            self._skipped_to = 0
        self._cc.on_ack(acked, ack, self.max - ack)
        timers = self._timers
        timers.rto = None if self.max == ack else now + self._rtt.rto()
        timers.tlp = None
        self._tlp_count = 0
        self._rxt_mark = 0
        return not fin_was_acked and self.fin_acked()

    def _progress(self, hdr: TcpHeader, ack: int, now: float) -> None:
        """An ACK that moved SND.UNA to `ack`: its RTT sample (the echoed
        timestamp, or the timed segment), and the end of any backoff."""
        rtt = self._rtt
        ts = hdr.options.timestamp if self._ts else None
        if ts is not None and ts[1]:
            self._sample_ts(ts[1], now)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
        # Forward progress ends any backoff, as in Linux.
        rtt.backoff = 0
        self._retries = 0

    def _sample_ts(self, tsecr: int, now: float) -> None:
        # Our TSval clock: milliseconds plus the ISN as offset (RFC 7323 5.4).
        rtt_ms = ((int(now * 1000) + self._iss) - tsecr) & MASK
        if rtt_ms < 0x80000000:
            self._rtt.sample(rtt_ms / 1000)

    def _rack_all_delivered(self, una: int, now: float) -> None:
        """RACK when the whole flight up to `una` is delivered: its RTT
        sample kept, nothing lost, no reordering timer."""
        cc, rack = self._cc, self._rack
        rack.all_delivered(una, now)
        cc.min_rtt = rack.min_rtt
        self._timers.rack = None
        cc.rack_lost = rack.lost_end

    def _rack_detect(self, now: float, delivered: int = 0) -> None:
        """Run RACK loss detection (RFC 8985) and act on what it finds.

        Called after an ACK that delivered something (`delivered` octets)
        and when the reordering timer fires. Octets RACK marks lost are
        resent by the SACK recovery machinery (entered here, once per
        window, as on a fast retransmit); a lost retransmission is resent
        again: the head at once, a hole by lowering HighRxt to it. In
        recovery, PRR then sets cwnd from what was delivered.
        """
        cc, rack, sb = self._cc, self._rack, self._sb
        una = self.una
        if una == self.max and not sb and not cc.in_recovery and not rack.retransmitting():
            # All of the flight delivered (a round trip's answer ACKed with
            # the next request): nothing is lost and nothing waits; RACK
            # keeps its RTT sample, and `lost_end` (never above SND.MAX)
            # marks nothing past `una`, so what follows below would do
            # nothing more.
            self._rack_all_delivered(una, now)
            return
        before = max(cc.lost_below(sb, self._mss), una)
        lost_rtx, deadline = rack.detect(una, sb, now, before)
        cc.min_rtt = rack.min_rtt
        self._timers.rack = deadline
        cc.rack_lost = rack.lost_end
        if rack.lost_end > before and rack.lost_end - before > sb.sacked_in(before, rack.lost_end):
            self._n.rack_losses += 1  # RACK found a loss DupThresh had not
        if lost_rtx and cc.in_recovery:
            self._n.rack_losses += len(lost_rtx)
            for start in lost_rtx:
                if start <= una:
                    cc.rexmit_head = True
                else:
                    cc.high_rxt = min(cc.high_rxt, start)
        if not cc.in_recovery and rack.lost_end > una >= cc.recover:
            cc.enter_recovery(una, self.max, True)
            self._recovery_began()
        if cc.in_recovery:
            cc.prr_ack(delivered, cc.pipe(sb, una, self.nxt, self._mss))

    def _recovery_began(self) -> None:
        # No tail loss probe in recovery (RFC 8985 section 7.2): the one
        # armed with the flight goes (or one due but not yet sent); the
        # retransmissions have their ACKs, RACK and the RTO.
        self._rtt_seq = None
        self._timers.tlp = None
        self._tlp_due = False

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
        if self._sb.sacked_in(mark, self.max) >= DUP_THRESH * self._mss:
            cc.rexmit_head = True
            self._rxt_mark = 0

    # ---------------------------------------------------------------- timers

    def on_rto(self, now: float) -> bool:
        """The retransmission timer fired; return False to give up (reset)."""
        self._retries += 1
        if self._retries > self._max_retries:
            return False
        t = self._timers
        rtt = self._rtt
        if self.una == 0:
            self.synack_due = True
            self._synack_retransmitted = True
            rtt.backoff += 1
            t.rto = now + rtt.rto()
            return True
        # Past the handshake the RTO runs only while data is in flight: it is
        # armed when a segment goes out and cleared by the ACK of everything.
        self._n.rto_timeouts += 1
        self._cc.on_rto(self.una, self.max, rtt.backoff == 0)
        rtt.backoff += 1
        t.tlp = t.rack = None
        self._rack.timeout()
        self._tlp_count = MAX_TAIL_PROBES  # after a timeout, go-back-N; no probes
        self.nxt = self.una  # go back N, skipping what was SACKed
        self._rtt_seq = None
        t.rto = now + rtt.rto()
        return True

    def on_rack_timer(self, now: float) -> None:
        """RACK's reordering timer fired: judge the flight again."""
        self._timers.rack = None
        self._rack_detect(now)

    def on_tlp(self) -> None:
        """The tail loss probe timer fired."""
        # Armed only with data in flight outside recovery, and cleared by
        # every ACK that moves SND.UNA and when recovery begins, so there
        # is always a flight to probe here, and no recovery under way.
        self._timers.tlp = None
        self._tlp_count += 1
        self._tlp_due = True

    def on_persist(self, now: float) -> bool:
        """The persist timer fired; return False to give up (reset)."""
        self._probes_unanswered += 1
        if self._probes_unanswered > self._max_retries:
            return False
        self.probe_due = True
        self._n.window_probes += 1
        self._timers.persist = now + self._rtt.backed_off(self._probes_unanswered)
        return True

    def synack_sent(self, now: float) -> None:
        """Record that the SYN-ACK went out."""
        if self._synack_retransmitted:
            self._n.retransmits += 1
        self.synack_due = False
        self._synack_time = now
        if self._timers.rto is None:
            self._timers.rto = now + self._rtt.rto()

    # ---------------------------------------------------------------- output

    def nothing_due(self) -> bool:
        """Return True when `output` would append nothing and change nothing.

        That is: everything queued is sent (SND.NXT = SND.MAX = the buffer's
        end) and our FIN too if queued, no probe of either kind is due, no
        persist timer runs (`output` would clear it), and either nothing is
        in flight or, outside loss recovery (no retransmission can be due
        then), the tail loss probe is armed already (`output` would arm
        it). Data held back by the window, cwnd or silly window avoidance
        is left to `output`, as is everything in recovery.
        """
        nxt = self.nxt
        if nxt != self.max or nxt != self._buf.end or self.probe_due or self._tlp_due:
            return False
        fin_at = self.fin_at
        if fin_at is not None and fin_at >= nxt:
            return False
        t = self._timers
        if t.persist is not None:
            return False
        return nxt == self.una or (t.tlp is not None and not self._cc.in_recovery)

    def output(self, now: float, writer: HeaderWriter, out: OutputList) -> None:
        """Append every segment due now to `out`: data, retransmissions, probes.

        Also arms the timers sending starts (RTO, tail loss probe, persist)
        and records send times for RACK.
        """
        n, t, rtt = self._n, self._timers, self._rtt
        header = writer.header
        sack = self._sack
        gso = self._gso
        wire_mss = 0
        mss = self._mss
        if gso is not None and gso > mss:
            # Super-segments: the device cuts them into packets of this peer's
            # MSS (at its own MTU, or at `packet_limit` when the peer announced
            # less, which the runtime passes on with the packet).
            mss, wire_mss = gso, mss
        mss -= writer.sack_len
        if not wire_mss:
            self._full_run(now, writer, mss, out)
        while True:
            seg = self.next_segment(mss, wire_mss)
            if seg is None:
                break
            start, length, fin, kind = seg
            resend = start < self.max
            flags = ACK | (FIN if fin else 0)
            if length and start + length == self._buf.end:
                flags |= PSH
            payload = self._buf.payload(start, length) if length else b""
            out.append((header(start, flags), payload))
            self._sent(seg)
            if sack:
                end = start + length + fin
                if not resend:
                    self._rack.sent(end, now)
                elif kind != NEW:
                    self._rack.resent(start, end, now)
            if resend:
                n.retransmits += 1
                self._rtt_seq = None  # Karn: no sample from a retransmission
                if kind == HEAD:
                    n.fast_retransmits += 1
                    self._rxt_mark = self.max
                elif kind == HOLE:
                    n.sack_retransmits += 1
            else:
                n.bytes_out += length
                if self._rtt_seq is None and not self._ts and kind == NEW:
                    self._rtt_seq = start + length + fin
                    self._rtt_time = now
            if t.rto is None:
                t.rto = now + rtt.rto()
        if self._tlp_due:
            self._tail_loss_probe(writer, out)
        if (
            self._tlp_count < MAX_TAIL_PROBES
            and sack
            and not self._cc.in_recovery
            and t.tlp is None
            and t.rto is not None
            and self.max > self.una
        ):
            srtt = rtt.srtt
            if srtt is not None:
                # A second probe waits twice as long: when the first probe or
                # its ACK was lost too (at 2 % loss, one probe in 25), it saves
                # the 200 ms RTO that RFC 8985's single probe would leave.
                pto = now + probe_timeout(srtt, self.max - self.una, self._mss) * (
                    1 << self._tlp_count
                )
                if pto < t.rto:
                    t.tlp = pto
        if self._window_blocked() and not self.fin_acked():
            if t.persist is None:
                t.persist = now + rtt.rto()
        else:
            t.persist = None
        if self.probe_due:
            # Out of window on purpose (Linux style): it draws an ACK with
            # the current window and touches no data.
            self.probe_due = False
            out.append((header(self.una - 1, ACK), b""))

    def _full_run(self, now: float, writer: HeaderWriter, mss: int, out: OutputList) -> None:
        """Append the run of full-sized new segments that `next_segment` would choose.

        The bulk of a download without offload: outside recovery, with
        nothing to resend, nothing SACKed and no FIN queued, each full
        segment takes `mss` from the congestion budget, the peer's window
        and the queued data alike, so the run's length is known before it
        starts and each segment needs no choosing. The same segments,
        flags, records and timers as one by one; the loop in `output` goes
        on from where the run ends (a shorter last segment, a FIN, a sliver
        of window).
        """
        cc = self._cc
        start = self.nxt
        una = self.una
        flight = start - una - cc.dup_credit  # the pipe, while it is not clamped at 0
        data_end = self._buf.end
        if cc.in_recovery or start != self.max or self.fin_at is not None or self._sb or flight < 0:
            return
        room = min(cc.cwnd - flight, una + self.wnd - start, data_end - start)
        stop = start + room - room % mss if room >= mss else start
        if stop == start:
            return
        writer.run(
            start,
            mss,
            self._buf.payloads(start, stop, mss),
            ACK | PSH if stop == data_end else ACK,
            out,
        )
        if self._sack:
            self._rack.sent_run(start, stop, mss, now)
        self.nxt = self.max = stop
        self._n.bytes_out += stop - start
        if self._rtt_seq is None and not self._ts:
            self._rtt_seq = start + mss
            self._rtt_time = now
        t = self._timers
        if t.rto is None:
            t.rto = now + self._rtt.rto()

    def _tail_loss_probe(self, writer: HeaderWriter, out: OutputList) -> None:
        """Resend the last packet of the flight (RFC 8985 section 7.3).

        When the flight's last ACKs were lost (or its tail was), nothing else
        would move before the RTO. The probe draws an ACK, or a SACK that
        starts fast recovery, within a few RTTs. A FIN at the tail goes with
        it: the end of every transfer is a tail.
        """
        self._tlp_due = False
        if self.max <= self.una:
            return
        fin_at = self.fin_at
        fin = fin_at is not None and self.max > fin_at
        end = self.max - fin
        start = max(self.una, end - self._mss)
        flags = ACK | (PSH if end > start else 0) | (FIN if fin else 0)
        out.append((writer.header(start, flags), self._buf.payload(start, end - start)))
        self._n.retransmits += 1
        self._n.tail_loss_probes += 1
        self._rtt_seq = None

    def _window_blocked(self) -> bool:
        """Return True if only a zero window keeps data from going out.

        That is when the persist timer must run: nothing is in flight to
        bring an ACK that would reopen the window (RFC 9293 3.8.6.1).
        """
        return self.max == self.una and self.nxt < self._buf.end and self.una + self.wnd <= self.nxt

    def next_segment(self, mss: int, wire_mss: int = 0) -> Segment | None:
        """Choose the next segment to send, or None if nothing may go now.

        Args:
            mss: payload octets per segment (after options).
            wire_mss: with GSO, `mss` is the super-segment size and this the
                size of the packets the device cuts it into; new data is then
                clipped to the congestion budget in whole packets instead of
                waiting for a budget of a whole super-segment.
        """
        una = self.una
        cc, sb = self._cc, self._sb
        data_end = self._buf.end
        # Loss is judged in wire packets: with GSO a lost 1448-byte packet
        # must not wait for two 64 KB super-segments to be SACKed above it.
        unit = wire_mss or mss
        if cc.in_recovery:
            if cc.rexmit_head:
                head = sb.next_hole(una) if sb else None
                head_end = head[1] if head is not None and head[0] == una else self.max
                return self._cut(una, head_end, mss, HEAD)
            budget = cc.cwnd - cc.pipe(sb, una, self.nxt, unit)
            if self._sack and budget > 0:
                pos = max(cc.high_rxt, una)
                lost = cc.lost_below(sb, unit)
                hole = sb.next_hole(pos)
                if hole is not None and hole[0] < lost:
                    # A hole larger than the budget goes out in whole wire
                    # packets now rather than waiting for room for all of it.
                    room = budget - budget % wire_mss if wire_mss else mss
                    seg = self._cut(hole[0], min(hole[1], lost), min(mss, room), HOLE)
                    if seg is not None and seg.length <= budget:
                        return seg
                    return None
        else:
            budget = cc.cwnd - cc.pipe(sb, una, self.nxt, unit)
        start = self.nxt
        limit = None
        if start < self.max and sb:
            # Resending after a timeout: skip what the peer already holds.
            start, limit = sb.skip_sacked(start)
            self.nxt = start
        if start >= self.max:
            limit = None
        elif limit is None or limit > self.max:
            limit = self.max
        avail = data_end - start
        # min(mss, max(avail, 0)) without the two calls (once per segment).
        n = avail if avail > 0 else 0
        n = n if n < mss else mss
        if limit is not None:
            n = min(n, limit - start)
        elif n:
            room = una + self.wnd - start
            if room < n:
                # Sender SWS avoidance: a sliver of window is used only if
                # it is half the largest window seen or nothing is in
                # flight (else the connection could stall).
                if room <= 0 or (room < self.max_wnd // 2 and self.max != una):
                    return None
                n = room
        if n > budget and n:
            if wire_mss and budget >= wire_mss:
                n = budget - budget % wire_mss
            else:
                return None
        fin = self.fin_at is not None and start + n == self.fin_at
        if n == 0 and not fin:
            return None
        return _tuple_new(Segment, (start, n, fin, NEW))

    def _cut(self, start: int, limit: int, mss: int, kind: int) -> Segment | None:
        n = max(0, min(start + mss, limit, self._buf.end) - start)
        fin = self.fin_at is not None and start + n == self.fin_at
        if n == 0 and not fin:
            return None
        return _tuple_new(Segment, (start, n, fin, kind))

    def _sent(self, seg: Segment) -> None:
        end = seg.start + seg.length + seg.fin
        cc = self._cc
        if cc.in_recovery:
            cc.prr_out += end - seg.start
        if seg.kind == NEW:
            self.nxt = end
            if end > self.max:
                self.max = end
        else:
            if seg.kind == HEAD:
                cc.rexmit_head = False
            if end > cc.high_rxt:
                cc.high_rxt = end
