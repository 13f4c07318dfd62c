"""SOCKS4 and SOCKS4a proxies: codec and dialer (CONNECT only).

SOCKS4 carries an IPv4 address and a user id, nothing else: no IPv6, no
host names, no UDP, no password. SOCKS4a adds a host name after the user
id, which the proxy resolves. The codec is sans-I/O: `Socks4ClientConnection`
sends one request and buffers until the 8-byte reply is whole; bytes after
it belong to the application and are handed back. Functions that read
proxy bytes end in `_untrusted` and raise only `Socks4ProtocolError`.

What cannot be carried fails at once, with one line naming why: an IPv6
destination gives NET_UNREACHABLE (as on a host without an IPv6 route),
a host name through plain SOCKS4 HOST_UNREACHABLE. A name is never
resolved here instead: the names tun2sx sees come from its fake-IP DNS,
and resolving them on this host would ask the system resolver, which
under auto-route is tun2sx itself (it would answer with another fake
address) and anyway leaks the name the proxy was meant to resolve. Use
socks4a:// for names.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

import attrs
import trio

from .base import Destination, FailureReply, OutboundError, UdpSession, redact_url
from .handshake import NEED_DATA, NeedData, OneRequestClient, open_tunnel
from .net import PrefixedStream, SocketOptions
from .proxyurl import split_proxy_url

__all__ = [
    "REPLY_FAILURES",
    "Socks4ClientConnection",
    "Socks4Outbound",
    "Socks4ProtocolError",
    "Socks4Reply",
    "Unsendable",
    "build_request",
    "parse_socks4_url",
]

VERSION: Final = 4
CONNECT: Final = 1
MAX_FIELD: Final = 255  # user id and host name: bounded here, not by the protocol

#   request:  +----+----+---------+-------------+--------+------+ (4a:) +------+------+
#             | VN | CD | DSTPORT |    DSTIP    | USERID | NULL |       | HOST | NULL |
#             +----+----+---------+-------------+--------+------+       +------+------+
#               1    1       2          4          var      1             var     1
#   reply:    | VN=0 | CD | DSTPORT | DSTIP |   (8 bytes)
_HEAD = struct.Struct("!BBH4s")
_REPLY = struct.Struct("!BBH4s")
# SOCKS4a's marker: 0.0.0.x with x non-zero means "the name follows".
_NAME_FOLLOWS = bytes((0, 0, 0, 1))

GRANTED: Final = 90
# 91: rejected or failed; 92: the proxy could not reach our identd; 93: the
# identd's user id did not match. A reset for each, as SOCKS5's general
# failure and auth failure: SOCKS4 cannot say "refused" apart from "not
# allowed".
REPLY_FAILURES: Final[dict[int, FailureReply]] = {
    91: FailureReply.RESET,
    92: FailureReply.RESET,
    93: FailureReply.RESET,
}
_REPLY_NAMES: Final = {
    90: "granted",
    91: "rejected or failed",
    92: "rejected: the proxy cannot reach our identd",
    93: "rejected: user id mismatch",
}


class Socks4ProtocolError(Exception):
    """The proxy's reply is not SOCKS4."""


class Unsendable(ValueError):
    """The destination cannot be put into a SOCKS4 request.

    Attributes:
        reply: What the application should get for it.
    """

    def __init__(self, reply: FailureReply, message: str) -> None:
        super().__init__(message)
        self.reply = reply


def build_request(dest: Destination, userid: bytes = b"", *, names: bool) -> bytes:
    """The CONNECT request for `dest`; host names only when `names` (SOCKS4a).

    Raises:
        Unsendable: IPv6, or a name without `names`, or a name or user id
            that a NUL-terminated field cannot carry.
    """
    if b"\x00" in userid or len(userid) > MAX_FIELD:
        raise Unsendable(FailureReply.RESET, "SOCKS4 user id must be 0..255 bytes without NUL")
    host = dest.host
    if isinstance(host, ipaddress.IPv4Address):
        return _HEAD.pack(VERSION, CONNECT, dest.port, host.packed) + userid + b"\x00"
    if isinstance(host, ipaddress.IPv6Address):
        raise Unsendable(FailureReply.NET_UNREACHABLE, f"SOCKS4 carries no IPv6 ({dest})")
    if not names:
        raise Unsendable(
            FailureReply.HOST_UNREACHABLE,
            f"SOCKS4 carries no host names ({dest}); use socks4a:// for names",
        )
    name = host.encode("utf-8", "surrogateescape")
    if b"\x00" in name:
        raise Unsendable(FailureReply.HOST_UNREACHABLE, f"host name {host!r} holds a NUL")
    head = _HEAD.pack(VERSION, CONNECT, dest.port, _NAME_FOLLOWS)
    return head + userid + b"\x00" + name + b"\x00"


@attrs.frozen
class Socks4Reply:
    """The proxy's reply: its code (90 granted) and the address it sent."""

    code: int
    bound: Destination

    @property
    def succeeded(self) -> bool:
        return self.code == GRANTED

    def failure(self) -> FailureReply:
        return REPLY_FAILURES.get(self.code, FailureReply.RESET)

    def describe(self) -> str:
        return _REPLY_NAMES.get(self.code, f"unknown reply code {self.code}")


class Socks4ClientConnection(OneRequestClient[Socks4Reply]):
    """Client side of one SOCKS4/4a CONNECT, without I/O (see `OneRequestClient`).

    Args:
        dest: Where to connect.
        userid: The user id to send (may be empty).
        names: SOCKS4a: send host names for the proxy to resolve.

    Raises:
        Unsendable: See `build_request`.
    """

    __slots__ = ()

    def __init__(self, dest: Destination, userid: bytes = b"", *, names: bool) -> None:
        super().__init__(build_request(dest, userid, names=names))

    def _protocol_error(self, message: str) -> Exception:
        return Socks4ProtocolError(message)

    def _answer_untrusted(self, buf: bytearray) -> NeedData | Socks4Reply:
        """The reply once its 8 bytes are here, else NEED_DATA.

        Raises:
            Socks4ProtocolError: A reply version other than 0 (4 is taken
                too: some servers echo the request's).
        """
        if buf and buf[0] not in (0, VERSION):
            raise Socks4ProtocolError(f"reply has version {buf[0]}, expected 0")
        if len(buf) < _REPLY.size:
            return NEED_DATA
        _version, code, port, addr = _REPLY.unpack_from(buf)
        del buf[: _REPLY.size]
        return Socks4Reply(code, Destination(ipaddress.IPv4Address(addr), port))


def parse_socks4_url(url: str, socket_options: SocketOptions | None = None) -> Socks4Outbound:
    """Build an outbound from `socks4://[userid@]host:port[?tfo=1]` (or socks4a://).

    Raises:
        ValueError: One line naming what is wrong (a password, say: SOCKS4
            has none).
    """
    parts = split_proxy_url(url, "SOCKS4", ("socks4", "socks4a"), ("tfo",))
    shown = redact_url(url)
    if parts.password is not None:
        raise ValueError(f"SOCKS4 URL {shown!r}: SOCKS4 has a user id but no password")
    userid = (parts.username or "").encode()
    if len(userid) > MAX_FIELD or b"\x00" in userid:
        raise ValueError(f"SOCKS4 URL {shown!r}: the user id must be 0..255 bytes without NUL")
    return Socks4Outbound(
        parts.host,
        parts.port,
        userid,
        names=parts.scheme == "socks4a",
        socket_options=socket_options,
        fast_open=parts.flags.get("tfo", False),
    )


class Socks4Outbound:
    """Connects through a SOCKS4 or SOCKS4a proxy; no UDP.

    Args:
        server_host: Proxy host name or address.
        server_port: Proxy port.
        userid: The user id sent with each request.
        names: SOCKS4a: hand host names to the proxy.
        socket_options: Loop avoidance, and the connect timeout that bounds
            the whole set-up: connect and reply (sent once the proxy's own
            connect is done).
        fast_open: TCP Fast Open to the proxy: the request rides in the SYN.
    """

    __slots__ = (
        "_fast_open",
        "_label",
        "_names",
        "_server",
        "_userid",
        "name",
        "socket_options",
    )

    def __init__(
        self,
        server_host: str,
        server_port: int,
        userid: bytes = b"",
        *,
        names: bool = True,
        socket_options: SocketOptions | None = None,
        fast_open: bool = False,
    ) -> None:
        self._server = Destination.parse_host(server_host, server_port)
        self._userid = userid
        self._names = names
        self.socket_options = socket_options or SocketOptions()
        self._fast_open = fast_open
        kind = "socks4a" if names else "socks4"
        self.name = f"{kind} {self._server}"
        self._label = f"{'SOCKS4a' if names else 'SOCKS4'} proxy {self._server}"

    def __repr__(self) -> str:
        return f"<Socks4Outbound {self.name}>"

    @property
    def fast_open(self) -> bool:
        """Whether connections to the proxy ask for TCP Fast Open."""
        return self._fast_open

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        """Open a TCP stream to `dest` through the proxy.

        Raises:
            OutboundError: A destination SOCKS4 cannot carry, proxy
                unreachable, or its reply code mapped by `REPLY_FAILURES`.
        """
        proxy = self._label
        try:
            conn = Socks4ClientConnection(dest, self._userid, names=self._names)
        except Unsendable as exc:
            raise OutboundError(exc.reply, f"{proxy}: {exc}") from None
        stream, reply = await open_tunnel(
            self._server,
            self.socket_options,
            conn,
            fast_open=self._fast_open,
            proxy=proxy,
            what=str(dest),
            protocol_error=Socks4ProtocolError,
            max_reads=_REPLY.size + 1,
        )
        if not reply.succeeded:
            stream.close_now()
            raise OutboundError(
                reply.failure(), f"{proxy} could not reach {dest}: {reply.describe()}"
            )
        trailing = conn.trailing_data
        return PrefixedStream(stream, trailing) if trailing else stream

    async def open_udp(self) -> UdpSession:
        """There is no UDP through SOCKS4.

        Raises:
            OutboundError: always, PORT_UNREACHABLE.
        """
        await trio.lowlevel.checkpoint()
        raise OutboundError(
            FailureReply.PORT_UNREACHABLE,
            f"{self._label} carries no UDP (SOCKS4 is TCP only); "
            "route UDP elsewhere with a NETWORK,udp,... rule",
        )
