"""What happens to one connection when its deadlines pass.

`timers` holds the deadlines and the RTO estimator as plain data; this
module owns the reaction to each one expiring: TIME-WAIT ends, the
handshake or idle limit gives up with an RST, the RTO retransmits the
SYN-ACK or goes back N with a backed-off timer, a tail loss probe is armed
for the next output, RACK's reordering timer reruns loss detection, a
delayed ACK falls due, and zero-window and keep-alive probes are counted
until the peer has had `max_retries` or `keepalive_probes` chances. It
only sets flags and deadlines on the connection; `output` turns them into
segments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stack.tcp.state import Stimulus, TcpState, next_state
from stack.tcp.timers import MAX_TAIL_PROBES

if TYPE_CHECKING:
    from stack.tcp.connection import TcpConnection

_S = TcpState


def handle_timeout(conn: TcpConnection, now: float) -> None:
    """Run every timer whose deadline is at or before `now`."""
    t = conn._timers
    state = conn._state
    if state is _S.CLOSED:
        return
    conn._changed()
    if t.time_wait is not None and now >= t.time_wait:
        conn._state = next_state(state, Stimulus.TIME_WAIT_EXPIRED)
        conn._to_closed()
        return
    if (t.handshake is not None and now >= t.handshake) or (t.idle is not None and now >= t.idle):
        conn._give_up()
        return
    if t.rto is not None and now >= t.rto:
        _on_rto(conn, now)
        if conn._state is _S.CLOSED:
            return
    if t.rack is not None and now >= t.rack:
        t.rack = None
        conn._rack_detect(now)
    if t.tlp is not None and now >= t.tlp:
        # Armed only with data in flight, and cleared by every ACK that
        # moves SND.UNA, so there is always a flight to probe here.
        t.tlp = None
        conn._tlp_count += 1
        if conn._cc.in_recovery:
            conn._n.tail_loss_probes += 1
            # The flight went quiet in recovery: the head's
            # retransmission (or its ACK) was lost. Send it again.
            conn._cc.rexmit_head = True
        else:
            conn._tlp_due = True
    if t.delack is not None and now >= t.delack:
        t.delack = None
        conn._ack_due = True
    if t.persist is not None and now >= t.persist:
        conn._probes_unanswered += 1
        if conn._probes_unanswered > conn._config.max_retries:
            conn._give_up()
            return
        conn._probe_due = True
        conn._n.window_probes += 1
        t.persist = now + _backed_off(conn, conn._probes_unanswered)
    if t.keepalive is not None and now >= t.keepalive:
        if conn._keepalive_sent >= conn._config.keepalive_probes:
            conn._give_up()
            return
        conn._keepalive_sent += 1
        conn._probe_due = True
        t.keepalive = now + conn._config.keepalive_interval


def _backed_off(conn: TcpConnection, count: int) -> float:
    base = conn._rtt.rto()
    return float(min(base * (1 << min(count, 30)), conn._config.rto_max))


def _on_rto(conn: TcpConnection, now: float) -> None:
    snd = conn._snd
    t = conn._timers
    conn._retries += 1
    if conn._retries > conn._config.max_retries:
        conn._give_up()
        return
    if snd.una == 0:
        conn._synack_due = True
        conn._synack_retransmitted = True
        conn._rtt.backoff += 1
        t.rto = now + conn._rtt.rto()
        return
    # Past the handshake the RTO runs only while data is in flight: it is
    # armed when a segment goes out and cleared by the ACK of everything.
    conn._n.rto_timeouts += 1
    conn._cc.on_rto(snd.una, snd.max, conn._rtt.backoff == 0)
    conn._rtt.backoff += 1
    t.tlp = t.rack = None
    conn._rack.timeout()
    conn._tlp_count = MAX_TAIL_PROBES  # after a timeout, go-back-N; no probes
    snd.nxt = snd.una  # go back N, skipping what was SACKed
    conn._rtt_seq = None
    t.rto = now + conn._rtt.rto()


def rearm_idle(conn: TcpConnection, now: float) -> None:
    config = conn._config
    t = conn._timers
    if config.idle_timeout is not None:
        t.idle = now + config.idle_timeout
    if config.keepalive_time is not None:
        t.keepalive = now + config.keepalive_time
        conn._keepalive_sent = 0
