"""The receive side: reassembly, window, SACK blocks, and when to acknowledge.

`Receiver` owns the receive sequence space and everything our ACKs say
about it, as gVisor's `receiver` does: the in-order and out-of-order data,
the window we advertise, the SACK blocks, the timestamp to echo
(TS.Recent, RFC 7323) and the ACK policy (at once for out-of-order and
gap-filling data, every second full segment, else after the delayed-ACK
time, whose deadline it keeps in the connection's `timers.Timers`). Every
segment that leaves carries an ACK; `output.Output` asks `ack_segment` for
its window field, which also records that everything received so far is
acknowledged.

Positions are unwrapped ints counted from the peer's ISN (its SYN is 0, its
first data octet 1), so no comparison here needs modular arithmetic; the
connection converts wire values before calling in.

In-order bytes wait in `ready` until `next_event` takes them; the window we
advertise is what `rcv_buf` has left, so an outbound that falls behind
closes the application's window (backpressure). Out-of-order data waits in
a few merged ranges (bounded in bytes and in count), and those ranges are
what SACK blocks report (RFC 2018).
"""

from __future__ import annotations

from bisect import bisect_right

from stack.seq import MASK, seq_ge
from stack.tcp.config import TcpConfig
from stack.tcp.events import Counters
from stack.tcp.options import Negotiated
from stack.tcp.timers import Timers

# Bits of the value `Receiver.receive` returns.
ADVANCED = 1  # new in-order bytes (or the FIN) were accepted
OUT_OF_ORDER = 2  # the segment left (or extended) a hole: ACK at once
HOLE_FILLED = 8  # out-of-order data became in-order: ACK at once
FIN_REACHED = 16  # the peer's FIN is now in sequence

_MAX_RECENT = 4


class Receiver:
    """Receive sequence space and buffers of one connection.

    Attributes:
        nxt: the next position expected (RCV.NXT).
        adv: the right edge of the window we last advertised.
        ready: in-order bytes not yet handed to the runtime.
        fin_received: the FIN is in sequence (after all data).
        unacked: in-order bytes accepted since our last ACK.
        ack_due: an ACK must go out with the next output.
        ts_recent: the peer's timestamp to echo (TS.Recent).
        last_ack_sent: RCV.NXT as our last ACK stated it (Last.ACK.sent).
    """

    __slots__ = (
        "_ack_every",
        "_datas",
        "_delayed_ack",
        "_fin_at",
        "_irs",
        "_max_ooo_bytes",
        "_max_ooo_ranges",
        "_n",
        "_recent",
        "_sack_limit",
        "_starts",
        "_threshold",
        "_timers",
        "ack_due",
        "adv",
        "fin_received",
        "last_ack_sent",
        "max_window",
        "nxt",
        "ooo_bytes",
        "rcv_buf",
        "ready",
        "ready_len",
        "ts_recent",
        "unacked",
    )

    def __init__(
        self,
        config: TcpConfig,
        neg: Negotiated,
        irs: int,
        ts_recent: int,
        timers: Timers,
        counters: Counters,
    ) -> None:
        rcv_buf = config.rcv_buf
        self._irs = irs
        self._timers = timers
        self._n = counters
        self._delayed_ack = config.delayed_ack
        self._ack_every = 2 * neg.rcv_mss
        # RFC 2018: as many blocks as fit beside the timestamp option.
        self._sack_limit = (3 if neg.timestamps else 4) if neg.sack else 0
        self.ack_due = False
        self.ts_recent = ts_recent
        self.last_ack_sent = 1
        self.nxt = 1
        self.adv = 1
        self.max_window = 0
        self.rcv_buf = rcv_buf
        # Chunks (views of the received packets), joined once when taken:
        # appending to one bytearray copied every segment twice and kept
        # reallocating as the buffer refilled after each take.
        self.ready: list[bytes | bytearray | memoryview] = []
        self.ready_len = 0
        self.fin_received = False
        self.unacked = 0
        self.ooo_bytes = 0
        self._starts: list[int] = []
        self._datas: list[bytearray] = []
        self._fin_at: int | None = None
        self._recent: list[int] = []
        self._max_ooo_bytes = config.max_ooo_bytes
        self._max_ooo_ranges = config.max_ooo_ranges
        # RFC 9293 section 3.8.6.2.2: move the right edge in steps of at
        # least min(buffer / 2, MSS), so the sender is not lured into
        # sending tiny segments.
        self._threshold = min(rcv_buf // 2, neg.rcv_mss)

    def window(self) -> int:
        """Return the receive window now in force (RCV.WND)."""
        return self.adv - self.nxt

    def advertise(self, shift: int) -> int:
        """Return the raw 16-bit window field to send, and record its edge.

        The right edge never moves left (RFC 9293 section 3.8.6); it moves
        right only in SWS-avoiding steps, rounded up to the scale unit so
        the scaled value never undercuts the edge already promised.
        """
        # Once per segment sent: plain comparisons, no min/max calls.
        nxt = self.nxt
        adv = self.adv
        free = self.rcv_buf - self.ready_len
        edge = nxt + free if free > 0 else nxt
        target = edge if edge - adv >= self._threshold else adv
        raw = (target - nxt + (1 << shift) - 1) >> shift
        if raw > 0xFFFF:
            raw = 0xFFFF
        right = nxt + (raw << shift)
        if right > adv:
            self.adv = adv = right
        if adv - nxt > self.max_window:
            self.max_window = adv - nxt
        return raw

    def note_timestamp(self, tsval: int, seq: int) -> None:
        """Take the TSval of an acceptable segment at position `seq` (RFC 7323 4.3).

        TS.Recent follows only segments that reach the left window edge as
        our last ACK stated it, so a delayed ACK echoes the earliest
        unacknowledged segment's timestamp.
        """
        if seq <= self.last_ack_sent and seq_ge(tsval, self.ts_recent):
            self.ts_recent = tsval

    def ack_segment(self, shift: int) -> int:
        """Return the window field of a segment leaving now, which ACKs all received.

        Any segment we send acknowledges RCV.NXT, so whatever ACK was owed
        (at once or delayed) is paid by it.
        """
        self.ack_due = False
        self._timers.delack = None
        self.unacked = 0
        self.last_ack_sent = self.nxt
        return self.advertise(shift)

    def wire_sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """Return the SACK blocks for our next segments, as wire values (or none)."""
        if not self._sack_limit or not self._starts:
            return ()
        irs = self._irs
        return tuple(
            ((irs + left) & MASK, (irs + right) & MASK)
            for left, right in self.sack_blocks(self._sack_limit)
        )

    def ack_later(self, now: float) -> None:
        """Owe an ACK within the delayed-ACK time (unless one is owed already)."""
        if self._timers.delack is None:
            self._timers.delack = now + self._delayed_ack

    def on_delack(self) -> None:
        """The delayed-ACK timer fired."""
        self._timers.delack = None
        self.ack_due = True

    def data_received(self, seq: int, data: bytes | memoryview, fin: bool, now: float) -> bool:
        """Take an acceptable segment's data and FIN, and decide when to ACK it.

        Returns:
            True when the peer's FIN is now in sequence (the ACK for it is
            left to the caller: it depends on the state it leads to).
        """
        before = self.nxt
        result = self.receive(seq, data, fin)
        n = self._n
        n.bytes_in += self.nxt - before - (1 if result & FIN_REACHED else 0)
        if result & (OUT_OF_ORDER | HOLE_FILLED) or self._starts:
            # RFC 5681 section 4.2: segments out of order, or filling all
            # or part of a gap, are acknowledged at once (that drives the
            # peer's fast retransmit and keeps its SACK scoreboard fresh).
            if result & OUT_OF_ORDER:
                n.ooo_segments += 1
            self.ack_due = True
        elif not result & ADVANCED:
            self.ack_due = True  # nothing fitted in the window
        elif self.unacked >= self._ack_every:
            self.ack_due = True
        elif self._timers.delack is None:
            self._timers.delack = now + self._delayed_ack
        return bool(result & FIN_REACHED)

    def plain_limit(self) -> int:
        """Return where plain in-order data must end, or -1 if no data is plain.

        Data starting at RCV.NXT and ending by the right edge advertised,
        with nothing queued out of order and no FIN seen, is plain:
        `data_received` would only append it (`append_run`).
        """
        return self.adv if not self._starts and self._fin_at is None else -1

    def append_run(self, run: list[bytes | memoryview], length: int, now: float) -> None:
        """`data_received` for plain data (`plain_limit`), segments `run` of `length` octets.

        The same state as one by one, where each is appended and an ACK is
        owed at once from the second full segment on, else within the
        delayed-ACK time. Over the run that decision comes down to the
        first segment's (the delayed ACK is armed if it alone stays below
        the threshold) and the last one's (an ACK is owed at once if all of
        them reach it): the unacknowledged count only grows.
        """
        self.ready.extend(run)
        self.ready_len += length
        self.nxt += length
        unacked = self.unacked
        self.unacked = unacked + length
        self._n.bytes_in += length
        ack_every = self._ack_every
        if unacked + len(run[0]) < ack_every and self._timers.delack is None:
            self._timers.delack = now + self._delayed_ack
        if unacked + length >= ack_every:
            self.ack_due = True

    def window_update_due(self) -> bool:
        """Return True if freed buffer space deserves a window update now.

        Like Linux: only when the advertised window has fallen to half the
        buffer or less and would at least double (so a closed window
        always reopens, and a streaming flow is not flooded with updates).
        """
        current = self.adv - self.nxt
        possible = self.rcv_buf - self.ready_len
        # Against the largest window advertised, not the buffer: the SYN's
        # window cannot be scaled, and reading the first bytes after the
        # handshake must not cost an ACK of its own (the next ACK, at most a
        # delayed ACK away, opens the window anyway).
        return (
            current * 2 <= min(self.rcv_buf, self.max_window)
            and possible >= 2 * current
            and possible - current >= self._threshold
        )

    def take(self) -> bytes:
        """Hand all in-order bytes to the caller, freeing buffer space."""
        ready = self.ready
        data = bytes(ready[0]) if len(ready) == 1 else b"".join(ready)
        self.discard()
        return data

    def discard(self) -> None:
        """Drop all in-order bytes not yet taken (on reset or abort)."""
        self.ready = []
        self.ready_len = 0

    def receive(self, seq: int, data: bytes | memoryview, fin: bool) -> int:
        """Accept a segment's payload (already checked to be acceptable).

        Args:
            seq: unwrapped position of the first payload octet.
            data: the payload.
            fin: whether the segment carries FIN (after the payload).

        Returns:
            A bit set of ADVANCED, OUT_OF_ORDER, HOLE_FILLED and
            FIN_REACHED.
        """
        # The acceptability test has already sent wholly old segments back
        # with an ACK, and a connection whose FIN arrived takes no more data.
        end = seq + len(data)
        nxt = self.nxt
        if seq < nxt:
            data = data[nxt - seq :]
            seq = nxt
        limit = self.adv
        if end > limit:
            # Beyond the window we promised: keep what fits, and the FIN
            # only if it fits too.
            data = data[: max(limit - seq, 0)]
            end = seq + len(data)
            fin = False
        if fin and self._fin_at is None:
            self._fin_at = end
        elif self._fin_at is not None and end > self._fin_at:
            # Data past a FIN already seen: a broken peer; the FIN stands.
            data = data[: max(self._fin_at - seq, 0)]
        if seq > nxt:
            if data:
                self._insert(seq, data)
            return OUT_OF_ORDER
        result = 0
        if data:
            self.ready.append(data)
            self.ready_len += len(data)
            self.nxt = nxt = seq + len(data)
            self.unacked += len(data)
            result = ADVANCED
        if self._starts and self._starts[0] <= nxt:
            self._pull()
            result |= ADVANCED | HOLE_FILLED
        if self._fin_at is not None and self.nxt == self._fin_at:
            self.nxt += 1
            self.fin_received = True
            result |= ADVANCED | FIN_REACHED
        return result

    def _insert(self, seq: int, data: bytes | memoryview) -> None:
        end = seq + len(data)
        starts, datas = self._starts, self._datas
        i = bisect_right(starts, seq) - 1
        if i >= 0 and starts[i] + len(datas[i]) >= seq:
            cur_end = starts[i] + len(datas[i])
            if end <= cur_end:
                return  # already held
            if self.ooo_bytes + end - cur_end > self._max_ooo_bytes:
                return
            datas[i] += data[cur_end - seq :]
            self.ooo_bytes += end - cur_end
            idx = i
        else:
            if (
                len(starts) >= self._max_ooo_ranges
                or self.ooo_bytes + len(data) > self._max_ooo_bytes
            ):
                return
            idx = i + 1
            starts.insert(idx, seq)
            datas.insert(idx, bytearray(data))
            self.ooo_bytes += len(data)
        # Swallow following ranges that the new bytes reach.
        cur_end = starts[idx] + len(datas[idx])
        while idx + 1 < len(starts) and starts[idx + 1] <= cur_end:
            nstart, ndata = starts[idx + 1], datas[idx + 1]
            nend = nstart + len(ndata)
            self.ooo_bytes -= len(ndata)
            if nend > cur_end:
                datas[idx] += ndata[cur_end - nstart :]
                self.ooo_bytes += nend - cur_end
                cur_end = nend
            del starts[idx + 1]
            del datas[idx + 1]
        recent = self._recent
        if seq in recent:
            recent.remove(seq)
        recent.insert(0, seq)
        del recent[_MAX_RECENT:]

    def _pull(self) -> None:
        starts, datas = self._starts, self._datas
        while starts and starts[0] <= self.nxt:
            start, data = starts.pop(0), datas.pop(0)
            self.ooo_bytes -= len(data)
            end = start + len(data)
            if self._fin_at is not None:
                end = min(end, self._fin_at)
            if end > self.nxt:
                piece = data[self.nxt - start : end - start]
                self.ready.append(piece)
                self.ready_len += len(piece)
                self.unacked += end - self.nxt
                self.nxt = end
        self._recent = [s for s in self._recent if s >= self.nxt]

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Return up to `limit` out-of-order ranges as (left, right) positions.

        The range holding the most recent arrival comes first, then other
        recently changed ones, then the rest from the highest down
        (RFC 2018 section 4).
        """
        starts, datas = self._starts, self._datas
        blocks: list[tuple[int, int]] = []
        for seq in self._recent:
            i = bisect_right(starts, seq) - 1
            if i >= 0:
                block = (starts[i], starts[i] + len(datas[i]))
                if block not in blocks:
                    blocks.append(block)
        for i in range(len(starts) - 1, -1, -1):
            if len(blocks) >= limit:
                break
            block = (starts[i], starts[i] + len(datas[i]))
            if block not in blocks:
                blocks.append(block)
        return blocks[:limit]
