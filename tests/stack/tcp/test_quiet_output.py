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

import contextlib
import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.errors import LocalProtocolError
from stack.tcp import NEED_DATA, FlowKey, TcpConfig, TcpConnection
from stack.tcp.output import Output
from stack.tcp.snd import OutputList
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, DataRun, TcpHeader, TcpOptions

KEY = FlowKey(b"\x0a\x00\x00\x02", 40000, b"\xc6\x12\x00\x05", 443)
CONFIG = TcpConfig(mss=600, rcv_buf=20_000, snd_buf=60_000, max_ooo_bytes=8000, max_ooo_ranges=8)
APP_ISN = 0xFFFFFF00
ISS = 0xFFFFFFF0
MASK = 0xFFFFFFFF
_FLAGS = (ACK,) * 10 + (ACK | PSH,) * 3 + (ACK | FIN, RST)
# What `Output.begin` builds for the headers of one output call and nothing
# outside that call reads: the quick exit does not build it.
_PER_CALL = {(Output, "_opts"), (Output, "_head"), (Output, "_runs"), (Output, "sack_len")}


def _state(obj: Any) -> Any:
    """Every slot of the connection and its parts, as plain values."""
    if isinstance(obj, (int, float, str, bytes, bool, type(None))):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_state(x) for x in obj])
    if isinstance(obj, dict):
        return {k: _state(v) for k, v in obj.items()}
    if callable(obj) and not hasattr(type(obj), "__slots__"):
        return repr(obj)
    if hasattr(obj, "_asdict"):
        return _state(tuple(obj))
    slots = [
        name
        for cls in type(obj).__mro__
        for name in getattr(cls, "__slots__", ())
        if (cls, name) not in _PER_CALL
    ]
    if not slots:
        return repr(obj)
    return (type(obj).__name__, {name: _state(getattr(obj, name, None)) for name in slots})


def _quiet(conn: TcpConnection) -> bool:
    """The condition of the quick exit in `_output`, read from outside."""
    return (
        conn._out._rst is None
        and conn._snd.una != 0
        and conn.state.name != "CLOSED"
        and not conn._rcv.ack_due
        and conn._snd.nothing_due()
    )


def _twin(conn: TcpConnection) -> TcpConnection:
    """A deep copy; the send buffer's chunks (memoryviews, never written) are shared."""
    dispatch: Any = copy._deepcopy_dispatch  # type: ignore[attr-defined]
    dispatch[memoryview] = lambda view, memo: view
    try:
        return copy.deepcopy(conn)
    finally:
        del dispatch[memoryview]


def _flush(conn: TcpConnection, now: float, runs: bool) -> list[tuple[TcpHeader, bytes]]:
    twin = _twin(conn) if _quiet(conn) else None
    if twin is not None:
        general: OutputList = []
        twin._emit(now, runs, general)
        assert general == []
    out = conn.output(now) if runs else conn.segments_to_send(now)
    if twin is not None:
        assert out == []
        assert _state(twin) == _state(conn)
    sent = []
    for hdr, payload in out:
        if isinstance(hdr, DataRun):
            sent += [(h, bytes(p)) for h, p in hdr.segments()]
        else:
            sent.append((hdr, bytes(payload)))
    return sent


_SEGMENT = st.tuples(
    st.sampled_from(_FLAGS),
    st.integers(0, 255),  # where seq lies: mostly RCV.NXT
    st.integers(0, 255),  # how far the ACK moves, and whether it is off
    st.sampled_from((0,) * 6 + (1, 300, 1200)),  # payload
    st.sampled_from((0, 1, 300, 65535, 65535, 65535)),  # window
    st.booleans(),  # a SACK block
)
_SEG = st.tuples(st.just("seg"), _SEGMENT)
_DELIVER = st.tuples(st.just("deliver"), st.none())
_SEND = st.tuples(st.just("send"), st.sampled_from((1, 64, 600, 1300, 5000, 40_000)))
_ACTION = st.one_of(
    _SEG,
    _SEG,
    _SEG,
    _DELIVER,
    _DELIVER,
    st.tuples(st.just("time"), st.tuples(st.booleans(), st.integers(0, 255))),
    _SEND,
    _SEND,
    st.tuples(st.just("close"), st.integers(0, 7)),
)


@settings(max_examples=500, deadline=None)
@given(
    sack=st.booleans(),
    stamps=st.booleans(),
    wscale=st.integers(0, 8),
    handshake=st.booleans(),
    actions=st.lists(_ACTION, max_size=80),
)
def test_quick_exit_is_the_general_path_producing_nothing(
    sack: bool, stamps: bool, wscale: int, handshake: bool, actions: list[tuple[str, Any]]
) -> None:
    syn_opts = TcpOptions(
        mss=1460, wscale=wscale, sack_permitted=sack, timestamp=(5, 0) if stamps else None
    )
    syn = TcpHeader(40000, 443, APP_ISN, 0, SYN, 65535, options=syn_opts)
    conn = TcpConnection(KEY, syn, ISS, 0.0, CONFIG)
    now = 0.0
    app_next = (APP_ISN + 1) & MASK
    sent = acked = 1
    tsval = 5
    pending: list[tuple[TcpHeader, bytes]] = []
    if handshake:  # most runs start established; the others may never be
        assert len(_flush(conn, now, True)) == 1
        options = TcpOptions(timestamp=(tsval, 0) if stamps else None)
        ack = TcpHeader(40000, 443, app_next, (ISS + 1) & MASK, ACK, 65535, options=options)
        conn.segment_received(ack, b"", now)
    for kind, arg in actions:
        if kind == "seg":
            flags, seq_mode, ack_mode, size, window, block = arg
            seq = app_next if seq_mode < 200 else (app_next + (seq_mode - 228) * 50) & MASK
            if ack_mode < 160:
                acked = min(acked + 300 * (ack_mode % 5) or sent, sent)
            at = acked if ack_mode < 240 else acked + (ack_mode - 248) * 300
            tsval += 1
            blocks: tuple[tuple[int, int], ...] = ()
            if block:
                left = (ISS + acked + 600 * (1 + ack_mode % 8)) & MASK
                blocks = ((left, (left + 600) & MASK),)
            options = TcpOptions(sack_blocks=blocks, timestamp=(tsval, 0) if stamps else None)
            hdr = TcpHeader(40000, 443, seq, (ISS + at) & MASK, flags, window, options=options)
            pending.append((hdr, bytes(size)))
            if seq == app_next and not flags & RST:
                app_next = (app_next + size + (1 if flags & FIN else 0)) & MASK
            continue
        if kind == "deliver":
            for hdr, payload in pending:
                conn.segment_received(hdr, payload, now)
            pending = []
        elif kind == "time":
            jump, step = arg
            deadline = conn.next_deadline()
            now = deadline if deadline is not None and jump else now + step / 200
            conn.handle_timeout(now)
        elif kind == "send":
            with contextlib.suppress(LocalProtocolError):
                conn.send(bytes(arg))
        elif arg == 0:
            conn.close()
        while conn.next_event() is not NEED_DATA:
            pass
        for hdr, payload in _flush(conn, now, kind != "send"):
            if not hdr.flags & RST:
                end = hdr.seq - ISS + len(payload) + (1 if hdr.flags & (SYN | FIN) else 0)
                sent = max(sent, end & MASK)


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
