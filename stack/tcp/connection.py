"""One TCP connection, passively opened: segments and time in, segments and events out.

`TcpConnection` is sans-I/O in the h11 / smoltcp shape. The runtime feeds
it the application's segments (`segment_received`), the outbound's bytes
(`send`, `close`, `abort`) and the passage of time (`handle_timeout`); it
collects segments for the application (`segments_to_send`), events for the
outbound (`next_event`) and the next deadline (`next_deadline`). Nothing
here reads a clock, draws a random number or does I/O.

The connection is the coordinator: it owns the RFC 9293 state (every change
goes through the table in `state`), the events owed to the runtime and the
connection-wide timers (handshake, idle, keep-alive, TIME-WAIT), and it
dispatches each segment in the order of RFC 9293 section 3.10.7.4 (PAWS
first, RFC 7323), with RFC 5961 hardening against blind RST, SYN and ACK
injection. The parts own the rest, as gVisor's `sender` and `receiver` do:
`snd.Sender` the send side (buffer, ACK processing, congestion control and
loss recovery, retransmission and probe timers), `rcv.Receiver` the
receive side (reassembly, window, SACK blocks, TS.Recent, when to ACK),
`timers.Timers` the deadlines, and `output.Output` the headers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from stack.errors import LocalProtocolError
from stack.seq import MASK
from stack.tcp.config import TcpConfig
from stack.tcp.events import (
    NEED_DATA,
    Closed,
    ConnectionReset,
    Counters,
    DataReceived,
    EofReceived,
    Event,
    FlowKey,
    TcpStatistics,
    _Sentinel,
)
from stack.tcp.options import TIMESTAMP_OPTION_LEN, Negotiated, negotiate
from stack.tcp.output import Output
from stack.tcp.rcv import Receiver
from stack.tcp.snd import OutputList, SegmentList, Sender
from stack.tcp.state import FINISHED, SENDING, Stimulus, TcpState, next_state
from stack.tcp.timers import Timers
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, DataRun, TcpHeader

_S = TcpState
_CLOSED = _S.CLOSED
_RECEIVING_DATA = frozenset({_S.ESTABLISHED, _S.FIN_WAIT_1, _S.FIN_WAIT_2})
# States in which an acceptable cumulative ACK changes nothing but the send
# side (our FIN is not queued: no ACK can move the state).
_PLAIN_ACK_STATES = frozenset({_S.ESTABLISHED, _S.CLOSE_WAIT})
_HALF = 1 << 31
_ACK_PSH = ACK | PSH


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
        "_closed_delivered",
        "_config",
        "_eof_delivered",
        "_irs",
        "_iss",
        "_keepalive_sent",
        "_last_challenge",
        "_n",
        "_on_change",
        "_out",
        "_rcv",
        "_reset_delivered",
        "_reset_seen",
        "_snd",
        "_state",
        "_timers",
        "_ts",
        "key",
        "packet_limit",
    )

    def __init__(
        self,
        key: FlowKey,
        syn: TcpHeader,
        iss: int,
        now: float,
        config: TcpConfig,
        on_change: Callable[[TcpConnection], object] | None = None,
        negotiated: Negotiated | None = None,
    ) -> None:
        """Open passively from the application's SYN; a SYN-ACK is queued.

        Args:
            key: the flow.
            syn: the application's SYN header.
            iss: our initial sequence number (random, chosen by the caller).
            now: the current time in seconds.
            config: the stack's configuration.
            on_change: called with this connection when a call from the
                runtime (`send`, `close`, `abort`, or `next_event` freeing
                window) left it with output to collect; the demux passes
                one so it never has to scan idle connections. Calls the
                demux makes itself (`segment_received`, `handle_timeout`)
                do not notify.
            negotiated: `negotiate(syn.options, config, ipv6)`, if the
                caller has it at hand (the demux keeps them by SYN options).

        Raises:
            LocalProtocolError: `syn` is not a plain SYN.
        """
        if syn.flags & (SYN | ACK | RST | FIN) != SYN:
            raise LocalProtocolError("a connection opens only from a plain SYN")
        self.key = key
        self._on_change = on_change
        self._config = config
        self._iss = iss = iss & MASK
        self._irs = syn.seq
        self._state = _S.SYN_RECEIVED
        ipv6 = len(key.app_addr) == 16
        neg = negotiated or negotiate(syn.options, config, ipv6=ipv6)
        self._ts = neg.timestamps
        # An application behind a link with a smaller MTU than the device's
        # (a LAN behind a router) announced a smaller MSS: the device must
        # cut our GSO super-segments at that size, not at its own MTU.
        ts_len = TIMESTAMP_OPTION_LEN if neg.timestamps else 0
        wire = neg.snd_mss + ts_len
        self.packet_limit = wire + 20 + (40 if ipv6 else 20) if wire < neg.mss else None
        timers = self._timers = Timers()
        timers.handshake = now + config.syn_received_timeout
        n = self._n = Counters()
        ts = syn.options.timestamp
        ts_recent = ts[0] if ts is not None and neg.timestamps else 0
        self._rcv = Receiver(config, neg, syn.seq, ts_recent, timers, n)
        self._snd = Sender(config, neg, iss, syn.window, timers, n, now)
        self._out = Output(key, iss, syn.seq, neg, syn.options, config, self._rcv)
        self._keepalive_sent = 0
        self._last_challenge: float | None = None
        self._reset_seen = False
        self._reset_delivered = False
        self._eof_delivered = False
        self._closed_delivered = False
        self._aborted = False

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

    def reopened_by(self, syn: TcpHeader) -> bool:
        """Return True if `syn` ends TIME-WAIT and opens the flow anew.

        Never outside TIME-WAIT. In it, only a SYN newer than this
        incarnation (RFC 6191, judged as Linux's `tcp_timewait_state_process`
        does): with timestamps on both sides, a TSval above TS.Recent, or
        equal to it with an ISN past RCV.NXT; an older TSval never (PAWS).
        Without timestamps, an ISN past RCV.NXT, the end of the old
        sequence space (RFC 1122 4.2.2.13). Any other SYN is the old
        connection's to answer.
        """
        if self._state is not _S.TIME_WAIT:
            return False
        rcv = self._rcv
        isn_newer = (syn.seq - self._irs - rcv.nxt + _HALF) & MASK > _HALF
        ts = syn.options.timestamp if self._ts else None
        if ts is None:
            return isn_newer
        age = (ts[0] - rcv.ts_recent + _HALF) & MASK
        return age > _HALF or (age == _HALF and isn_newer)

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
        if self._state is _CLOSED:
            return
        if self._state is not _S.TIME_WAIT:
            self._out.queue_rst(self._snd.max)
        self._aborted = True
        self._rcv.discard()
        self._to_closed()
        self._changed()

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
                    rcv.ack_due = True
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

    def acks_received(self, hdrs: Sequence[TcpHeader], now: float) -> None:
        """Process segments without data that arrived together, in order.

        Meant for a batch's pure ACKs (the demux hands over runs of them);
        any segment is processed as `segment_received` would, except that
        a plain cumulative ACK (`Sender.plain_ack_range`: new data acknowledged,
        no loss recovery, nothing SACKed) followed by another ACK at the
        same sequence number that acknowledges more, with
        a timestamp no older and both windows open, is only counted
        (`acks_coalesced`): the later one stands for it (`Sender.skipped_ack`
        keeps its slow-start growth, RTT sample and window).
        What the skipped ACK would have done, the later one does (its RTT
        sample and window are taken as it is skipped). Duplicate ACKs, ACKs
        in recovery or with SACK blocks, and anything PAWS or the
        acceptability test would judge are processed one by one.

        Args:
            hdrs: the headers, in arrival order (no payloads).
            now: the current time in seconds.
        """
        last = len(hdrs) - 1
        rcv = self._rcv
        snd = self._snd
        n = self._n
        timestamps = self._ts
        # What the test below reads of the state, taken again after each
        # segment processed one by one (a skipped ACK moves none of it).
        view = False
        wire_seq = una = limit = base = ts_recent = 0
        for i, hdr in enumerate(hdrs):
            if i < last:
                if not view and self._state in _PLAIN_ACK_STATES:
                    view = True
                    wire_seq = (self._irs + rcv.nxt) & MASK
                    una, limit = snd.plain_ack_range()
                    base = self._iss + una - _HALF
                    ts_recent = rcv.ts_recent
                if view:
                    # Skipped if the later ACK does all this one would: both
                    # plain ACKs at RCV.NXT with open windows; with
                    # timestamps, PAWS passes this one and the later one is
                    # no older; this one acknowledges new data and the later
                    # one more (SND.UNA < ack < later ack <= limit). Strictly
                    # more: an equal one would make the later a duplicate
                    # ACK, to be counted (the state does not move while ACKs
                    # are skipped, so each is judged from where the one
                    # before it would have left SND.UNA: above it, by this
                    # rule).
                    _, _, seq, wire_ack, flags, window, _, _, options = hdr
                    later = hdrs[i + 1]
                    later_options = later[8]
                    if (
                        flags == ACK
                        and later[4] == ACK
                        and seq == wire_seq
                        and later[2] == seq
                        and window
                        and later[5]
                        and not options[3]
                        and not later_options[3]
                    ):
                        ts, later_ts = options[4], later_options[4]
                        if not timestamps or (
                            ts is not None
                            and later_ts is not None
                            and (ts[0] - ts_recent + _HALF) & MASK >= _HALF
                            and (later_ts[0] - ts[0] + _HALF) & MASK >= _HALF
                        ):
                            ack = una + ((wire_ack - base) & MASK) - _HALF
                            if una < ack < una + ((later[3] - base) & MASK) - _HALF <= limit:
                                snd.skipped_ack(hdr, ack, now)
                                n.segments_in += 1
                                n.acks_coalesced += 1
                                continue
            view = False
            self.segment_received(hdr, b"", now)

    def data_received_run(
        self, segments: Sequence[tuple[TcpHeader, bytes | memoryview]], now: float
    ) -> None:
        """Process data segments that arrived together, in order.

        Meant for a batch's data segments of one flow (the demux hands over
        runs of them). Each is processed as `segment_received` would; one
        that is plain in-order data in ESTABLISHED (ACK and perhaps PSH,
        no SACK blocks, at RCV.NXT and within the window, a timestamp
        PAWS accepts, acknowledging exactly SND.UNA with nothing in
        flight) takes a short path with the same result: the tests
        `segment_received` would make are known to pass, so only their
        effects remain (TS.Recent, the window update, the idle timers,
        the data and the ACK decision).

        Consecutive segments on the short path are taken together
        (`_take_plain`): their data in one step of the receive side
        (`Receiver.append_run`), and the window update only for the last
        segment before the window field changes, since an update that the
        next one repeats with the same window leaves nothing the next does
        not (no data of ours is in flight, so none of them is a duplicate
        ACK). Anything else is processed by `segment_received` after the
        segments before it are taken.

        Args:
            segments: (header, payload) pairs, in arrival order.
            now: the current time in seconds.
        """
        rcv = self._rcv
        snd = self._snd
        timestamps = self._ts
        plain = False  # whether the locals below hold the short path's view
        taken: list[bytes | memoryview] = []
        wire_nxt = wire_ack = nxt = limit = ts_recent = acked_to = length = 0
        last: TcpHeader | None = None
        last_seq = 0
        for hdr, payload in segments:
            if not plain:
                if self._state is not _S.ESTABLISHED or snd.max != snd.una:
                    self.segment_received(hdr, payload, now)
                    continue
                # The view the short path keeps up to date itself: nothing
                # else moves while only plain data arrives.
                plain = True
                nxt = rcv.nxt
                wire_nxt = (self._irs + nxt) & MASK
                wire_ack = (self._iss + snd.una) & MASK
                limit = rcv.plain_limit()
                ts_recent = rcv.ts_recent
                acked_to = rcv.last_ack_sent
                taken = []
                length = 0
                last = None
            _, _, seq, ack, flags, window, _, _, options = hdr
            plen = len(payload)
            ts = options[4]
            if (
                seq != wire_nxt
                or ack != wire_ack
                or not plen
                or nxt + plen > limit
                or (flags != ACK and flags != _ACK_PSH)
                or options[3]
                or (
                    timestamps
                    # PAWS (RFC 7323 section 5.3) would drop it, or no timestamp.
                    and (ts is None or (ts[0] - ts_recent + _HALF) & MASK < _HALF)
                )
            ):
                if last is not None:
                    self._take_plain(taken, length, last, last_seq, now)
                plain = False
                self.segment_received(hdr, payload, now)
                continue
            if timestamps and nxt <= acked_to and ts is not None:
                # TS.Recent follows the segment at the left edge (PAWS
                # passed, so it is no older).
                rcv.note_timestamp(ts[0], nxt)
                ts_recent = rcv.ts_recent
            if last is not None and window != last[5]:
                # (A payload length of 1: data, never a duplicate ACK.)
                snd.on_ack(last, last_seq, snd.una, 1, now)
            last = hdr
            last_seq = nxt
            taken.append(payload)
            length += plen
            nxt += plen
            wire_nxt = (wire_nxt + plen) & MASK
        if plain and last is not None:
            self._take_plain(taken, length, last, last_seq, now)

    def _take_plain(
        self,
        taken: list[bytes | memoryview],
        length: int,
        last: TcpHeader,
        last_seq: int,
        now: float,
    ) -> None:
        """Apply the effects of plain in-order data segments (`data_received_run`)."""
        self._n.segments_in += len(taken)
        snd = self._snd
        # Nothing in flight and SEG.ACK = SND.UNA: only the window update
        # rule acts (no new data acknowledged, no duplicate ACK).
        snd.on_ack(last, last_seq, snd.una, 1, now)
        self._rearm_idle(now)
        self._rcv.append_run(taken, length, now)

    def segment_received(self, hdr: TcpHeader, payload: bytes | memoryview, now: float) -> None:
        """Process one segment from the application.

        Args:
            hdr: the parsed header (checksum already verified).
            payload: the segment's data.
            now: the current time in seconds.
        """
        state = self._state
        if state is _CLOSED:
            return
        n = self._n
        n.segments_in += 1
        flags = hdr.flags
        rcv = self._rcv
        snd = self._snd
        plen = len(payload)
        nxt = rcv.nxt
        # stack.seq's seq_diff and seq_lt, inline (a call is ~0.1 us per
        # segment here): the signed distance on the 32-bit circle.
        seq = nxt + ((hdr.seq - self._irs - nxt + _HALF) & MASK) - _HALF
        # PAWS (RFC 7323 section 5.3): an old timestamp marks an old segment.
        ts = hdr.options.timestamp if self._ts else None
        if ts is not None and not flags & RST and (ts[0] - rcv.ts_recent + _HALF) & MASK < _HALF:
            n.paws_drops += 1
            if state is _S.TIME_WAIT:
                # An old duplicate is about: keep guarding the flow (Linux
                # restarts TIME-WAIT on a PAWS failure too).
                self._timers.time_wait = now + self._config.time_wait
            self._send_ack()
            return
        # Acceptability test (RFC 9293 section 3.10.7.4, first check).
        wnd = rcv.window()
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        if seg_len == 0:
            ok = seq == nxt if wnd <= 0 else nxt <= seq < nxt + wnd
        else:
            last = seq + seg_len - 1
            ok = wnd > 0 and (nxt <= seq < nxt + wnd or nxt <= last < nxt + wnd)
        ack_only = False
        if not ok:
            if flags & RST:
                if seq == nxt + wnd:
                    # An application that filled the window we promised
                    # and then reset (SO_LINGER 0) puts its RST at the
                    # window's right edge; behind a lost segment it is
                    # the last thing it sends. Linux takes the edge as in
                    # the window (tcp_sequence: not after it), so the
                    # challenge ACK draws the exact RST from its kernel;
                    # dropped, the flow would wait for the idle timeout.
                    self._challenge_ack(now)
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
                self._challenge_ack(now)
            return
        if flags & SYN:
            # RFC 5961 section 4.2 (in SYN-RECEIVED the SYN-ACK is the ACK).
            self._challenge_ack(now)
            return
        if not flags & ACK:
            return
        una = snd.una
        ack = una + ((hdr.ack - self._iss - una + _HALF) & MASK) - _HALF
        if una == 0:
            if not 0 < ack <= snd.max:
                # RFC 9293: an unacceptable ACK in SYN-RECEIVED gets <SEQ=SEG.ACK><RST>.
                self._out.queue_rst_for_ack(hdr.ack)
                return
        elif ack > snd.max:
            self._send_ack()
            return
        elif ack < una - snd.max_wnd:
            # RFC 5961 section 5.2: far too old to be a real acknowledgement.
            self._challenge_ack(now)
            return
        # Only a segment that passed every check so far may set TS.Recent
        # (RFC 7323 section 4.3): one dropped for its ACK leaves it alone.
        if ts is not None:
            rcv.note_timestamp(ts[0], seq)
        if una == 0:
            snd.establish(hdr, seq, ack, now)
            self._timers.handshake = None
            self._state = next_state(self._state, Stimulus.ACK_OF_SYN)
        elif snd.on_ack(hdr, seq, ack, plen, now):
            self._state = state = next_state(self._state, Stimulus.ACK_OF_FIN)
            if state is _S.TIME_WAIT:
                self._enter_time_wait(now)
            elif state is _CLOSED:
                self._to_closed()
                return
        self._rearm_idle(now)
        if ack_only or not (plen or flags & FIN):
            return
        if self._state in _RECEIVING_DATA:
            if rcv.data_received(seq, payload, bool(flags & FIN), now):
                self._fin_received(now)
        else:
            # Data past the peer's FIN: nothing can be taken; just ACK.
            self._send_ack()

    def _fin_received(self, now: float) -> None:
        self._state = state = next_state(self._state, Stimulus.FIN_RECEIVED)
        if state is _S.CLOSE_WAIT:
            # As in Linux, the FIN's ACK is a delayed ACK: a program that
            # closes in turn sends it with its own FIN, one packet instead
            # of two (and a TUN write costs as much as a packet).
            self._rcv.ack_later(now)
        else:
            self._send_ack()
        if state is _S.TIME_WAIT:
            self._enter_time_wait(now)

    def _rearm_idle(self, now: float) -> None:
        config = self._config
        if config.idle_timeout is not None:
            self._timers.idle = now + config.idle_timeout
        if config.keepalive_time is not None:
            self._timers.keepalive = now + config.keepalive_time
            self._keepalive_sent = 0

    # ------------------------------------------------------------------- time

    def handle_timeout(self, now: float) -> None:
        """Run every timer whose deadline is at or before `now`.

        The connection's own deadlines (TIME-WAIT, handshake, idle,
        keep-alive) are handled here; the sender's and the receiver's are
        handed to them.
        """
        state = self._state
        if state is _CLOSED:
            return
        t = self._timers
        if t.time_wait is not None and now >= t.time_wait:
            self._state = next_state(state, Stimulus.TIME_WAIT_EXPIRED)
            self._to_closed()
            return
        if (t.handshake is not None and now >= t.handshake) or (
            t.idle is not None and now >= t.idle
        ):
            self._give_up()
            return
        snd = self._snd
        if t.rto is not None and now >= t.rto and not snd.on_rto(now):
            self._give_up()
            return
        if t.rack is not None and now >= t.rack:
            snd.on_rack_timer(now)
        if t.tlp is not None and now >= t.tlp:
            snd.on_tlp()
        if t.delack is not None and now >= t.delack:
            self._rcv.on_delack()
        if t.persist is not None and now >= t.persist and not snd.on_persist(now):
            self._give_up()
            return
        if t.keepalive is not None and now >= t.keepalive:
            if self._keepalive_sent >= self._config.keepalive_probes:
                self._give_up()
                return
            self._keepalive_sent += 1
            snd.probe_due = True
            t.keepalive = now + self._config.keepalive_interval

    # ----------------------------------------------------------------- output

    def segments_to_send(self, now: float) -> SegmentList:
        """Return every segment due now: data, ACKs, FIN, RST, retransmits, probes."""
        out: OutputList = []
        self._output(now, False, out)
        return cast(SegmentList, out)

    def output(self, now: float) -> OutputList:
        """`segments_to_send`, with a run of full data segments as one `DataRun`.

        For a packet builder that takes a run's common fields once
        (`TcpTemplate.build_run`); `DataRun.segments` gives the same
        segments `segments_to_send` would.
        """
        out: OutputList = []
        self._output(now, True, out)
        return out

    def _output(self, now: float, runs: bool, out: OutputList) -> None:
        writer = self._out
        rst = writer.take_rst()
        if rst is not None:
            out.append((rst, b""))
        snd = self._snd
        if self._state is _CLOSED:
            pass
        elif snd.una == 0:
            # Before the handshake completes, the SYN-ACK is our only segment.
            if snd.synack_due:
                out.append((writer.synack(now), b""))
                snd.synack_sent(now)
        elif self._rcv.ack_due or not snd.nothing_due():
            self._emit(now, runs, out)
        # Else nothing is due (a flush after an ACK that left nothing to
        # answer, the handshake's among them): `_emit` would build the
        # options and run the sender's output loop to append no segment
        # and change nothing (tests/stack/tcp/test_quiet_output.py).
        if not out:
            return
        count = len(out)
        if runs:
            for hdr, _ in out:
                if type(hdr) is DataRun:
                    count += len(hdr.payloads) - 1
        self._n.segments_out += count

    def _emit(self, now: float, runs: bool, out: OutputList) -> None:
        """Append the segments of an established connection: data, probes, the owed ACK."""
        writer = self._out
        snd = self._snd
        writer.begin(now, runs)
        snd.output(now, writer, out)
        if self._rcv.ack_due:
            out.append((writer.header(snd.nxt, ACK), b""))

    # ---------------------------------------------------------------- helpers

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    def _send_ack(self) -> None:
        if self._snd.una == 0:
            self._snd.synack_due = True  # before the handshake, the SYN-ACK is the ACK
        else:
            self._rcv.ack_due = True

    def _challenge_ack(self, now: float) -> None:
        """Answer a blind RST, SYN or old ACK (RFC 5961), at most once per interval.

        RFC 5961 section 7: without a limit every forged segment costs a
        packet, and a flood of them is a flood of ACKs. As Linux, one per
        `challenge_ack_interval` per connection; the others are counted.
        """
        last = self._last_challenge
        if last is not None and now - last < self._config.challenge_ack_interval:
            self._n.challenge_acks_suppressed += 1
            return
        self._last_challenge = now
        self._n.challenge_acks += 1
        self._send_ack()

    def _reset(self) -> None:
        self._reset_seen = self._state is not _S.TIME_WAIT
        self._rcv.discard()
        self._to_closed()

    def _give_up(self) -> None:
        self._out.queue_rst(self._snd.max)
        self._reset()

    def _enter_time_wait(self, now: float) -> None:
        self._timers.clear()
        self._timers.time_wait = now + self._config.time_wait

    def _to_closed(self) -> None:
        if self._state is not _CLOSED:
            self._state = next_state(self._state, Stimulus.RESET)
        self._timers.clear()
        self._rcv.ack_due = False
        self._snd.probe_due = self._snd.synack_due = False
