"""The quiet flush: an established connection with nothing due returns no segment at once.

`TcpConnection._output` skips building the options and running the
sender's output loop when no ACK is owed and `Sender.nothing_due` says so.
Hypothesis drives a connection through random segments (data, ACKs that
move on, SACK blocks, closed and small windows, FIN, RST), sends, closes
and timeouts; before every flush that takes the quick exit a twin (a deep
copy) runs the general path, `_emit`, and must produce no segment and end
in the same state as the connection after its flush.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings

from stack.tcp import TcpConnection
from stack.tcp.snd import OutputList
from stack.wire.tcp import ACK, SYN, TcpHeader, TcpOptions
from tests.stack.tcp.programs import (
    APP_ISN,
    CONFIG,
    ISS,
    KEY,
    MASK,
    PROGRAM,
    collect,
    run,
    state,
    twin,
)


def _quiet(conn: TcpConnection) -> bool:
    """The condition of the quick exit in `_output`, read from outside."""
    return (
        conn._out._rst is None
        and conn._snd.una != 0
        and conn.state.name != "CLOSED"
        and not conn._rcv.ack_due
        and conn._snd.nothing_due()
    )


def _flush(conn: TcpConnection, now: float, runs: bool) -> list[tuple[TcpHeader, bytes]]:
    other = twin(conn) if _quiet(conn) else None
    if other is not None:
        general: OutputList = []
        other._emit(now, runs, general)
        assert general == []
    sent = collect(conn, now, runs)
    if other is not None:
        assert sent == []
        assert state(other) == state(conn)
    return sent


@settings(max_examples=500, deadline=None)
@given(**PROGRAM)
def test_quick_exit_is_the_general_path_producing_nothing(
    sack: bool, stamps: bool, wscale: int, handshake: bool, actions: list[tuple[str, Any]]
) -> None:
    run(sack, stamps, wscale, handshake, actions, flush=_flush)


def test_the_handshakes_ack_leaves_nothing_due() -> None:
    """The flush after the handshake's ACK is the quiet one: no segment, no options built."""
    syn = TcpHeader(40000, 443, APP_ISN, 0, SYN, 65535, options=TcpOptions(mss=1460))
    conn = TcpConnection(KEY, syn, ISS, 0.0, CONFIG)
    assert len(conn.segments_to_send(0.0)) == 1  # the SYN-ACK
    ack = TcpHeader(40000, 443, (APP_ISN + 1) & MASK, (ISS + 1) & MASK, ACK, 65535)
    conn.segment_received(ack, b"", 0.01)
    assert _quiet(conn)
    assert conn.output(0.01) == []
    conn.send(b"x")
    assert not _quiet(conn)
    assert [bytes(p) for _, p in conn.segments_to_send(0.02)] == [b"x"]


def test_a_partial_ack_leaves_the_tail_loss_probe_to_arm() -> None:
    """In flight after a partial ACK, the flush is not quiet: it arms the probe again."""
    opts = TcpOptions(mss=1460, sack_permitted=True)
    syn = TcpHeader(40000, 443, APP_ISN, 0, SYN, 65535, options=opts)
    conn = TcpConnection(KEY, syn, ISS, 0.0, CONFIG)
    conn.segments_to_send(0.0)
    seq = (APP_ISN + 1) & MASK
    conn.segment_received(TcpHeader(40000, 443, seq, (ISS + 1) & MASK, ACK, 65535), b"", 0.01)
    conn.send(bytes(3000))
    assert len(conn.segments_to_send(0.01)) == 5
    armed = conn.next_deadline()
    conn.segment_received(TcpHeader(40000, 443, seq, (ISS + 601) & MASK, ACK, 65535), b"", 0.02)
    assert not _quiet(conn)
    assert _flush(conn, 0.02, True) == []
    # The probe is due again a little after the first one would have been,
    # well before the retransmission timeout.
    deadline = conn.next_deadline()
    assert armed is not None and deadline is not None
    assert armed < deadline < 0.02 + 0.2
