"""Congestion control: NewReno with SACK-based loss recovery.

Two pieces live here. `Scoreboard` records which octets above SND.UNA the
peer has SACKed (RFC 6675 section 3). `Congestion` holds cwnd, ssthresh and
the recovery state: slow start and congestion avoidance with appropriate
byte counting (RFC 5681, RFC 3465 with L = 2), fast retransmit on three
duplicate ACKs or when the scoreboard (or RACK) says the first segment is
lost, and loss recovery driven by "pipe" (RFC 6675) so holes reported by
SACK are retransmitted in one round trip. With SACK, Proportional Rate
Reduction (RFC 6937, PRR-SSRB) sets cwnd on every ACK in recovery: the
flight shrinks to ssthresh in step with what is delivered instead of
halving at once and then sending nothing for half a round trip, and
recovery ends with cwnd = ssthresh. Peers without SACK get NewReno
(RFC 6582): each duplicate ACK counts as one segment that left the
network, and every partial ACK retransmits the new first unacknowledged
segment.

Loss tolerance (SACK connections): a loss halves the window only down to
twice the path's measured bandwidth-delay product: the highest delivery
rate of the last ten round trips times the smallest RTT seen, the window
BBR keeps. Random loss on a link that is not full (Wi-Fi, a lossy LAN hop)
then costs a retransmission instead of half the rate, while a queue that
overflows still brings a larger window down to that floor, and the floor
follows the delivery rate down. This hop is the local one between the
application and tun2sx; the long path to the server is the outbound
socket's, under the kernel's own congestion control.

Positions are unwrapped ints of our send sequence space.
"""

from __future__ import annotations

from bisect import bisect_right

DUP_THRESH = 3
_MAX_BLOCKS = 128  # bound on remembered SACK ranges (CPU and memory)
_CWND_CAP = 1 << 30
_BW_ROUNDS = 10  # delivery-rate samples the loss floor looks back over (as BBR)
_FLOOR_GAIN = 2  # the loss floor in bandwidth-delay products (BBR's cwnd gain)


class Scoreboard:
    """SACKed ranges above SND.UNA, sorted, disjoint and merged.

    Attributes:
        sacked: total SACKed octets.
    """

    __slots__ = ("_ends", "_starts", "sacked")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.sacked = 0

    def __bool__(self) -> bool:
        return bool(self._starts)

    def high(self) -> int:
        """Return the end of the highest SACKed range, or 0."""
        return self._ends[-1] if self._ends else 0

    def ranges(self) -> list[tuple[int, int]]:
        """Return the SACKed ranges as (left, right) pairs, lowest first."""
        return list(zip(self._starts, self._ends, strict=True))

    def update(self, blocks: list[tuple[int, int]], una: int, snd_max: int) -> int:
        """Record SACK blocks; return how many octets were newly SACKed.

        Blocks outside (una, snd_max] are ignored (stale or bogus: RFC 2018
        lets a receiver report old blocks, and a broken peer may report
        anything).
        """
        added = 0
        starts, ends = self._starts, self._ends
        for left, right in blocks:
            left = max(left, una)
            right = min(right, snd_max)
            if left >= right:
                continue
            i = bisect_right(starts, left) - 1
            if i >= 0 and ends[i] >= left:
                if right <= ends[i]:
                    continue
                added += right - ends[i]
                ends[i] = right
            else:
                if len(starts) >= _MAX_BLOCKS:
                    continue
                i += 1
                starts.insert(i, left)
                ends.insert(i, right)
                added += right - left
            # Merge the ranges the grown one now reaches.
            while i + 1 < len(starts) and starts[i + 1] <= ends[i]:
                added -= min(ends[i], ends[i + 1]) - starts[i + 1]
                ends[i] = max(ends[i], ends[i + 1])
                del starts[i + 1]
                del ends[i + 1]
        self.sacked += added
        return added

    def ack(self, una: int) -> None:
        """Forget everything below the cumulative acknowledgement."""
        starts, ends = self._starts, self._ends
        while starts and starts[0] < una:
            if ends[0] <= una:
                self.sacked -= ends[0] - starts[0]
                del starts[0]
                del ends[0]
            else:
                self.sacked -= una - starts[0]
                starts[0] = una

    def sacked_in(self, lo: int, hi: int) -> int:
        """Return the SACKed octets inside [lo, hi)."""
        total = 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start >= hi:
                break
            total += max(0, min(end, hi) - max(start, lo))
        return total

    def next_hole(self, pos: int) -> tuple[int, int] | None:
        """Return the first un-SACKed range at or after `pos` below high()."""
        starts, ends = self._starts, self._ends
        i = bisect_right(starts, pos) - 1
        if i >= 0 and ends[i] > pos:
            pos = ends[i]
        i += 1
        if i >= len(starts):
            return None
        return pos, starts[i]

    def skip_sacked(self, pos: int) -> tuple[int, int | None]:
        """Return the first un-SACKed position at or after `pos`, and the
        start of the SACKed range above it (None if there is none)."""
        for left, right in zip(self._starts, self._ends, strict=True):
            if right <= pos:
                continue
            if left > pos:
                return pos, left
            pos = right
        return pos, None

    def lost_below(self, threshold: int) -> int:
        """Return the position below which un-SACKed octets count as lost.

        RFC 6675 IsLost(): an octet is lost once more than `threshold`
        octets above it are SACKed (threshold = (DupThresh - 1) * SMSS).
        """
        above = 0
        for i in range(len(self._starts) - 1, -1, -1):
            above += self._ends[i] - self._starts[i]
            if above > threshold:
                return self._starts[i]
        return 0


class Congestion:
    """Congestion window and loss-recovery state of one connection.

    Attributes:
        cwnd: congestion window in octets.
        ssthresh: slow-start threshold in octets.
        in_recovery: fast recovery in progress.
        recover: SND.MAX when recovery (or the last RTO) began.
        high_rxt: highest position retransmitted in this recovery.
        rexmit_head: the first unacknowledged segment must be resent now.
        dupacks: duplicate ACKs since the last advance of SND.UNA.
        dup_credit: for peers without SACK, octets presumed delivered
            because duplicate ACKs arrived (each stands for one segment).
        rack_lost: un-SACKed octets below this position are lost by time
            (RACK, RFC 8985); 0 when RACK is not in use.
        prr_delivered: octets delivered since recovery began (RFC 6937).
        prr_out: octets sent since recovery began.
        recover_fs: the flight when recovery began.
        delivered: octets delivered (cumulatively ACKed or SACKed) so far.
        min_rtt: the smallest RTT measured on a segment, None before the
            first (kept up to date by the connection, from RACK).
    """

    __slots__ = (
        "_acked_accum",
        "_loss_floor",
        "_rates",
        "_round_delivered",
        "_round_end",
        "_round_start",
        "cwnd",
        "delivered",
        "dup_credit",
        "dupacks",
        "high_rxt",
        "in_recovery",
        "min_rtt",
        "mss",
        "prr",
        "prr_delivered",
        "prr_out",
        "rack_lost",
        "recover",
        "recover_fs",
        "rexmit_head",
        "ssthresh",
    )

    def __init__(self, mss: int, initial_segments: int, loss_floor: bool = True) -> None:
        self.mss = mss
        # RFC 6928 section 2.
        self.cwnd = min(initial_segments * mss, max(2 * mss, initial_segments * 1460))
        self.ssthresh = _CWND_CAP
        self.in_recovery = False
        self.recover = 0
        self.high_rxt = 0
        self.rexmit_head = False
        self.dupacks = 0
        self.dup_credit = 0
        self.rack_lost = 0
        self.prr = False
        self.prr_delivered = self.prr_out = self.recover_fs = 0
        self._acked_accum = 0
        self._loss_floor = loss_floor
        self.delivered = 0
        self.min_rtt: float | None = None
        self._rates: list[float] = []
        self._round_end = 0
        self._round_start = -1.0
        self._round_delivered = 0

    def lost_below(self, sb: Scoreboard, unit: int) -> int:
        """Return the position below which un-SACKed octets are lost.

        By count (RFC 6675 IsLost, in packets of `unit` octets) or by time
        (RACK), whichever reaches further.
        """
        return max(sb.lost_below((DUP_THRESH - 1) * unit), self.rack_lost)

    def pipe(self, sb: Scoreboard, una: int, nxt: int, unit: int) -> int:
        """Return the octets presumed in the network (RFC 6675 SetPipe).

        Args:
            sb: the scoreboard.
            una: SND.UNA.
            nxt: SND.NXT.
            unit: the size of the packets on the wire (what IsLost counts in).
        """
        pipe = nxt - una
        if sb:
            pipe -= sb.sacked_in(una, nxt)
            if self.in_recovery:
                # Lost octets not yet resent have left the network.
                pos = max(self.high_rxt, una)
                lost = self.lost_below(sb, unit)
                if lost > pos:
                    pipe -= (lost - pos) - sb.sacked_in(pos, lost)
        pipe -= self.dup_credit
        return pipe if pipe > 0 else 0  # once per segment sent: no max() call

    def on_delivered(self, delivered: int, high: int, snd_max: int, now: float) -> None:
        """Count `delivered` newly ACKed or SACKed octets, sampling the rate.

        A round trip ends when an octet sent after it began is delivered
        (`high`, the highest delivered position, passes the SND.MAX of its
        start); its delivery rate is what was delivered during it over its
        length, never taken as shorter than min_rtt (ACKs bunched up by a
        busy receiver or host would overstate the rate).
        """
        self.delivered += delivered
        if high <= self._round_end:
            return
        if self._round_start >= 0:
            elapsed = max(now - self._round_start, self.min_rtt or 0.0)
            if elapsed > 0:
                rates = self._rates
                rates.append((self.delivered - self._round_delivered) / elapsed)
                if len(rates) > _BW_ROUNDS:
                    del rates[0]
        self._round_end = snd_max
        self._round_start = now
        self._round_delivered = self.delivered

    def loss_floor(self) -> int:
        """Return the octets a loss never takes the window below (0: none yet)."""
        if not self._loss_floor or not self._rates or self.min_rtt is None:
            return 0
        return int(_FLOOR_GAIN * max(self._rates) * self.min_rtt)

    def _reduced(self, flight: int) -> int:
        """Return ssthresh after a loss: half the flight, or the floor if higher.

        The floor may exceed the flight (when the flight was cut short by a
        loss or the application): recovery then ends with the window BBR
        would keep, PRR having sent in step with deliveries until then.
        """
        return max(flight // 2, self.loss_floor(), 2 * self.mss)

    def on_ack(self, acked: int, una: int, flight: int) -> None:
        """SND.UNA advanced by `acked` octets to `una`; `flight` is what is left."""
        self.dupacks = 0
        if self.in_recovery:
            if una >= self.recover:
                # Full acknowledgement: leave recovery (RFC 6582 3.2 step 3).
                self.in_recovery = False
                self.rexmit_head = False
                self.dup_credit = 0
                if self.prr:
                    self.cwnd = self.ssthresh  # RFC 6937 section 3
                else:
                    self.cwnd = min(self.ssthresh, max(flight, self.mss) + self.mss)
            else:
                # Partial acknowledgement: the new first segment is lost
                # too, unless this recovery already resent it.
                self.dup_credit = max(0, self.dup_credit - acked)
                if una >= self.high_rxt:
                    self.rexmit_head = True
            return
        self.dup_credit = 0
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, 2 * self.mss)
        else:
            self._acked_accum += acked
            if self._acked_accum >= self.cwnd:
                self._acked_accum -= self.cwnd
                self.cwnd += self.mss
        self.cwnd = min(self.cwnd, _CWND_CAP)

    def on_dupack(self, sack: bool, head_lost: bool, una: int, snd_max: int) -> bool:
        """Count a duplicate ACK; return True if fast recovery starts now.

        Args:
            sack: SACK is in use (otherwise duplicate ACKs earn credit).
            head_lost: the scoreboard already marks SND.UNA as lost.
            una: SND.UNA.
            snd_max: the highest position sent.
        """
        self.dupacks += 1
        if not sack:
            self.dup_credit = min(self.dupacks * self.mss, max(0, snd_max - una - self.mss))
        if self.in_recovery or una < self.recover:
            return False
        if self.dupacks < DUP_THRESH and not head_lost:
            return False
        self.enter_recovery(una, snd_max, sack)
        return True

    def enter_recovery(self, una: int, snd_max: int, sack: bool) -> None:
        """Start fast retransmit / fast recovery (RFC 6675 section 5 step 4).

        With `sack`, PRR then sets cwnd on every ACK (`prr_ack`).
        """
        flight = snd_max - una
        self.prr = sack
        self.prr_delivered = self.prr_out = 0
        self.recover_fs = flight
        self.ssthresh = self._reduced(flight)
        self.cwnd = self.ssthresh
        self.in_recovery = True
        self.recover = snd_max
        self.high_rxt = una
        self.rexmit_head = True
        self._acked_accum = 0

    def prr_ack(self, delivered: int, pipe: int) -> None:
        """Set cwnd for an ACK in SACK recovery (RFC 6937 section 3, PRR-SSRB).

        Args:
            delivered: octets this ACK newly delivered (SND.UNA advance
                plus the change in SACKed octets).
            pipe: the octets in flight after this ACK.
        """
        self.prr_delivered += delivered
        ssthresh = self.ssthresh
        if pipe > ssthresh:
            # Proportional: send ssthresh/RecoverFS of what is delivered.
            sndcnt = -(-self.prr_delivered * ssthresh // self.recover_fs) - self.prr_out
        else:
            # Slow start back up to ssthresh, bounded by what is delivered.
            limit = max(self.prr_delivered - self.prr_out, delivered) + self.mss
            sndcnt = min(ssthresh - pipe, limit)
        self.cwnd = pipe + max(sndcnt, 0)

    def on_rto(self, una: int, snd_max: int, first: bool) -> None:
        """The retransmission timer expired (RFC 5681 section 3.1, eq. 4).

        Args:
            una: SND.UNA.
            snd_max: the highest position sent.
            first: this is the first expiry for this segment; repeated
                (backed-off) expiries keep ssthresh as it is.
        """
        if first:
            self.ssthresh = self._reduced(snd_max - una)
        self.cwnd = self.mss
        self.in_recovery = False
        self.rexmit_head = False
        self.recover = snd_max
        self.dupacks = 0
        self.dup_credit = 0
        self.rack_lost = 0
        self._acked_accum = 0
