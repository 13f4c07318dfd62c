"""Receiving: in-order delivery, delayed ACK, reassembly, SACK blocks, PAWS, backpressure."""

from __future__ import annotations

import pytest

from stack.tcp import DataReceived, EofReceived, TcpConfig, TcpConnection, TcpState
from stack.wire.tcp import TcpOptions

from .fixtures import (
    CFG,
    CLOSE_WAIT_AT,
    PAYLOAD,
    ack_seg,
    close_wait,
    established,
    observe,
    syn_received,
    ts,
)
from .helpers import ACK, APP_ISN, FIN, RST, SRV_ISS, App, Seg, s

FULL = 50_000  # the whole 100000-byte buffer, scaled by 2


def test_in_order_data_is_delivered_and_acked_after_the_delayed_ack_time() -> None:
    conn, app = established()
    conn.segment_received(*app.seg(ACK, b"a" * 500), 0.02)
    assert observe(conn, app, 0.02) == (TcpState.ESTABLISHED, [], [DataReceived(b"a" * 500)])
    assert conn.next_deadline() == pytest.approx(0.02 + CFG.delayed_ack)
    conn.handle_timeout(0.06)
    assert observe(conn, app, 0.06) == (TcpState.ESTABLISHED, [ack_seg(0.06, app, FULL)], [])
    assert conn.statistics().bytes_in == 500


def test_every_second_full_segment_is_acked_at_once() -> None:
    conn, app = established()
    conn.segment_received(*app.seg(ACK, b"b" * PAYLOAD), 0.02)
    assert observe(conn, app, 0.02) == (TcpState.ESTABLISHED, [], [DataReceived(b"b" * PAYLOAD)])
    conn.segment_received(*app.seg(ACK, b"c" * PAYLOAD), 0.02)
    _state, segs, events = observe(conn, app, 0.02)
    # The second segment was unread when the ACK was built: the window shows it.
    assert segs == [ack_seg(0.02, app, (100_000 - PAYLOAD) // 2)]
    assert events == [DataReceived(b"c" * PAYLOAD)]


def test_out_of_order_data_is_sacked_at_once_and_delivered_when_the_hole_fills() -> None:
    conn, app = established()
    first = app.seg(ACK, b"1" * 100)
    second = app.seg(ACK, b"2" * 100)
    third = app.seg(ACK, b"3" * 100)
    conn.segment_received(*third, 0.02)
    left = s(APP_ISN + 201)
    _, segs, events = observe(conn, app, 0.02)
    assert events == []
    assert segs == [
        Seg(
            s(SRV_ISS + 1),
            s(APP_ISN + 1),
            ACK,
            FULL,
            TcpOptions(sack_blocks=((left, s(left + 100)),), timestamp=(ts(0.02), 1000)),
            b"",
        )
    ]
    conn.segment_received(*first, 0.03)
    _, segs, events = observe(conn, app, 0.03)
    assert events == [DataReceived(b"1" * 100)]
    assert [(x.ack, x.options.sack_blocks) for x in segs] == [
        (s(APP_ISN + 101), ((left, s(left + 100)),))
    ]
    conn.segment_received(*second, 0.04)
    _state, segs, events = observe(conn, app, 0.04)
    assert events == [DataReceived(b"2" * 100 + b"3" * 100)]
    # Hole filled: ACK at once, no SACK. The right edge has not moved since
    # the first ACK (receiver SWS avoidance: it moves by an MSS or more).
    assert segs == [ack_seg(0.04, app, (100_000 - 300) // 2)]
    assert conn.statistics().ooo_segments == 1


def test_sack_blocks_put_the_latest_first_and_stop_at_three_with_timestamps() -> None:
    conn, app = established()
    base = s(APP_ISN + 1)
    for i in (1, 3, 5, 7):
        conn.segment_received(*app.seg(ACK, b"x" * 10, seq=s(base + 20 * i)), 0.02)
    segs = app.absorb(conn.segments_to_send(0.02))
    blocks = segs[-1].options.sack_blocks
    assert blocks == tuple((s(base + 20 * i), s(base + 20 * i + 10)) for i in (7, 5, 3))


def test_overlapping_and_duplicate_segments_are_trimmed() -> None:
    conn, app = established()
    base = s(APP_ISN + 1)
    conn.segment_received(*app.seg(ACK, b"abcdef"), 0.02)
    conn.segment_received(*app.seg(ACK, b"cdefgh", seq=s(base + 2)), 0.02)
    app.nxt = s(base + 8)
    assert observe(conn, app, 0.02)[2] == [DataReceived(b"abcdefgh")]
    # Entirely old: a duplicate, answered with an ACK at once.
    conn.segment_received(*app.seg(ACK, b"abc", seq=base), 0.03)
    assert observe(conn, app, 0.03)[1] == [ack_seg(0.03, app, FULL)]
    # Out of order ranges that overlap each other merge.
    conn.segment_received(*app.seg(ACK, b"klm", seq=s(base + 10)), 0.04)
    conn.segment_received(*app.seg(ACK, b"jklmno", seq=s(base + 9)), 0.04)
    conn.segment_received(*app.seg(ACK, b"mnopq", seq=s(base + 12)), 0.04)
    conn.segment_received(*app.seg(ACK, b"i", seq=s(base + 8)), 0.04)
    app.nxt = s(base + 17)
    assert observe(conn, app, 0.04)[2] == [DataReceived(b"ijklmnopq")]
    assert conn.statistics().dup_segments == 1


def test_paws_drops_a_segment_with_an_old_timestamp() -> None:
    conn, app = established()
    conn.segment_received(*app.seg(ACK, b"new", tsval=1005), 0.02)
    observe(conn, app, 0.02)
    conn.segment_received(*app.seg(ACK, b"old", tsval=1001), 0.03)
    app.nxt = s(app.nxt - 3)
    app.tsval = 1005
    _state, segs, events = observe(conn, app, 0.03)
    assert events == []
    assert segs == [
        ack_seg(0.03, app, FULL)._replace(options=TcpOptions(timestamp=(ts(0.03), 1005)))
    ]
    assert conn.statistics().paws_drops == 1


def test_window_closes_as_the_outbound_falls_behind_and_reopens_when_read() -> None:
    cfg = TcpConfig(mss=1000, rcv_buf=4000)
    conn, app = established(cfg, ts=False, wscale=None)
    ack = s(APP_ISN + 1)
    windows = []
    for _ in range(4):
        conn.segment_received(*app.seg(ACK, b"z" * 1000), 0.02)
        windows += [(x.ack, x.window) for x in app.absorb(conn.segments_to_send(0.02))]
    assert windows == [(s(ack + 2000), 2000), (s(ack + 4000), 0)]
    # A byte beyond the closed window is not taken; the ACK repeats the zero window.
    conn.segment_received(*app.seg(ACK, b"!"), 0.03)
    app.nxt = s(app.nxt - 1)
    assert [(x.ack, x.window) for x in app.absorb(conn.segments_to_send(0.03))] == [
        (s(ack + 4000), 0)
    ]
    assert conn.next_event() == DataReceived(b"z" * 4000)
    # Reading freed the whole buffer: a window update goes out unasked.
    assert [(x.ack, x.window) for x in app.absorb(conn.segments_to_send(0.04))] == [
        (s(ack + 4000), 4000)
    ]


def test_fin_before_the_hole_fills_is_reported_after_the_data() -> None:
    conn, app = established()
    first = app.seg(ACK, b"head")
    conn.segment_received(*app.seg(ACK | FIN, b"tail"), 0.02)
    assert observe(conn, app, 0.02)[0:3:2] == (TcpState.ESTABLISHED, [])
    conn.segment_received(*first, 0.03)
    state, segs, events = observe(conn, app, 0.03)
    assert state is TcpState.CLOSE_WAIT
    assert events == [DataReceived(b"headtail"), EofReceived()]
    assert segs == [ack_seg(0.03, app, (100_000 - 8) // 2)]


def test_segment_beyond_the_window_is_not_acceptable() -> None:
    conn, app = established()
    far = s(APP_ISN + 1 + 200_000)
    conn.segment_received(*app.seg(ACK, b"far", seq=far), 0.02)
    assert observe(conn, app, 0.02) == (TcpState.ESTABLISHED, [ack_seg(0.02, app, FULL)], [])


def test_out_of_order_memory_is_bounded() -> None:
    cfg = TcpConfig(mss=1000, rcv_buf=100_000, max_ooo_bytes=300, max_ooo_ranges=2)
    conn, app = established(cfg)
    base = s(APP_ISN + 1)
    conn.segment_received(*app.seg(ACK, b"a" * 100, seq=s(base + 1000)), 0.02)
    conn.segment_received(*app.seg(ACK, b"b" * 100, seq=s(base + 2000)), 0.02)
    conn.segment_received(*app.seg(ACK, b"c" * 100, seq=s(base + 3000)), 0.02)  # 3rd range
    conn.segment_received(*app.seg(ACK, b"d" * 150, seq=s(base + 2100)), 0.02)  # > 300 bytes
    conn.segment_received(*app.seg(ACK, b"e" * 1000), 0.02)
    app.nxt = s(base + 1100)
    assert observe(conn, app, 0.02)[2] == [DataReceived(b"e" * 1000 + b"a" * 100)]
    conn.segment_received(*app.seg(ACK, b"f" * 900), 0.03)
    assert observe(conn, app, 0.03)[2] == [DataReceived(b"f" * 900 + b"b" * 100)]


def test_an_extended_out_of_order_range_moves_to_the_front_of_the_sack_blocks() -> None:
    conn, app = established()
    base = s(APP_ISN + 1)
    conn.segment_received(*app.seg(ACK, b"x" * 10, seq=s(base + 20)), 0.02)
    conn.segment_received(*app.seg(ACK, b"y" * 10, seq=s(base + 60)), 0.02)
    conn.segment_received(*app.seg(ACK, b"x" * 20, seq=s(base + 20)), 0.02)
    segs = app.absorb(conn.segments_to_send(0.02))
    assert segs[-1].options.sack_blocks == (
        (s(base + 20), s(base + 40)),
        (s(base + 60), s(base + 70)),
    )


def test_data_past_the_advertised_window_is_cut_and_a_fin_beyond_it_is_not_taken() -> None:
    conn, app = established(TcpConfig(mss=1000, rcv_buf=2000, snd_buf=2000, max_ooo_bytes=2000))
    base = s(APP_ISN + 1)
    conn.segment_received(*app.seg(ACK | FIN, b"z" * 2500), 0.02)
    state, segs, events = observe(conn, app, 0.02)
    assert state is TcpState.ESTABLISHED
    assert events == [DataReceived(b"z" * 2000)]
    # Two full segments' worth arrived: acknowledged at once, up to the edge.
    assert [(x.ack, x.flags) for x in segs] == [(s(base + 2000), ACK)]


def test_a_fin_that_contradicts_an_earlier_fin_is_not_taken() -> None:
    conn, app = established()
    base = s(APP_ISN + 1)
    conn.segment_received(*app.seg(ACK | FIN, seq=s(base + 100)), 0.02)
    assert [x.ack for x in observe(conn, app, 0.02)[1]] == [base]
    # A bare FIN at RCV.NXT, though the peer's FIN was announced at +100.
    conn.segment_received(*app.seg(ACK | FIN, seq=base), 0.03)
    state, segs, events = observe(conn, app, 0.03)
    assert (state, events) == (TcpState.ESTABLISHED, [])
    assert [(x.ack, x.flags) for x in segs] == [(base, ACK)]


def test_data_after_the_peers_fin_is_only_acknowledged() -> None:
    conn, app = close_wait()
    after_fin = app.nxt
    t = CLOSE_WAIT_AT + 0.01
    conn.segment_received(*app.seg(ACK, b"late"), t)
    state, segs, events = observe(conn, app, t)
    assert (state, events) == (TcpState.CLOSE_WAIT, [])
    assert [(x.ack, x.flags, x.payload) for x in segs] == [(after_fin, ACK, b"")]


def test_a_resent_segment_that_covers_held_out_of_order_data_delivers_each_byte_once() -> None:
    conn, app = established()
    base = s(APP_ISN + 1)
    data = bytes(range(30))
    conn.segment_received(*app.seg(ACK, data[10:20], seq=s(base + 10)), 0.02)
    observe(conn, app, 0.02)
    conn.segment_received(*app.seg(ACK, data, seq=base), 0.03)
    app.nxt = s(base + 30)
    _state, segs, events = observe(conn, app, 0.03)
    assert events == [DataReceived(data)]
    # The ACK covers all of it and has no SACK block left.
    assert segs == [ack_seg(0.03, app, (100_000 - 30) // 2)]


def test_data_a_broken_peer_sent_past_its_fin_is_never_delivered() -> None:
    conn, app = established()
    base = s(APP_ISN + 1)
    # Out of order, latest last: +50, +30, then +10 (where the FIN will land).
    for offset in (50, 30, 10):
        conn.segment_received(*app.seg(ACK, b"x" * 10, seq=s(base + offset)), 0.02)
    observe(conn, app, 0.02)
    conn.segment_received(*app.seg(ACK | FIN, b"a" * 10, seq=base), 0.03)
    state, segs, events = observe(conn, app, 0.03)
    assert (state, events) == (TcpState.CLOSE_WAIT, [DataReceived(b"a" * 10), EofReceived()])
    # The FIN swallowed the range at +10; of the ranges still held, the one
    # that most recently grew comes first (RFC 2018 section 4).
    assert [(x.ack, x.options.sack_blocks) for x in segs] == [
        (s(base + 11), ((s(base + 30), s(base + 40)), (s(base + 50), s(base + 60))))
    ]


def test_reading_the_first_bytes_after_the_handshake_costs_no_ack_of_its_own() -> None:
    """The SYN-ACK's window cannot be scaled (65535 of a 400000-byte buffer):
    taking data out must not look like a window worth reopening at once.
    The delayed ACK carries the whole window a moment later."""
    cfg = TcpConfig(mss=1000, rcv_buf=400_000, snd_buf=100_000, max_ooo_bytes=50_000)
    conn, app = established(cfg)
    conn.segment_received(*app.seg(ACK, b"hello"), 0.02)
    state, segs, events = observe(conn, app, 0.02)
    assert (state, segs, events) == (TcpState.ESTABLISHED, [], [DataReceived(b"hello")])
    assert app.absorb(conn.segments_to_send(0.02)) == []  # taking the data sent nothing
    conn.handle_timeout(0.02 + cfg.delayed_ack)
    [ack] = observe(conn, app, 0.02 + cfg.delayed_ack)[1]
    assert (ack.ack, ack.window) == (app.nxt, 400_000 >> 3)


def _sent_data_acked(app_kw: dict[str, object]) -> tuple[TcpConnection, App, int]:
    """ESTABLISHED with two segments of ours sent and acknowledged by 0.035."""
    conn, app = established(**app_kw)
    iss1 = s(SRV_ISS + 1)
    for i in range(2):
        conn.send(bytes(PAYLOAD))
        app.absorb(conn.segments_to_send(0.02 + i / 100))
        conn.segment_received(*app.seg(ack=s(iss1 + (i + 1) * PAYLOAD)), 0.025 + i / 100)
    observe(conn, app, 0.035)
    return conn, app, iss1


@pytest.mark.parametrize("case", ["ack-of-unsent-data", "ack-older-than-the-window"])
def test_a_segment_dropped_for_its_ack_leaves_ts_recent_alone(case: str) -> None:
    """RFC 7323 section 4.3: TS.Recent comes only from a segment that is accepted."""
    conn, app, iss1 = _sent_data_acked({"wscale": None, "window": 1000})
    bad_ack = s(iss1 + 3 * PAYLOAD) if case == "ack-of-unsent-data" else s(iss1 - 1000)
    conn.segment_received(*app.seg(ACK, b"bad", ack=bad_ack, tsval=5000), 0.04)
    app.nxt = s(app.nxt - 3)  # dropped: the app will send those bytes again
    state, segs, events = observe(conn, app, 0.04)
    assert (state, events) == (TcpState.ESTABLISHED, [])
    # The answer echoes the timestamp of the last accepted segment, not 5000.
    assert [(x.ack, x.flags, x.options.timestamp) for x in segs] == [
        (app.nxt, ACK, (ts(0.04), 1000))
    ]
    # A later segment with a timestamp between the two is not taken as old.
    conn.segment_received(*app.seg(ACK, b"good", tsval=2000), 0.05)
    assert observe(conn, app, 0.05) == (TcpState.ESTABLISHED, [], [DataReceived(b"good")])
    assert conn.statistics().paws_drops == 0


def test_an_unacceptable_ack_in_syn_received_leaves_ts_recent_alone() -> None:
    conn, app = syn_received()
    observe(conn, app, 0.0)
    conn.segment_received(*app.seg(ACK, ack=s(SRV_ISS + 7), tsval=5000), 0.01)
    assert [x.flags for x in observe(conn, app, 0.01)[1]] == [RST]
    conn.segment_received(*app.seg(ACK, b"hi", tsval=2000), 0.02)
    assert observe(conn, app, 0.02) == (TcpState.ESTABLISHED, [], [DataReceived(b"hi")])
    assert conn.statistics().paws_drops == 0
