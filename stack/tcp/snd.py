"""The send side: the send buffer, send sequence space, and what to send next.

Positions are unwrapped ints counted from our ISN (the SYN is 0, the first
data octet 1). The buffer holds every octet from SND.UNA (or the first data
octet) up to the last one the runtime queued; acknowledged octets are cut
from its front, which CPython's bytearray does without moving the rest.

`Sender.next_segment` is the one place that decides the next segment:
retransmissions of loss recovery first (the head on fast retransmit and
NewReno partial ACKs, then SACK holes per RFC 6675 NextSeg, lost by count
or by RACK's clock), then the
regular stream at SND.NXT (new data, or go-back-N after a timeout, skipping
what the peer SACKed), limited by the peer's window, by cwnd minus pipe,
and by sender-side silly window avoidance (RFC 9293 section 3.8.6.2.1).
"""

from __future__ import annotations

from typing import NamedTuple

from stack.tcp.congestion import Congestion, Scoreboard

# Kinds of segment `next_segment` returns.
NEW = 0  # first transmission (or a retransmission after a timeout)
HEAD = 1  # fast retransmit of the first unacknowledged segment
HOLE = 2  # retransmission of a SACK hole during recovery


class Segment(NamedTuple):
    """One segment chosen to send: positions, length, FIN, and why."""

    start: int
    length: int
    fin: bool
    kind: int


class Sender:
    """Send sequence space and buffer of one connection.

    Attributes:
        una: oldest unacknowledged position (SND.UNA).
        nxt: next position of the regular stream (SND.NXT).
        max: highest position sent so far plus one.
        wnd: the peer's window, scaled (SND.WND).
        wl1: sequence number of the segment that last updated wnd.
        wl2: acknowledgement number of that segment.
        max_wnd: the largest window the peer ever offered.
        fin_at: position of our FIN once close() queued it.
    """

    __slots__ = (
        "_buf",
        "_buf_start",
        "_cap",
        "fin_at",
        "max",
        "max_wnd",
        "nxt",
        "una",
        "wl1",
        "wl2",
        "wnd",
    )

    def __init__(self, snd_buf: int, wnd: int) -> None:
        self.una = 0
        self.nxt = 1
        self.max = 1
        self.wnd = wnd
        self.wl1 = 0
        self.wl2 = 0
        self.max_wnd = wnd
        self.fin_at: int | None = None
        self._buf = bytearray()
        self._buf_start = 1
        self._cap = snd_buf

    @property
    def data_end(self) -> int:
        """Return the position after the last queued data octet."""
        return self._buf_start + len(self._buf)

    def space(self) -> int:
        """Return how many bytes `queue` would accept now."""
        # Only asked before close(): the connection refuses send() after it.
        return max(0, self._cap - len(self._buf))

    def queue(self, data: bytes | memoryview) -> int:
        """Append as much of `data` as the buffer takes; return the count."""
        n = min(len(data), self.space())
        if n:
            self._buf += data[:n]
        return n

    def queue_fin(self) -> None:
        """Place our FIN after the last queued octet."""
        self.fin_at = self.data_end

    def fin_acked(self) -> bool:
        """Return True once the peer acknowledged our FIN."""
        return self.fin_at is not None and self.una > self.fin_at

    def ack(self, ack: int) -> None:
        """Advance SND.UNA to `ack` and drop acknowledged octets."""
        self.una = ack
        cut = min(ack, self.data_end) - self._buf_start
        if cut > 0:
            del self._buf[:cut]
            self._buf_start += cut
        if self.nxt < ack:
            self.nxt = ack

    def payload(self, start: int, length: int) -> bytearray:
        """Return `length` octets of the stream from position `start`.

        A bytearray slice: one copy (a `bytes()` around it made a second one
        of up to 64 KB per segment).
        """
        offset = start - self._buf_start
        return self._buf[offset : offset + length]

    def window_blocked(self) -> bool:
        """Return True if only a zero window keeps data from going out.

        That is when the persist timer must run: nothing is in flight to
        bring an ACK that would reopen the window (RFC 9293 3.8.6.1).
        """
        return self.max == self.una and self.nxt < self.data_end and self.una + self.wnd <= self.nxt

    def pipe(self, cc: Congestion, sb: Scoreboard, sack: bool, mss: int) -> int:
        """Return the octets presumed in the network (RFC 6675 SetPipe).

        `mss` is the size of the packets on the wire (what IsLost counts in).
        """
        una = self.una
        pipe = self.nxt - una
        if sb:
            pipe -= sb.sacked_in(una, self.nxt)
            if cc.in_recovery:
                # Lost octets not yet resent have left the network.
                pos = max(cc.high_rxt, una)
                lost = cc.lost_below(sb, mss)
                if lost > pos:
                    pipe -= (lost - pos) - sb.sacked_in(pos, lost)
        return max(0, pipe - cc.dup_credit)

    def next_segment(
        self, cc: Congestion, sb: Scoreboard, sack: bool, mss: int, wire_mss: int = 0
    ) -> Segment | None:
        """Choose the next segment to send, or None if nothing may go now.

        Args:
            cc: congestion state.
            sb: the SACK scoreboard.
            sack: SACK is in use.
            mss: payload octets per segment (after options).
            wire_mss: with GSO, `mss` is the super-segment size and this the
                size of the packets the device cuts it into; new data is then
                clipped to the congestion budget in whole packets instead of
                waiting for a budget of a whole super-segment.
        """
        una = self.una
        # Loss is judged in wire packets: with GSO a lost 1448-byte packet
        # must not wait for two 64 KB super-segments to be SACKed above it.
        unit = wire_mss or mss
        if cc.in_recovery:
            if cc.rexmit_head:
                head = sb.next_hole(una) if sb else None
                head_end = head[1] if head is not None and head[0] == una else self.max
                return self._cut(una, head_end, mss, HEAD)
            budget = cc.cwnd - self.pipe(cc, sb, sack, unit)
            if sack and budget > 0:
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
            budget = cc.cwnd - self.pipe(cc, sb, sack, unit)
        start = self.nxt
        limit = None
        if start < self.max and sb:
            # Resending after a timeout: skip what the peer already holds.
            start, limit = self._skip_sacked(sb, start)
            self.nxt = start
        if start >= self.max:
            limit = None
        elif limit is None or limit > self.max:
            limit = self.max
        avail = self.data_end - start
        n = min(mss, max(avail, 0))
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
        return Segment(start, n, fin, NEW)

    def _cut(self, start: int, limit: int, mss: int, kind: int) -> Segment | None:
        n = max(0, min(start + mss, limit, self.data_end) - start)
        fin = self.fin_at is not None and start + n == self.fin_at
        if n == 0 and not fin:
            return None
        return Segment(start, n, fin, kind)

    @staticmethod
    def _skip_sacked(sb: Scoreboard, pos: int) -> tuple[int, int | None]:
        for left, right in sb.ranges():
            if right <= pos:
                continue
            if left > pos:
                return pos, left
            pos = right
        return pos, None

    def sent(self, seg: Segment, cc: Congestion) -> None:
        """Record that `seg` went out."""
        end = seg.start + seg.length + seg.fin
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
