"""A batch's ACKs taken together (`acks_received`) leave the state one by one would.

Two identical connections with the same flight out get the same ACKs, one
one by one (`segment_received`), the other as a run; their whole observable
state must then agree (state, segments, events, statistics but the
coalescing counter, deadline, send space), including the duplicate ACKs
that start fast retransmit without SACK.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.tcp import TcpConnection, TcpStatistics
from stack.wire.tcp import PSH, TcpHeader, TcpOptions

from .fixtures import PAYLOAD, established, observe
from .helpers import ACK, SRV_ISS, App, s

FLIGHT = 10  # segments the initial window lets out


def twins(**app_kw: object) -> list[tuple[TcpConnection, App]]:
    """Two identical connections, each with a full initial window in flight."""
    out = []
    for _ in range(2):
        conn, app = established(**app_kw)
        conn.send(bytes(40 * PAYLOAD))
        assert len(app.absorb(conn.segments_to_send(0.02))) == FLIGHT
        out.append((conn, app))
    return out


def state(conn: TcpConnection, app: App, now: float) -> tuple[object, ...]:
    seen = observe(conn, app, now)
    stats: TcpStatistics = conn.statistics()._replace(acks_coalesced=0)
    return seen, stats, conn.next_deadline(), conn.send_space()


def acks(app: App, ends: list[int], windows: list[int] | None = None) -> list[TcpHeader]:
    """Pure ACKs up to `ends` segments of the flight."""
    out = []
    for i, end in enumerate(ends):
        window = None if windows is None else windows[i]
        hdr, _ = app.seg(ack=s(SRV_ISS + 1 + end * PAYLOAD), window=window)
        out.append(hdr)
    return out


def feed_both(
    pair: list[tuple[TcpConnection, App]], hdrs: list[TcpHeader], now: float
) -> tuple[TcpConnection, TcpConnection]:
    (one, _), (batch, _) = pair
    for hdr in hdrs:
        one.segment_received(hdr, b"", now)
    batch.acks_received(hdrs, now)
    return one, batch


def test_a_run_of_cumulative_acks_is_taken_once_with_the_same_result() -> None:
    for app_kw in ({}, {"sack": False}, {"ts": False}, {"sack": False, "ts": False}):
        pair = twins(**app_kw)
        # An ACK per second segment, as Linux sends them.
        hdrs = acks(pair[0][1], [2, 4, 6, 8, 10])
        one, batch = feed_both(pair, hdrs, 0.03)
        assert batch.statistics().acks_coalesced == 4, app_kw
        assert one.statistics().acks_coalesced == 0
        first = state(one, pair[0][1], 0.03)
        assert first == state(batch, pair[1][1], 0.03), app_kw
        # Slow start doubled the window (2 MSS per ACK, five ACKs), for the
        # batch as one by one: the next round's flight matches too.
        assert sum(len(seg.payload) for seg in first[0][1]) > 1.8 * FLIGHT * PAYLOAD, app_kw
        hdrs = acks(pair[0][1], list(range(12, 31, 2)))
        feed_both(pair, hdrs, 0.04)
        assert state(one, pair[0][1], 0.04) == state(batch, pair[1][1], 0.04), app_kw


def test_duplicate_acks_in_one_batch_still_start_fast_retransmit_without_sack() -> None:
    pair = twins(sack=False)
    # The third segment is lost: two advances, then three duplicates.
    hdrs = acks(pair[0][1], [1, 2, 2, 2, 2])
    one, batch = feed_both(pair, hdrs, 0.03)
    assert batch.statistics().acks_coalesced == 1  # only the first advance
    expected = state(one, pair[0][1], 0.03)
    assert expected == state(batch, pair[1][1], 0.03)
    assert expected[1].fast_retransmits == 1


def test_a_closing_window_is_never_skipped() -> None:
    pair = twins()
    hdrs = acks(pair[0][1], [2, 4, 6], windows=[100, 0, 100])
    one, batch = feed_both(pair, hdrs, 0.03)
    assert batch.statistics().acks_coalesced == 0
    assert state(one, pair[0][1], 0.03) == state(batch, pair[1][1], 0.03)


def test_acks_with_sack_blocks_are_taken_one_by_one() -> None:
    pair = twins()
    app = pair[0][1]
    block = ((s(SRV_ISS + 1 + 5 * PAYLOAD), s(SRV_ISS + 1 + 6 * PAYLOAD)),)
    hdrs = [
        app.seg(ack=s(SRV_ISS + 1 + 2 * PAYLOAD))[0],
        app.seg(ack=s(SRV_ISS + 1 + 3 * PAYLOAD), sack=block)[0],
        app.seg(ack=s(SRV_ISS + 1 + 3 * PAYLOAD), sack=block)[0],
    ]
    one, batch = feed_both(pair, hdrs, 0.03)
    assert batch.statistics().acks_coalesced == 0
    assert state(one, pair[0][1], 0.03) == state(batch, pair[1][1], 0.03)


def test_a_skipped_acks_larger_window_is_still_seen() -> None:
    """MAX.SND.WND (RFC 5961's old-ACK bound) takes the skipped ACK's window."""
    pair = twins(window=100)  # 100 << 7 octets until the skipped ACK
    hdrs = acks(pair[0][1], [2, 4], windows=[65535, 100])
    one, batch = feed_both(pair, hdrs, 0.03)
    assert batch.statistics().acks_coalesced == 1
    assert state(one, pair[0][1], 0.03) == state(batch, pair[1][1], 0.03)
    # An ACK just within 65535 << 7 below SND.UNA is old but acceptable for
    # both (no challenge ACK); it would be challenged with MAX.SND.WND = 100 << 7.
    for conn, app in pair:
        old, _ = app.seg(ack=s(SRV_ISS + 1 + 4 * PAYLOAD - 20_000))
        conn.segment_received(old, b"", 0.04)
        assert conn.statistics().challenge_acks == 0


def _unlike(reason: str, app: App) -> list[TcpHeader]:
    """Two ACKs of 2 and 4 segments, changed so the first must not be skipped."""
    first, _ = app.seg(ack=s(SRV_ISS + 1 + 2 * PAYLOAD))
    later, _ = app.seg(ack=s(SRV_ISS + 1 + 4 * PAYLOAD))
    assert app.tsval is not None and first.options.timestamp is not None
    tsval, echo = first.options.timestamp
    if reason == "later without timestamp":
        later = later._replace(options=TcpOptions())
    elif reason == "first without timestamp":
        first = first._replace(options=TcpOptions())
    elif reason == "first older than TS.Recent":
        first = first._replace(options=TcpOptions(timestamp=(s(tsval - 5), echo)))
    elif reason == "later older than first":
        first = first._replace(options=TcpOptions(timestamp=(s(tsval + 5), echo)))
    elif reason == "not at RCV.NXT":
        first, later = (h._replace(seq=s(h.seq + 1)) for h in (first, later))
    elif reason == "different seq":
        later = later._replace(seq=s(later.seq + 1))
    elif reason == "not a pure ACK":
        first = first._replace(flags=ACK | PSH)
    elif reason == "later a duplicate":
        later = later._replace(ack=first.ack)
    elif reason == "later beyond SND.MAX":
        later = later._replace(ack=s(SRV_ISS + 1 + 20 * PAYLOAD))
    return [first, later]


REASONS = [
    "later without timestamp",
    "first without timestamp",
    "first older than TS.Recent",
    "later older than first",
    "not at RCV.NXT",
    "different seq",
    "not a pure ACK",
    "later a duplicate",
    "later beyond SND.MAX",
]


@pytest.mark.parametrize("reason", REASONS)
def test_an_ack_the_next_cannot_stand_for_is_processed(reason: str) -> None:
    pair = twins()
    one, batch = feed_both(pair, _unlike(reason, pair[0][1]), 0.03)
    assert batch.statistics().acks_coalesced == 0
    assert state(one, pair[0][1], 0.03) == state(batch, pair[1][1], 0.03)


# Steps of at most two segments (what one ACK covers from a Linux peer) in
# half segments (an ACK may end inside one), 0 a duplicate; a window; a
# timestamp going back, staying or going on.
ack_runs = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from([0, 1, 2000, 65535]), st.integers(-1, 1)),
    min_size=1,
    max_size=8,
)


@given(ack_runs, st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_any_run_of_pure_acks_gives_the_state_one_by_one_gives(
    run: list[tuple[int, int, int]], sack: bool, timestamps: bool, shift_seq: bool, closing: bool
) -> None:
    pair = twins(sack=sack, ts=timestamps)
    if closing:
        # Our FIN queued (FIN-WAIT-1): no ACK is skipped, all go one by one.
        for conn, _ in pair:
            conn.close()
    app = pair[0][1]
    hdrs = []
    end = 0
    for step, window, tick in run:
        end = min(end + step, 2 * FLIGHT + 2)  # FLIGHT + 1: past what was sent
        if app.tsval is not None:
            app.tsval += tick
        hdr, _ = app.seg(ack=s(SRV_ISS + 1 + end * PAYLOAD // 2), window=window)
        if shift_seq and step == 4:
            hdr = hdr._replace(seq=s(hdr.seq + 1))  # outside the window's left edge
        hdrs.append(hdr)
    one, batch = feed_both(pair, hdrs, 0.03)
    assert state(one, pair[0][1], 0.03) == state(batch, pair[1][1], 0.03)
    assert one.statistics().segments_in == batch.statistics().segments_in


def test_a_skipped_ack_still_gives_rack_its_round_trip_sample() -> None:
    """One by one, an ACK ending on a segment gives RACK (RFC 8985) an RTT
    sample; an ACK after it that ends inside a segment gives none, so the
    skipped one's sample must not be lost: the reordering window a later
    SACK arms is built from it."""
    pair = twins()
    app = pair[0][1]
    hdrs = [app.seg(ack=s(SRV_ISS + 1 + 3 * PAYLOAD))[0]]
    hdrs.append(app.seg(ack=s(SRV_ISS + 1 + 3 * PAYLOAD + PAYLOAD // 2))[0])
    one, batch = feed_both(pair, hdrs, 0.03)
    assert batch.statistics().acks_coalesced == 1
    assert state(one, pair[0][1], 0.03) == state(batch, pair[1][1], 0.03)
    block = ((s(SRV_ISS + 1 + 12 * PAYLOAD), s(SRV_ISS + 1 + 13 * PAYLOAD)),)
    sack = app.seg(ack=s(SRV_ISS + 1 + 3 * PAYLOAD + PAYLOAD // 2), sack=block)[0]
    feed_both(pair, [sack], 0.2)
    assert state(one, pair[0][1], 0.2) == state(batch, pair[1][1], 0.2)


def test_a_skipped_ack_that_ends_a_round_trip_still_samples_the_delivery_rate() -> None:
    """One by one, the first ACK past a round trip's end closes it and starts
    the next; the delivery rate measured over a round sets the floor a loss
    cuts the window to (`Congestion.loss_floor`). A skipped ACK must start
    its round just as well, or the window after recovery differs."""
    pair = twins()
    app = pair[0][1]

    def step(hdrs: list[TcpHeader], now: float) -> None:
        one, batch = feed_both(pair, hdrs, now)
        assert state(one, pair[0][1], now) == state(batch, pair[1][1], now)

    step(acks(app, [1]), 0.03)  # the first round starts
    step(acks(app, [11]), 0.05)  # and ends (12 segments were out)
    # 13 ends the second round (24 were out); skipped, 20 stands for it.
    step(acks(app, [13, 20]), 0.06)
    assert pair[1][0].statistics().acks_coalesced == 1
    step(acks(app, [30]), 0.08)
    # A loss: three SACKs above a hole, then all acknowledged.
    for k in range(3):
        block = ((s(SRV_ISS + 1 + 31 * PAYLOAD), s(SRV_ISS + 1 + (32 + k) * PAYLOAD)),)
        step([app.seg(ack=s(SRV_ISS + 1 + 30 * PAYLOAD), sack=block)[0]], 0.09)
    step(acks(app, [40]), 0.12)
    # The window recovery left: what a new flight may hold.
    for conn, _ in pair:
        conn.send(bytes(40 * PAYLOAD))
    flights = [state(conn, app, 0.13)[0][1] for conn, app in pair]
    assert len(flights[0]) > 10
    assert flights[0] == flights[1]


def test_a_run_that_ends_slow_start_grows_the_window_as_one_by_one() -> None:
    """After a retransmission time-out slow start stops at ssthresh (half
    the flight); one by one the ACKs past it count as congestion avoidance,
    so a run of skipped ACKs must not grow the window as slow start."""
    pair = twins()
    app = pair[0][1]
    for conn, app_ in pair:
        while conn.statistics().rto_timeouts == 0:
            now = conn.next_deadline()
            assert now is not None
            conn.handle_timeout(now)
            app_.absorb(conn.segments_to_send(now))
    steps = [[1], [2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12]]
    for i, ends in enumerate(steps):
        now = 0.5 + 0.01 * i
        one, batch = feed_both(pair, acks(app, ends), now)
        assert state(one, pair[0][1], now) == state(batch, pair[1][1], now), ends
    assert batch.statistics().acks_coalesced == 8


# A step of a multi-round exchange: how far the ACK reaches (in half
# segments past the last, 0 a duplicate), a SACK block above it, a window.
_ACK_STEP = st.tuples(st.integers(-4, 4), st.booleans(), st.sampled_from([None, 0, 2000]))


@given(
    st.lists(
        st.tuples(
            st.lists(_ACK_STEP, min_size=1, max_size=6), st.sampled_from([0.0, 0.01, 0.3, 1.5])
        ),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
    st.booleans(),
)
def test_rounds_of_acks_with_losses_give_the_state_one_by_one_gives(
    rounds: list[tuple[list[tuple[int, bool, int | None]], float]], sack: bool, timestamps: bool
) -> None:
    """Several batches, with time between them, SACK blocks and so loss
    recovery, zero windows and ACKs inside segments: what a skipped ACK
    leaves behind (the window's growth, the delivery rate's rounds, RACK's
    samples) shows in the segments of later rounds."""
    pair = twins(sack=sack, ts=timestamps)
    app = pair[0][1]
    end = 0  # in half segments
    now = 0.03
    for steps, pause in rounds:
        hdrs = []
        for reach, sacked, window in steps:
            # A negative reach: an old ACK, below what was acknowledged.
            at = max(end + reach, 0) if reach < 0 else min(end + reach, 2 * 40)
            end = max(end, at)
            block: tuple[tuple[int, int], ...] = ()
            if sacked:
                left = (at // 2 + 2) * PAYLOAD
                block = ((s(SRV_ISS + 1 + left), s(SRV_ISS + 1 + left + PAYLOAD)),)
            if app.tsval is not None:
                app.tsval += 1
            ack = s(SRV_ISS + 1 + at * PAYLOAD // 2)
            hdrs.append(app.seg(ack=ack, window=window, sack=block)[0])
        one, batch = feed_both(pair, hdrs, now)
        assert state(one, pair[0][1], now) == state(batch, pair[1][1], now)
        now += pause
    # Later: the timers, and a new flight of what the window allows.
    later = now + 2.0
    for conn, _ in pair:
        conn.handle_timeout(later)
    assert state(pair[0][0], pair[0][1], later) == state(pair[1][0], pair[1][1], later)
