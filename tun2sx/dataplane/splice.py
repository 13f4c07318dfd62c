"""The splice: copying bytes both ways between an application's TCP flow and its outbound.

What it owns: one flow's two copy directions and how they hand over to each
other (in the engine's wake-ups, in the flow's task, or in a task of their
own), the byte counts of the flow's `FlowInfo` and its `closer` (the
controller's close breaks the splice). Half-close is kept: the
application's FIN becomes `send_eof` on the outbound and the outbound's EOF
our FIN. A break on either side resets the other.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import trio

from outbounds.base import NowaitStream
from tun2sx.dataplane.tcpstream import TcpStream

if TYPE_CHECKING:
    from tun2sx.dataplane.context import FlowInfo


def splice(
    app: trio.abc.HalfCloseableStream,
    upstream: trio.abc.HalfCloseableStream,
    bufsize: int,
    info: FlowInfo | None = None,
    read_size: Callable[[], int] | None = None,
) -> Coroutine[Any, Any, None]:
    """Copy both ways until both sides have sent EOF, or either breaks.

    A break on one side (reset, error) resets the other: the application
    gets an RST, the outbound socket is closed with SO_LINGER 0 when it is a
    plain socket, so both ends learn the flow failed rather than ended.

    Args:
        bufsize: the most bytes read at once from either side.
        read_size: asked before each read that waits, how much to read
            now (at most `bufsize`); by default always `bufsize`. What one
            read brings is written on in one step of the flow's task, and
            every other flow waits for that step: a bulk flow that moves
            less at once while others are open keeps their round trips short.

    Returns the copy's coroutine, to be awaited, instead of awaiting it in
    one of its own: a held flow then keeps one coroutine frame fewer
    (about 250 bytes).
    """
    return _Splice(app, upstream, bufsize, info, read_size).run()


class _Splice:
    """One flow's two copy directions, in as few task steps as they allow.

    A short flow spends most of its CPU on trips through trio's scheduler,
    so the outbound-to-application direction (the download) runs in the
    flow's own task, and the application-to-outbound one (the upload),
    when both streams can move bytes without waiting (a `TcpStream`
    towards an outbound with `send_nowait`), runs from the engine's
    wake-ups: the engine calls `_upload` right after the segments that
    brought the data, and it goes straight out. No second task, no
    nursery.

    Only when the outbound does not take everything at once (its buffer is
    full) does the upload get a task of its own, which waits for room and
    from then on reads the application itself: not reading is what closes
    the application's window. The flow's task opens the nursery for it,
    and the download goes on there. Streams that cannot send without
    waiting get the two tasks from the start.
    """

    __slots__ = (
        "app",
        "broken",
        "bufsize",
        "carried",
        "carried_end",
        "download_done",
        "error",
        "info",
        "pending",
        "read_size",
        "receiving",
        "scope",
        "upload",
        "upstream",
        "waiter",
        "woken_by",
    )

    def __init__(
        self,
        app: trio.abc.HalfCloseableStream,
        upstream: trio.abc.HalfCloseableStream,
        bufsize: int,
        info: FlowInfo | None,
        read_size: Callable[[], int] | None = None,
    ) -> None:
        self.app = app
        self.read_size = read_size
        # The application's stream while the upload runs in its wake-ups.
        self.woken_by: TcpStream | None = None
        self.upstream = upstream
        self.bufsize = bufsize
        self.info = info
        self.upload = _UPLOAD_IN_WAKE
        self.broken = False
        self.download_done = False
        self.receiving = False  # the download waits in the outbound's receive
        # Read by the download, not yet passed on, and what follows it.
        self.carried: list[bytes | bytearray | memoryview] = []
        self.carried_end: object = None  # None, _EOF, or the outbound's reset
        self.pending: memoryview | None = None  # what the upload task sends first
        self.error: Exception | None = None  # a bug met in `_upload`
        self.scope: trio.CancelScope | None = None
        self.waiter: trio.lowlevel.Task | None = None

    async def run(self) -> None:
        app = self.app
        if self.info is not None:
            # The controller's close breaks the flow (a reset to both
            # ends) with the scope the splice has anyway: the flow needs
            # no cancel scope of its own for it. (`close_flow` takes it
            # off again: info -> close -> splice -> info is a cycle.)
            self.info.closer = self.close
        if type(app) is TcpStream and isinstance(self.upstream, NowaitStream):
            with trio.CancelScope() as self.scope:
                self.woken_by = app
                app.set_wake_callback(self._upload)
                try:
                    # Data may have come with the handshake's last ACK.
                    self._upload()
                    await self._download(fast=True)
                    await self._wait_upload()
                finally:
                    app.set_wake_callback(None)
                    self.woken_by = None
        else:
            self.upload = _UPLOAD_IN_TASK
        if self.upload is _UPLOAD_IN_TASK and not self.broken:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                nursery.start_soon(self._upload_task, self.pending)
                self.pending = None
                if not self.download_done:
                    await self._download(fast=False)
        if self.broken:
            if isinstance(app, TcpStream):
                app.abort()
            reset_socket(self.upstream)
        if self.error is not None:
            raise self.error

    def _read_size(self) -> int:
        read_size = self.read_size
        return self.bufsize if read_size is None else min(read_size(), self.bufsize)

    def close(self) -> None:
        """End the flow now as one cut short: both ends are reset."""
        if not self.broken:
            self._break()

    def _break(self) -> None:
        """One side failed: stop both directions (the caller resets both)."""
        self.broken = True
        if self.woken_by is not None:
            self.woken_by.set_wake_callback(None)
        assert self.scope is not None
        self.scope.cancel()

    async def _wait_upload(self) -> None:
        """Wait until `_upload` has passed the application's EOF on, or handed over."""
        if self.upload is not _UPLOAD_IN_WAKE or self.broken:
            return
        self.waiter = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _upload(self) -> None:
        """Application to outbound, in the engine's task; never waits."""
        if self.upload is not _UPLOAD_IN_WAKE:
            return
        app = self.woken_by
        # `run` chose this path for these two (the ABC check of an assert
        # here was two calls per wake-up).
        upstream: NowaitStream = self.upstream  # type: ignore[assignment]
        assert app is not None
        try:
            while True:
                data = app.receive_nowait(self.bufsize)
                if data is None:
                    return
                if not data:
                    upstream.send_eof_nowait()
                    self._leave_wake(_UPLOAD_DONE)
                    return
                sent = upstream.send_nowait(data)
                if self.info is not None:
                    self.info.bytes_up += sent
                if sent < len(data):
                    self.pending = memoryview(data)[sent:]
                    self._leave_wake(_UPLOAD_IN_TASK)
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._break()
        except Exception as exc:
            # Raised here, in the engine's task, it would end every flow:
            # the flow's own task raises it instead, and resets this flow.
            self.error = exc
            self._break()

    def _leave_wake(self, upload: str) -> None:
        """The upload is done, or needs its task: tell the flow's task."""
        self.upload = upload
        if self.woken_by is not None:
            self.woken_by.set_wake_callback(None)
        if self.waiter is not None:
            trio.lowlevel.reschedule(self.waiter)
            self.waiter = None
        elif upload is _UPLOAD_IN_TASK and self.receiving:
            # Out of the download's wait (nothing was read yet) to start the
            # upload task; a download busy sending sees `upload` next round.
            assert self.scope is not None
            self.scope.cancel()

    async def _upload_task(self, pending: memoryview | None) -> None:
        app, upstream, info = self.app, self.upstream, self.info
        nowait = upstream if isinstance(upstream, NowaitStream) else None
        try:
            if pending is not None:
                await upstream.send_all(pending)
                if info is not None:
                    info.bytes_up += len(pending)
            while True:
                data = await app.receive_some(self._read_size())
                if not data:
                    break
                # The receive yielded already: send without another trip
                # through the scheduler where the stream allows.
                sent = 0 if nowait is None else nowait.send_nowait(data)
                if sent < len(data):
                    await upstream.send_all(memoryview(data)[sent:] if sent else data)
                if info is not None:
                    info.bytes_up += len(data)
            if nowait is None:
                await upstream.send_eof()
            else:
                nowait.send_eof_nowait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._break()

    async def _download(self, *, fast: bool) -> None:
        """Outbound to application, in the flow's task.

        With `fast` (the upload runs in wake-ups), it returns early, the
        download not done, as soon as the upload needs its own task, and
        before it would wait for the application to take data: the upload
        must not wait behind that (an application that writes everything
        before it reads would never read). What it holds by then, data not
        yet passed on and what follows it (the outbound's EOF or reset),
        stays in `carried` and `carried_end` for the call without `fast`.
        """
        app, upstream, info = self.app, self.upstream, self.info
        size = self.bufsize
        app_nowait = app if isinstance(app, NowaitStream) else None
        up_nowait = upstream if isinstance(upstream, NowaitStream) else None
        # Looking ahead for the EOF pays only when it can go with the data.
        receive_nowait = None
        if app_nowait is not None and up_nowait is not None:
            receive_nowait = up_nowait.receive_nowait
        # At the start the application has sent nothing yet, so there is
        # rarely an answer: wait before the first recv rather than after.
        receive_some = upstream.receive_some
        wait_then_receive = None if up_nowait is None else up_nowait.receive_after_wait
        receive = wait_then_receive or receive_some
        backlog, end = self.carried, self.carried_end
        self.carried, self.carried_end = [], None
        try:
            while True:
                if backlog:
                    data = backlog.pop(0)
                elif end is not None:
                    break
                else:
                    if fast and self.upload is _UPLOAD_IN_TASK:
                        return
                    self.receiving = True
                    size = self._read_size()
                    try:
                        data = await receive(size)
                    finally:
                        self.receiving = False
                    receive = receive_some
                    if not data:
                        end = _EOF
                    if fast and self.upload is _UPLOAD_IN_TASK:
                        # The scope may be cancelled now (see `_leave_wake`):
                        # a send here could lose the data half sent.
                        self.carried = [data] if data else []
                        self.carried_end = end
                        return
                    if not data:
                        break
                if receive_nowait is not None and not backlog and end is None:
                    # A short response usually has its EOF right behind it:
                    # then the FIN leaves with the data, in one segment, and
                    # the EOF costs no trip through the scheduler. A reset
                    # behind it ends the flow only once the data is passed on.
                    try:
                        ahead = receive_nowait(size)
                    except trio.BrokenResourceError as exc:
                        end = exc
                    else:
                        if ahead is None:
                            # The socket was empty just now: unless time
                            # passes (a wait for the application below),
                            # the next receive's first recv would only
                            # fail; it waits for readability first instead.
                            receive = wait_then_receive or receive_some
                        elif ahead:
                            backlog.append(ahead)
                        else:
                            end = _EOF
                if app_nowait is None:
                    sent = 0
                else:
                    sent = app_nowait.send_nowait(data, eof=end is _EOF and not backlog)
                if sent < len(data):
                    rest = memoryview(data)[sent:] if sent else data
                    if fast and self.upload is not _UPLOAD_DONE:
                        # The application's window is shut: hand the upload
                        # to its task before waiting for the application.
                        if info is not None:
                            info.bytes_down += sent
                        self.carried = [rest, *backlog]
                        self.carried_end = end
                        if self.upload is _UPLOAD_IN_WAKE:
                            self._leave_wake(_UPLOAD_IN_TASK)
                        return
                    await app.send_all(rest)
                    receive = receive_some  # data may have come meanwhile
                if info is not None:
                    info.bytes_down += len(data)
                if backlog:
                    if fast and self.upload is _UPLOAD_IN_TASK:
                        self.carried = backlog
                        self.carried_end = end
                        return
                    # Read without waiting: yield here, as a receive would.
                    await trio.lowlevel.checkpoint()
            if isinstance(end, Exception):
                raise end
            if app_nowait is None:
                await app.send_eof()
            else:
                app_nowait.send_eof_nowait()  # a no-op when the FIN went with the data
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._break()
        self.download_done = True


# Where the upload runs: in the engine's wake-ups, in a task, or finished.
_UPLOAD_IN_WAKE = "in wake"
_UPLOAD_IN_TASK = "in task"
_UPLOAD_DONE = "done"
_EOF = "eof"  # `carried_end`: the outbound's EOF follows what is carried


def reset_socket(stream: trio.abc.Stream) -> None:
    sock = getattr(stream, "socket", None)
    if sock is not None:
        # Close with RST instead of FIN so the far side sees a failure.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
