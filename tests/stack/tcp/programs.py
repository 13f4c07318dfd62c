"""Random programs for one connection, and the twin comparison of its state.

A program is what the application and the outbound do to a connection:
segments (data, ACKs that move on towards what was sent, stale or future
ones, SACK blocks, closed and small windows, FIN, RST) gathered until
delivered, time passing (to the next deadline or by a step), sends and a
close now and then; after each step the connection's events are taken and
its output collected. `run` plays one through hooks, so a test can
compare, at the step it cares about, a twin (`twin`, a deep copy) taken
through the general path with the connection itself (`state`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from fuzz.tcp_runs import _feed_as_batch
from stack.errors import LocalProtocolError
from stack.tcp import NEED_DATA, FlowKey, TcpConfig, TcpConnection
from stack.tcp.output import Output
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, DataRun, TcpHeader, TcpOptions

KEY = FlowKey(b"\x0a\x00\x00\x02", 40000, b"\xc6\x12\x00\x05", 443)
CONFIG = TcpConfig(mss=600, rcv_buf=20_000, snd_buf=60_000, max_ooo_bytes=8000, max_ooo_ranges=8)
APP_ISN = 0xFFFFFF00
ISS = 0xFFFFFFF0
MASK = 0xFFFFFFFF
_FLAGS = (ACK,) * 10 + (ACK | PSH,) * 3 + (ACK | FIN, RST)
# What `Output.begin` builds for the headers of one output call and nothing
# outside that call reads.
_PER_CALL = {(Output, "_opts"), (Output, "_head"), (Output, "_runs"), (Output, "sack_len")}

_SEGMENT = st.tuples(
    st.sampled_from(_FLAGS),
    st.integers(0, 255),  # where seq lies: mostly RCV.NXT
    st.integers(0, 255),  # how far the ACK moves, and whether it is off
    st.sampled_from((0,) * 6 + (1, 300, 1200)),  # payload
    st.sampled_from((0, 1, 300, 65535, 65535, 65535)),  # window
    st.sampled_from((False, False, False, True)),  # a SACK block
    st.integers(0, 3),  # the timestamp echo: 0 none, else our clock less a step
)
_SEG = st.tuples(st.just("seg"), _SEGMENT)
_DELIVER = st.tuples(st.just("deliver"), st.booleans())  # as a batch or one by one
_SEND = st.tuples(st.just("send"), st.sampled_from((1, 64, 600, 1300, 5000, 40_000)))
ACTIONS = st.lists(
    st.one_of(
        _SEG,
        _SEG,
        _SEG,
        _DELIVER,
        _DELIVER,
        st.tuples(st.just("time"), st.tuples(st.booleans(), st.integers(0, 255))),
        _SEND,
        _SEND,
        st.tuples(st.just("close"), st.integers(0, 7)),
    ),
    min_size=15,
    max_size=80,
)
# A program's whole draw, for `@given(**PROGRAM)`: the SYN's options, whether
# the handshake completes first (most runs), and the actions; the keywords
# are `run`'s.
PROGRAM = {
    "sack": st.booleans(),
    "stamps": st.booleans(),
    "wscale": st.integers(0, 8),
    "handshake": st.sampled_from((True, True, True, False)),
    "actions": ACTIONS,
}
Segments = list[tuple[TcpHeader, bytes]]
Deliver = Callable[[TcpConnection, Segments, float, bool], None]
Flush = Callable[[TcpConnection, float, bool], list[tuple[TcpHeader, bytes]]]


def state(obj: Any) -> Any:
    """Every slot of a connection and its parts, as plain values."""
    if isinstance(obj, (int, float, str, bytes, bool, type(None))):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [state(x) for x in obj])
    if isinstance(obj, dict):
        return {k: state(v) for k, v in obj.items()}
    if callable(obj) and not hasattr(type(obj), "__slots__"):
        return repr(obj)
    slots = [
        name
        for cls in type(obj).__mro__
        for name in getattr(cls, "__slots__", ())
        if (cls, name) not in _PER_CALL
    ]
    if not slots:
        return repr(obj)
    return (type(obj).__name__, {name: state(getattr(obj, name, None)) for name in slots})


def twin(conn: TcpConnection) -> TcpConnection:
    """A deep copy; the send buffer's chunks (memoryviews, never written) are shared."""
    dispatch: Any = copy._deepcopy_dispatch  # type: ignore[attr-defined]
    dispatch[memoryview] = lambda view, memo: view
    try:
        return copy.deepcopy(conn)
    finally:
        del dispatch[memoryview]


def collect(conn: TcpConnection, now: float, runs: bool) -> list[tuple[TcpHeader, bytes]]:
    """The connection's output, a `DataRun` read as its segments."""
    out = conn.output(now) if runs else conn.segments_to_send(now)
    sent = []
    for hdr, payload in out:
        if isinstance(hdr, DataRun):
            sent += [(h, bytes(p)) for h, p in hdr.segments()]
        else:
            sent.append((hdr, bytes(payload)))
    return sent


def deliver(conn: TcpConnection, segments: Segments, now: float, batch: bool) -> None:
    """Hand `segments` over one by one, or as `NetStack.receive_batch` does."""
    if batch:
        _feed_as_batch(conn, segments, now)
    else:
        for hdr, payload in segments:
            conn.segment_received(hdr, payload, now)


def run(
    sack: bool,
    stamps: bool,
    wscale: int,
    handshake: bool,
    actions: list[tuple[str, Any]],
    receive: Deliver = deliver,
    flush: Flush = collect,
) -> None:
    """Play `actions` on a new connection (established first if `handshake`)."""
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
        assert len(flush(conn, now, True)) == 1
        options = TcpOptions(timestamp=(tsval, ISS & MASK) if stamps else None)
        ack = TcpHeader(40000, 443, app_next, (ISS + 1) & MASK, ACK, 65535, options=options)
        receive(conn, [(ack, b"")], now, False)
    for kind, arg in actions:
        if kind == "seg":
            flags, seq_mode, ack_mode, size, window, block, echo = arg
            seq = app_next if seq_mode < 200 else (app_next + (seq_mode - 228) * 50) & MASK
            if ack_mode < 160:  # on towards what we sent, or all of it
                acked = min(acked + 300 * (ack_mode % 5), sent) if ack_mode % 5 else sent
            at = acked if ack_mode < 240 else acked + (ack_mode - 248) * 300
            tsval += 1
            blocks: tuple[tuple[int, int], ...] = ()
            if block:
                left = (ISS + acked + 600 * (1 + ack_mode % 8)) & MASK
                blocks = ((left, (left + 600) & MASK),)
            tsecr = (int(now * 1000) - 10 * echo + ISS) & MASK if echo else 0
            options = TcpOptions(sack_blocks=blocks, timestamp=(tsval, tsecr) if stamps else None)
            hdr = TcpHeader(40000, 443, seq, (ISS + at) & MASK, flags, window, options=options)
            pending.append((hdr, bytes(size)))
            if seq == app_next and not flags & RST:
                app_next = (app_next + size + (1 if flags & FIN else 0)) & MASK
            continue
        if kind == "deliver":
            receive(conn, pending, now, arg)
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
        for hdr, payload in flush(conn, now, kind != "send"):
            if not hdr.flags & RST:
                end = hdr.seq - ISS + len(payload) + (1 if hdr.flags & (SYN | FIN) else 0)
                sent = max(sent, end & MASK)
