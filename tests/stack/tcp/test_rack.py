"""RACK (RFC 8985): losses judged by time, so the tail of a flight is not left to the RTO.

A packet is lost once a packet sent after it was delivered and an RTT
plus a quarter of the minimum RTT has passed since it was sent; until
then a reordering timer waits for it. The fixture's handshake measured
10 ms; these tests ACK after 5 or 10 ms.
"""

from __future__ import annotations

import pytest

from stack.tcp import TcpConfig

from .fixtures import PAYLOAD, established
from .helpers import SRV_ISS, App, s

ISS1 = s(SRV_ISS + 1)


def p(i: int) -> int:
    """The wire sequence number of our packet `i`."""
    return s(ISS1 + i * PAYLOAD)


def sent(conn: object, app: App, now: float) -> list[tuple[int, int]]:
    """Packets sent now, as (packet index, payload length)."""
    out = app.absorb(conn.segments_to_send(now))  # type: ignore[attr-defined]
    return [(s(x.seq - ISS1) // PAYLOAD, len(x.payload)) for x in out]


def test_a_loss_with_too_few_packets_after_it_is_resent_after_an_rtt_and_a_quarter() -> None:
    conn, app = established()
    conn.send(bytes(4 * PAYLOAD))
    assert sent(conn, app, 0.02) == [(i, PAYLOAD) for i in range(4)]
    # Packet 2 is lost; 0 and 1 are ACKed, 3 is SACKed: one packet after
    # the hole is not enough for DupThresh.
    conn.segment_received(*app.seg(ack=p(2), sack=((p(3), p(4)),)), 0.03)
    assert sent(conn, app, 0.03) == []
    # RTT 10 ms (packet 3's), min RTT 10 ms: packet 2 is lost at
    # 0.02 + 0.01 + 0.0025, well before the tail probe (0.042) and the RTO.
    assert conn.next_deadline() == pytest.approx(0.0325)
    conn.handle_timeout(0.0324)
    assert sent(conn, app, 0.0324) == []
    conn.handle_timeout(0.0325)
    assert sent(conn, app, 0.0325) == [(2, PAYLOAD)]
    st = conn.statistics()
    assert (st.rack_losses, st.fast_retransmits, st.tail_loss_probes, st.rto_timeouts) == (
        1,
        1,
        0,
        0,
    )
    # Recovery with PRR: ssthresh is half the flight (at least two
    # packets); nothing was in the pipe, so PRR allowed one packet, the
    # retransmission: more data must wait.
    conn.send(bytes(4 * PAYLOAD))
    assert sent(conn, app, 0.0325) == []
    conn.segment_received(*app.seg(ack=p(4)), 0.045)
    assert conn.next_deadline() == pytest.approx(0.045 + 100.0 * 72)
    # Recovery ended with cwnd = ssthresh: two packets.
    assert sent(conn, app, 0.045) == [(4, PAYLOAD), (5, PAYLOAD)]


def test_reordering_inside_the_window_is_no_loss() -> None:
    conn, app = established()
    conn.send(bytes(4 * PAYLOAD))
    sent(conn, app, 0.02)
    conn.segment_received(*app.seg(ack=p(2), sack=((p(3), p(4)),)), 0.03)
    assert conn.next_deadline() == pytest.approx(0.0325)
    # Packet 2 was only late: its ACK comes before the reordering timer.
    conn.segment_received(*app.seg(ack=p(4)), 0.032)
    assert sent(conn, app, 0.032) == []
    st = conn.statistics()
    assert (st.rack_losses, st.retransmits) == (0, 0)
    assert conn.next_deadline() == pytest.approx(0.032 + 100.0 * 72)


def test_lost_retransmissions_are_resent_when_packets_sent_after_them_arrive() -> None:
    conn, app = established()
    conn.send(bytes(30 * PAYLOAD))
    assert sent(conn, app, 0.02) == [(i, PAYLOAD) for i in range(10)]
    # Packets 0 and 5 are lost: the head and the hole go out again, then
    # new data as the halved cwnd allows.
    conn.segment_received(*app.seg(ack=ISS1, sack=((p(1), p(5)), (p(6), p(10)))), 0.025)
    assert [i for i, _ in sent(conn, app, 0.025)] == [0, 5, 10, 11, 12]
    # Both retransmissions are lost too; packet 10, sent after them, arrives.
    sack = ((p(10), p(11)), (p(6), p(10)), (p(1), p(5)))
    conn.segment_received(*app.seg(ack=ISS1, sack=sack), 0.03)
    assert [i for i, _ in sent(conn, app, 0.03)] == [13]
    # 0.025 + RTT 5 ms + 5 ms / 4: both are lost, and resent at once.
    assert conn.next_deadline() == pytest.approx(0.03125)
    conn.handle_timeout(0.03125)
    assert sent(conn, app, 0.03125) == [(0, PAYLOAD), (5, PAYLOAD)]
    st = conn.statistics()
    assert (st.rack_losses, st.fast_retransmits, st.sack_retransmits, st.rto_timeouts) == (
        2,
        2,
        2,
        0,
    )


def test_a_lost_retransmission_of_the_new_head_after_a_partial_ack_is_resent() -> None:
    conn, app = established()
    conn.send(bytes(30 * PAYLOAD))
    sent(conn, app, 0.02)
    conn.segment_received(*app.seg(ack=ISS1, sack=((p(1), p(5)), (p(6), p(10)))), 0.025)
    assert [i for i, _ in sent(conn, app, 0.025)] == [0, 5, 10, 11, 12]
    # The head's retransmission arrives, the hole's does not.
    conn.segment_received(*app.seg(ack=p(5), sack=((p(6), p(11)),)), 0.03)
    assert [i for i, _ in sent(conn, app, 0.03)] == [13, 14]
    assert conn.next_deadline() == pytest.approx(0.03125)
    conn.handle_timeout(0.03125)
    assert sent(conn, app, 0.03125) == [(5, PAYLOAD)]
    assert conn.statistics().rack_losses == 1


def test_a_retransmission_acked_sooner_than_the_min_rtt_counts_as_the_original() -> None:
    conn, app = established()
    conn.send(bytes(10 * PAYLOAD))
    sent(conn, app, 0.02)
    conn.segment_received(*app.seg(ack=ISS1, sack=((p(1), p(4)),)), 0.03)
    assert sent(conn, app, 0.03) == [(0, PAYLOAD)]  # DupThresh: fast retransmit
    # 1 ms later the head is ACKed: the original arrived late, the
    # retransmission cannot have (min RTT 10 ms), so RACK keeps the
    # original's send time. Taken as the retransmission's, it would make
    # packets 4 to 9 (sent before it, 11 ms ago) lost at once.
    conn.segment_received(*app.seg(ack=p(1), sack=((p(2), p(4)),)), 0.031)
    assert sent(conn, app, 0.031) == [(1, PAYLOAD)]  # the partial ACK's new head
    assert conn.statistics().rack_losses == 0


def test_a_timeout_forgets_what_rack_marked() -> None:
    conn, app = established()
    conn.send(bytes(10 * PAYLOAD))
    sent(conn, app, 0.02)
    conn.segment_received(*app.seg(ack=ISS1, sack=((p(1), p(4)),)), 0.03)
    assert sent(conn, app, 0.03) == [(0, PAYLOAD)]
    conn.handle_timeout(0.0325)  # the reordering timer: 1..3 were SACKed
    assert sent(conn, app, 0.0325) == []
    rto = 0.02 + 0.2  # armed by the first send; the minimum RTO
    conn.handle_timeout(rto)
    assert conn.statistics().rto_timeouts == 1
    # Go back N with one packet of cwnd; RACK's marks and its timer are
    # gone: the next deadline is the backed-off RTO.
    assert sent(conn, app, rto) == [(0, PAYLOAD)]
    assert conn.next_deadline() == pytest.approx(rto + 0.4)
    # The ACK of the head resends the rest as slow start allows, none of
    # it as a RACK loss.
    conn.segment_received(*app.seg(ack=p(1), sack=((p(1), p(4)),)), rto + 0.01)
    assert sent(conn, app, rto + 0.01) == [(4, PAYLOAD), (5, PAYLOAD)]
    assert conn.statistics().rack_losses == 0


def test_without_sack_there_is_no_reordering_timer() -> None:
    conn, app = established(sack=False)
    conn.send(bytes(4 * PAYLOAD))
    sent(conn, app, 0.02)
    conn.segment_received(*app.seg(ack=p(2)), 0.03)
    # Only the RTO (200 ms) is armed, no reordering timer.
    assert conn.next_deadline() == pytest.approx(0.23)


def test_the_lost_rest_of_a_gso_super_segment_is_resent_as_one() -> None:
    cfg = TcpConfig(mss=1460, gso_size=64000, rcv_buf=1 << 20, snd_buf=1 << 20)
    conn, app = established(cfg, mss=1460)

    def q(i: int) -> int:
        return s(ISS1 + i * 1448)

    def wire_packets(now: float) -> list[tuple[float, float]]:
        out = app.absorb(conn.segments_to_send(now))
        return [(s(x.seq - ISS1) / 1448, len(x.payload) / 1448) for x in out]

    conn.send(bytes(40_000))
    assert wire_packets(0.02) == [(0, 10)]  # the initial window, one super-segment
    conn.segment_received(*app.seg(ack=q(5)), 0.03)
    assert wire_packets(0.03) == [(10, 7)]  # slow start: 12 packets of cwnd
    # Packets 5 to 9 are lost, the second super-segment arrives: the hole
    # goes out again whole, then one new packet as PRR allows.
    conn.segment_received(*app.seg(ack=q(5), sack=((q(10), q(17)),)), 0.04)
    assert wire_packets(0.04) == [(5, 5), (17, 1)]
    st = conn.statistics()
    assert (st.fast_retransmits, st.retransmits, st.rto_timeouts) == (1, 1, 0)


def test_prr_sends_in_step_with_deliveries_and_leaves_recovery_at_ssthresh() -> None:
    conn, app = established()
    conn.send(bytes(30 * PAYLOAD))
    assert [i for i, _ in sent(conn, app, 0.02)] == list(range(10))
    # Packet 0 is lost; each later packet arrives and is SACKed alone.
    out = []
    for n in range(2, 11):
        conn.segment_received(*app.seg(ack=ISS1, sack=((p(1), p(n)),)), 0.03)
        out.append([i for i, _ in sent(conn, app, 0.03)])
    # Two limited transmits, the fast retransmit on the third duplicate
    # ACK; then the flight of 12 shrinks towards ssthresh = 6 packets: PRR
    # holds back while the pipe is above it (RFC 6675 would too), then
    # sends one packet per packet delivered.
    assert out == [[10], [11], [0], [], [], [], [12], [13], [14]]
    # Everything up to the recovery point arrives: cwnd = ssthresh
    # (RFC 6937; six packets, one of them in flight), not the flight plus
    # one packet (RFC 6582: two).
    conn.segment_received(*app.seg(ack=p(12), sack=((p(13), p(15)),)), 0.04)
    assert [i for i, _ in sent(conn, app, 0.04)] == [15, 16, 17, 18, 19]
