"""Connection fixtures built step by step (SYN-RECEIVED, ESTABLISHED, ...).

Each fixture drives a fresh connection through the handshake (and on) with
scripted segments and checks every step, so a later test starts from a
known state and compares whole observable state from there.
"""

from __future__ import annotations

from stack.tcp import TcpConfig, TcpConnection, TcpState
from stack.wire.tcp import TcpOptions

from .helpers import ACK, APP_ISN, FIN, KEY, SRV_ISS, SYN, App, Seg, s

# Small numbers that are easy to follow: a window scale of 1 (100000 > 65535),
# and 988 payload bytes per segment (1000 minus the timestamp option).
CFG = TcpConfig(mss=1000, rcv_buf=100_000, snd_buf=100_000, max_ooo_bytes=50_000)
SHIFT = 1
PAYLOAD = 988


def ts(t: float) -> int:
    """Our timestamp clock at time t (the ISN is its offset)."""
    return s(SRV_ISS + int(t * 1000))


def observe(conn: TcpConnection, app: App, now: float) -> tuple[TcpState, list[Seg], list[object]]:
    """Collect the whole observable state: state, segments sent now, events."""
    segments = app.absorb(conn.segments_to_send(now))
    events = []
    while (ev := conn.next_event()).__class__.__name__ != "_Sentinel":
        events.append(ev)
    return conn.state, segments, events


def syn_received(cfg: TcpConfig = CFG, **app_kw: object) -> tuple[TcpConnection, App]:
    """A connection just opened from the app's SYN; the SYN-ACK not yet taken."""
    app = App(**app_kw)  # type: ignore[arg-type]
    conn = TcpConnection(KEY, app.syn(), SRV_ISS, 0.0, cfg)
    assert conn.state is TcpState.SYN_RECEIVED
    return conn, app


def established(cfg: TcpConfig = CFG, **app_kw: object) -> tuple[TcpConnection, App]:
    """SYN, SYN-ACK, ACK at t = 0.01: ESTABLISHED, nothing pending."""
    conn, app = syn_received(cfg, **app_kw)
    [synack] = app.absorb(conn.segments_to_send(0.0))
    assert synack.flags == SYN | ACK and synack.ack == s(APP_ISN + 1)
    conn.segment_received(*app.seg(), 0.01)
    assert observe(conn, app, 0.01) == (TcpState.ESTABLISHED, [], [])
    return conn, app


def ack_seg(
    t: float,
    app: App,
    window: int,
    *,
    seq: int | None = None,
    flags: int = ACK,
    sack: tuple[tuple[int, int], ...] = (),
    payload: bytes = b"",
) -> Seg:
    """The segment we expect to carry an ACK of everything the app sent."""
    return Seg(
        s(SRV_ISS + 1) if seq is None else seq,
        app.nxt,
        flags,
        window,
        TcpOptions(sack_blocks=sack, timestamp=(ts(t), app.tsval or 0)),
        payload,
    )


def close_wait() -> tuple[TcpConnection, App]:
    """ESTABLISHED, then the app's FIN at t = 0.02: CLOSE-WAIT; its ACK,
    delayed, goes out at t = 0.02 + delayed_ack (CLOSE_WAIT_AT)."""
    conn, app = established()
    conn.segment_received(*app.seg(ACK | FIN), 0.02)
    state, segs, events = observe(conn, app, 0.02)
    assert state is TcpState.CLOSE_WAIT
    assert segs == []
    assert [type(e).__name__ for e in events] == ["EofReceived"]
    assert conn.next_deadline() == CLOSE_WAIT_AT
    conn.handle_timeout(CLOSE_WAIT_AT)
    state, segs, events = observe(conn, app, CLOSE_WAIT_AT)
    assert (state, [x.flags for x in segs], events) == (TcpState.CLOSE_WAIT, [ACK], [])
    return conn, app


CLOSE_WAIT_AT = 0.02 + CFG.delayed_ack


def fin_wait_1() -> tuple[TcpConnection, App]:
    """ESTABLISHED, then close() at t = 0.02: our FIN is out, unacknowledged."""
    conn, app = established()
    conn.close()
    state, segs, events = observe(conn, app, 0.02)
    assert state is TcpState.FIN_WAIT_1
    assert [(x.seq, x.flags) for x in segs] == [(s(SRV_ISS + 1), ACK | FIN)]
    assert events == []
    return conn, app


def fin_wait_2() -> tuple[TcpConnection, App]:
    """FIN-WAIT-1, then the app ACKs our FIN at t = 0.03."""
    conn, app = fin_wait_1()
    conn.segment_received(*app.seg(), 0.03)
    assert observe(conn, app, 0.03) == (TcpState.FIN_WAIT_2, [], [])
    return conn, app


__all__ = [
    "CFG",
    "PAYLOAD",
    "SHIFT",
    "ack_seg",
    "close_wait",
    "established",
    "fin_wait_1",
    "fin_wait_2",
    "observe",
    "syn_received",
    "ts",
]
