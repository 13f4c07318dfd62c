"""The direct outbound: flows leave through the host's own network.

Used for destinations the rules send around the proxy (LAN, captive portals,
NTP). It is the only outbound that resolves names itself: with its own
`DirectResolver` when it has one (tun2sx always gives it one, since the
system resolver is usually tun2sx's fake-IP DNS), else with the system
resolver through trio's `getaddrinfo`. Every other outbound hands the name
to the remote side. Its sockets come from `outbounds.net`, so the fwmark,
interface binding or `protect(fd)` keep them out of the TUN; without those, a
direct flow in a whole-system TUN setup would loop straight back into tun2sx.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import time
from collections.abc import Sequence

import attrs
import trio

from .base import Destination, FailureReply, IPAddress, OutboundError, UdpDrops
from .net import (
    SocketOptions,
    TcpSocketStream,
    error_from_oserror,
    open_tcp,
    open_udp_socket,
    resolve,
    sockaddr_of,
)
from .resolver import DirectResolver
from .udpsock import UdpSocket

__all__ = ["DirectOutbound", "DirectUdpSession", "DirectUdpStatistics", "connect_staggered"]

# RFC 8305's recommended wait before the next address is tried.
ATTEMPT_DELAY = 0.25


def _interleaved(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """IPv4 first, then the families alternate (RFC 8305 section 4)."""
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    ordered: list[IPAddress] = []
    for pair in itertools.zip_longest(v4, v6):
        ordered += [a for a in pair if a is not None]
    return ordered


async def connect_staggered(
    addresses: Sequence[IPAddress],
    port: int,
    options: SocketOptions,
    *,
    delay: float = ATTEMPT_DELAY,
) -> TcpSocketStream:
    """Connect to the first of `addresses` that answers (happy eyeballs).

    Addresses are tried IPv4 first, the families alternating; the next
    attempt starts when the one before failed or after `delay` seconds,
    whichever comes first, and the first connection wins (the others are
    closed). One dead address then costs `delay`, not the whole timeout.

    Raises:
        OutboundError: Every attempt failed (the last error), or none
            connected within `options.connect_timeout` (HOST_UNREACHABLE).
    """
    ordered = _interleaved(addresses)
    if len(ordered) == 1:
        return await open_tcp(ordered[0], port, options)
    winner: TcpSocketStream | None = None
    errors: list[OutboundError] = []

    async def attempt(address: IPAddress, failed: trio.Event, nursery: trio.Nursery) -> None:
        nonlocal winner
        try:
            stream = await open_tcp(address, port, options)
        except OutboundError as exc:
            errors.append(exc)
            failed.set()
            return
        if winner is None:
            winner = stream
            nursery.cancel_scope.cancel()
        else:
            stream.close_now()

    try:
        with trio.move_on_after(options.connect_timeout):
            async with trio.open_nursery() as nursery:
                for address in ordered:
                    failed = trio.Event()
                    nursery.start_soon(attempt, address, failed, nursery)
                    with trio.move_on_after(delay):
                        await failed.wait()
    except BaseException:
        # Cancelled from outside just as one connected: nobody gets it.
        if winner is not None:
            winner.close_now()
        raise
    if winner is not None:
        return winner
    if len(errors) == len(ordered):
        raise errors[-1]
    raise OutboundError(
        FailureReply.HOST_UNREACHABLE,
        f"connecting to {', '.join(map(str, ordered))} port {port} timed out "
        f"after {options.connect_timeout:g}s",
    )


class DirectOutbound:
    """Connects from this host, resolving names locally.

    Args:
        socket_options: Loop avoidance and the connect timeout.
        resolver: Resolves host names; None: the system resolver.
    """

    __slots__ = ("name", "resolver", "socket_options")

    def __init__(
        self,
        *,
        socket_options: SocketOptions | None = None,
        resolver: DirectResolver | None = None,
    ) -> None:
        self.socket_options = socket_options or SocketOptions()
        self.resolver = resolver
        self.name = "direct"

    def __repr__(self) -> str:
        if self.resolver is None:
            return "<DirectOutbound>"
        return f"<DirectOutbound resolving with {self.resolver!r}>"

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        """Connect to `dest`, trying each resolved address in order.

        Raises:
            OutboundError: The name does not resolve (HOST_UNREACHABLE), or the
                connect failed (mapped from the OS error) or timed out.
        """
        if self.resolver is not None and isinstance(dest.host, str):
            addresses = await self.resolver.resolve(dest.host)
            return await connect_staggered(addresses, dest.port, self.socket_options)
        return await open_tcp(dest.host, dest.port, self.socket_options)

    async def open_udp(self) -> DirectUdpSession:
        """Open one unconnected UDP socket that can reach any destination.

        The socket is IPv6 dual-stack when the host supports IPv6, so one
        session serves IPv4 and IPv6 destinations alike.

        Raises:
            OutboundError: No UDP socket could be created.
        """
        await trio.lowlevel.checkpoint()
        try:
            sock = open_udp_socket(socket.AF_INET6, self.socket_options)
            try:
                sock.bind(("::", 0))
            except OSError:
                sock.close()
            else:
                return DirectUdpSession(
                    sock, dual_stack=True, options=self.socket_options, resolver=self.resolver
                )
        except OutboundError as exc:
            if exc.reply is not FailureReply.NET_UNREACHABLE:
                raise
        # No IPv6 on this host: fall back to an IPv4-only socket.
        sock = open_udp_socket(socket.AF_INET, self.socket_options)
        try:
            sock.bind(("0.0.0.0", 0))
        except OSError as exc:
            sock.close()
            raise error_from_oserror(exc, "binding a UDP socket") from exc
        return DirectUdpSession(
            sock, dual_stack=False, options=self.socket_options, resolver=self.resolver
        )


@attrs.define(slots=True)
class DirectUdpStatistics:
    sent: int
    received: int
    unresolved: int


# Names a session resolved, kept this long (seconds) so that each datagram
# to a name does not wait for the resolver; a session sending for longer
# picks up a changed address within this time.
_NAME_TTL = 60.0
_CACHE_SIZE = 256


class DirectUdpSession:
    """An unconnected UDP socket: send anywhere, receive from anyone.

    Replies from any source are passed up (full-cone), which is what games and
    STUN expect; the runtime decides whether to filter. A destination given
    by name is resolved on its first datagram (`send_to_nowait` then says
    it would block) and remembered for `_NAME_TTL` seconds.
    """

    __slots__ = (
        "_closed",
        "_dual_stack",
        "_names",
        "_options",
        "_resolver",
        "_sock",
        "_sources",
        "_stats",
    )

    def __init__(
        self,
        sock: UdpSocket,
        *,
        dual_stack: bool,
        options: SocketOptions,
        resolver: DirectResolver | None = None,
    ) -> None:
        self._sock = sock
        self._resolver = resolver
        self._dual_stack = dual_stack
        self._options = options
        self._closed = False
        self._stats = DirectUdpStatistics(0, 0, 0)
        # destination -> (expiry, socket address); IP destinations never expire.
        self._names: dict[Destination, tuple[float, tuple[object, ...]]] = {}
        self._sources: dict[tuple[object, ...], Destination] = {}

    def statistics(self) -> DirectUdpStatistics:
        """Counters: datagrams sent/received and destinations that did not resolve."""
        return attrs.evolve(self._stats)

    def drops(self) -> UdpDrops:
        return UdpDrops(self._sock.send_drops, self._sock.receive_drops(), 0)

    def _sockaddr(
        self, family: socket.AddressFamily, addr: tuple[object, ...]
    ) -> tuple[object, ...]:
        if family == socket.AF_INET and self._dual_stack:
            # A dual-stack socket reaches IPv4 through IPv4-mapped addresses.
            return (f"::ffff:{addr[0]}", addr[1], 0, 0)
        return addr

    def _remember(self, dest: Destination, sockaddr: tuple[object, ...], ttl: float) -> None:
        if len(self._names) >= _CACHE_SIZE:
            self._names.clear()
        self._names[dest] = (time.monotonic() + ttl, sockaddr)

    def _known(self, dest: Destination) -> tuple[object, ...] | None:
        entry = self._names.get(dest)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        host = dest.host
        if isinstance(host, str):
            return None
        if not self._dual_stack and host.version == 6:
            return None  # send_to reports it
        family = socket.AF_INET if host.version == 4 else socket.AF_INET6
        plain = (str(host), dest.port) if host.version == 4 else (str(host), dest.port, 0, 0)
        sockaddr = self._sockaddr(family, plain)
        self._remember(dest, sockaddr, float("inf"))
        return sockaddr

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        """Send one datagram now, or drop it if the buffer is full.

        Raises:
            trio.WouldBlock: `dest` is a name not resolved yet: use `send_to`.
            OutboundError: The send failed.
        """
        sockaddr = self._known(dest)
        if sockaddr is None:
            raise trio.WouldBlock
        try:
            sent = self._sock.sendto_nowait(data, sockaddr)
        except OSError as exc:
            raise error_from_oserror(exc, f"sending a datagram to {dest}") from exc
        if sent:
            self._stats.sent += 1
        return sent

    async def send_to(self, data: bytes, dest: Destination) -> None:
        """Send one datagram; names are resolved here (first usable address).

        Raises:
            OutboundError: The name did not resolve, or the send failed.
        """
        sockaddr = self._known(dest)
        if sockaddr is None:
            try:
                if self._resolver is not None and isinstance(dest.host, str):
                    addresses = await self._resolver.resolve(dest.host)
                    candidates = [sockaddr_of(address, dest.port) for address in addresses]
                else:
                    candidates = await resolve(dest.host, dest.port, socket.SOCK_DGRAM)
            except OutboundError:
                self._stats.unresolved += 1
                raise
            usable = [
                (family, addr)
                for family, addr in candidates
                if self._dual_stack or family == socket.AF_INET
            ]
            if not usable:
                self._stats.unresolved += 1
                raise OutboundError(FailureReply.NET_UNREACHABLE, f"no IPv4 address for {dest}")
            family, addr = usable[0]
            sockaddr = self._sockaddr(family, addr)
            if isinstance(dest.host, str):
                self._remember(dest, sockaddr, _NAME_TTL)
        try:
            await self._sock.sendto(data, sockaddr)
        except OSError as exc:
            raise error_from_oserror(exc, f"sending a datagram to {dest}") from exc
        self._stats.sent += 1

    def _source(self, source: tuple[object, ...]) -> Destination:
        known = self._sources.get(source)
        if known is not None:
            return known
        text = str(source[0])
        host = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped
        dest = Destination(host, int(source[1]))  # type: ignore[call-overload]
        if len(self._sources) >= _CACHE_SIZE:
            self._sources.clear()
        self._sources[source] = dest
        return dest

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        """Wait for the socket, then return every datagram waiting, with sources.

        Raises:
            OutboundError: The socket failed (e.g. an ICMP error was reported).
        """
        sock = self._sock
        try:
            raw = await sock.receive_from_batch(limit)
        except OSError as exc:
            raise error_from_oserror(exc, "receiving a datagram") from exc
        self._stats.received += len(raw)
        source = self._source
        return [(data, source(addr)) for data, addr in raw]

    async def receive_from(self) -> tuple[bytes, Destination]:
        """Wait for the next datagram and its source address.

        Raises:
            OutboundError: The socket failed (e.g. an ICMP error was reported).
        """
        try:
            data, source = await self._sock.receive_from()
        except OSError as exc:
            raise error_from_oserror(exc, "receiving a datagram") from exc
        self._stats.received += 1
        return data, self._source(source)

    async def wait_ended(self) -> None:
        """Nothing on the far side can end a direct session: waits for ever."""
        await trio.sleep_forever()

    async def aclose(self) -> None:
        """Close the socket; idempotent."""
        if not self._closed:
            self._closed = True
            self._sock.close()
        await trio.lowlevel.checkpoint()
