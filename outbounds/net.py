"""The socket boundary every outbound goes through.

Two jobs live here and nowhere else:

* Loop avoidance. When tun2sx routes the whole system into its TUN, its own
  connections to the proxy would be routed into the TUN as well and loop
  forever. The fix is per socket and must happen before `connect`: set a
  firewall mark (`SO_MARK`, matched by an `ip rule` that bypasses the TUN
  table), bind the socket to the real uplink (`SO_BINDTODEVICE`), or hand the
  descriptor to the platform (`protect(fd)` on Android's VpnService). Every
  outbound creates its sockets through `open_tcp` / `open_udp_socket` so no
  socket can forget this.
* Error translation. OS errors and timeouts become `OutboundError` once, here,
  with a message that names the peer, so the runtime can turn them into an RST
  or an ICMP unreachable without knowing about errno.

Outbound TCP connections are `TcpSocketStream`s: the trio stream contract
implemented straight over a non-blocking stdlib socket. `trio.SocketStream`
and `trio.socket` are general (conflict detectors, address resolution on
every connect, context managers per call); at a proxy's connection rate
their Python overhead was a large share of the CPU spent per flow.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import socket
from collections.abc import Callable

import attrs
import trio

from .base import FailureReply, IPAddress, NowaitStream, OutboundError, reply_for_oserror
from .udpsock import DEFAULT_UDP_BUFFER, UdpSocket, set_buffers

__all__ = [
    "PrefixedStream",
    "SocketOptions",
    "TcpSocketStream",
    "error_from_oserror",
    "finish_tcp_connect",
    "format_endpoint",
    "open_tcp",
    "open_udp_socket",
    "resolve",
    "sockaddr_of",
    "start_tcp_connect",
]

# Linux values; the names exist in the socket module on Linux builds, but the
# numbers are ABI and do not change.
_SO_MARK = getattr(socket, "SO_MARK", 36)
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)
# Linux 4.11+: connect() returns at once and the first write goes in the SYN
# (RFC 7413) when the kernel holds a Fast Open cookie for the server.
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)

# As trio.SocketStream: the receive size when the caller gives none, and
# TCP_NOTSENT_LOWAT, so that "writable" means little unsent data is queued.
DEFAULT_RECEIVE_SIZE = 1 << 16
_NOTSENT_LOWAT = 1 << 14
# Linux 4.18+: a recvmsg also says how many bytes are still queued behind
# what it returned, and 1 when only the peer's FIN is (tcp_inq_hint).
_TCP_INQ = getattr(socket, "TCP_INQ", 36)
_INQ_SPACE = socket.CMSG_SPACE(4)
_NOTHING_QUEUED = bytes(4)

_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


def _check_timeout(
    instance: SocketOptions, attribute: attrs.Attribute[float], value: float
) -> None:
    if not value > 0:
        raise ValueError(f"connect_timeout must be positive, got {value}")


@attrs.frozen
class SocketOptions:
    """How an outbound's own sockets are made, so they bypass the TUN.

    Attributes:
        fwmark: `SO_MARK` value for every socket (needs CAP_NET_ADMIN), or None.
        interface: Interface name for `SO_BINDTODEVICE`, or None.
        protect: Called with each socket's file descriptor before connect; must
            return True once the platform has excluded it from the VPN. None
            when there is no such hook.
        connect_timeout: Seconds allowed for name resolution plus connect.
        udp_buffer: Send and receive buffer size of every UDP socket, bytes
            (None: the kernel's default).
    """

    fwmark: int | None = None
    interface: str | None = None
    protect: Callable[[int], bool] | None = None
    connect_timeout: float = attrs.field(default=10.0, validator=_check_timeout)
    udp_buffer: int | None = DEFAULT_UDP_BUFFER


def format_endpoint(host: str | IPAddress, port: int) -> str:
    """Render `host:port` for messages, bracketing IPv6 addresses.

    Args:
        host: A name or an address.
        port: The port.

    Returns:
        The printable endpoint.
    """
    if isinstance(host, ipaddress.IPv6Address) or (isinstance(host, str) and ":" in host):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def error_from_oserror(exc: OSError, doing: str) -> OutboundError:
    """Translate an OS error into an `OutboundError`.

    Args:
        exc: The OS error.
        doing: What was being attempted, e.g. "connecting to 10.0.0.1:80".

    Returns:
        The `OutboundError` to raise (the caller chains it with `from`).
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutboundError(reply_for_oserror(exc), f"{doing} failed: {reason}")


def _prepare(sock: socket.socket | trio.socket.SocketType, opts: SocketOptions) -> None:
    """Apply the loop-avoidance options; must run before connect or sendto."""
    try:
        if opts.fwmark is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, opts.fwmark)
        if opts.interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, opts.interface.encode())
    except OSError as exc:
        # A socket that cannot be marked would loop through the TUN; refusing
        # it is the only safe answer, and the message says which option failed.
        raise OutboundError(
            FailureReply.NET_UNREACHABLE,
            f"cannot apply socket options (fwmark={opts.fwmark}, "
            f"interface={opts.interface}): {exc.strerror or exc}",
        ) from exc
    if opts.protect is not None and not opts.protect(sock.fileno()):
        raise OutboundError(
            FailureReply.NET_UNREACHABLE, "protect(fd) refused to exclude the socket from the VPN"
        )


def sockaddr_of(address: IPAddress, port: int) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    """The family and socket address of an IP address and port."""
    if isinstance(address, ipaddress.IPv4Address):
        return socket.AF_INET, (str(address), port)
    return socket.AF_INET6, (str(address), port, 0, 0)


async def resolve(
    host: str | IPAddress, port: int, kind: socket.SocketKind
) -> list[tuple[socket.AddressFamily, tuple[object, ...]]]:
    """Resolve `host` with the system resolver (no resolution for addresses).

    Args:
        host: A name or an address.
        port: The port to put into the socket addresses.
        kind: `SOCK_STREAM` or `SOCK_DGRAM`.

    Returns:
        `(family, sockaddr)` pairs in the resolver's preference order.

    Raises:
        OutboundError: HOST_UNREACHABLE when the name does not resolve.
    """
    if not isinstance(host, str):
        return [sockaddr_of(host, port)]
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=kind)
    except socket.gaierror as exc:
        raise OutboundError(
            FailureReply.HOST_UNREACHABLE, f"cannot resolve {host!r}: {exc.strerror or exc}"
        ) from exc
    # Deduplicate while keeping order: getaddrinfo may list an address once
    # per protocol.
    seen: dict[tuple[object, ...], socket.AddressFamily] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(tuple(sockaddr), family)
    if not seen:
        raise OutboundError(FailureReply.HOST_UNREACHABLE, f"{host!r} has no IP address")
    return [(family, addr) for addr, family in seen.items()]


async def open_tcp(
    host: str | IPAddress,
    port: int,
    opts: SocketOptions,
    *,
    early_data: bytes = b"",
    fast_open: bool = False,
) -> TcpSocketStream:
    """Connect a TCP socket that bypasses the TUN.

    Each resolved address is tried in order until one connects; the whole
    attempt, resolution included, is bounded by `opts.connect_timeout`.

    Args:
        host: Name or address to connect to.
        port: TCP port.
        opts: Loop-avoidance options and the timeout.
        early_data: Bytes to send as soon as the connection allows (a proxy
            handshake's first message); sent when this returns.
        fast_open: Ask for TCP Fast Open (RFC 7413): with a cookie from an
            earlier connection, `early_data` rides in the SYN and the
            server's answer can come one round trip sooner. Falls back to
            a plain connect without a word when the kernel refuses the
            option or holds no cookie; a server that ignores the data in
            the SYN gets it again after the handshake (the kernel resends
            it). Connect errors surface here either way.

    Returns:
        A connected `TcpSocketStream` (TCP_NODELAY set; `send_eof` half-closes).

    Raises:
        OutboundError: The error of the last address tried, or a timeout
            (HOST_UNREACHABLE), with a message naming `host:port`.
    """
    deadline = trio.current_time() + opts.connect_timeout
    if trio.current_effective_deadline() < deadline:
        # An enclosing deadline comes first, so ours could never fire: no
        # scope of our own (a measurable cost once per connection).
        stream, last_error = await _connect_first(host, port, opts, early_data, fast_open)
        timed_out = False
    else:
        # A bare cancel scope: trio.move_on_after is a generator context
        # manager, a measurable cost once per connection.
        stream = last_error = None
        with trio.CancelScope(deadline=deadline) as scope:
            stream, last_error = await _connect_first(host, port, opts, early_data, fast_open)
        timed_out = scope.cancelled_caught
    if stream is not None:
        return stream
    if last_error is not None and not timed_out:
        raise last_error
    raise OutboundError(
        FailureReply.HOST_UNREACHABLE,
        f"connecting to {format_endpoint(host, port)} "
        f"timed out after {_seconds(opts.connect_timeout)}",
    )


async def _connect_first(
    host: str | IPAddress,
    port: int,
    opts: SocketOptions,
    early_data: bytes,
    fast_open: bool,
) -> tuple[TcpSocketStream | None, OutboundError | None]:
    """Try each address of `host` in order; the stream, or the last error."""
    # The endpoint for the messages is only formatted for one: an address's
    # str() is a Python-level conversion, once per connection otherwise.
    last_error: OutboundError | None = None
    for family, sockaddr in await resolve(host, port, socket.SOCK_STREAM):
        try:
            sock = _connectable_socket(family, opts)
        except OSError as exc:
            last_error = error_from_oserror(exc, f"connecting to {format_endpoint(host, port)}")
            continue
        if fast_open and early_data:
            # Refused when the sysctl net.ipv4.tcp_fastopen lacks the client
            # bit: then this is a plain connect.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        try:
            await _connect(sock, sockaddr, early_data)
        except OSError as exc:
            sock.close()
            last_error = error_from_oserror(exc, f"connecting to {format_endpoint(host, port)}")
            continue
        except BaseException:
            sock.close()
            raise
        return TcpSocketStream(sock), None
    return None, last_error


def start_tcp_connect(
    address: IPAddress, port: int, opts: SocketOptions
) -> tuple[socket.socket, bool]:
    """Start connecting a TCP socket that bypasses the TUN, without waiting.

    For a connection made ahead of its use (a proxy connection kept ready):
    nothing here waits, so it can run while something else is awaited.

    Returns:
        The non-blocking socket and whether it is connected already (to a
        peer on this machine or behind a veth the handshake is over before
        `connect` returns); if not, `finish_tcp_connect` waits for it.

    Raises:
        OSError: The socket could not be made or the connect failed at once.
        OutboundError: The loop-avoidance options could not be applied.
    """
    family, sockaddr = sockaddr_of(address, port)
    sock = _connectable_socket(family, opts)
    try:
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            try:
                sock.getpeername()
            except OSError:
                return sock, False
        elif err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock, True


async def finish_tcp_connect(sock: socket.socket) -> None:
    """Wait for a connect that `start_tcp_connect` left in progress.

    Raises:
        OSError: The connect failed.
    """
    await _wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _connectable_socket(family: socket.AddressFamily, opts: SocketOptions) -> socket.socket:
    """A non-blocking TCP socket with the loop-avoidance and stream options set."""
    sock = socket.socket(family, socket.SOCK_STREAM | _SOCK_NONBLOCK)
    try:
        if not _SOCK_NONBLOCK:
            sock.setblocking(False)
        _prepare(sock, opts)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_NOTSENT_LOWAT is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(sock: socket.socket, sockaddr: tuple[object, ...], early_data: bytes) -> None:
    """Non-blocking connect, then `early_data` sent; raises OSError on failure.

    Always a cancel point; a schedule point unless the connection was made
    before `connect` returned (see below).

    `sockaddr` is numeric (from `resolve`), so unlike `trio.socket` there is
    no address resolution here. The caller closes `sock` on any exception:
    a cancelled connect leaves it in no useful state.
    """
    await _checkpoint_if_cancelled()
    err = sock.connect_ex(sockaddr)
    sent = 0
    connected = False  # the handshake was over before `connect` returned
    if err == 0 and early_data:
        # 0 at once from a TCP socket: TCP_FASTOPEN_CONNECT with a cookie
        # deferred the SYN to the first write, which is now. Nothing is
        # connected yet, so this waits below like any connect.
        # BlockingIOError: the SYN left without the data, which follows
        # the handshake below.
        with contextlib.suppress(BlockingIOError):
            sent = sock.send(early_data)
        err = errno.EINPROGRESS
    elif err == errno.EINPROGRESS and early_data:
        # With data to send, the send itself tells whether the handshake is
        # over: it succeeds when it is, fails with EAGAIN while the SYN is
        # still unanswered (then the wait below), or raises the connect's
        # own error (a refusal) as the SO_ERROR query below would. That is
        # one system call where `getpeername` and the send made two.
        try:
            sent = sock.send(early_data)
        except BlockingIOError:
            pass
        else:
            err, connected = 0, True
    if err == errno.EINPROGRESS:
        # To a peer on this machine (a local proxy, one behind a veth) the
        # handshake is usually over before connect returns: then there is
        # nothing to wait for, and the wait (an epoll registration and a trip
        # through the scheduler) and the SO_ERROR query are skipped. The
        # caller's next step (a handshake's receive, the splice) waits anyway,
        # so no schedule point is added here. A refused or unreachable peer
        # gives ENOTCONN here and its error after the wait, as before.
        try:
            sock.getpeername()
        except OSError:
            await _wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            err = 0
    elif not connected:
        await _cancel_shielded_checkpoint()
    if err:
        raise OSError(err, os.strerror(err))
    while sent < len(early_data):
        # A few hundred bytes into an empty send buffer: one send.
        try:
            sent += sock.send(early_data[sent:])
        except BlockingIOError:
            await _wait_writable(sock)


def _seconds(value: float) -> str:
    return f"{value:g}s" if math.isfinite(value) else "forever"


class TcpSocketStream(NowaitStream):
    """`trio.abc.HalfCloseableStream` over a connected, non-blocking TCP socket.

    Keeps `trio.SocketStream`'s contract: an operation that completes
    without waiting still checkpoints (cancel point before, schedule point
    after); one that waited does not yield again. Concurrent sends or
    concurrent receives raise `trio.BusyResourceError`; any use after close
    raises `trio.ClosedResourceError`, also in a task waiting at the time;
    other OS errors become `trio.BrokenResourceError` whose `__cause__` is
    the `OSError`.

    Args:
        sock: A connected stdlib `SOCK_STREAM` socket in non-blocking mode.
            The stream owns it.

    Attributes:
        socket: The stdlib socket, for `getpeername`, `setsockopt` and the
            like. Close it with `close_now()` or `aclose()`, never directly:
            only those wake tasks waiting on it.
    """

    __slots__ = ("_drained", "_eof_sent", "_hinted", "_receiving", "_sending", "socket")

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        # With TCP_INQ each receive learns whether it left the socket empty
        # (`receive_drained`); a socket without it (not TCP, an older
        # kernel) is read with plain recv and never known drained.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_INQ, 1)
        except OSError:
            self._hinted = False
        else:
            self._hinted = True
        self._drained = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is currently receiving on this stream")
        self._receiving = True
        sock = self.socket
        try:
            await _checkpoint_if_cancelled()
            try:
                data = self._recv_now(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await _cancel_shielded_checkpoint()
                raise
            if data is not None:
                await _cancel_shielded_checkpoint()
                return data
            # The wait is written out here and in receive_after_wait rather
            # than in a helper: an idle flow waits in it, and a coroutine
            # frame less is about 220 bytes per flow.
            while True:
                await _wait_readable(sock)  # the checkpoint
                data = self._recv_now(max_bytes)
                if data is not None:
                    return data
        finally:
            self._receiving = False

    async def receive_after_wait(self, max_bytes: int) -> bytes:
        """`receive_some` for an answer that cannot have come yet.

        Right after sending a request (a proxy handshake's), a first recv
        only fails: this waits for the socket to be readable first, which
        is the checkpoint, and saves that system call and its exception.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is currently receiving on this stream")
        fd = self.socket.fileno()
        if fd == -1:
            raise trio.ClosedResourceError("socket was already closed")
        self._receiving = True
        try:
            while True:
                # The number, not the socket: trio would ask it again.
                await _wait_readable(fd)
                data = self._recv_now(max_bytes)
                if data is not None:
                    return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What the socket has now, without a checkpoint: None when nothing.

        b"" is EOF, as from `receive_some`. For a copy loop that just got
        data and asks whether the EOF came with it: then both go on
        together, without a trip through the scheduler for the EOF.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is currently receiving on this stream")
        return self._recv_now(max_bytes)

    def receive_drained(self) -> bool:
        """Whether the last receive left the socket empty: no data, no EOF.

        From the kernel's count at that receive (TCP_INQ): what came since
        is not known, but a copy loop that would look for more right away
        (`receive_nowait`) can skip a look that would only fail. False when
        not known (no receive yet, the last one found nothing, no TCP_INQ).
        """
        return self._drained

    def _recv_now(self, max_bytes: int) -> bytes | None:
        """One non-blocking recv: the data (b"" at EOF), None when there is none yet."""
        sock = self.socket
        try:
            if self._hinted:
                data, ancdata, _flags, _addr = sock.recvmsg(max_bytes, _INQ_SPACE)
                # One control message, the count (cmsg_data is a native int).
                self._drained = bool(ancdata) and ancdata[0][2] == _NOTHING_QUEUED
                return data
            return sock.recv(max_bytes)
        except BlockingIOError:
            self._drained = False
            return None
        except OSError as exc:
            self._drained = False
            raise _stream_error(exc) from _cause(exc)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        if self._sending:
            raise trio.BusyResourceError("another task is currently sending on this stream")
        self._sending = True
        sock = self.socket
        try:
            if not data:
                if sock.fileno() == -1:
                    raise trio.ClosedResourceError("socket was already closed")
                await trio.lowlevel.checkpoint()
                return
            await _checkpoint_if_cancelled()
            try:
                sent = _send_now(sock, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await _cancel_shielded_checkpoint()
                raise
            size = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
            if sent == size:
                await _cancel_shielded_checkpoint()
                return
            # The socket buffer is full: from here on every send follows a
            # wait, which is the checkpoint.
            with memoryview(data) as view, view.cast("B") as octets:
                while sent < len(octets):
                    await _wait_writable(sock)
                    sent += _send_now(sock, octets[sent:])
        finally:
            self._sending = False

    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        """Send what the socket takes now, without a checkpoint; bytes sent.

        For a copy loop whose receives already yield (tun2sx's splice, a
        proxy handshake): skipping the send's own trip through the
        scheduler is a measurable share of a short flow. The rest, if any,
        goes with `send_all`. With `eof` and everything sent, the write
        side is shut down too.
        """
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        if self._sending:
            raise trio.BusyResourceError("another task is currently sending on this stream")
        sent = _send_now(self.socket, data)
        if eof and sent == len(data):
            self._shutdown_write()
        return sent

    def send_eof_nowait(self) -> None:
        """`send_eof` without the checkpoint (see `send_nowait`)."""
        if self._sending:
            raise trio.BusyResourceError("another task is currently sending on this stream")
        self._shutdown_write()

    def _shutdown_write(self) -> None:
        # Idempotent, as the contract asks (a second shutdown may fail).
        if self._eof_sent:
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from _cause(exc)
        self._eof_sent = True

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is currently sending on this stream")
        sock = self.socket
        if sock.fileno() == -1:
            raise trio.ClosedResourceError("socket was already closed")
        self._sending = True
        try:
            await _wait_writable(sock)
        except OSError as exc:
            raise _stream_error(exc) from _cause(exc)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is currently sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            self._shutdown_write()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """Close at once, without a checkpoint; idempotent.

        Tasks waiting on the socket wake up with `trio.ClosedResourceError`.
        """
        sock = self.socket
        if sock.fileno() != -1:
            # Only our own operations wait on the socket, and each sets its
            # flag for as long as it runs: with neither set, nobody can be
            # woken, and notify_closing (an exception object and an epoll_ctl
            # per call) is skipped. The kernel drops the epoll entry on close.
            if self._receiving or self._sending:
                trio.lowlevel.notify_closing(sock)
            sock.close()


def _send_now(sock: socket.socket, data: bytes | bytearray | memoryview) -> int:
    """One non-blocking send: the bytes the socket took (0 when its buffer is full)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _stream_error(exc) from _cause(exc)


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The stream error for an OS error, as trio.SocketStream translates it."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def _cause(exc: OSError) -> OSError | None:
    """What `_stream_error(exc)` is chained to: nothing for a closed socket."""
    return None if exc.errno == errno.EBADF else exc


class PrefixedStream(NowaitStream):
    """A stream that first returns bytes read ahead during a proxy handshake.

    Handshake codecs may read past their last message (TCP has no message
    boundaries); those bytes belong to the application and are replayed here.

    Args:
        inner: The connected socket stream.
        prefix: Bytes to return before reading from `inner` again.
    """

    __slots__ = ("_from_prefix", "_prefix", "inner")

    def __init__(self, inner: NowaitStream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix
        # The last receive was served from the prefix: the inner stream's
        # `receive_drained` then speaks of an older read (the handshake's).
        self._from_prefix = False

    def _take_prefix(self, max_bytes: int | None) -> bytes:
        n = len(self._prefix) if max_bytes is None else max_bytes
        if n < 1:
            raise ValueError("max_bytes must be >= 1")
        chunk, self._prefix = self._prefix[:n], self._prefix[n:]
        self._from_prefix = True
        return chunk

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            return self._take_prefix(max_bytes)
        self._from_prefix = False
        return await self.inner.receive_some(max_bytes)

    async def receive_after_wait(self, max_bytes: int) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            return self._take_prefix(max_bytes)
        self._from_prefix = False
        return await self.inner.receive_after_wait(max_bytes)

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        if self._prefix:
            return self._take_prefix(max_bytes)
        self._from_prefix = False
        return self.inner.receive_nowait(max_bytes)

    def receive_drained(self) -> bool:
        # After a receive from the prefix nothing is known of the socket.
        return not self._prefix and not self._from_prefix and self.inner.receive_drained()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        return self.inner.send_nowait(data, eof=eof)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    def send_eof_nowait(self) -> None:
        self.inner.send_eof_nowait()

    async def aclose(self) -> None:
        self._prefix = b""
        await self.inner.aclose()

    def close_now(self) -> None:
        self._prefix = b""
        self.inner.close_now()


def open_udp_socket(family: socket.AddressFamily, opts: SocketOptions) -> UdpSocket:
    """Create a UDP socket that bypasses the TUN, not yet bound or connected.

    An `AF_INET6` socket is made dual-stack (IPv4-mapped addresses allowed)
    where the system permits it, so one socket can serve both families. Its
    buffers are `opts.udp_buffer` bytes each way.

    Args:
        family: `AF_INET` or `AF_INET6`.
        opts: Loop-avoidance options and the buffer size.

    Returns:
        The socket, non-blocking; the caller owns it and must close it.

    Raises:
        OutboundError: The socket could not be created or prepared.
    """
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM | _SOCK_NONBLOCK)
    except OSError as exc:
        raise error_from_oserror(exc, f"creating a {family.name} UDP socket") from exc
    try:
        if family == socket.AF_INET6:
            # Without IPv4 mapping the socket still works for IPv6 alone.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if opts.udp_buffer is not None:
            try:
                set_buffers(sock, opts.udp_buffer)
            except OSError as exc:
                raise error_from_oserror(exc, "sizing a UDP socket's buffers") from exc
        _prepare(sock, opts)
    except BaseException:
        sock.close()
        raise
    return UdpSocket(sock)
