"""The ACK of everything sent: `Sender._ack_all` against the general path.

An ACK that moves SND.UNA up to SND.MAX outside recovery, with no SACK
block, nothing SACKed and no retransmission tracked, skips the general
ACK processing (`_ack_general`: the scoreboard, duplicate ACK counting,
`Congestion.on_delivered`'s SACKed share, RACK's `detect`). Hypothesis
drives a connection through random programs (tests/stack/tcp/programs.py);
before every delivery (one by one, or as a batch, where pure ACKs may be
coalesced), a twin (a deep copy) takes the same segments with the short
path routed to the general one, and both must end in the same state.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from hypothesis import given, settings

from stack.tcp import TcpConnection
from stack.tcp.snd import Sender
from stack.wire.tcp import ACK, SYN, TcpHeader, TcpOptions
from tests.stack.tcp.programs import (
    APP_ISN,
    CONFIG,
    ISS,
    KEY,
    MASK,
    PROGRAM,
    Segments,
    deliver,
    run,
    state,
    twin,
)

_short_path = Sender._ack_all


def _general(snd: Sender, hdr: TcpHeader, ack: int, now: float) -> bool:
    # The ACK advances: its payload length and whether the window changed
    # matter only for a duplicate ACK.
    return snd._ack_general(hdr, ack, 0, now, False)


@settings(max_examples=500, deadline=None)
@given(**PROGRAM)
def test_the_short_path_leaves_the_general_paths_state(
    sack: bool, stamps: bool, wscale: int, handshake: bool, actions: list[tuple[str, Any]]
) -> None:
    taken = []

    def counted(snd: Sender, hdr: TcpHeader, ack: int, now: float) -> bool:
        taken.append(ack)
        return _short_path(snd, hdr, ack, now)

    def receive(conn: TcpConnection, segments: Segments, now: float, batch: bool) -> None:
        other = twin(conn)
        with mock.patch.object(Sender, "_ack_all", _general):
            deliver(other, segments, now, batch)
        before = len(taken)
        with mock.patch.object(Sender, "_ack_all", counted):
            deliver(conn, segments, now, batch)
        if len(taken) > before:
            assert state(other) == state(conn)
            assert other.next_event() == conn.next_event()

    run(sack, stamps, wscale, handshake, actions, receive=receive)


def test_a_coalesced_ack_before_the_ack_of_everything() -> None:
    """A skipped ACK counted its share already: the short path counts the rest."""
    opts = TcpOptions(mss=1460, sack_permitted=True, timestamp=(5, 0))
    syn = TcpHeader(40000, 443, APP_ISN, 0, SYN, 65535, options=opts)
    conn = TcpConnection(KEY, syn, ISS, 0.0, CONFIG)
    conn.segments_to_send(0.0)
    seq = (APP_ISN + 1) & MASK

    def ack(upto: int, tsval: int) -> TcpHeader:
        options = TcpOptions(timestamp=(tsval, ISS & MASK))
        return TcpHeader(40000, 443, seq, (ISS + upto) & MASK, ACK, 65535, options=options)

    conn.segment_received(ack(1, 6), b"", 0.01)
    conn.send(bytes(3000))
    assert len(conn.segments_to_send(0.01)) > 2
    assert conn._snd.max == 3001
    other = twin(conn)
    with mock.patch.object(Sender, "_ack_all", _general):
        other.acks_received([ack(2401, 7), ack(3001, 8)], 0.03)
    conn.acks_received([ack(2401, 7), ack(3001, 8)], 0.03)
    assert conn.statistics().acks_coalesced == 1
    assert conn._snd.una == 3001
    assert state(other) == state(conn)
