"""`TcpStream`: a trio half-closeable stream over one sans-I/O TCP connection.

The engine owns the connection and the TUN; the stream is the flow's view of
it. Reads take in-order data out of the connection (which reopens the
window the application sees: backpressure is simply not reading); writes
put outbound bytes into the connection's bounded send buffer and park while
it is full. The engine unparks a stream whenever a segment or a timer
touched its connection.

Closing follows the kernel's rules: `send_eof` sends a FIN and keeps
receiving; `aclose` sends a FIN too, unless data the application sent is
still unread, in which case it resets the connection, as `close()` on a
socket with unread data does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Protocol

import trio

from outbounds.base import NowaitStream
from stack.tcp import (
    NEED_DATA,
    Closed,
    ConnectionReset,
    DataReceived,
    EofReceived,
    TcpConnection,
    TcpState,
)

_DEAD_STATES = frozenset({TcpState.CLOSED, TcpState.TIME_WAIT})
# What `_rbuf` holds when nothing is buffered: one view shared by every
# stream (a memoryview and its buffer are about 300 bytes each).
_NO_DATA = memoryview(b"")


class Flusher(Protocol):
    """What a stream needs from the engine: writing out pending segments."""

    def flush(self) -> None: ...


class _ConflictDetector:
    """Raises BusyResourceError when two tasks use one direction at once.

    A lock would do too, but acquiring a trio lock is a checkpoint: one
    more trip through the scheduler on every send and receive.
    """

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._busy = False
        self._message = message

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(self._message)
        self._busy = True

    def __exit__(self, *exc_info: object) -> None:
        self._busy = False


class TcpStream(NowaitStream):
    """The application side of a proxied TCP flow."""

    # One per flow: slots, and a parking lot only once a task waits here
    # (the splice's fast path never does; a lot is about 250 bytes).
    __slots__ = (
        "_closed",
        "_conn",
        "_eof",
        "_eof_sent",
        "_flusher",
        "_lot",
        "_on_wake",
        "_rbuf",
        "_receiving",
        "_reset",
        "_sending",
    )

    def __init__(self, flusher: Flusher, conn: TcpConnection) -> None:
        self._flusher = flusher
        self._conn = conn
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._rbuf = _NO_DATA
        self._eof = False  # the application's FIN was handed to a reader
        self._reset = False  # the connection was reset (by either side)
        self._closed = False  # aclose() was called
        self._eof_sent = False
        self._receiving = _ConflictDetector("another task is receiving")
        self._sending = _ConflictDetector("another task is sending")
        self._on_wake: Callable[[], None] | None = None

    @property
    def connection(self) -> TcpConnection:
        return self._conn

    def _parking_lot(self) -> trio.lowlevel.ParkingLot:
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        return self._lot

    def _unpark_all(self) -> None:
        if self._lot is not None:
            self._lot.unpark_all()

    def wake(self) -> None:
        """Called by the engine when the connection may have news.

        A closed stream stays registered until its connection is gone, so
        that data the application sends after we closed is answered with a
        reset, as the kernel answers data for a closed socket.
        """
        if self._closed and not self._reset and self._has_unread():
            self.abort()
        if self._lot is not None:
            self._lot.unpark_all()
        if self._on_wake is not None:
            self._on_wake()

    def set_wake_callback(self, callback: Callable[[], None] | None) -> None:
        """Have every `wake` call `callback` too (None: stop).

        It runs in the engine's task, synchronously, after the segments
        that woke the stream: the splice moves application data on from
        there instead of keeping a task parked for it.
        """
        self._on_wake = callback

    @property
    def finished(self) -> bool:
        """Closed by us and the connection is gone: the engine can forget it."""
        return self._closed and self._conn.state in _DEAD_STATES

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        self._check_open()
        with self._receiving:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self._take(max_bytes)
            if data is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while True:
                # Parking is a checkpoint: like trio's own sockets, a call
                # that blocked does not yield a second time.
                await self._parking_lot().park()
                data = self._take(max_bytes)
                if data is not None:
                    return data

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What `receive_some` would return now, without a checkpoint.

        For the splice, which calls it from `wake`: the data, b"" at the
        application's EOF, or None when nothing has come yet.

        Raises:
            trio.BrokenResourceError: the connection was reset.
            trio.ClosedResourceError: the stream was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        # Synchronous, so no other call starts while this one runs: a
        # task inside `receive_some` is the only conflict there can be,
        # and marking the direction busy meanwhile would change nothing.
        # (Called twice per wake-up of a flow: once for the data, once
        # to find nothing more.)
        receiving = self._receiving
        if receiving._busy:
            raise trio.BusyResourceError(receiving._message)
        return self._take(max_bytes)

    def _take(self, max_bytes: int | None) -> bytes | None:
        """Take in-order data out of the connection; b"" at EOF, None if none yet."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if self._rbuf:
                if max_bytes is None or max_bytes >= len(self._rbuf):
                    data = bytes(self._rbuf)
                    self._rbuf = _NO_DATA
                else:
                    data = bytes(self._rbuf[:max_bytes])
                    self._rbuf = self._rbuf[max_bytes:]
                return data
            if self._eof:
                return b""
            if self._reset:
                raise trio.BrokenResourceError("connection reset by the application")
            event = self._conn.next_event()
            if type(event) is DataReceived:
                self._rbuf = memoryview(event.data)
                # Taking data out reopens the window: let the ACK go.
                self._flusher.flush()
            elif type(event) is EofReceived:
                self._eof = True
            elif type(event) is ConnectionReset:
                self._reset = True
            elif type(event) is Closed:
                if not self._eof:
                    self._reset = True
            else:
                assert event is NEED_DATA
                return None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        with self._sending:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was called")
            view = memoryview(data).cast("B")
            parked = False
            while view:
                self._check_open()
                sent = self._queue(view)
                if sent:
                    view = view[sent:]
                else:
                    await self._parking_lot().park()
                    parked = True
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        """Queue what fits in the send buffer now, without a checkpoint.

        For the splice, whose receives already yield: returns the bytes
        taken; the rest goes with `send_all`. With `eof`, and when all of
        `data` fits, the FIN is queued too, so that it leaves in the
        same segment as the data's end.
        """
        # Synchronous: checking for a task inside `send_all` is enough
        # (see `receive_nowait`).
        sending = self._sending
        if sending._busy:
            raise trio.BusyResourceError(sending._message)
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called")
        if isinstance(data, bytearray):
            data = bytes(data)
        return self._queue(data, eof=eof)

    def send_eof_nowait(self) -> None:
        """`send_eof` without the checkpoint (see `send_nowait`)."""
        with self._sending:
            self._check_open()
            self._queue_eof()

    def _queue(self, data: bytes | memoryview, *, eof: bool = False) -> int:
        """Put what fits of `data` into the connection; let it go out.

        With `eof`, when all of `data` fits, the FIN is queued behind it
        (one flush for both).
        """
        self._check_alive()
        sent = self._conn.send(data)
        if eof and sent == len(data):
            self._eof_sent = True
            self._conn.close()
        elif not sent:
            return 0
        self._flusher.flush()
        return sent

    def _queue_eof(self) -> None:
        """Close our direction (FIN after the queued data), once."""
        if not self._eof_sent:
            self._eof_sent = True
            self._check_alive()
            self._conn.close()
            self._flusher.flush()

    def _check_alive(self) -> None:
        if self._reset or self._conn.state in _DEAD_STATES:
            self._reset = True
            raise trio.BrokenResourceError("connection to the application is gone")

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        with self._sending:
            await trio.lowlevel.checkpoint_if_cancelled()
            while not self._closed and not self._reset and self._conn.send_space() == 0:
                if self._conn.state in _DEAD_STATES:
                    break
                await self._parking_lot().park()
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        self._check_open()
        with self._sending:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._queue_eof()
            await trio.lowlevel.cancel_shielded_checkpoint()

    def abort(self) -> None:
        """Reset the connection now (RST to the application)."""
        if self._conn.state not in _DEAD_STATES:
            self._conn.abort()
            self._flusher.flush()
        self._reset = True
        self._unpark_all()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """`aclose` without the checkpoint, for a flow that is ending anyway.

        `aclose_forcefully` costs a cancelled checkpoint (an exception
        raised and caught), which is a measurable share of a short flow.
        """
        if not self._closed:
            self._closed = True
            if self._reset or self._has_unread():
                self.abort()
            elif not self._eof_sent and self._conn.state not in _DEAD_STATES:
                self._eof_sent = True
                self._conn.close()
                self._flusher.flush()
            self._unpark_all()

    def _has_unread(self) -> bool:
        """Whether the application sent data nobody read (then close resets)."""
        if self._rbuf:
            return True
        event = self._conn.next_event()
        if type(event) is DataReceived:
            return True
        if type(event) is ConnectionReset:
            self._reset = True
        return False
