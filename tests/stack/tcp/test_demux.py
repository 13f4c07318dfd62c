"""The demux: connection requests, accept/refuse, RSTs for unknown flows, caps, timers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.errors import LocalProtocolError
from stack.tcp import ConnectionRequest, FlowKey, TcpConfig, TcpConnection, TcpDemux, TcpState
from stack.wire.tcp import TcpHeader, TcpOptions

from .helpers import ACK, APP_ISN, FIN, KEY, KEY6, RST, SRV_ISS, SYN, App, s


def key(port: int) -> FlowKey:
    return KEY._replace(app_port=port)


def test_new_syn_becomes_a_request_and_accept_queues_the_synack() -> None:
    demux = TcpDemux(TcpConfig())
    app = App()
    syn = app.syn()
    assert demux.segment_received(KEY, syn, b"", 0.0) == ConnectionRequest(KEY, syn)
    assert demux.segment_received(KEY, syn, b"", 0.5) is None  # retransmitted: still pending
    assert demux.statistics().pending == 1 and demux.segments_to_send(0.5) == []
    conn = demux.accept(KEY, SRV_ISS, 0.6)
    assert demux.connections[KEY] is conn and conn.state is TcpState.SYN_RECEIVED
    [(k, hdr, payload)] = demux.segments_to_send(0.6)
    assert (k, hdr.flags, hdr.seq, hdr.ack) == (KEY, SYN | ACK, SRV_ISS, s(APP_ISN + 1))
    app.absorb([(hdr, payload)])
    assert demux.segment_received(KEY, *app.seg(ACK, b"hi"), 0.7) is conn
    assert conn.state is TcpState.ESTABLISHED
    with pytest.raises(LocalProtocolError):
        demux.accept(KEY, SRV_ISS, 0.8)


def test_refuse_answers_rst_ack_and_forget_pending_answers_nothing() -> None:
    demux = TcpDemux(TcpConfig())
    syn = App().syn()
    demux.segment_received(KEY, syn, b"", 0.0)
    demux.refuse(KEY, 0.1)
    [(_k, hdr, _)] = demux.segments_to_send(0.1)
    assert (hdr.flags, hdr.seq, hdr.ack, hdr.src_port, hdr.dst_port) == (
        RST | ACK,
        0,
        s(APP_ISN + 1),
        443,
        40000,
    )
    demux.segment_received(key(1), syn, b"", 0.0)
    demux.forget_pending(key(1))
    assert demux.segments_to_send(0.2) == [] and demux.statistics().pending == 0
    with pytest.raises(LocalProtocolError):
        demux.refuse(key(1), 0.3)


def test_unknown_flows_get_rst_by_the_rfc_rules_but_never_for_rst() -> None:
    demux = TcpDemux(TcpConfig())
    with_ack = TcpHeader(40000, 443, 100, 777, ACK, 1000)
    without_ack = TcpHeader(40000, 443, 100, 0, FIN, 1000)
    assert demux.segment_received(KEY, with_ack, b"abc", 0.0) is None
    demux.segment_received(KEY, without_ack, b"abc", 0.0)
    demux.segment_received(KEY, TcpHeader(40000, 443, 100, 0, RST | ACK, 0), b"", 0.0)
    got = [(h.seq, h.ack, h.flags) for _, h, _ in demux.segments_to_send(0.0)]
    assert got == [(777, 0, RST), (0, 104, RST | ACK)]
    assert demux.statistics().resets_sent == 2


def test_half_open_cap_drops_and_connection_cap_refuses() -> None:
    demux = TcpDemux(TcpConfig(max_half_open=2, max_connections=3))
    apps = {port: App() for port in (1, 2)}
    for port, one in apps.items():
        assert isinstance(demux.segment_received(key(port), one.syn(), b"", 0.0), ConnectionRequest)
    assert demux.segment_received(key(3), App().syn(), b"", 0.0) is None
    assert demux.segments_to_send(0.0) == []  # dropped silently
    conn = demux.accept(key(1), SRV_ISS, 0.0)
    demux.segment_received(key(3), App().syn(), b"", 0.0)  # still 2 half-open
    assert demux.statistics().syn_dropped_half_open == 2
    app = apps[1]
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.0)])
    demux.segment_received(key(1), *app.seg(), 0.01)
    assert conn.state is TcpState.ESTABLISHED
    assert isinstance(demux.segment_received(key(3), App().syn(), b"", 0.02), ConnectionRequest)
    # Three flows now (one live, two pending): the fourth is refused with RST.
    assert demux.segment_received(key(4), App().syn(), b"", 0.03) is None
    [(k, hdr, _)] = demux.segments_to_send(0.03)
    assert k == key(4) and hdr.flags == RST | ACK
    st = demux.statistics()
    assert (st.connections, st.pending, st.half_open, st.syn_refused_max_connections) == (
        1,
        2,
        2,
        1,
    )


def test_timers_run_through_the_heap_and_closed_connections_leave() -> None:
    demux = TcpDemux(TcpConfig(time_wait=1.0))
    conns: dict[FlowKey, tuple[TcpConnection, App]] = {}
    for port in range(10):
        app = App()
        demux.segment_received(key(port), app.syn(), b"", 0.0)
        conns[key(port)] = (demux.accept(key(port), SRV_ISS, 0.0), app)
    for k, h, p in demux.segments_to_send(0.0):
        conns[k][1].absorb([(h, p)])
    assert demux.next_deadline() == pytest.approx(1.0)  # SYN-ACK retransmission
    for k, (conn, app) in conns.items():
        demux.segment_received(k, *app.seg(ACK | FIN), 0.01)
        conn.close()
    out = demux.segments_to_send(0.01)
    assert {h.flags for _, h, _ in out} == {ACK | FIN}
    for k, h, p in out:
        app = conns[k][1]
        app.absorb([(h, p)])
        demux.segment_received(k, *app.seg(), 0.02)
    demux.segments_to_send(0.02)
    assert all(c.state is TcpState.CLOSED for c, _ in conns.values())
    assert len(demux.connections) == 0 and demux.next_deadline() is None


def test_time_wait_ends_on_its_deadline_and_a_new_syn_reuses_the_flow() -> None:
    demux = TcpDemux(TcpConfig(time_wait=1.0))
    app = App()
    demux.segment_received(KEY, app.syn(), b"", 0.0)
    conn = demux.accept(KEY, SRV_ISS, 0.0)
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.0)])
    demux.segment_received(KEY, *app.seg(), 0.01)
    conn.close()
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.01)])
    demux.segment_received(KEY, *app.seg(ACK | FIN), 0.02)
    demux.segments_to_send(0.02)
    assert conn.state is TcpState.TIME_WAIT
    # The FIN's RTO deadline is stale but still in the heap: an early wake-up.
    assert demux.next_deadline() == pytest.approx(0.21)
    demux.handle_timeout(0.5)
    assert demux.segments_to_send(0.5) == [] and conn.state is TcpState.TIME_WAIT
    assert demux.next_deadline() == pytest.approx(1.02)
    demux.handle_timeout(1.02)
    demux.segments_to_send(1.02)
    assert conn.state is TcpState.CLOSED and KEY not in demux.connections
    # Again, but a new SYN arrives during TIME-WAIT.
    demux2 = TcpDemux(TcpConfig())
    demux2.segment_received(KEY, App().syn(), b"", 0.0)
    old = demux2.accept(KEY, SRV_ISS, 0.0)
    old.abort()
    demux2.segments_to_send(0.0)
    assert KEY not in demux2.connections


def test_stale_heap_entries_are_skipped_and_compacted() -> None:
    demux = TcpDemux(TcpConfig())
    app = App()
    demux.segment_received(KEY, app.syn(), b"", 0.0)
    conn = demux.accept(KEY, SRV_ISS, 0.0)
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.0)])
    demux.segment_received(KEY, *app.seg(), 0.01)
    for i in range(200):
        conn.send(b"x")
        demux.segments_to_send(0.02 + i * 0.001)
        demux.segment_received(KEY, *app.seg(ack=s(SRV_ISS + 2 + i)), 0.02 + i * 0.001)
    demux.segments_to_send(0.3)
    deadline = demux.next_deadline()
    assert deadline is not None
    demux.handle_timeout(deadline)
    assert demux.statistics().deadline_entries <= 2 * len(demux.connections) + 64


def _establish(demux: TcpDemux, k: FlowKey, app: App, now: float) -> TcpConnection:
    demux.segment_received(k, app.syn(), b"", now)
    conn = demux.accept(k, SRV_ISS, now)
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(now)])
    assert demux.segment_received(k, *app.seg(), now) is conn
    assert conn.state is TcpState.ESTABLISHED
    return conn


def test_a_new_syn_during_time_wait_ends_it_and_becomes_a_request() -> None:
    demux = TcpDemux(TcpConfig(time_wait=60.0))
    app = App()
    old = _establish(demux, KEY, app, 0.0)
    old.close()
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.01)])
    demux.segment_received(KEY, *app.seg(ACK | FIN), 0.02)
    demux.segments_to_send(0.02)
    assert old.state is TcpState.TIME_WAIT and demux.connections[KEY] is old
    again = App(isn=s(APP_ISN + 100_000))
    syn = again.syn()
    assert demux.segment_received(KEY, syn, b"", 0.5) == ConnectionRequest(KEY, syn)
    assert KEY not in demux.connections
    new = demux.accept(KEY, SRV_ISS + 5000, 0.5)
    # The old incarnation's stream lets go only now: the demux, which no
    # longer lists it, must not collect it (and so drop the new one).
    old.abort()
    [(_k, hdr, _)] = demux.segments_to_send(0.5)
    assert (hdr.flags, hdr.ack) == (SYN | ACK, s(APP_ISN + 100_001))
    assert demux.connections[KEY] is new and new.state is TcpState.SYN_RECEIVED


def _time_wait(demux: TcpDemux, app: App) -> TcpConnection:
    """A flow of `app` closed by us first, in TIME-WAIT since t = 0.02."""
    conn = _establish(demux, KEY, app, 0.0)
    conn.close()
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.01)])
    demux.segment_received(KEY, *app.seg(ACK | FIN), 0.02)
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.02)])
    assert conn.state is TcpState.TIME_WAIT and demux.connections[KEY] is conn
    return conn


# RFC 6191 (with timestamps) and RFC 1122 4.2.2.13 (without): a SYN reopens a
# flow in TIME-WAIT only when it is newer than the old incarnation. The old
# one's last segment (its FIN, at APP_ISN + 1) had TSval 1000.
OLD_END = s(APP_ISN + 2)  # RCV.NXT of the old incarnation


@pytest.mark.parametrize(
    ("ts", "isn", "tsval"),
    [
        (True, s(APP_ISN - 100_000), 900),  # lower ISN, older timestamp
        (True, s(OLD_END + 100_000), 900),  # an older timestamp decides alone
        (True, s(APP_ISN - 100_000), 1000),  # same timestamp, lower ISN
        (False, s(APP_ISN - 100_000), None),  # no timestamps: lower ISN
        (False, OLD_END, None),  # no timestamps: the old end itself
    ],
    ids=["old-isn-old-ts", "new-isn-old-ts", "old-isn-same-ts", "no-ts-old-isn", "no-ts-same-isn"],
)
def test_an_old_syn_in_time_wait_is_answered_with_an_ack_and_reopens_nothing(
    ts: bool, isn: int, tsval: int | None
) -> None:
    demux = TcpDemux(TcpConfig(time_wait=60.0))
    app = App(ts=ts)
    old = _time_wait(demux, app)
    again = App(isn=isn, ts=ts)
    again.tsval = tsval
    assert demux.segment_received(KEY, again.syn(), b"", 0.5) is old
    assert demux.connections[KEY] is old and old.state is TcpState.TIME_WAIT
    assert demux.statistics().pending == 0
    [(_k, hdr, _)] = demux.segments_to_send(0.5)
    assert (hdr.flags, hdr.seq, hdr.ack) == (ACK, s(SRV_ISS + 2), OLD_END)
    if ts:
        assert hdr.options.timestamp is not None and hdr.options.timestamp[1] == 1000
    # As Linux: only a SYN refused by PAWS restarts TIME-WAIT.
    restarted = tsval is not None and tsval < 1000
    assert old.next_deadline() == pytest.approx(60.5 if restarted else 60.02)


@pytest.mark.parametrize(
    ("ts", "isn", "tsval"),
    [
        (True, s(APP_ISN - 100_000), 1001),  # a newer timestamp decides alone
        (True, s(OLD_END + 1), 1000),  # same timestamp, higher ISN
        (False, s(OLD_END + 1), None),  # no timestamps: past the old end
    ],
    ids=["old-isn-new-ts", "new-isn-same-ts", "no-ts-new-isn"],
)
def test_a_newer_syn_in_time_wait_replaces_the_old_incarnation(
    ts: bool, isn: int, tsval: int | None
) -> None:
    demux = TcpDemux(TcpConfig(time_wait=60.0))
    app = App(ts=ts)
    _time_wait(demux, app)
    again = App(isn=isn, ts=ts)
    again.tsval = tsval
    syn = again.syn()
    assert demux.segment_received(KEY, syn, b"", 0.5) == ConnectionRequest(KEY, syn)
    assert KEY not in demux.connections and demux.segments_to_send(0.5) == []


def test_a_syn_for_a_live_flow_is_the_connections_however_new() -> None:
    demux = TcpDemux(TcpConfig())
    app = App()
    conn = _establish(demux, KEY, app, 0.0)
    again = App(isn=s(APP_ISN + 100_000))
    again.tsval = 5000
    assert demux.segment_received(KEY, again.syn(), b"", 0.5) is conn
    assert conn.state is TcpState.ESTABLISHED and demux.statistics().pending == 0


def test_a_syn_with_a_timestamp_after_an_incarnation_without_is_judged_by_its_isn() -> None:
    demux = TcpDemux(TcpConfig(time_wait=60.0))
    old = _time_wait(demux, App(ts=False))
    syn = App(isn=s(APP_ISN - 100_000)).syn()  # a timestamp, but nothing to compare it with
    assert demux.segment_received(KEY, syn, b"", 0.5) is old
    assert [h.flags for _, h, _ in demux.segments_to_send(0.5)] == [ACK]
    syn = App(isn=s(OLD_END + 1)).syn()
    assert demux.segment_received(KEY, syn, b"", 0.6) == ConnectionRequest(KEY, syn)


def test_a_non_syn_segment_for_a_pending_request_is_ignored_without_rst() -> None:
    demux = TcpDemux(TcpConfig())
    app = App()
    syn = app.syn()
    demux.segment_received(KEY, syn, b"", 0.0)
    assert demux.segment_received(KEY, *app.seg(ACK, b"early"), 0.1) is None
    assert demux.segments_to_send(0.1) == [] and demux.statistics().resets_sent == 0
    demux.accept(KEY, SRV_ISS, 0.2)
    [(_k, hdr, _)] = demux.segments_to_send(0.2)
    assert (hdr.flags, hdr.ack) == (SYN | ACK, s(APP_ISN + 1))  # from the kept SYN


def test_next_deadline_sees_changes_not_yet_collected() -> None:
    demux = TcpDemux(TcpConfig(syn_received_timeout=30.0))
    demux.segment_received(KEY, App().syn(), b"", 0.0)
    demux.accept(KEY, SRV_ISS, 0.0)
    demux.segment_received(key(1), App().syn(), b"", 0.0)
    demux.accept(key(1), SRV_ISS, 0.0).abort()
    # Before any output: the live one's handshake limit; the aborted one is skipped.
    assert demux.next_deadline() == pytest.approx(30.0)
    demux.segments_to_send(0.0)
    assert demux.next_deadline() == pytest.approx(1.0)  # SYN-ACK retransmission
    assert list(demux.connections) == [KEY]


def test_a_connection_without_deadlines_leaves_the_heap() -> None:
    demux = TcpDemux(TcpConfig(idle_timeout=None))
    conn = _establish(demux, KEY, App(), 0.0)
    demux.segments_to_send(0.0)
    assert conn.next_deadline() is None and demux.next_deadline() is None
    assert demux.handle_timeout(1e6) == [] and conn.state is TcpState.ESTABLISHED


def test_rsts_for_unknown_flows_are_capped_until_collected() -> None:
    demux = TcpDemux(TcpConfig())
    stray = TcpHeader(40000, 443, 100, 777, ACK, 1000)
    for _ in range(5000):
        assert demux.segment_received(KEY, stray, b"", 0.0) is None
    out = demux.segments_to_send(0.0)
    assert len(out) == 4096 == demux.statistics().resets_sent
    assert {(h.flags, h.seq) for _, h, _ in out} == {(RST, 777)}
    demux.segment_received(KEY, stray, b"", 0.1)
    assert len(demux.segments_to_send(0.1)) == 1


def test_entries_of_closed_connections_are_compacted_away() -> None:
    demux = TcpDemux(TcpConfig())
    conns = []
    for port in range(80):
        demux.segment_received(key(port), App().syn(), b"", 0.0)
        conns.append(demux.accept(key(port), SRV_ISS, 0.0))
    demux.segments_to_send(0.0)
    for conn in conns[1:]:
        conn.abort()
    assert len(demux.segments_to_send(0.0)) == 79  # one RST each
    assert demux.handle_timeout(0.5) == []
    # Documented bound (docs/tcp.md): at most 2 x connections + 64 entries.
    assert demux.statistics().deadline_entries <= 2 * len(demux.connections) + 64
    assert demux.next_deadline() == pytest.approx(1.0)
    assert demux.handle_timeout(1.0) == [conns[0]]


def test_acks_received_routes_a_run_as_segment_received_would() -> None:
    # A live connection takes the run itself.
    demux = TcpDemux(TcpConfig(time_wait=1.0))
    app = App()
    conn = _establish(demux, KEY, app, 0.0)
    conn.send(bytes(3000))
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.0)])
    hdrs = [app.seg(ack=s(SRV_ISS + 1 + end))[0] for end in (1000, 2000, 3000)]
    assert demux.acks_received(KEY, hdrs, 0.01) is conn
    assert conn.statistics().acks_coalesced == 2
    # In TIME-WAIT, one by one (a SYN there would replace the connection).
    conn.close()
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.01)])
    demux.segment_received(KEY, *app.seg(ACK | FIN), 0.02)
    demux.segments_to_send(0.02)
    assert conn.state is TcpState.TIME_WAIT
    assert demux.acks_received(KEY, [app.seg()[0], app.seg()[0]], 0.03) is conn
    assert conn.statistics().acks_coalesced == 2
    # Unknown flows: an RST for each.
    other = key(5555)
    ack = TcpHeader(5555, 443, 1, 2, ACK, 100)
    assert demux.acks_received(other, [ack, ack._replace(ack=3)], 0.03) is None
    rsts = [(k, h.seq) for k, h, _ in demux.segments_to_send(0.03) if h.flags & RST]
    assert rsts == [(other, 2), (other, 3)]


def flow(dst: int, src: int = 1, port: int = 40000) -> FlowKey:
    """A flow from application address 10.0.0.`src` to 10.1.0.`dst`:443."""
    return FlowKey(bytes([10, 0, 0, src]), port, bytes([10, 1, 0, dst]), 443)


def requested(demux: TcpDemux, key: FlowKey) -> bool:
    return isinstance(demux.segment_received(key, App().syn(), b"", 0.0), ConnectionRequest)


def test_pending_syns_are_capped_per_destination_and_per_source() -> None:
    config = TcpConfig(max_half_open=100, max_pending_per_destination=2, max_pending_per_source=3)
    demux = TcpDemux(config)
    # Two pending to one destination; a third is dropped, another is not.
    assert [requested(demux, flow(1, port=p)) for p in (1, 2, 3)] == [True, True, False]
    assert requested(demux, flow(2, port=4))
    # The source now has three pending: its next SYN anywhere is dropped,
    # another source's is not.
    assert not requested(demux, flow(3, port=5))
    assert requested(demux, flow(3, src=2, port=5))
    st = demux.statistics()
    assert (st.pending, st.syn_dropped_per_destination, st.syn_dropped_per_source) == (4, 1, 1)
    assert demux.segments_to_send(0.0) == []  # dropped silently, like a full backlog
    # Answered or forgotten SYNs free their destination's and source's room.
    demux.accept(flow(1, port=1), SRV_ISS, 0.0)
    demux.forget_pending(flow(1, port=2))
    demux.forget_pending(flow(1, port=2))  # unknown by now: nothing happens
    assert requested(demux, flow(1, port=3)) and requested(demux, flow(1, port=6))
    assert demux.take_evicted() == []


def test_a_full_table_evicts_the_oldest_syn_of_the_most_represented_destination() -> None:
    config = TcpConfig(max_half_open=4, max_pending_per_destination=3, max_pending_per_source=4)
    demux = TcpDemux(config)
    flooded = [flow(1, src=s) for s in (1, 2, 3)]
    assert all(requested(demux, k) for k in flooded)
    assert requested(demux, flow(2, src=4))  # the table is full
    # A SYN to a destination with nothing pending takes the flood's oldest slot.
    assert requested(demux, flow(3, src=5))
    assert demux.take_evicted() == [flooded[0]]
    assert demux.take_evicted() == []
    assert not demux.is_pending(flooded[0]) and demux.is_pending(flooded[1])
    st = demux.statistics()
    assert (st.pending, st.syn_evicted, st.syn_dropped_half_open) == (4, 1, 0)
    # The evicted SYN is no longer pending: the runtime can neither accept nor refuse it.
    with pytest.raises(LocalProtocolError):
        demux.accept(flooded[0], SRV_ISS, 0.0)
    # Destinations 1 (two left), 2 and 3 (one each): one fewer is not enough
    # to evict, so a fourth destination's SYN evicts destination 1's next oldest,
    # then nobody is ahead by two and new SYNs are dropped.
    assert requested(demux, flow(4, src=6))
    assert demux.take_evicted() == [flooded[1]]
    assert not requested(demux, flow(5, src=7))
    assert demux.statistics().syn_dropped_half_open == 1


def test_a_full_table_evicts_by_source_when_destinations_are_even() -> None:
    config = TcpConfig(max_half_open=3, max_pending_per_destination=3, max_pending_per_source=3)
    demux = TcpDemux(config)
    # One source, three destinations: no destination is ahead.
    flood = [flow(d, src=1) for d in (1, 2, 3)]
    assert all(requested(demux, k) for k in flood)
    assert requested(demux, flow(4, src=2))
    assert demux.take_evicted() == [flood[0]]
    # The same source gains nothing by evicting its own SYNs.
    assert not requested(demux, flow(5, src=1))


def test_a_table_full_of_handshakes_has_nothing_to_evict() -> None:
    demux = TcpDemux(TcpConfig(max_half_open=2))
    for port in (1, 2):
        requested(demux, flow(1, port=port))
        demux.accept(flow(1, port=port), SRV_ISS, 0.0)
    assert not requested(demux, flow(2, src=2))
    assert demux.statistics().syn_dropped_half_open == 1
    assert demux.take_evicted() == []


def test_has_output_says_whether_anything_is_due_or_a_deadline_may_have_moved() -> None:
    demux = TcpDemux(TcpConfig())
    app = App()
    assert not demux.has_output()
    demux.segment_received(KEY, app.syn(), b"", 0.0)
    assert not demux.has_output()  # a pending SYN waits for accept, silently
    conn = demux.accept(KEY, SRV_ISS, 0.0)
    assert demux.has_output()
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.0)])
    assert not demux.has_output()
    demux.segment_received(KEY, *app.seg(), 0.1)
    assert demux.has_output()  # the handshake's end changes the connection's timers
    assert demux.segments_to_send(0.1) == []
    assert not demux.has_output()
    assert conn.send(b"data") == 4 and demux.has_output()
    assert [p for _, _, p in demux.segments_to_send(0.2)] == [b"data"]
    assert not demux.has_output()
    demux.segment_received(key(9), TcpHeader(40000, 443, 100, 777, ACK, 1000), b"", 0.3)
    assert demux.has_output()  # an RST for the unknown flow
    assert [h.flags for _, h, _ in demux.segments_to_send(0.3)] == [RST]
    assert not demux.has_output() and demux.segments_to_send(0.4) == []


SYN_OPTIONS = st.builds(
    TcpOptions,
    mss=st.sampled_from([None, 0, 536, 1220, 1460, 9000]),
    wscale=st.sampled_from([None, 0, 7, 14, 15]),
    sack_permitted=st.booleans(),
    timestamp=st.none() | st.just((1000, 0)),
)


@given(
    st.lists(st.tuples(SYN_OPTIONS, st.booleans()), min_size=1, max_size=8),
    st.sampled_from([TcpConfig(), TcpConfig(mss_ipv6=1200, sack=False, rcv_buf=1 << 16)]),
)
def test_connections_accepted_by_the_demux_act_as_ones_opened_alone(
    syns: list[tuple[TcpOptions, bool]], config: TcpConfig
) -> None:
    """The demux shares one negotiation among SYNs that offered the same
    options: each connection still answers and sends as one opened from
    its own SYN does (SYN-ACK, packet limit, segment sizes)."""
    demux = TcpDemux(config)
    for port, (options, ipv6) in enumerate(syns, 1000):
        k = (KEY6 if ipv6 else KEY)._replace(app_port=port)
        syn = TcpHeader(port, 443, APP_ISN, 0, SYN, 65535, options=options)
        assert isinstance(demux.segment_received(k, syn, b"", 0.0), ConnectionRequest)
        shared = demux.accept(k, SRV_ISS, 0.0)
        alone = TcpConnection(k, syn, SRV_ISS, 0.0, config)
        assert shared.packet_limit == alone.packet_limit
        ts = None if options.timestamp is None else (1001, (SRV_ISS + 0) & 0xFFFFFFFF)
        ack = TcpHeader(port, 443, s(APP_ISN + 1), s(SRV_ISS + 1), ACK, 65535)
        ack = ack._replace(options=TcpOptions(timestamp=ts))
        sent = []
        for conn in (shared, alone):
            synack = conn.segments_to_send(0.0)
            conn.segment_received(ack, b"", 0.001)
            conn.send(bytes(20000))
            sent.append((synack, conn.segments_to_send(0.001)))
        assert shared.state is TcpState.ESTABLISHED and len(sent[0][1]) > 1
        assert sent[0] == sent[1]


def test_syns_the_caps_dropped_are_refused_at_the_stop_unless_taken_up_since() -> None:
    """At the stack's stop, an application whose SYN a cap dropped would
    retry into a device that is gone and wait in connect() for its own
    time-out: `refuse_dropped` answers it RST (connection refused)."""
    config = TcpConfig(max_half_open=100, max_pending_per_destination=2, max_pending_per_source=100)
    demux = TcpDemux(config)
    assert [requested(demux, flow(1, port=p)) for p in (1, 2, 3, 4)] == [True, True, False, False]
    # Port 4's retry is taken up once room is made: its flow answers it.
    demux.forget_pending(flow(1, port=1))
    assert requested(demux, flow(1, port=4))
    assert demux.segments_to_send(0.0) == []  # dropped silently while running
    demux.refuse_dropped(10.0)
    rsts = demux.segments_to_send(10.0)
    assert [(k, h.flags, h.ack) for k, h, _ in rsts] == [
        (flow(1, port=3), RST | ACK, (APP_ISN + 1) & 0xFFFFFFFF)
    ]
    demux.refuse_dropped(10.0)  # the memory was emptied
    assert demux.segments_to_send(10.0) == []
    # A drop older than a client's SYN retries is left alone.
    assert not requested(demux, flow(1, port=5))
    demux.refuse_dropped(200.0)
    assert demux.segments_to_send(200.0) == []
