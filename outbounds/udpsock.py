"""The UDP socket every outbound session relays through, built for packet rates.

A datagram relay in Python pays per system call and per trip through the
scheduler, not per byte. So this is a thin layer over a non-blocking
stdlib socket (not `trio.socket`, whose every call is a checkpoint and a
context manager): sends never wait (a full buffer drops the datagram and
says so, as a router would), and receives drain the socket until EAGAIN
after one wait, so a burst costs one wake-up.

It also owns what the kernel knows about this socket's losses: the
receive-buffer drops (`SO_MEMINFO`'s drop count, read on demand, so the hot
path pays nothing), and the buffer sizes themselves: large, with the FORCE
variants when allowed, because a burst that outruns one scheduling round
is otherwise dropped by the kernel before Python sees it.

OS errors are raised as they are; the sessions translate them once, with
the peer's name, into `OutboundError`.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

import trio

_T = TypeVar("_T")

__all__ = ["DEFAULT_UDP_BUFFER", "UdpSocket", "set_buffers"]

# 4 MiB each way: about 1,800 QUIC-sized datagrams at the kernel's ~2.3 KB
# per-skb accounting; a buffer is a limit, memory is used only when full.
DEFAULT_UDP_BUFFER = 4 << 20

_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_MEMINFO = 55
_SK_MEMINFO = struct.Struct("=9I")
_SK_MEMINFO_DROPS = 8

# A send that fails with one of these lost the datagram to a full queue
# (socket buffer, or the device's queue below it); nothing is wrong.
_FULL = frozenset({errno.EAGAIN, errno.ENOBUFS})

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_checkpoint = trio.lowlevel.checkpoint


def set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for `size`-byte send and receive buffers.

    The FORCE variants pass the `net.core.[rw]mem_max` caps but need
    CAP_NET_ADMIN; without it the capped request is the best there is.
    """
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class UdpSocket:
    """A non-blocking UDP socket with batch receives and non-waiting sends.

    Args:
        sock: a UDP socket; it is made non-blocking and owned from here on.
    """

    __slots__ = ("_error", "_fd", "_sock", "send_drops")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self.send_drops = 0  # datagrams lost to a full send buffer
        # An error met after a batch had begun, raised by the next call (the
        # kernel reports a socket error once: dropping it would hide it).
        self._error: OSError | None = None

    @property
    def socket(self) -> socket.socket:
        """The stdlib socket (for options and addresses)."""
        return self._sock

    def fileno(self) -> int:
        return self._fd

    def connect(self, address: tuple[object, ...]) -> None:
        """Fix the peer (a UDP connect does not wait: it only sets the route)."""
        self._sock.connect(address)

    def bind(self, address: tuple[object, ...]) -> None:
        self._sock.bind(address)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Send one datagram to the connected peer, or drop it.

        Returns:
            False when the send buffer (or the queue below it) was full and
            the datagram was dropped (counted in `send_drops`).

        Raises:
            OSError: any other failure (an ICMP error reported back, say).
        """
        try:
            self._sock.send(data)
        except OSError as exc:
            if exc.errno in _FULL:
                self.send_drops += 1
                return False
            raise
        return True

    def sendto_nowait(
        self, data: bytes | bytearray | memoryview, address: tuple[object, ...]
    ) -> bool:
        """As `send_nowait`, to `address` (an unconnected socket)."""
        try:
            self._sock.sendto(data, address)
        except OSError as exc:
            if exc.errno in _FULL:
                self.send_drops += 1
                return False
            raise
        return True

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one datagram, waiting for buffer room if there is none."""
        while True:
            try:
                self._sock.send(data)
                break
            except BlockingIOError:
                await _wait_writable(self._sock)
        await trio.lowlevel.checkpoint()

    async def sendto(
        self, data: bytes | bytearray | memoryview, address: tuple[object, ...]
    ) -> None:
        """Send one datagram to `address`, waiting for room if there is none."""
        while True:
            try:
                self._sock.sendto(data, address)
                break
            except BlockingIOError:
                await _wait_writable(self._sock)
        await trio.lowlevel.checkpoint()

    async def wait_readable(self) -> None:
        await _wait_readable(self._sock)

    def receive_batch_nowait(self, limit: int) -> list[bytes]:
        """The datagrams waiting now, at most `limit` (none: an empty list).

        Raises:
            OSError: the socket failed (e.g. an ICMP error from the peer);
                met after some datagrams, it is raised by the next call.
        """
        return self._drain(self._sock.recv, limit)

    def receive_from_batch_nowait(self, limit: int) -> list[tuple[bytes, tuple[object, ...]]]:
        """As `receive_batch_nowait`, with each datagram's source address."""
        return self._drain(self._sock.recvfrom, limit)

    def _drain(self, receive: Callable[[int], _T], limit: int) -> list[_T]:
        """Call `receive` until the socket has nothing more, at most `limit` times."""
        self._raise_saved()
        out: list[_T] = []
        try:
            while len(out) < limit:
                out.append(receive(65535))
        except BlockingIOError:
            pass
        except OSError as exc:
            if not out:
                raise
            self._error = exc
        return out

    def _raise_saved(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def receive_batch(self, limit: int) -> list[bytes]:
        """Every datagram waiting (at most `limit`, at least one), waiting
        for the first if there is none.

        A batch already waiting is taken at once but still yields to the
        other tasks (a checkpoint), so a busy socket never starves the rest
        of the process. Cancelled there, the batch is lost with the
        session that was being ended.

        Raises:
            OSError: the socket failed.
        """
        return await self._wait_batch(self.receive_batch_nowait, limit)

    async def receive_decoded(self, limit: int, decode: Callable[[bytes], _T | None]) -> list[_T]:
        """`receive_batch`, each datagram through `decode`; those it rejects
        (None: it counted them) are dropped, and an all-rejected batch waits
        for the next.

        Raises:
            OSError: the socket failed.
        """
        while True:
            out = [
                item
                for datagram in await self.receive_batch(limit)
                if (item := decode(datagram)) is not None
            ]
            if out:
                return out

    async def receive_from_batch(self, limit: int) -> list[tuple[bytes, tuple[object, ...]]]:
        """As `receive_batch`, with each datagram's source address."""
        return await self._wait_batch(self.receive_from_batch_nowait, limit)

    async def _wait_batch(self, take: Callable[[int], list[_T]], limit: int) -> list[_T]:
        out = take(limit)
        if out:
            await _checkpoint()
            return out
        while True:
            await _wait_readable(self._sock)
            out = take(limit)
            if out:
                return out

    async def receive(self) -> bytes:
        """Wait for one datagram from the connected peer."""
        while True:
            try:
                data = self._sock.recv(65535)
            except BlockingIOError:
                await _wait_readable(self._sock)
                continue
            await trio.lowlevel.checkpoint()
            return data

    async def receive_from(self) -> tuple[bytes, tuple[object, ...]]:
        """Wait for one datagram and its source address."""
        while True:
            try:
                data, source = self._sock.recvfrom(65535)
            except BlockingIOError:
                await _wait_readable(self._sock)
                continue
            await trio.lowlevel.checkpoint()
            return data, source

    def receive_drops(self) -> int:
        """Datagrams the kernel dropped for this socket (a full receive
        buffer, mostly): `SO_MEMINFO`'s drop count; 0 once closed or where
        the kernel has no such option."""
        if self._sock.fileno() < 0:
            return 0
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _SK_MEMINFO.size)
        except OSError:
            return 0
        if len(raw) < _SK_MEMINFO.size:
            return 0
        return int(_SK_MEMINFO.unpack(raw)[_SK_MEMINFO_DROPS])

    def close(self) -> None:
        self._sock.close()
