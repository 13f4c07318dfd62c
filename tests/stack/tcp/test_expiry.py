"""Timer expiry: persist give-up, SYN-ACK retransmission, connections with no timers."""

from __future__ import annotations

import attrs
import pytest

from stack.tcp import Closed, ConnectionReset, TcpConnection, TcpState

from .fixtures import CFG, established, observe
from .helpers import ACK, KEY, RST, SRV_ISS, SYN, App, s


def test_unanswered_zero_window_probes_give_up_with_a_reset() -> None:
    conn, app = established(attrs.evolve(CFG, max_retries=3))
    conn.segment_received(*app.seg(window=0), 0.02)
    assert conn.send(b"p" * 100) == 100
    assert app.absorb(conn.segments_to_send(0.02)) == []
    sent = []
    for _ in range(4):
        at = conn.next_deadline()
        assert at is not None
        conn.handle_timeout(at)
        sent += [(x.seq, x.flags) for x in app.absorb(conn.segments_to_send(at))]
    # Three probes at SND.UNA - 1, then the fourth expiry gives up.
    assert sent == [(s(SRV_ISS), ACK)] * 3 + [(s(SRV_ISS + 1), RST | ACK)]
    assert conn.statistics().window_probes == 3
    assert observe(conn, app, 5.0)[0::2] == (TcpState.CLOSED, [ConnectionReset(), Closed()])
    assert conn.next_deadline() is None


def test_syn_ack_retransmission_takes_no_rtt_sample_and_ends_the_backoff() -> None:
    app = App(ts=False)
    conn = TcpConnection(KEY, app.syn(), SRV_ISS, 0.0, CFG)
    [first] = app.absorb(conn.segments_to_send(0.0))
    assert conn.next_deadline() == CFG.rto_initial
    conn.handle_timeout(CFG.rto_initial)
    [again] = app.absorb(conn.segments_to_send(CFG.rto_initial))
    assert again == first and again.flags == SYN | ACK
    assert conn.statistics().retransmits == 1
    # The SYN-ACK timer is backed off to 2 s; the ACK arrives at 2.5 s.
    assert conn.next_deadline() == pytest.approx(3 * CFG.rto_initial)
    conn.segment_received(*app.seg(), 2.5)
    assert conn.state is TcpState.ESTABLISHED
    conn.send(b"d")
    [data] = app.absorb(conn.segments_to_send(2.5))
    assert data.payload == b"d"
    # Karn: the ambiguous handshake gave no sample, and the backoff is over,
    # so the data's RTO is the initial one, not doubled and not 2.5 s based.
    assert conn.next_deadline() == pytest.approx(2.5 + CFG.rto_initial)


def test_without_idle_timeout_or_keepalive_an_idle_connection_has_no_deadline() -> None:
    cfg = attrs.evolve(CFG, idle_timeout=None, keepalive_time=None)
    conn, app = established(cfg)
    conn.segment_received(*app.seg(ACK, b"hi"), 0.02)
    conn.handle_timeout(0.02 + cfg.delayed_ack)
    [ack] = app.absorb(conn.segments_to_send(0.02 + cfg.delayed_ack))
    assert ack.flags == ACK and ack.ack == app.nxt
    assert conn.next_deadline() is None
    conn.handle_timeout(1e6)
    assert observe(conn, app, 1e6)[:2] == (TcpState.ESTABLISHED, [])
    # The default keeps an idle limit.
    conn2, app2 = established()
    conn2.segment_received(*app2.seg(ACK, b"hi"), 0.02)
    assert conn2.next_deadline() == pytest.approx(0.02 + CFG.delayed_ack)
    conn2.handle_timeout(0.02 + CFG.delayed_ack)
    conn2.segments_to_send(0.02 + CFG.delayed_ack)
    assert conn2.next_deadline() == pytest.approx(0.02 + CFG.idle_timeout)  # type: ignore[operator]
