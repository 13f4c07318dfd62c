"""Tail loss probes (RFC 8985 section 7): a lost tail or lost ACKs cost RTTs, not an RTO.

When the last ACKs of a flight are lost, nothing arrives to clock the
sender and only the RTO (200 ms at least) would move it; on a LAN that is
hundreds of round trips. The probe resends the flight's last packet after
about two smoothed RTTs; when that probe or its ACK is lost too, a second
one follows after twice the wait, and only then the RTO. As RFC 8985
section 7.2 (and Linux) say, only on SACK connections and never in loss
recovery.
"""

from __future__ import annotations

import pytest

from stack.tcp import TcpConnection

from .fixtures import CFG, PAYLOAD, established
from .helpers import ACK, FIN, SRV_ISS, App, s

PSH = 0x08
ISS1 = s(SRV_ISS + 1)
SRTT = 0.01  # what the fixture's handshake measured
PTO = 2 * SRTT + 0.002


def test_probe_resends_the_last_packet_after_two_rtts_when_acks_are_lost() -> None:
    conn, app = established()
    data = bytes(range(256)) * 20
    conn.send(data[: 4 * PAYLOAD])
    app.absorb(conn.segments_to_send(0.02))
    assert conn.next_deadline() == pytest.approx(0.02 + PTO)
    conn.handle_timeout(0.02 + PTO)
    probe = app.absorb(conn.segments_to_send(0.02 + PTO))
    assert [(x.seq, len(x.payload), x.flags) for x in probe] == [
        (s(ISS1 + 3 * PAYLOAD), PAYLOAD, ACK | PSH)
    ]
    assert probe[0].payload == data[3 * PAYLOAD : 4 * PAYLOAD]
    stats = conn.statistics()
    assert (stats.tail_loss_probes, stats.retransmits, stats.rto_timeouts) == (1, 1, 0)
    # A second probe is armed, twice as far out.
    assert conn.next_deadline() == pytest.approx(0.02 + PTO + 2 * PTO)
    # The ACK the probe draws covers everything; no recovery, no timeout.
    conn.segment_received(*app.seg(ack=s(ISS1 + 4 * PAYLOAD)), 0.05)
    assert conn.segments_to_send(0.05) == []
    assert conn.statistics().rto_timeouts == 0
    assert conn.next_deadline() == pytest.approx(0.05 + 100.0 * 72)  # only the idle timer


def test_when_the_probe_is_lost_too_a_second_one_goes_before_the_rto() -> None:
    conn, app = established()
    data = bytes(range(256)) * 20
    conn.send(data[: 4 * PAYLOAD])
    app.absorb(conn.segments_to_send(0.02))
    first = 0.02 + PTO
    conn.handle_timeout(first)
    conn.segments_to_send(first)  # lost
    second = first + 2 * PTO
    assert conn.next_deadline() == pytest.approx(second)
    conn.handle_timeout(second)
    probe = app.absorb(conn.segments_to_send(second))
    assert [(x.seq, x.payload) for x in probe] == [
        (s(ISS1 + 3 * PAYLOAD), data[3 * PAYLOAD : 4 * PAYLOAD])
    ]
    # Two probes per flight: then only the RTO, armed at the first send.
    assert conn.next_deadline() == pytest.approx(0.02 + CFG.rto_min)
    conn.segment_received(*app.seg(ack=s(ISS1 + 4 * PAYLOAD)), second + SRTT)
    assert conn.segments_to_send(second + SRTT) == []
    stats = conn.statistics()
    assert (stats.tail_loss_probes, stats.rto_timeouts) == (2, 0)


def test_a_lone_packet_in_flight_waits_for_the_peers_delayed_ack_too() -> None:
    conn, app = established()
    conn.send(b"x" * 100)
    app.absorb(conn.segments_to_send(0.02))
    # 2 * SRTT + 2 ms + 200 ms exceeds the 200 ms RTO: no probe, the RTO.
    assert conn.next_deadline() == pytest.approx(0.02 + CFG.rto_min)


def test_forward_progress_rearms_the_probe_for_the_rest_of_the_flight() -> None:
    conn, app = established()
    data = bytes(range(256)) * 20
    conn.send(data[: 4 * PAYLOAD])
    app.absorb(conn.segments_to_send(0.02))
    conn.segment_received(*app.seg(ack=s(ISS1 + 2 * PAYLOAD)), 0.03)
    assert app.absorb(conn.segments_to_send(0.03)) == []
    assert conn.next_deadline() == pytest.approx(0.03 + PTO)


def test_a_fin_tail_is_probed_with_the_fin() -> None:
    conn, app = established()
    data = bytes(range(256)) * 20
    conn.send(data[: 3 * PAYLOAD])
    conn.close()
    app.absorb(conn.segments_to_send(0.02))
    conn.handle_timeout(0.02 + PTO)
    probe = app.absorb(conn.segments_to_send(0.02 + PTO))
    assert [(x.seq, x.flags, x.payload) for x in probe] == [
        (s(ISS1 + 2 * PAYLOAD), ACK | PSH | FIN, data[2 * PAYLOAD : 3 * PAYLOAD])
    ]
    assert conn.statistics().tail_loss_probes == 1


def test_a_fin_left_alone_in_flight_is_probed_alone() -> None:
    conn, app = established()
    conn.send(bytes(4 * PAYLOAD))
    conn.close()
    app.absorb(conn.segments_to_send(0.02))
    conn.handle_timeout(0.02 + PTO)
    # The data's ACK comes in just as the probe fell due: only the FIN is
    # left to probe.
    conn.segment_received(*app.seg(ack=s(ISS1 + 4 * PAYLOAD)), 0.02 + PTO)
    probe = app.absorb(conn.segments_to_send(0.02 + PTO))
    assert [(x.seq, x.flags, x.payload) for x in probe] == [(s(ISS1 + 4 * PAYLOAD), ACK | FIN, b"")]


def _quiet_until(conn: TcpConnection, app: App, until: float) -> list[tuple[float, int]]:
    """Run every deadline before `until`; return what went out, as (time, seq)."""
    sent = []
    while (deadline := conn.next_deadline()) is not None and deadline < until:
        conn.handle_timeout(deadline)
        sent += [(deadline, x.seq) for x in app.absorb(conn.segments_to_send(deadline))]
    return sent


def test_no_probe_in_recovery_a_lost_head_retransmission_waits_for_the_rto() -> None:
    """RFC 8985 section 7.2: no tail loss probe while in loss recovery (as Linux)."""
    conn, app = established()
    data = bytes(range(256)) * 40
    conn.send(data[: 6 * PAYLOAD])
    app.absorb(conn.segments_to_send(0.02))
    # The head is lost; three dupACKs SACK the packets behind it.
    for i in (2, 3, 4):
        sack = ((s(ISS1 + PAYLOAD), s(ISS1 + i * PAYLOAD)),)
        conn.segment_received(*app.seg(ack=ISS1, sack=sack), 0.025)
    first = app.absorb(conn.segments_to_send(0.025))
    assert (first[0].seq, len(first[0].payload)) == (ISS1, PAYLOAD)
    assert conn.statistics().fast_retransmits == 1
    # That retransmission is lost too and the flight goes quiet: the probe
    # armed with the flight was disarmed when recovery began, and nothing
    # goes out before the RTO (armed at the first send).
    rto = 0.02 + CFG.rto_min
    assert _quiet_until(conn, app, rto) == []
    assert conn.next_deadline() == pytest.approx(rto)
    conn.handle_timeout(rto)
    again = app.absorb(conn.segments_to_send(rto))
    assert [(x.seq, len(x.payload)) for x in again] == [(ISS1, PAYLOAD)]
    stats = conn.statistics()
    assert (stats.tail_loss_probes, stats.rto_timeouts) == (0, 1)


def test_a_probe_due_when_recovery_begins_is_not_sent() -> None:
    conn, app = established()
    conn.send(bytes(6 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))
    conn.handle_timeout(0.02 + PTO)  # the probe falls due...
    for i in (2, 3, 4):  # ...and SACKs start recovery before it leaves
        sack = ((s(ISS1 + PAYLOAD), s(ISS1 + i * PAYLOAD)),)
        conn.segment_received(*app.seg(ack=ISS1, sack=sack), 0.02 + PTO)
    out = app.absorb(conn.segments_to_send(0.02 + PTO))
    assert [(x.seq, len(x.payload)) for x in out] == [(ISS1, PAYLOAD)]
    assert conn.statistics().tail_loss_probes == 0


def test_without_sack_fast_recovery_resends_the_head_once_then_waits() -> None:
    """NewReno (RFC 6582): one retransmission on the third dupACK, then ACKs or the RTO."""
    conn, app = established(sack=False)
    conn.send(bytes(6 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))
    for _ in range(3):
        conn.segment_received(*app.seg(ack=ISS1), 0.025)
    resent = app.absorb(conn.segments_to_send(0.025))
    assert [(x.seq, len(x.payload)) for x in resent] == [(ISS1, PAYLOAD)]
    rto = 0.02 + CFG.rto_min
    assert _quiet_until(conn, app, rto) == []
    conn.handle_timeout(rto)
    assert [x.seq for x in app.absorb(conn.segments_to_send(rto))] == [ISS1]
    stats = conn.statistics()
    assert (stats.fast_retransmits, stats.tail_loss_probes, stats.rto_timeouts) == (1, 0, 1)


def test_without_sack_a_lost_tail_is_left_to_the_rto() -> None:
    """RFC 8985 section 7.2: a probe needs SACK to tell what it repaired (Linux too)."""
    conn, app = established(sack=False)
    conn.send(bytes(4 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))
    rto = 0.02 + CFG.rto_min
    assert conn.next_deadline() == pytest.approx(rto)
    conn.handle_timeout(rto)
    assert [x.seq for x in app.absorb(conn.segments_to_send(rto))] == [ISS1]
    assert conn.statistics().tail_loss_probes == 0


def test_a_head_retransmission_overtaken_by_later_packets_is_resent() -> None:
    conn, app = established()
    conn.send(bytes(30 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))  # ten packets (initial cwnd)

    def sack(packets: int, now: float) -> None:
        block = ((s(ISS1 + PAYLOAD), s(ISS1 + packets * PAYLOAD)),)
        conn.segment_received(*app.seg(ack=ISS1, sack=block), now)

    def sack_up_to(packets: int, now: float) -> list[int]:
        sack(packets, now)
        return [x.seq for x in app.absorb(conn.segments_to_send(now))]

    sack(2, 0.025)
    sack(3, 0.025)
    assert sack_up_to(4, 0.025) == [ISS1]  # fast retransmit of the head
    # Everything sent before that retransmission is SACKed: new data only.
    assert ISS1 not in sack_up_to(10, 0.026)
    assert conn.statistics().fast_retransmits == 1
    # Three packets sent after the retransmission arrive, the head does not:
    # the retransmission was lost, and the head goes out again at once.
    assert sack_up_to(13, 0.027)[0] == ISS1
    stats = conn.statistics()
    assert (stats.fast_retransmits, stats.tail_loss_probes, stats.rto_timeouts) == (2, 0, 0)


def test_no_probe_when_everything_was_acked_after_the_timer_fired() -> None:
    conn, app = established()
    conn.send(bytes(4 * PAYLOAD))
    app.absorb(conn.segments_to_send(0.02))
    conn.handle_timeout(0.02 + PTO)
    conn.segment_received(*app.seg(ack=s(ISS1 + 4 * PAYLOAD)), 0.02 + PTO)
    assert app.absorb(conn.segments_to_send(0.02 + PTO)) == []
    assert conn.statistics().tail_loss_probes == 0
