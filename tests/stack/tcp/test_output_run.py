"""A run of full segments as one `DataRun` (`TcpConnection.output`) says what one by one says.

Two identical connections send the same data and take the same ACKs from
the application; one's output is collected with `segments_to_send`, the
other's with `output`, its runs expanded by `DataRun.segments`. The
segments, their payloads, the statistics and the deadlines must agree at
every step, whatever the ACKs (cumulative, partial, duplicate, with SACK
blocks, with a new window), losses, timeouts and the FIN do.
"""

from __future__ import annotations

from hypothesis import event, given
from hypothesis import strategies as st

from stack.tcp import TcpConnection
from stack.wire.tcp import PSH, DataRun, TcpHeader

from .fixtures import CFG, PAYLOAD, established
from .helpers import ACK, SRV_ISS, s

Segments = list[tuple[TcpHeader, bytes]]


def expanded(conn: TcpConnection, now: float) -> tuple[Segments, int]:
    """`output`'s segments one by one, and how many runs it held."""
    out: Segments = []
    runs = 0
    for hdr, payload in conn.output(now):
        if isinstance(hdr, DataRun):
            runs += 1
            out += [(h, bytes(p)) for h, p in hdr.segments()]
        else:
            out.append((hdr, bytes(payload)))
    return out, runs


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["send", "send", "ack", "ack", "dup", "sack", "window", "wait", "close"]),
        st.integers(1, 12 * PAYLOAD),
    ),
    min_size=1,
    max_size=14,
)


@given(STEPS, st.booleans(), st.booleans())
def test_output_with_runs_is_segments_to_send(
    steps: list[tuple[str, int]], sack: bool, timestamps: bool
) -> None:
    pair = [established(CFG, sack=sack, ts=timestamps) for _ in range(2)]
    (one, app), (other, _) = pair
    now = 0.02
    sent = 0  # how far (relative to our ISS + 1) we have sent
    runs = 0
    closed = False
    for kind, size in steps:
        now += 0.001
        feed: list[tuple[TcpHeader, bytes]] = []
        if kind == "send" and not closed:
            assert one.send(bytes([size & 0xFF]) * size) == other.send(bytes([size & 0xFF]) * size)
        elif kind == "close" and not closed:
            one.close()
            other.close()
            closed = True
        elif kind in ("ack", "sack", "window") and sent:
            upto = size % (sent + 1)
            blocks: tuple[tuple[int, int], ...] = ()
            if kind == "sack" and upto + PAYLOAD < sent:
                blocks = ((s(SRV_ISS + 1 + upto + PAYLOAD), s(SRV_ISS + 1 + sent)),)
            feed.append(
                app.seg(
                    ack=s(SRV_ISS + 1 + upto),
                    sack=blocks,
                    window=size % 600 if kind == "window" else None,
                )
            )
        elif kind == "dup":
            feed += [app.seg() for _ in range(3)]
        elif kind == "wait":
            now += size / 1000
            for conn in (one, other):
                deadline = conn.next_deadline()
                if deadline is not None and deadline <= now:
                    conn.handle_timeout(now)
        for hdr, payload in feed:
            one.segment_received(hdr, payload, now)
            other.segment_received(hdr, payload, now)
        first = [(h, bytes(p)) for h, p in one.segments_to_send(now)]
        second, count = expanded(other, now)
        runs += count
        assert first == second
        app.absorb(first)  # type: ignore[arg-type]
        for hdr, payload in first:
            if hdr.flags & ACK and payload:
                end = (hdr.seq - SRV_ISS - 1 + len(payload)) & 0xFFFFFFFF
                sent = max(sent, end)
        assert one.statistics() == other.statistics()
        assert one.next_deadline() == other.next_deadline()
        assert one.state is other.state
    event(f"runs: {min(runs, 2)}")


def test_a_flight_of_full_segments_is_one_run() -> None:
    (one, _), (other, _) = [established(CFG) for _ in range(2)]
    one.send(bytes(10 * PAYLOAD))
    other.send(bytes(10 * PAYLOAD))
    [(run, _)] = other.output(0.02)
    assert isinstance(run, DataRun)
    first = [(h, bytes(p)) for h, p in one.segments_to_send(0.02)]
    assert [(h, bytes(p)) for h, p in run.segments()] == first
    assert len(first) == 10 and first[-1][0].flags == ACK | PSH
    assert one.statistics() == other.statistics()
