"""The output path of one connection: which segments leave, and their headers.

`segments_to_send` drains what the input and the timers left due: a queued
RST, the SYN-ACK before the handshake completes, then new data, fast and
SACK retransmissions and the FIN as `snd` and `congestion` allow, a tail
loss probe (RFC 8985), a zero-window or keep-alive probe, and a pure ACK.
Every header is built here, so the advertised window, the timestamp and
SACK options and the end of a pending delayed ACK stay in one place. It
also arms the timers that sending starts (RTO, loss probe, persist) and
records send times for RACK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stack.seq import MASK
from stack.tcp.options import synack_options
from stack.tcp.snd import HEAD, HOLE, NEW
from stack.tcp.state import TcpState
from stack.tcp.timers import MAX_TAIL_PROBES, probe_timeout
from stack.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, SYN, TcpHeader, TcpOptions

if TYPE_CHECKING:
    from stack.tcp.connection import TcpConnection

_S = TcpState
_SACK_BLOCK_LEN = 8
_SACK_OPTION_BASE = 4  # NOP NOP kind length


def segments_to_send(conn: TcpConnection, now: float) -> list[tuple[TcpHeader, bytes | bytearray]]:
    """Return every segment due now: data, ACKs, FIN, RST, retransmits, probes."""
    out: list[tuple[TcpHeader, bytes | bytearray]] = []
    if conn._rst_out is not None:
        out.append((conn._rst_out, b""))
        conn._rst_out = None
        conn._n.segments_out += 1
    state = conn._state
    if state is _S.CLOSED:
        return out
    snd = conn._snd
    if snd.una == 0:
        if conn._synack_due:
            _emit_synack(conn, now, out)
        return out
    neg = conn._neg
    cc, sb, n, t = conn._cc, conn._sb, conn._n, conn._timers
    blocks = _sack_blocks(conn)
    gso = conn._config.gso_size
    wire_mss = 0
    mss = neg.snd_mss
    if gso is not None and gso > mss:
        # Super-segments: the device cuts them into packets of this peer's
        # MSS (at its own MTU, or at `packet_limit` when the peer announced
        # less, which the runtime passes on with the packet).
        mss, wire_mss = gso, mss
    if blocks:
        mss -= _SACK_OPTION_BASE + _SACK_BLOCK_LEN * len(blocks)
    while True:
        seg = snd.next_segment(cc, sb, neg.sack, mss, wire_mss)
        if seg is None:
            break
        start, length, fin, kind = seg
        resend = start < snd.max
        flags = ACK | (FIN if fin else 0)
        if length and start + length == snd.data_end:
            flags |= PSH
        payload = snd.payload(start, length) if length else b""
        out.append((_header(conn, start, flags, now, blocks), payload))
        snd.sent(seg, cc)
        if neg.sack:
            end = start + length + fin
            if not resend:
                conn._rack.sent(end, now)
            elif kind != NEW:
                conn._rack.resent(start, end, now)
        if resend:
            n.retransmits += 1
            conn._rtt_seq = None  # Karn: no sample from a retransmission
            if kind == HEAD:
                n.fast_retransmits += 1
                conn._rxt_mark = snd.max
            elif kind == HOLE:
                n.sack_retransmits += 1
        else:
            n.bytes_out += length
            if conn._rtt_seq is None and not neg.timestamps and kind == NEW:
                conn._rtt_seq = start + length + fin
                conn._rtt_time = now
        if t.rto is None:
            t.rto = now + conn._rtt.rto()
    if conn._tlp_due:
        _tail_loss_probe(conn, now, out, blocks)
    if (
        conn._tlp_count < MAX_TAIL_PROBES
        and t.tlp is None
        and t.rto is not None
        and snd.max > snd.una
    ):
        srtt = conn._rtt.srtt
        if srtt is not None:
            # A second probe waits twice as long: when the first probe or
            # its ACK was lost too (at 2 % loss, one probe in 25), it saves
            # the 200 ms RTO that RFC 8985's single probe would leave.
            pto = now + probe_timeout(srtt, snd.max - snd.una, neg.snd_mss) * (1 << conn._tlp_count)
            if pto < t.rto:
                t.tlp = pto
    if snd.window_blocked() and not snd.fin_acked():
        if t.persist is None:
            t.persist = now + conn._rtt.rto()
    else:
        t.persist = None
    if conn._probe_due:
        # Out of window on purpose (Linux style): it draws an ACK with
        # the current window and touches no data.
        conn._probe_due = False
        out.append((_header(conn, snd.una - 1, ACK, now, blocks), b""))
    if conn._ack_due:
        out.append((_header(conn, snd.nxt, ACK, now, blocks), b""))
    n.segments_out += len(out)
    return out


def _tail_loss_probe(
    conn: TcpConnection,
    now: float,
    out: list[tuple[TcpHeader, bytes | bytearray]],
    blocks: tuple[tuple[int, int], ...],
) -> None:
    """Resend the last packet of the flight (RFC 8985 section 7.3).

    When the flight's last ACKs were lost (or its tail was), nothing else
    would move before the RTO. The probe draws an ACK, or a SACK that
    starts fast recovery, within a few RTTs. A FIN at the tail goes with
    it: the end of every transfer is a tail.
    """
    conn._tlp_due = False
    snd = conn._snd
    if snd.max <= snd.una:
        return
    fin_at = snd.fin_at
    fin = fin_at is not None and snd.max > fin_at
    end = snd.max - fin
    start = max(snd.una, end - conn._neg.snd_mss)
    flags = ACK | (PSH if end > start else 0) | (FIN if fin else 0)
    out.append((_header(conn, start, flags, now, blocks), snd.payload(start, end - start)))
    conn._n.retransmits += 1
    conn._n.tail_loss_probes += 1
    conn._rtt_seq = None


def _emit_synack(
    conn: TcpConnection, now: float, out: list[tuple[TcpHeader, bytes | bytearray]]
) -> None:
    neg = conn._neg
    options = synack_options(
        neg, conn._syn_options, conn._config, conn._ts_now(now), conn._ts_recent
    )
    window = min(0xFFFF, conn._rcv.advertise(0))
    hdr = TcpHeader(
        conn.key.remote_port,
        conn.key.app_port,
        conn._iss,
        (conn._irs + 1) & MASK,
        SYN | ACK,
        window,
        options=options,
    )
    out.append((hdr, b""))
    conn._n.segments_out += 1
    if conn._synack_retransmitted:
        conn._n.retransmits += 1
    conn._synack_due = False
    conn._ack_due = False
    conn._synack_time = now
    if conn._timers.rto is None:
        conn._timers.rto = now + conn._rtt.rto()


def _sack_blocks(conn: TcpConnection) -> tuple[tuple[int, int], ...]:
    rcv = conn._rcv
    if not conn._neg.sack or not rcv.has_out_of_order():
        return ()
    irs = conn._irs
    limit = 3 if conn._neg.timestamps else 4
    return tuple(
        ((irs + left) & MASK, (irs + right) & MASK) for left, right in rcv.sack_blocks(limit)
    )


def _header(
    conn: TcpConnection, seq: int, flags: int, now: float, blocks: tuple[tuple[int, int], ...]
) -> TcpHeader:
    rcv = conn._rcv
    neg = conn._neg
    if neg.timestamps:
        options = TcpOptions(sack_blocks=blocks, timestamp=(conn._ts_now(now), conn._ts_recent))
    elif blocks:
        options = TcpOptions(sack_blocks=blocks)
    else:
        options = NO_OPTIONS
    window = rcv.advertise(neg.rcv_wscale)
    conn._ack_due = False
    conn._timers.delack = None
    rcv.unacked = 0
    conn._last_ack_sent = rcv.nxt
    return TcpHeader(
        conn.key.remote_port,
        conn.key.app_port,
        (conn._iss + seq) & MASK,
        (conn._irs + rcv.nxt) & MASK,
        flags,
        window,
        options=options,
    )
