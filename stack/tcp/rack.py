"""RACK: time-based loss detection for SACK connections (RFC 8985, simplified).

Counting three duplicate ACKs (RFC 6675 IsLost) cannot judge a loss near
the end of a flight, a lost retransmission, or a flight whose ACKs were
lost: too few packets follow. RACK judges by time instead. A packet is lost
once a packet sent after it was delivered (cumulatively ACKed or SACKed)
and its own send time + RACK.rtt + reo_wnd has passed; if that time is
still ahead, a reordering timer is armed for it.

Keeping it cheap on the sender's hot path: first transmissions go out in
sequence order, so their send times are two parallel lists sorted both by
end position and by time (one entry per segment, a GSO super-segment is one
entry), pruned from the front by the cumulative ACK, and searched with
bisect. What RACK marks lost among them is therefore always a prefix of
the sequence space: every un-SACKed octet below `lost_end`. The few
retransmissions (fast, SACK hole) are kept in a short separate list.

Simplifications against RFC 8985: reo_wnd is always min_rtt / 4 (no
reordering detection, no D-SACK driven growth); min_rtt is the minimum
over the connection's life, not a windowed filter; a retransmission counts
as delivered only if at least min_rtt passed since it was sent (section 6.2
step 2, by RTT rather than timestamps); a first transmission whose octets
were later resent by a tail loss probe or after a timeout keeps its first
send time (such a range is the flight's last, or below the recovery point
of the timeout, where RACK starts no recovery); after a timeout RACK
forgets its retransmissions and leaves the go-back-N resends to the RTO.

Positions are unwrapped ints of our send sequence space.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stack.tcp.congestion import Scoreboard


class Rack:
    """Send times of the flight and the RACK loss-detection state.

    Attributes:
        xmit_ts: send time of the most recently sent delivered segment.
        end_seq: its end position (breaks ties between equal send times).
        rtt: RTT measured on that segment when it was delivered.
        min_rtt: the smallest such RTT, None before the first.
        lost_end: un-SACKed octets below this position are lost (those
            not retransmitted since).
    """

    __slots__ = ("_ends", "_rtx", "_times", "end_seq", "lost_end", "min_rtt", "rtt", "xmit_ts")

    def __init__(self) -> None:
        self._ends: list[int] = []
        self._times: list[float] = []
        self._rtx: list[tuple[int, int, float]] = []
        self.xmit_ts = -1.0
        self.end_seq = 0
        self.rtt = 0.0
        self.min_rtt: float | None = None
        self.lost_end = 0

    def sent(self, end: int, now: float) -> None:
        """Record a first transmission ending at `end`."""
        self._ends.append(end)
        self._times.append(now)

    def sent_run(self, start: int, stop: int, size: int, now: float) -> None:
        """`sent` for each segment of `size` octets from `start` up to `stop`."""
        ends = range(start + size, stop + 1, size)
        self._ends.extend(ends)
        self._times.extend([now] * len(ends))

    def cumulative_sample(self, una: int, now: float) -> None:
        """Take the RTT sample of a cumulative ACK of `una` (RFC 8985 6.2).

        What `detect` takes from it when nothing is SACKed and no
        retransmission is tracked: the segment ending exactly at `una`, if
        it was sent after the last one delivered. Nothing can be judged
        lost then (every segment sent before it is delivered too), so
        `detect` is left to the next ACK.
        """
        ends = self._ends
        j = bisect_left(ends, una)
        if j < len(ends) and ends[j] == una:
            t = self._times[j]
            if (t, una) > (self.xmit_ts, self.end_seq):
                self.xmit_ts, self.end_seq = t, una
                self.rtt = rtt = now - t
                if self.min_rtt is None or rtt < self.min_rtt:
                    self.min_rtt = rtt

    def all_delivered(self, una: int, now: float) -> None:
        """`detect` when `una` covers everything sent, nothing is SACKed and
        no retransmission is tracked: the request and answer of a round
        trip, a flight ACKed whole.

        Then `detect` takes the RTT sample of the segment ending at `una`
        (`cumulative_sample`) and drops every record; nothing is left to
        be judged lost and no timer is due (it would return ``([], None)``).
        """
        self.cumulative_sample(una, now)
        self._ends.clear()
        self._times.clear()

    def retransmitting(self) -> bool:
        """Return True while a retransmission awaits its delivery or loss."""
        return bool(self._rtx)

    def resent(self, start: int, end: int, now: float) -> None:
        """Record a loss-recovery retransmission of [start, end)."""
        rtx = self._rtx
        if rtx:
            rtx[:] = [r for r in rtx if not (start <= r[0] and r[1] <= end)]
        rtx.append((start, end, now))

    def timeout(self) -> None:
        """The RTO fired: go-back-N resends everything; forget retransmissions."""
        self._rtx.clear()
        self.lost_end = 0

    def detect(
        self, una: int, sb: Scoreboard, now: float, marked: int
    ) -> tuple[list[int], float | None]:
        """Update from what is delivered and mark losses (RFC 8985 6.2, 6.3).

        Args:
            una: SND.UNA (already advanced by this ACK).
            sb: the scoreboard (already updated by this ACK).
            now: the current time.
            marked: octets below this are already marked lost otherwise
                (DupThresh); no timer waits for them.

        Returns:
            The starts of the retransmissions now judged lost, and when the
            reordering timer must fire (or None). `lost_end` is advanced as
            a side effect.
        """
        ends, times = self._ends, self._times
        # The most recently sent delivered segment, among first
        # transmissions: the one holding the highest delivered octet (when
        # only the cumulative ACK moved, the one ending exactly at it).
        best_t, best_end = self.xmit_ts, self.end_seq
        hi = max(una, sb.high())
        j = bisect_left(ends, hi)
        if (
            j < len(ends)
            and (hi > una or ends[j] == hi)
            and (times[j], ends[j]) > (best_t, best_end)
        ):
            best_t, best_end = times[j], ends[j]
        k = bisect_right(ends, una)
        if k:
            del ends[:k]
            del times[:k]
        rtx = self._rtx
        min_rtt = self.min_rtt
        if rtx:
            keep = []
            for r in rtx:
                start, end, t = r
                if end <= una or sb.sacked_in(start, end) == end - start:
                    # Delivered; a retransmission ACKed sooner than an RTT
                    # after it was sent is the original's ACK (6.2 step 2).
                    if min_rtt is not None and now - t >= min_rtt and (t, end) > (best_t, best_end):
                        best_t, best_end = t, end
                else:
                    keep.append(r)
            rtx[:] = keep
        if (best_t, best_end) > (self.xmit_ts, self.end_seq):
            self.xmit_ts, self.end_seq = best_t, best_end
            self.rtt = now - best_t
            if min_rtt is None or self.rtt < min_rtt:
                self.min_rtt = min_rtt = self.rtt
        wait = self.rtt + (min_rtt or 0.0) / 4
        # A nanosecond of slack: a deadline computed as t + wait must not
        # round to one that is due again at the same `now`.
        cutoff = now - wait + 1e-9
        xmit_ts, end_seq = self.xmit_ts, self.end_seq
        # First transmissions sent before the delivered one: those sent at an
        # earlier time, or at the same time below it.
        same_time = min(bisect_left(ends, end_seq), bisect_right(times, xmit_ts))
        before = max(bisect_left(times, xmit_ts), same_time)
        expired = bisect_right(times, cutoff)
        n = min(before, expired)
        if n and ends[n - 1] > self.lost_end:
            self.lost_end = ends[n - 1]
        # The timer waits for the oldest segment sent before the delivered
        # one and not yet marked lost (it may be SACKed by then: one wasted
        # wake-up, cheaper than looking for it in the scoreboard).
        first = max(expired, bisect_right(ends, max(marked, self.lost_end)))
        deadline = times[first] + wait if first < before else None
        lost_rtx: list[int] = []
        if rtx:
            keep = []
            for r in rtx:
                start, end, t = r
                if (t, end) < (xmit_ts, end_seq):
                    if t <= cutoff:
                        lost_rtx.append(start)
                        self.lost_end = max(self.lost_end, end)
                        continue
                    deadline = t + wait if deadline is None else min(deadline, t + wait)
                keep.append(r)
            rtx[:] = keep
        return lost_rtx, deadline
