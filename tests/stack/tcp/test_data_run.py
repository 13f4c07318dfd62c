"""A batch's data segments taken together (`data_received_run`) leave the state one by one would.

Two identical connections get the same segments from the application, one
one by one (`segment_received`), the other as a run; their whole
observable state must then agree (state, the segments sent, events,
statistics, deadline, send space), now and once the delayed ACK is due.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stack.tcp import FlowKey, TcpConfig, TcpConnection, TcpDemux, TcpState
from stack.wire.tcp import PSH, TcpHeader, TcpOptions

from .fixtures import CFG, PAYLOAD, established, observe
from .helpers import ACK, FIN, KEY, RST, SRV_ISS, App, s

Run = list[tuple[TcpHeader, bytes]]


def twins(
    cfg: TcpConfig = CFG, in_flight: int = 0, **app_kw: object
) -> list[tuple[TcpConnection, App]]:
    """Two identical established connections, `in_flight` octets sent by each."""
    out = []
    for _ in range(2):
        conn, app = established(cfg, **app_kw)
        if in_flight:
            conn.send(bytes(in_flight))
            app.absorb(conn.segments_to_send(0.01))
        out.append((conn, app))
    return out


def state(conn: TcpConnection, app: App, now: float) -> tuple[object, ...]:
    return observe(conn, app, now), conn.statistics(), conn.next_deadline(), conn.send_space()


def feed_both(pair: list[tuple[TcpConnection, App]], run: Run, now: float) -> None:
    (one, _), (batch, _) = pair
    for hdr, payload in run:
        one.segment_received(hdr, payload, now)
    batch.data_received_run(run, now)


def same(pair: list[tuple[TcpConnection, App]], now: float) -> tuple[object, ...]:
    """Assert both agree now and when the delayed ACK is due; return the first."""
    (one, app1), (batch, app2) = pair
    first = state(one, app1, now)
    assert first == state(batch, app2, now)
    later = now + 1.0
    assert state(one, app1, later) == state(batch, app2, later)
    # What we send next depends on the window the segments left us.
    if one.state is TcpState.ESTABLISHED:
        one.send(bytes(20_000))
        batch.send(bytes(20_000))
        assert state(one, app1, later) == state(batch, app2, later)
    return first


def data_run(app: App, sizes: list[int], flags: int = ACK) -> Run:
    """Segments of `sizes` octets, the application's clock ticking for each."""
    run = []
    for i, size in enumerate(sizes):
        if app.tsval is not None:
            app.tsval += 1
        run.append(app.seg(flags, bytes([i]) * size))
    return run


def test_in_order_data_is_taken_as_a_run_with_the_same_result() -> None:
    for app_kw in ({}, {"sack": False}, {"ts": False}):
        pair = twins(**app_kw)
        run = data_run(pair[0][1], [PAYLOAD] * 5 + [100])
        run[2] = (run[2][0]._replace(flags=ACK | PSH), run[2][1])
        feed_both(pair, run, 0.02)
        (_, segments, events), stats, _, _ = same(pair, 0.02)
        # Every byte delivered in order, one ACK for all of it.
        assert b"".join(e.data for e in events) == b"".join(p for _, p in run)  # type: ignore[attr-defined]
        assert [seg.ack for seg in segments] == [s(pair[0][1].nxt)]
        assert stats.bytes_in == 5 * PAYLOAD + 100 and stats.segments_in == 7


def test_a_lone_segment_waits_for_the_delayed_ack_in_a_run_too() -> None:
    pair = twins()
    feed_both(pair, data_run(pair[0][1], [10]), 0.02)
    (_, segments, _), _, deadline, _ = same(pair, 0.02)
    assert segments == [] and deadline == 0.02 + CFG.delayed_ack


def test_data_beyond_the_window_is_cut_as_one_by_one() -> None:
    cfg = TcpConfig(mss=1000, rcv_buf=3000, snd_buf=100_000, max_ooo_bytes=50_000)
    pair = twins(cfg)
    feed_both(pair, data_run(pair[0][1], [PAYLOAD] * 4), 0.02)
    (_, _, events), _, _, _ = same(pair, 0.02)
    assert sum(len(e.data) for e in events) < 4 * PAYLOAD  # type: ignore[attr-defined]


def test_data_with_our_data_in_flight_is_taken_one_by_one() -> None:
    pair = twins(in_flight=3 * PAYLOAD)
    app = pair[0][1]
    run = data_run(app, [PAYLOAD] * 3)
    # The second acknowledges what we sent; the third no longer repeats it.
    run[1] = (run[1][0]._replace(ack=s(SRV_ISS + 1 + 3 * PAYLOAD)), run[1][1])
    run[2] = (run[2][0]._replace(ack=s(SRV_ISS + 1 + 3 * PAYLOAD)), run[2][1])
    feed_both(pair, run, 0.02)
    assert same(pair, 0.02)[1].bytes_in == 3 * PAYLOAD


def test_demux_routes_a_run_as_segment_received_would() -> None:
    demux = TcpDemux(CFG)
    app = App()
    demux.segment_received(KEY, app.syn(), b"", 0.0)
    conn = demux.accept(KEY, SRV_ISS, 0.0)
    app.absorb([(h, p) for _, h, p in demux.segments_to_send(0.0)])
    demux.segment_received(KEY, *app.seg(), 0.01)
    assert conn.state is TcpState.ESTABLISHED
    assert demux.data_received_run(KEY, data_run(app, [5, 6]), 0.02) is conn
    assert conn.statistics().bytes_in == 11
    event = conn.next_event()
    assert event.data == bytes(5) + b"\x01" * 6  # type: ignore[union-attr]
    # An unknown flow: an RST for each, as one by one.
    other = FlowKey(KEY.app_addr, 5555, KEY.remote_addr, 443)
    hdr = TcpHeader(5555, 443, 1, 2, ACK, 100)
    assert demux.data_received_run(other, [(hdr, b"a"), (hdr._replace(seq=2), b"b")], 0.03) is None
    rsts = [(k, h.seq) for k, h, _ in demux.segments_to_send(0.03) if h.flags & RST]
    assert rsts == [(other, 2), (other, 2)]


# What may happen to a segment of a run: most are plain in-order data; the
# others must go the general way and leave the same state.
KINDS = [
    "next",
    "next",
    "next",
    "psh",
    "gap",  # a later segment's position: queued out of order
    "old",  # a retransmission of octets already received
    "fin",
    "sack",
    "no ts",
    "old ts",
    "ts on",
    "acks ours",  # acknowledges the data we have in flight
    "beyond",  # acknowledges more than we sent
    "empty",
    "rst",
    "window",  # a smaller window than the application advertised so far
]


@given(
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, PAYLOAD)), min_size=1, max_size=10),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 2 * PAYLOAD]),
)
def test_any_run_of_segments_gives_the_state_one_by_one_gives(
    steps: list[tuple[str, int]], sack: bool, timestamps: bool, in_flight: int
) -> None:
    pair = twins(in_flight=in_flight, sack=sack, ts=timestamps)
    app = pair[0][1]
    run: Run = []
    for kind, size in steps:
        data = bytes([len(run) & 0xFF]) * size
        if kind == "gap":
            hdr, payload = app.seg(ACK, data, seq=s(app.nxt + 3 * PAYLOAD))
        elif kind == "old":
            hdr, payload = app.seg(ACK, data, seq=s(app.nxt - size))
        elif kind == "fin":
            hdr, payload = app.seg(ACK | FIN, data)
        elif kind == "sack":
            block = ((s(SRV_ISS + 1), s(SRV_ISS + 2)),)
            hdr, payload = app.seg(ACK, data, sack=block)
        elif kind == "no ts":
            hdr, payload = app.seg(ACK, data)
            hdr = hdr._replace(options=TcpOptions())
        elif kind == "old ts" and app.tsval is not None:
            hdr, payload = app.seg(ACK, data, tsval=s(app.tsval - 10))
        elif kind == "ts on" and app.tsval is not None:
            app.tsval += 1
            hdr, payload = app.seg(ACK, data)
        elif kind == "acks ours":
            hdr, payload = app.seg(ACK, data, ack=s(SRV_ISS + 1 + in_flight))
        elif kind == "beyond":
            hdr, payload = app.seg(ACK, data, ack=s(SRV_ISS + 1 + in_flight + 5000))
        elif kind == "empty":
            hdr, payload = app.seg(ACK)
        elif kind == "rst":
            hdr, payload = app.seg(RST)
        elif kind == "window":
            hdr, payload = app.seg(ACK, data, window=size // 100)
        else:
            hdr, payload = app.seg(ACK | PSH if kind == "psh" else ACK, data)
        run.append((hdr, payload))
    feed_both(pair, run, 0.02)
    same(pair, 0.02)


def test_a_smaller_window_on_in_order_data_limits_what_we_send_next() -> None:
    pair = twins()
    app = pair[0][1]
    run = data_run(app, [PAYLOAD] * 3)
    run[1] = (run[1][0]._replace(window=8), run[1][1])
    run[2] = (run[2][0]._replace(window=8), run[2][1])
    feed_both(pair, run, 0.02)
    same(pair, 0.02)
    (one, _), (batch, _) = pair
    # 8 << 7 octets of window: one full segment of the 20,000 queued.
    assert one.statistics().segments_out == batch.statistics().segments_out
    assert batch.statistics().bytes_out == PAYLOAD


def test_data_without_a_timestamp_or_with_an_old_one_is_taken_one_by_one() -> None:
    pair = twins()
    app = pair[0][1]
    run = data_run(app, [PAYLOAD] * 3)
    run[1] = (run[1][0]._replace(options=TcpOptions()), run[1][1])
    old = run[2][0].options.timestamp
    assert old is not None
    run[2] = (
        run[2][0]._replace(options=TcpOptions(timestamp=(s(old[0] - 100), old[1]))),
        run[2][1],
    )
    feed_both(pair, run, 0.02)
    stats = same(pair, 0.02)[1]
    assert stats.paws_drops == 1  # type: ignore[attr-defined]
