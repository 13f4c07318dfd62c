"""Half-close both ways, every closing state, TIME-WAIT, RST and abort in each state."""

from __future__ import annotations

import pytest

from stack.tcp import Closed, ConnectionReset, DataReceived, EofReceived, TcpConfig, TcpState

from .fixtures import (
    CFG,
    CLOSE_WAIT_AT,
    PAYLOAD,
    SHIFT,
    close_wait,
    established,
    fin_wait_1,
    fin_wait_2,
    observe,
    syn_received,
)
from .helpers import ACK, FIN, RST, SRV_ISS, SYN, s

ISS1 = s(SRV_ISS + 1)


def test_app_half_closes_and_data_still_flows_to_it() -> None:
    conn, app = close_wait()
    t = CLOSE_WAIT_AT
    assert conn.send(b"reply") == 5
    [data] = app.absorb(conn.segments_to_send(t + 0.01))
    assert (data.seq, data.payload) == (ISS1, b"reply")
    conn.close()
    [fin] = app.absorb(conn.segments_to_send(t + 0.02))
    assert (fin.seq, fin.flags) == (s(ISS1 + 5), ACK | FIN)
    assert conn.state is TcpState.LAST_ACK
    conn.segment_received(*app.seg(), t + 0.03)
    assert observe(conn, app, t + 0.03) == (TcpState.CLOSED, [], [Closed()])
    assert conn.next_deadline() is None


def test_the_fins_ack_rides_on_our_fin_when_we_close_in_turn() -> None:
    """A program that closes soon after the peer's FIN sends one packet, not two."""
    conn, app = established()
    conn.segment_received(*app.seg(ACK | FIN), 0.02)
    assert observe(conn, app, 0.02)[1] == []
    conn.close()
    state, segs, _events = observe(conn, app, 0.03)
    assert state is TcpState.LAST_ACK
    assert [(x.seq, x.ack, x.flags) for x in segs] == [(ISS1, app.nxt, ACK | FIN)]
    # Nothing else is owed: no separate ACK fires later.
    conn.handle_timeout(0.02 + CFG.delayed_ack)
    assert observe(conn, app, 0.02 + CFG.delayed_ack)[1] == []


def test_we_half_close_and_the_app_keeps_sending() -> None:
    conn, app = fin_wait_2()
    conn.segment_received(*app.seg(ACK, b"more"), 0.04)
    assert observe(conn, app, 0.04)[2] == [DataReceived(b"more")]
    conn.segment_received(*app.seg(ACK | FIN), 0.05)
    state, segs, events = observe(conn, app, 0.05)
    assert state is TcpState.TIME_WAIT
    assert [(x.seq, x.ack, x.flags) for x in segs] == [(s(ISS1 + 1), app.nxt, ACK)]
    assert events == [EofReceived(), Closed()]
    assert conn.next_deadline() == pytest.approx(0.05 + CFG.time_wait)
    # A retransmitted FIN is acknowledged again and restarts TIME-WAIT.
    conn.segment_received(*app.seg(ACK | FIN, seq=s(app.nxt - 1)), 0.5)
    assert [x.flags for x in observe(conn, app, 0.5)[1]] == [ACK]
    assert conn.next_deadline() == pytest.approx(0.5 + CFG.time_wait)
    conn.handle_timeout(1.5)
    assert observe(conn, app, 1.5) == (TcpState.CLOSED, [], [])


def test_simultaneous_close_goes_through_closing() -> None:
    conn, app = fin_wait_1()
    # The app's FIN crosses ours: it does not acknowledge our FIN yet.
    conn.segment_received(*app.seg(ACK | FIN, ack=ISS1), 0.03)
    state, _segs, events = observe(conn, app, 0.03)
    assert state is TcpState.CLOSING
    assert events == [EofReceived()]
    conn.segment_received(*app.seg(), 0.04)
    assert observe(conn, app, 0.04) == (TcpState.TIME_WAIT, [], [Closed()])


def test_fin_and_ack_of_our_fin_together_go_straight_to_time_wait() -> None:
    conn, app = fin_wait_1()
    conn.segment_received(*app.seg(ACK | FIN), 0.03)
    state, _segs, events = observe(conn, app, 0.03)
    assert state is TcpState.TIME_WAIT
    assert events == [EofReceived(), Closed()]


FIXTURES = {
    "SYN-RECEIVED": syn_received,
    "ESTABLISHED": established,
    "CLOSE-WAIT": close_wait,
    "FIN-WAIT-1": fin_wait_1,
    "FIN-WAIT-2": fin_wait_2,
}


@pytest.mark.parametrize("name", FIXTURES)
def test_exact_rst_resets_and_is_never_answered(name: str) -> None:
    conn, app = FIXTURES[name]()
    if conn.state is TcpState.SYN_RECEIVED:
        app.absorb(conn.segments_to_send(0.0))
    observe(conn, app, 0.1)
    conn.segment_received(*app.seg(RST), 0.1)
    assert observe(conn, app, 0.1) == (TcpState.CLOSED, [], [ConnectionReset(), Closed()])
    conn.segment_received(*app.seg(RST), 0.2)  # anything after is ignored
    conn.segment_received(*app.seg(ACK, b"x"), 0.2)
    assert observe(conn, app, 0.2) == (TcpState.CLOSED, [], [])


@pytest.mark.parametrize("name", ["ESTABLISHED", "CLOSE-WAIT", "FIN-WAIT-2"])
def test_blind_rst_and_syn_get_a_challenge_ack(name: str) -> None:
    conn, app = FIXTURES[name]()
    observe(conn, app, 0.1)
    conn.segment_received(*app.seg(RST, seq=s(app.nxt + 10)), 0.1)
    conn.segment_received(*app.seg(SYN, seq=s(app.nxt + 10)), 0.1)
    state, segs, events = observe(conn, app, 0.1)
    assert state.value == name and events == []
    assert [x.flags & ~0x01 for x in segs] == [ACK]  # one ACK (FIN-WAIT states may resend FIN)
    stats = conn.statistics()
    assert (stats.challenge_acks, stats.challenge_acks_suppressed) == (1, 1)
    conn.segment_received(*app.seg(RST, seq=s(app.nxt + 10_000_000)), 0.1)  # out of window
    assert observe(conn, app, 0.1) == (state, [], [])


def test_challenge_acks_are_rate_limited_per_connection() -> None:
    """RFC 5961 section 7: a flood of in-window RSTs draws one ACK, not one each."""
    conn, app = established()
    t = 0.1
    sent = []
    for i in range(300):
        conn.segment_received(*app.seg(RST, seq=s(app.nxt + 10 + i)), t + i / 1000)
        sent += observe(conn, app, t + i / 1000)[1]
    assert [(x.ack, x.flags) for x in sent] == [(app.nxt, ACK)]
    stats = conn.statistics()
    assert (stats.challenge_acks, stats.challenge_acks_suppressed) == (1, 299)
    # A SYN and an old ACK share the budget; it renews after the interval.
    conn.segment_received(*app.seg(SYN, seq=s(app.nxt + 10)), t + 0.499)
    conn.segment_received(*app.seg(ack=s(ISS1 - 9_000_000)), t + 0.499)  # RFC 5961 5.2
    assert observe(conn, app, t + 0.499) == (TcpState.ESTABLISHED, [], [])
    conn.segment_received(*app.seg(SYN, seq=s(app.nxt + 10)), t + 0.5)
    assert [x.flags for x in observe(conn, app, t + 0.5)[1]] == [ACK]
    stats = conn.statistics()
    assert (stats.challenge_acks, stats.challenge_acks_suppressed) == (2, 301)
    assert conn.state is TcpState.ESTABLISHED


def test_the_challenge_ack_interval_is_configurable() -> None:
    cfg = TcpConfig(mss=1000, rcv_buf=100_000, challenge_ack_interval=0.05)
    conn, app = established(cfg)
    answered = []
    for t in (0.1, 0.13, 0.16):
        conn.segment_received(*app.seg(RST, seq=s(app.nxt + 10)), t)
        if observe(conn, app, t)[1]:
            answered.append(t)
    assert answered == [0.1, 0.16]
    stats = conn.statistics()
    assert (stats.challenge_acks, stats.challenge_acks_suppressed) == (2, 1)


@pytest.mark.parametrize("name", FIXTURES)
def test_abort_sends_rst_and_closes(name: str) -> None:
    conn, app = FIXTURES[name]()
    conn.abort()
    state, segs, events = observe(conn, app, 0.1)
    assert state is TcpState.CLOSED
    assert [(x.flags, x.ack) for x in segs] == [(RST | ACK, app.nxt)]
    assert events == [Closed()]
    conn.abort()  # idempotent
    assert observe(conn, app, 0.2) == (TcpState.CLOSED, [], [])


def test_abort_and_rst_in_time_wait_close_quietly() -> None:
    conn, app = fin_wait_2()
    conn.segment_received(*app.seg(ACK | FIN), 0.05)
    observe(conn, app, 0.05)
    conn.abort()
    assert observe(conn, app, 0.06) == (TcpState.CLOSED, [], [])
    conn2, app2 = fin_wait_2()
    conn2.segment_received(*app2.seg(ACK | FIN), 0.05)
    observe(conn2, app2, 0.05)
    conn2.segment_received(*app2.seg(RST), 0.06)
    assert observe(conn2, app2, 0.06) == (TcpState.CLOSED, [], [])


def test_idle_timeout_resets_a_silent_connection() -> None:
    conn, app = established()
    assert conn.next_deadline() == pytest.approx(0.01 + CFG.idle_timeout)  # type: ignore[operator]
    conn.handle_timeout(7200.02)
    state, segs, events = observe(conn, app, 7200.02)
    assert state is TcpState.CLOSED
    assert [x.flags for x in segs] == [RST | ACK]
    assert events == [ConnectionReset(), Closed()]


def test_keepalive_probes_then_resets() -> None:
    cfg = TcpConfig(keepalive_time=10.0, keepalive_interval=1.0, keepalive_probes=2)
    conn, app = established(cfg)
    assert conn.next_deadline() == pytest.approx(10.01)
    conn.handle_timeout(10.01)
    [probe] = app.absorb(conn.segments_to_send(10.01))
    assert (probe.seq, probe.flags) == (SRV_ISS, ACK)
    # The app answers: keep-alive starts over.
    conn.segment_received(*app.seg(), 10.02)
    assert conn.next_deadline() == pytest.approx(20.02)
    for t in (20.02, 21.02):
        conn.handle_timeout(t)
        assert len(conn.segments_to_send(t)) == 1
    conn.handle_timeout(22.02)
    assert observe(conn, app, 22.02)[2] == [ConnectionReset(), Closed()]


def test_an_rst_at_the_edge_of_our_window_behind_a_lost_segment_draws_a_challenge_ack() -> None:
    """An application that filled the window we promised and then closed
    with SO_LINGER 0 sends its RST at that window's right edge. With a
    segment before it lost, the RST is not exact; dropped without a word,
    nothing more comes from the application's side (its socket is gone)
    and the flow stays open until the idle timeout, hours later. Answered
    with a challenge ACK, as Linux answers an RST at its window's edge,
    the application's kernel resets at the exact sequence."""
    conn, app = established()
    # Data nobody takes yet (the outbound is slow): the window closes in.
    for _ in range(60):
        conn.segment_received(*app.seg(ACK, b"d" * PAYLOAD), 0.02)
    conn.handle_timeout(0.02 + CFG.delayed_ack)
    *_, last_ack = app.absorb(conn.segments_to_send(0.02 + CFG.delayed_ack))
    edge = s(last_ack.ack + (last_ack.window << SHIFT))
    assert last_ack.ack == app.nxt and 0 < edge - app.nxt < 50_000
    lost = app.nxt
    tail = b"x" * 500
    conn.segment_received(*app.seg(ACK, tail, seq=s(edge - len(tail))), 0.1)
    [dup] = app.absorb(conn.segments_to_send(0.1))
    assert (dup.ack, s(dup.ack + (dup.window << SHIFT))) == (lost, edge)  # the hole; same edge
    conn.segment_received(*app.seg(RST, seq=edge), 0.15)
    segs = app.absorb(conn.segments_to_send(0.15))
    assert (conn.state, [(x.ack, x.flags) for x in segs]) == (TcpState.ESTABLISHED, [(lost, ACK)])
    # The application's kernel answers the ACK with an RST at its SEG.ACK.
    conn.segment_received(*app.seg(RST, seq=lost), 0.16)
    state, segs, events = observe(conn, app, 0.16)
    assert (state, segs, events[-2:]) == (TcpState.CLOSED, [], [ConnectionReset(), Closed()])
    # Beyond the edge it is still dropped without an answer.
    conn2, app2 = established()
    conn2.segment_received(*app2.seg(RST, seq=s(app2.nxt + 10_000_000)), 0.1)
    assert observe(conn2, app2, 0.1) == (TcpState.ESTABLISHED, [], [])
