"""Passive open: SYN-ACK and option negotiation, duplicate SYNs, retransmission, failures."""

from __future__ import annotations

import pytest

from stack.errors import LocalProtocolError
from stack.tcp import Closed, ConnectionReset, DataReceived, TcpConfig, TcpConnection, TcpState
from stack.wire.tcp import RST, TcpHeader, TcpOptions

from .fixtures import CFG, ack_seg, observe, syn_received, ts
from .helpers import ACK, APP_ISN, FIN, KEY, KEY6, SRV_ISS, SYN, App, Seg, s

SYNACK_OPTIONS = TcpOptions(mss=1000, wscale=1, sack_permitted=True, timestamp=(ts(0), 1000))


def synack(t: float, options: TcpOptions = SYNACK_OPTIONS) -> Seg:
    opts = options._replace(timestamp=(ts(t), 1000)) if options.timestamp else options
    return Seg(SRV_ISS, s(APP_ISN + 1), SYN | ACK, 65535, opts, b"")


def test_synack_answers_every_offered_option() -> None:
    conn, app = syn_received()
    assert observe(conn, app, 0.0) == (TcpState.SYN_RECEIVED, [synack(0.0)], [])
    assert conn.next_deadline() == CFG.rto_initial
    assert conn.send_space() == CFG.snd_buf


def test_synack_without_offered_options_carries_only_mss_and_default_mss_applies() -> None:
    conn, app = syn_received(mss=None, wscale=None, sack=False, ts=False)
    assert observe(conn, app, 0.0)[1] == [synack(0.0, TcpOptions(mss=1000))]
    conn.segment_received(*app.seg(), 0.01)
    assert conn.send(b"x" * 1200) == 1200
    segs = app.absorb(conn.segments_to_send(0.01))
    # RFC 9293: 536 octets when the SYN carries no MSS option.
    assert [len(x.payload) for x in segs] == [536, 536, 128]
    assert all(x.options == TcpOptions() for x in segs)


def test_ipv6_default_mss_is_1220() -> None:
    app = App(mss=None, ts=False)
    conn = TcpConnection(KEY6, app.syn(), SRV_ISS, 0.0, CFG)
    app.absorb(conn.segments_to_send(0.0))
    conn.segment_received(*app.seg(), 0.01)
    conn.send(b"y" * 2000)
    assert [len(x.payload) for x in app.absorb(conn.segments_to_send(0.01))] == [1000, 1000]
    app2 = App(mss=None, ts=False)
    conn2 = TcpConnection(KEY6, app2.syn(), SRV_ISS, 0.0, TcpConfig(mss=1400))
    app2.absorb(conn2.segments_to_send(0.0))
    conn2.segment_received(*app2.seg(), 0.01)
    conn2.send(b"y" * 2000)
    assert [len(x.payload) for x in app2.absorb(conn2.segments_to_send(0.01))] == [1220, 780]


def test_each_family_announces_and_uses_its_own_mss() -> None:
    """IPv4 can take MTU - 40, IPv6 needs MTU - 60: fewer packets for IPv4."""
    config = TcpConfig(mss=1460, mss_ipv6=1440)
    for key, ours in ((KEY, 1460), (KEY6, 1440)):
        app = App(mss=1460, ts=False)
        conn = TcpConnection(key, app.syn(), SRV_ISS, 0.0, config)
        [synack_seg] = app.absorb(conn.segments_to_send(0.0))
        assert synack_seg.options.mss == ours
        conn.segment_received(*app.seg(), 0.01)
        conn.send(b"y" * 3000)
        sizes = [len(x.payload) for x in app.absorb(conn.segments_to_send(0.01))]
        assert sizes == [ours, ours, 3000 - 2 * ours]
    with pytest.raises(LocalProtocolError, match="mss_ipv6"):
        TcpConfig(mss_ipv6=65476)


def test_window_scaling_is_off_unless_offered_and_config_allows_it() -> None:
    conn, app = syn_received(TcpConfig(window_scaling=False, sack=False, timestamps=False))
    assert observe(conn, app, 0.0)[1] == [synack(0.0, TcpOptions(mss=1460))]


def test_duplicate_syn_is_answered_with_the_same_synack() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    conn.segment_received(app.syn(), b"", 0.3)
    assert observe(conn, app, 0.3) == (TcpState.SYN_RECEIVED, [synack(0.3)], [])
    assert conn.statistics().retransmits == 0


def test_synack_is_retransmitted_with_backoff_then_handshake_gives_up() -> None:
    conn, app = syn_received(TcpConfig(syn_received_timeout=2.5, mss=1000, rcv_buf=100_000))
    observe(conn, app, 0.0)
    conn.handle_timeout(0.5)  # nothing due yet
    assert observe(conn, app, 0.5) == (TcpState.SYN_RECEIVED, [], [])
    conn.handle_timeout(1.0)
    assert observe(conn, app, 1.0) == (TcpState.SYN_RECEIVED, [synack(1.0)], [])
    assert conn.next_deadline() == 2.5  # handshake deadline before the 2 s backed-off RTO
    conn.handle_timeout(2.5)
    state, segs, events = observe(conn, app, 2.5)
    assert state is TcpState.CLOSED
    assert segs == [Seg(s(SRV_ISS + 1), s(APP_ISN + 1), RST | ACK, 0, TcpOptions(), b"")]
    assert events == [ConnectionReset(), Closed()]
    assert conn.next_deadline() is None
    assert conn.statistics().retransmits == 1


def test_synack_retries_are_capped_by_max_retries() -> None:
    conn, app = syn_received(TcpConfig(max_retries=1, rto_initial=1.0))
    observe(conn, app, 0.0)
    conn.handle_timeout(1.0)
    assert [x.flags for x in observe(conn, app, 1.0)[1]] == [SYN | ACK]
    conn.handle_timeout(3.0)
    assert observe(conn, app, 3.0)[0] is TcpState.CLOSED


def test_third_ack_with_data_establishes_and_delivers() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    conn.segment_received(*app.seg(ACK, b"hello"), 0.01)
    assert observe(conn, app, 0.01) == (TcpState.ESTABLISHED, [], [DataReceived(b"hello")])
    assert conn.next_deadline() == pytest.approx(0.01 + CFG.delayed_ack)


def test_unacceptable_ack_in_syn_received_gets_rst_and_connection_survives() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    conn.segment_received(*app.seg(ACK, seq=app.nxt, ack=s(SRV_ISS + 7)), 0.01)
    rst = Seg(s(SRV_ISS + 7), 0, RST, 0, TcpOptions(), b"")
    assert observe(conn, app, 0.01) == (TcpState.SYN_RECEIVED, [rst], [])
    conn.segment_received(*app.seg(), 0.02)
    assert conn.state is TcpState.ESTABLISHED


def test_rst_in_syn_received_resets_only_on_exact_sequence() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    conn.segment_received(*app.seg(RST, seq=s(APP_ISN + 5)), 0.01)
    # In the window but not exact: a challenge (here the SYN-ACK again), no reset.
    assert observe(conn, app, 0.01) == (TcpState.SYN_RECEIVED, [synack(0.01)], [])
    conn.segment_received(*app.seg(RST, seq=s(APP_ISN + 1)), 0.02)
    assert observe(conn, app, 0.02) == (TcpState.CLOSED, [], [ConnectionReset(), Closed()])


def test_segment_without_ack_is_dropped_in_syn_received() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    conn.segment_received(*app.seg(0, b"data"), 0.01)
    assert observe(conn, app, 0.01) == (TcpState.SYN_RECEIVED, [], [])


def test_send_and_close_before_the_handshake_completes() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    assert conn.send(b"early") == 5
    conn.close()
    assert conn.state is TcpState.FIN_WAIT_1
    assert observe(conn, app, 0.0) == (TcpState.FIN_WAIT_1, [], [])
    conn.segment_received(*app.seg(), 0.01)
    expected = ack_seg(0.01, app, 50_000, flags=ACK | FIN | 0x08, payload=b"early")
    assert observe(conn, app, 0.01) == (TcpState.FIN_WAIT_1, [expected], [])


def test_only_a_plain_syn_opens_a_connection() -> None:
    for flags in (ACK, SYN | ACK, SYN | FIN, RST):
        hdr = TcpHeader(40000, 443, APP_ISN, 0, flags, 1000)
        with pytest.raises(LocalProtocolError):
            TcpConnection(KEY, hdr, SRV_ISS, 0.0, CFG)


def test_config_rejects_nonsense() -> None:
    for kwargs in (
        {"mss": 0},
        {"mss": 70000},
        {"rto_min": 5.0, "rto_max": 1.0},
        {"rcv_buf": 2**31},
        {"time_wait": -1.0},
    ):
        with pytest.raises(LocalProtocolError):
            TcpConfig(**kwargs)  # type: ignore[arg-type]
