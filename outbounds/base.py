"""What every outbound promises the runtime, and how failures are reported.

The runtime splices an application's flow to whatever `connect_tcp` or
`open_udp` returns and never looks at the protocol behind it, so the contract
lives here, in one place: the destination type (a domain name stays a string
and is never resolved locally, because the remote side should resolve it), the
stream and datagram-session shapes, and `OutboundError`.

`OutboundError` carries the `FailureReply` the application should see. The
design promise is that a refused connection becomes a TCP RST and an
unreachable host or network becomes an ICMP unreachable, instead of a silent
reset after a fake success; so every outbound must decide, at its boundary,
which of these a failure means. OS errors are mapped by `reply_for_oserror`,
the single table for that.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
from abc import abstractmethod
from typing import NamedTuple, Protocol, TypeAlias

import attrs
import trio

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "Destination",
    "FailureReply",
    "IPAddress",
    "NowaitStream",
    "Outbound",
    "OutboundError",
    "UdpDrops",
    "UdpSession",
    "redact_url",
    "reply_for_oserror",
]

# Domain names longer than this cannot be carried by SOCKS5 or Shadowsocks
# (one length byte) and are not valid DNS names anyway (RFC 1035 2.3.4).
MAX_DOMAIN_LENGTH = 255


def _check_host(
    instance: Destination, attribute: attrs.Attribute[str | IPAddress], value: str | IPAddress
) -> None:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return
    if not isinstance(value, str):  # Guards callers that ignore the annotations.
        raise TypeError(f"Destination host must be str or an IP address, not {type(value)!r}")
    if not value:
        raise ValueError("Destination host must not be empty")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_DOMAIN_LENGTH:
        raise ValueError(f"Destination host name is longer than {MAX_DOMAIN_LENGTH} bytes")


def _check_port(instance: Destination, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"Destination port {value} is outside 0..65535")


@attrs.frozen
class Destination:
    """Where a flow should go: a host name or an IP address, and a port.

    A host name stays a `str` all the way to the outbound, which hands it to
    the proxy (or, for the direct outbound only, resolves it). Construct with
    `Destination.parse_host` when the host may be an IP literal in text form.

    Attributes:
        host: A domain name, or an `IPv4Address` / `IPv6Address`.
        port: The TCP or UDP port, 0..65535.
    """

    host: str | IPAddress = attrs.field(validator=_check_host)
    port: int = attrs.field(validator=_check_port)

    @classmethod
    def parse_host(cls, host: str, port: int) -> Destination:
        """Build a destination, turning an IP literal into an address object.

        Args:
            host: A domain name or an IPv4/IPv6 literal (brackets allowed).
            port: The port.

        Returns:
            A `Destination` whose host is an address when `host` was a literal.
        """
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            return cls(ipaddress.ip_address(bare), port)
        except ValueError:
            return cls(host, port)

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class FailureReply(enum.Enum):
    """What the application should receive when its flow cannot be opened."""

    RESET = "reset"
    """A TCP RST: the destination refused, or the failure has no better name."""
    HOST_UNREACHABLE = "host-unreachable"
    """ICMP destination unreachable, code host unreachable."""
    NET_UNREACHABLE = "net-unreachable"
    """ICMP destination unreachable, code network unreachable."""
    PORT_UNREACHABLE = "port-unreachable"
    """ICMP port unreachable (the UDP analogue of a refused connection)."""
    ADMIN_PROHIBITED = "admin-prohibited"
    """ICMP communication administratively prohibited (a proxy ruleset said no)."""


class OutboundError(Exception):
    """An outbound could not open, or lost, a connection.

    Attributes:
        reply: What the application should get instead of a connection.
        proxy_failed: The proxy itself failed (unreachable, silent, broke
            its protocol, refused our credentials), as opposed to the proxy
            reporting that the destination failed. A proxy group marks such
            a member down at once (outbounds.group).
    """

    def __init__(self, reply: FailureReply, message: str, *, proxy_failed: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.proxy_failed = proxy_failed

    def __repr__(self) -> str:
        return f"OutboundError({self.reply.name}, {str(self)!r})"


# One table for every outbound. Timeouts mean nothing answered, which to the
# application looks like an unreachable host.
_ERRNO_REPLIES: dict[int, FailureReply] = {
    errno.ECONNREFUSED: FailureReply.RESET,
    errno.ECONNRESET: FailureReply.RESET,
    errno.ECONNABORTED: FailureReply.RESET,
    errno.EPIPE: FailureReply.RESET,
    errno.EHOSTUNREACH: FailureReply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: FailureReply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: FailureReply.HOST_UNREACHABLE,
    errno.ENETUNREACH: FailureReply.NET_UNREACHABLE,
    errno.ENETDOWN: FailureReply.NET_UNREACHABLE,
    errno.EADDRNOTAVAIL: FailureReply.NET_UNREACHABLE,
    errno.EAFNOSUPPORT: FailureReply.NET_UNREACHABLE,
    errno.EACCES: FailureReply.ADMIN_PROHIBITED,
    errno.EPERM: FailureReply.ADMIN_PROHIBITED,
}


def redact_url(url: str) -> str:
    """`url` with its secret replaced by `***`, for messages a user reads.

    The user name stays (it tells two outbounds apart); the password goes,
    and so does user info without a colon, which in a SIP002 URL is the
    base64 of method and password together.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user, colon, _secret = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{head}{sep}{masked}@{hostpart}"


def reply_for_oserror(exc: OSError) -> FailureReply:
    """Map an OS error from a socket call to what the application should see.

    Args:
        exc: The error raised by connect, send or receive.

    Returns:
        The matching `FailureReply`; `RESET` when the errno has no better match.
    """
    if isinstance(exc, TimeoutError):
        return FailureReply.HOST_UNREACHABLE
    if exc.errno is None:
        return FailureReply.RESET
    return _ERRNO_REPLIES.get(exc.errno, FailureReply.RESET)


class NowaitStream(trio.abc.HalfCloseableStream):
    """A stream that can also move bytes without a trip through the scheduler.

    A short flow spends most of its CPU in trio's scheduler, and trio's rule
    that every async stream call is a checkpoint costs one trip per call. A
    copy loop whose receives already yield (the splice, a proxy handshake)
    uses these calls instead, none of which checkpoints or waits. Both ends
    of a spliced flow implement them: the application's `TcpStream` and the
    outbounds' streams. The splice takes its fast path only when both ends
    are `NowaitStream`s, and checks that once per flow.

    When a send or receive cannot be done without waiting, the call says
    so (0 bytes taken, None received) and the caller falls back to the
    awaiting call.
    """

    __slots__ = ()

    @abstractmethod
    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        """Take what fits now; return the bytes taken (the rest goes with `send_all`).

        With `eof`, when all of `data` was taken, the EOF is sent behind it,
        so that a last piece of data and the end can leave together.
        """

    @abstractmethod
    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What has arrived already: None when nothing has, b"" at EOF."""

    def receive_drained(self) -> bool:
        """Whether the last receive is known to have left nothing behind it
        (no data, no EOF), so that `receive_nowait` now would find nothing.

        A hint: True only when the stream knows it; by default False.
        """
        return False

    @abstractmethod
    def send_eof_nowait(self) -> None:
        """`send_eof` without a checkpoint (after `send_nowait` took everything)."""

    @abstractmethod
    def close_now(self) -> None:
        """Close at once, without a checkpoint; idempotent.

        For a flow that is over anyway: `trio.aclose_forcefully` costs a
        cancelled checkpoint (an exception raised and caught) per stream.
        """

    async def receive_after_wait(self, max_bytes: int) -> bytes | bytearray:
        """`receive_some` for an answer that cannot have come yet.

        A stream over a socket waits for readability before its first recv,
        saving a system call that could only fail; by default the same as
        `receive_some`.
        """
        return await self.receive_some(max_bytes)


class UdpDrops(NamedTuple):
    """Datagrams a UDP session lost, by where.

    Attributes:
        send_full: sends dropped because the socket's buffer (or the queue
            below it) was full.
        receive_overflow: datagrams the kernel dropped before we read them
            (the socket's receive buffer was full).
        malformed: datagrams from the relay that did not decode (truncated,
            fragmented, forged), dropped.
    """

    send_full: int = 0
    receive_overflow: int = 0
    malformed: int = 0


class UdpSession(Protocol):
    """A datagram association through an outbound.

    One session serves one application source endpoint (full-cone): it can
    send to any destination and reports where each reply came from.

    The runtime relays at packet rates through the `_nowait` send and the
    batch receive: a datagram is sent as it arrives, with no task switch,
    and a burst of replies costs one wake-up. `send_to` and `receive_from`
    are the one-at-a-time forms.
    """

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        """Send one datagram to `dest` now, or drop it; never waits.

        Returns:
            False when the datagram was dropped because the socket's
            buffer was full (counted in `drops().send_full`).

        Raises:
            trio.WouldBlock: it cannot go without waiting (a name must be
                resolved first): `send_to` it instead.
            OutboundError: the session failed.
        """
        ...

    async def send_to(self, data: bytes, dest: Destination) -> None:
        """Send one datagram to `dest`. Raises `OutboundError`."""
        ...

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        """Wait for datagrams, then return all that are waiting (at most
        `limit`, at least one) with their sources. Raises `OutboundError`."""
        ...

    async def receive_from(self) -> tuple[bytes, Destination]:
        """Wait for the next datagram and its source. Raises `OutboundError`."""
        ...

    async def wait_ended(self) -> None:
        """Wait until the far side ends the session, then raise `OutboundError`.

        A SOCKS5 association ends when the proxy closes its control
        connection; sessions the far side cannot end wait for ever.
        """
        ...

    def drops(self) -> UdpDrops:
        """What this session lost so far, by where."""
        ...

    async def aclose(self) -> None:
        """Release the session's sockets; idempotent."""
        ...


class Outbound(Protocol):
    """A way out of the TUN: SOCKS5, Shadowsocks, direct, ..."""

    name: str

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        """Open a TCP stream to `dest`. Raises `OutboundError`.

        The outbounds here return `NowaitStream`s, which the splice drives
        without extra scheduler trips; any other stream works too, slower.
        """
        ...

    async def open_udp(self) -> UdpSession:
        """Open a datagram session. Raises `OutboundError`."""
        ...
