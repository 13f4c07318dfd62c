"""Sending: segmentation, cwnd, peer window, RTO, fast retransmit, SACK holes, GSO, probes."""

from __future__ import annotations

import pytest

from stack.errors import LocalProtocolError
from stack.tcp import Closed, ConnectionReset, TcpConfig, TcpState
from stack.tcp.congestion import _MAX_BLOCKS, Scoreboard

from .fixtures import CFG, PAYLOAD, established, observe
from .helpers import ACK, FIN, RST, SRV_ISS, s

PSH = 0x08
ISS1 = s(SRV_ISS + 1)


def test_data_is_cut_into_mss_segments_up_to_the_initial_cwnd() -> None:
    conn, app = established()
    data = bytes(range(256)) * 80  # 20480 bytes
    assert conn.send(data) == len(data)
    assert conn.send_space() == CFG.snd_buf - len(data)
    segs = app.absorb(conn.segments_to_send(0.02))
    # Initial window min(10 * MSS, max(2 * MSS, 14600)) = 9880 (RFC 6928).
    assert [(x.seq, len(x.payload), x.flags) for x in segs] == [
        (s(ISS1 + i * PAYLOAD), PAYLOAD, ACK) for i in range(10)
    ]
    assert b"".join(x.payload for x in segs) == data[: 10 * PAYLOAD]
    # The handshake measured 10 ms: the RTO sits at its 200 ms floor, and
    # the tail loss probe comes first, at 2 * SRTT + 2 ms.
    assert conn.next_deadline() == pytest.approx(0.02 + 2 * 0.01 + 0.002)
    # One ACK for everything: slow start grows cwnd and the rest goes out.
    conn.segment_received(*app.seg(ack=s(ISS1 + 10 * PAYLOAD)), 0.05)
    segs = app.absorb(conn.segments_to_send(0.05))
    assert sum(len(x.payload) for x in segs) == len(data) - 10 * PAYLOAD
    assert segs[-1].flags == ACK | PSH
    conn.segment_received(*app.seg(ack=s(ISS1 + len(data))), 0.08)
    assert conn.next_deadline() == pytest.approx(0.08 + 100.0 * 72)  # only the idle timer
    assert conn.send_space() == CFG.snd_buf
    assert conn.statistics().bytes_out == len(data)


def test_the_peer_window_limits_what_is_sent() -> None:
    conn, app = established()
    conn.segment_received(*app.seg(window=10), 0.02)  # 10 << 7 = 1280 bytes
    conn.send(b"w" * 5000)
    segs = app.absorb(conn.segments_to_send(0.02))
    # The 292-byte rest of the window is a sliver while data is in flight
    # (sender SWS avoidance); the window slides when the first is acked.
    assert [len(x.payload) for x in segs] == [PAYLOAD]
    conn.segment_received(*app.seg(ack=s(ISS1 + PAYLOAD), window=10), 0.03)
    segs = app.absorb(conn.segments_to_send(0.03))
    assert [(x.seq, len(x.payload)) for x in segs] == [(s(ISS1 + PAYLOAD), PAYLOAD)]


def test_rto_retransmits_with_backoff_and_gives_up_after_max_retries() -> None:
    conn, app = established(TcpConfig(mss=1000, rcv_buf=100_000, max_retries=2))
    conn.send(b"r" * 100)
    [first] = app.absorb(conn.segments_to_send(0.02))
    assert conn.next_deadline() == pytest.approx(0.22)
    conn.handle_timeout(0.22)
    [again] = app.absorb(conn.segments_to_send(0.22))
    assert (again.seq, again.payload) == (first.seq, first.payload)
    assert conn.next_deadline() == pytest.approx(0.62)  # doubled
    conn.handle_timeout(0.62)
    assert len(conn.segments_to_send(0.62)) == 1
    conn.handle_timeout(conn.next_deadline() or 0)
    state, segs, events = observe(conn, app, 8.0)
    assert state is TcpState.CLOSED
    assert [(x.flags, x.seq) for x in segs] == [(RST | ACK, s(ISS1 + 100))]
    assert events == [ConnectionReset(), Closed()]
    st = conn.statistics()
    assert (st.rto_timeouts, st.retransmits) == (2, 2)


def test_three_duplicate_acks_trigger_fast_retransmit_without_sack() -> None:
    conn, app = established(sack=False)
    conn.send(b"f" * (8 * PAYLOAD))
    segs = app.absorb(conn.segments_to_send(0.02))
    assert len(segs) == 8
    conn.segment_received(*app.seg(ack=s(ISS1 + PAYLOAD)), 0.05)
    app.absorb(conn.segments_to_send(0.05))
    for i in range(3):
        conn.segment_received(*app.seg(ack=s(ISS1 + PAYLOAD)), 0.06 + i / 1000)
        out = app.absorb(conn.segments_to_send(0.06 + i / 1000))
        if i < 2:
            assert [x.seq for x in out if x.seq == s(ISS1 + PAYLOAD)] == []
    assert [x.seq for x in out][:1] == [s(ISS1 + PAYLOAD)]
    st = conn.statistics()
    assert (st.fast_retransmits, st.rto_timeouts) == (1, 0)
    # A partial ACK (NewReno) resends the next hole at once.
    conn.segment_received(*app.seg(ack=s(ISS1 + 3 * PAYLOAD)), 0.08)
    out = app.absorb(conn.segments_to_send(0.08))
    assert out[0].seq == s(ISS1 + 3 * PAYLOAD)
    assert conn.statistics().fast_retransmits == 2


def test_sack_holes_are_retransmitted_in_one_round_trip() -> None:
    conn, app = established()
    conn.send(b"k" * (10 * PAYLOAD))
    segs = app.absorb(conn.segments_to_send(0.02))
    assert len(segs) == 10
    edge = [s(ISS1 + i * PAYLOAD) for i in range(11)]
    # Segments 0, 3 and 6 were lost: SACK the rest.
    blocks = ((edge[1], edge[3]), (edge[4], edge[6]), (edge[7], edge[10]))
    conn.segment_received(*app.seg(ack=edge[0], sack=blocks), 0.05)
    out = app.absorb(conn.segments_to_send(0.05))
    resent = [x.seq for x in out if x.seq in (edge[0], edge[3], edge[6])]
    assert resent == [edge[0], edge[3], edge[6]]  # the head first, then the holes
    st = conn.statistics()
    assert st.fast_retransmits == 1 and st.sack_retransmits == 2 and st.rto_timeouts == 0


def test_zero_window_is_probed_until_it_opens() -> None:
    conn, app = established()
    conn.segment_received(*app.seg(window=0), 0.02)
    conn.send(b"p" * 100)
    assert app.absorb(conn.segments_to_send(0.02)) == []
    probe_at = conn.next_deadline()
    assert probe_at == pytest.approx(0.02 + CFG.rto_min)
    conn.handle_timeout(probe_at or 0)
    [probe] = app.absorb(conn.segments_to_send(probe_at or 0))
    assert (probe.seq, probe.flags, probe.payload) == (SRV_ISS, ACK, b"")  # SND.UNA - 1
    assert conn.statistics().window_probes == 1
    conn.segment_received(*app.seg(window=100), 1.1)
    [data] = app.absorb(conn.segments_to_send(1.1))
    assert (data.seq, data.payload) == (ISS1, b"p" * 100)


def test_send_after_close_is_a_local_error_and_send_after_reset_takes_nothing() -> None:
    conn, _app = established()
    conn.close()
    with pytest.raises(LocalProtocolError):
        conn.send(b"late")
    assert conn.send_space() == 0
    conn2, app2 = established()
    conn2.segment_received(*app2.seg(RST), 0.02)
    assert conn2.send(b"late") == 0
    conn2.close()  # a no-op once reset
    assert conn2.state is TcpState.CLOSED


def test_send_buffer_is_bounded() -> None:
    conn, _app = established(TcpConfig(snd_buf=3000))
    assert conn.send(b"b" * 5000) == 3000
    assert conn.send(b"more") == 0
    assert conn.send_space() == 0


def test_ack_of_unsent_data_is_answered_and_ignored() -> None:
    conn, app = established()
    conn.segment_received(*app.seg(ack=s(ISS1 + 50)), 0.02)
    [ack] = app.absorb(conn.segments_to_send(0.02))
    assert (ack.seq, ack.flags) == (ISS1, ACK)
    assert conn.state is TcpState.ESTABLISHED


def test_fin_is_retransmitted_when_lost() -> None:
    conn, app = established()
    conn.close()
    [fin] = app.absorb(conn.segments_to_send(0.02))
    conn.handle_timeout(0.22)
    [again] = app.absorb(conn.segments_to_send(0.22))
    assert fin.flags == again.flags == ACK | FIN and fin.seq == again.seq


def test_gso_super_segments_name_the_packet_size_of_a_peer_behind_a_smaller_mtu() -> None:
    # A peer behind a 1500-byte link (MSS 1460) on a 9000-byte device still
    # gets super-segments, cut by the device at 1500-byte packets (the
    # runtime passes `packet_limit` on), in whole packets of its MSS.
    cfg = TcpConfig(mss=8960, gso_size=60000, rcv_buf=200_000, snd_buf=200_000)
    small, app = established(cfg, mss=1460)
    assert small.packet_limit == 20 + 20 + 1460
    small.send(bytes(50_000))
    segs = app.absorb(small.segments_to_send(0.02))
    assert len(segs) == 1 and len(segs[0].payload) == 10 * (1460 - 12)  # the initial cwnd
    big, app = established(cfg, mss=8960)
    assert big.packet_limit is None  # the device's own MTU cuts right
    big.send(bytes(50_000))
    segs = app.absorb(big.segments_to_send(0.02))
    assert max(len(x.payload) for x in segs) > 8960


def test_gso_super_segment_is_cut_to_the_peers_window() -> None:
    cfg = TcpConfig(mss=1000, gso_size=20_000, rcv_buf=100_000, snd_buf=100_000)
    conn, app = established(cfg, mss=1000)
    conn.segment_received(*app.seg(window=40), 0.02)  # 40 << 7 = 5120 bytes
    data = bytes(range(256)) * 80  # 20480 bytes
    conn.send(data)
    segs = app.absorb(conn.segments_to_send(0.02))
    # Nothing is in flight, so the whole window goes out at once, though it
    # is less than a super-segment and not a whole number of packets.
    assert [(x.seq, len(x.payload)) for x in segs] == [(ISS1, 5120)]
    assert segs[0].payload == data[:5120]
    conn.segment_received(*app.seg(ack=s(ISS1 + 5120), window=40), 0.05)
    segs = app.absorb(conn.segments_to_send(0.05))
    assert [(x.seq, len(x.payload)) for x in segs] == [(s(ISS1 + 5120), 5120)]


def test_gso_resends_a_sack_hole_in_whole_packets_when_the_budget_allows() -> None:
    cfg = TcpConfig(
        mss=1000, gso_size=20_000, initial_cwnd_segments=12, rcv_buf=100_000, snd_buf=100_000
    )
    conn, app = established(cfg, mss=1000)
    data = bytes(range(256)) * 50
    conn.send(data[: 11 * PAYLOAD])
    segs = app.absorb(conn.segments_to_send(0.02))
    assert [(x.seq, len(x.payload)) for x in segs] == [(ISS1, 11 * PAYLOAD)]
    edge = [s(ISS1 + i * PAYLOAD) for i in range(12)]
    # The device cut it into 11 packets: 0, 2 and 3 were lost, 1 and 4-6 arrived.
    conn.segment_received(
        *app.seg(ack=edge[0], sack=((edge[4], edge[7]), (edge[1], edge[2]))), 0.05
    )
    out = app.absorb(conn.segments_to_send(0.05))
    # cwnd 5434 (half the flight) less 5 packets in the network leaves 494
    # bytes: the head is resent, the hole waits rather than go as a sliver.
    assert [(x.seq, len(x.payload)) for x in out] == [(edge[0], PAYLOAD)]
    # Packets 7 and 8 arrive: room for two packets, the whole hole in one segment.
    conn.segment_received(
        *app.seg(ack=edge[0], sack=((edge[4], edge[9]), (edge[1], edge[2]))), 0.06
    )
    out = app.absorb(conn.segments_to_send(0.06))
    assert [(x.seq, x.payload) for x in out] == [(edge[2], data[2 * PAYLOAD : 4 * PAYLOAD])]
    st = conn.statistics()
    assert (st.fast_retransmits, st.sack_retransmits, st.rto_timeouts) == (1, 1, 0)


def test_sack_blocks_outside_the_flight_are_no_duplicate_acks() -> None:
    conn, app = established()
    conn.send(b"d" * (4 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))
    edge = [s(ISS1 + i * PAYLOAD) for i in range(5)]
    conn.segment_received(*app.seg(ack=edge[2]), 0.03)
    assert app.absorb(conn.segments_to_send(0.03)) == []
    # A late copy of segment 0 reported (RFC 2883 D-SACK), and a bogus block
    # beyond everything sent: neither says a segment left the network.
    beyond = (s(ISS1 + 5 * PAYLOAD), s(ISS1 + 6 * PAYLOAD))
    for i in range(4):
        now = 0.04 + i / 1000
        conn.segment_received(*app.seg(ack=edge[2], sack=((edge[0], edge[1]), beyond)), now)
        assert app.absorb(conn.segments_to_send(now)) == []
    st = conn.statistics()
    assert (st.retransmits, st.fast_retransmits) == (0, 0)


def test_scoreboard_keeps_what_a_partial_ack_leaves_of_a_sacked_range() -> None:
    sb = Scoreboard()
    assert sb.update([(100, 300), (400, 500)], 1, 1000) == 300
    sb.ack(200)  # the cumulative ACK lands inside the first range
    assert (sb.ranges(), sb.sacked) == ([(200, 300), (400, 500)], 200)
    assert sb.next_hole(200) == (300, 400)
    sb.ack(450)
    assert (sb.ranges(), sb.sacked) == ([(450, 500)], 50)


def test_scoreboard_ignores_new_ranges_beyond_its_cap_but_still_grows_known_ones() -> None:
    sb = Scoreboard()
    blocks = [(10 * i + 1, 10 * i + 5) for i in range(_MAX_BLOCKS)]
    assert sb.update(blocks, 1, 100_000) == 4 * _MAX_BLOCKS
    far = 10 * _MAX_BLOCKS + 1
    assert sb.update([(far, far + 4)], 1, 100_000) == 0  # one range too many
    assert sb.update([(1, 8)], 1, 100_000) == 3
    assert sb.ranges() == [(1, 8), *blocks[1:]]
    assert sb.sacked == 4 * _MAX_BLOCKS + 3


def _sack_of(first: int, last: int) -> tuple[tuple[int, int], ...]:
    return ((s(ISS1 + first * PAYLOAD), s(ISS1 + last * PAYLOAD)),)


def test_limited_transmit_sends_one_new_segment_per_early_duplicate_ack() -> None:
    # RFC 3042 through RFC 6675 pipe: an octet SACKed above SND.UNA has left
    # the network, so each of the first two duplicate ACKs frees room for one
    # new segment while cwnd stays as it is; the third starts fast retransmit.
    conn, app = established()
    conn.send(bytes(20 * PAYLOAD))
    first = app.absorb(conn.segments_to_send(0.02))
    assert [x.seq for x in first] == [s(ISS1 + i * PAYLOAD) for i in range(10)]
    sent = []
    for n in (2, 3):
        conn.segment_received(*app.seg(ack=ISS1, sack=_sack_of(1, n)), 0.03)
        sent.append([(x.seq, len(x.payload)) for x in app.absorb(conn.segments_to_send(0.03))])
    assert sent == [[(s(ISS1 + 10 * PAYLOAD), PAYLOAD)], [(s(ISS1 + 11 * PAYLOAD), PAYLOAD)]]
    conn.segment_received(*app.seg(ack=ISS1, sack=_sack_of(1, 4)), 0.03)
    out = app.absorb(conn.segments_to_send(0.03))
    assert [(x.seq, len(x.payload)) for x in out] == [(ISS1, PAYLOAD)]
    st = conn.statistics()
    assert (st.fast_retransmits, st.sack_retransmits, st.rto_timeouts) == (1, 0, 0)


def test_limited_transmit_without_sack_counts_duplicate_acks() -> None:
    conn, app = established(sack=False)
    conn.send(bytes(20 * PAYLOAD))
    assert len(app.absorb(conn.segments_to_send(0.02))) == 10
    sent = []
    for _ in range(2):
        conn.segment_received(*app.seg(ack=ISS1), 0.03)
        sent.append([x.seq for x in app.absorb(conn.segments_to_send(0.03))])
    assert sent == [[s(ISS1 + 10 * PAYLOAD)], [s(ISS1 + 11 * PAYLOAD)]]
    # cwnd stayed at ten packets and no recovery began: the ACK of one
    # packet grows it to eleven (slow start), just what is in flight.
    conn.segment_received(*app.seg(ack=s(ISS1 + PAYLOAD)), 0.04)
    assert app.absorb(conn.segments_to_send(0.04)) == []
    conn.segment_received(*app.seg(ack=s(ISS1 + 2 * PAYLOAD)), 0.04)
    assert [x.seq for x in app.absorb(conn.segments_to_send(0.04))] == [
        s(ISS1 + 12 * PAYLOAD),
        s(ISS1 + 13 * PAYLOAD),
    ]


def test_limited_transmit_waits_for_the_peers_window_and_for_data() -> None:
    conn, app = established()
    conn.send(bytes(10 * PAYLOAD))
    assert len(app.absorb(conn.segments_to_send(0.02))) == 10
    # Nothing unsent: a duplicate ACK sends nothing.
    conn.segment_received(*app.seg(ack=ISS1, sack=_sack_of(1, 2)), 0.03)
    assert app.absorb(conn.segments_to_send(0.03)) == []
    # New data, but the peer's window ends at what is in flight.
    conn.send(bytes(PAYLOAD))
    window = (10 * PAYLOAD) >> 7  # the app's window scale is 7
    conn.segment_received(*app.seg(ack=ISS1, sack=_sack_of(1, 3), window=window), 0.03)
    assert app.absorb(conn.segments_to_send(0.03)) == []


def test_an_ack_older_than_the_largest_window_draws_a_challenge_ack() -> None:
    # RFC 5961 section 5.2: below SND.UNA - MAX.SND.WND it cannot be real.
    conn, app = established(wscale=None, window=1000)
    for i in range(2):
        conn.send(bytes(PAYLOAD))
        app.absorb(conn.segments_to_send(0.02 + i / 100))
        conn.segment_received(*app.seg(ack=s(ISS1 + (i + 1) * PAYLOAD)), 0.025 + i / 100)
    conn.segment_received(*app.seg(ack=s(ISS1 - 1000)), 0.05)
    [challenge] = app.absorb(conn.segments_to_send(0.05))
    assert (challenge.seq, challenge.flags, challenge.payload) == (
        s(ISS1 + 2 * PAYLOAD),
        ACK,
        b"",
    )
    assert conn.statistics().challenge_acks == 1


def test_after_a_timeout_go_back_n_skips_every_sacked_range() -> None:
    conn, app = established()
    conn.send(bytes(10 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))
    conn.segment_received(*app.seg(ack=ISS1, sack=_sack_of(2, 3)), 0.03)
    conn.segment_received(*app.seg(ack=ISS1, sack=_sack_of(5, 6) + _sack_of(2, 3)), 0.03)
    assert app.absorb(conn.segments_to_send(0.03)) == []
    conn.handle_timeout(0.22)  # the RTO (and RACK's timer, which it cancels)

    def resent(now: float) -> list[int]:
        return [s(x.seq - ISS1) // PAYLOAD for x in app.absorb(conn.segments_to_send(now))]

    assert resent(0.22) == [0]
    conn.segment_received(
        *app.seg(ack=s(ISS1 + PAYLOAD), sack=_sack_of(5, 6) + _sack_of(2, 3)), 0.23
    )
    assert resent(0.23) == [1, 3]
    conn.segment_received(*app.seg(ack=s(ISS1 + 3 * PAYLOAD), sack=_sack_of(5, 6)), 0.24)
    assert resent(0.24) == [4, 6, 7]
    assert conn.statistics().rto_timeouts == 1


def test_without_timestamps_data_round_trips_are_timed_too() -> None:
    # Karn's algorithm: with no timestamp option, a first transmission's
    # ACK is the RTT sample. A path that turns slow (10 ms at the
    # handshake, 500 ms now) must not see probes and timeouts fire early.
    conn, app = established(TcpConfig(mss=1000, rcv_buf=100_000, timestamps=False))
    conn.send(b"a" * 100)
    app.absorb(conn.segments_to_send(0.02))
    conn.segment_received(*app.seg(ack=s(ISS1 + 100)), 0.52)
    conn.send(b"b" * 100)
    app.absorb(conn.segments_to_send(0.6))
    srtt = 0.875 * 0.01 + 0.125 * 0.5  # RFC 6298 with the 0.5 s sample
    # The tail loss probe for a lone packet: 2 * SRTT + 2 ms + 200 ms.
    assert conn.next_deadline() == pytest.approx(0.6 + 2 * srtt + 0.202)
