"""SOCKS5 (RFC 1928) with username/password auth (RFC 1929): codec and dialer.

The codec is sans-I/O. `Socks5ClientConnection` is fed whatever bytes the
proxy sent and buffers until a whole message is there, because TCP does not
preserve message boundaries: a reply may arrive one byte at a time, or glued
to the first bytes of the proxied stream (a server that speaks first). Those
trailing bytes belong to the application and are handed back, never dropped.
Every function that reads proxy bytes ends in `_untrusted` and raises only
`Socks5ProtocolError`.

`Socks5Outbound` is the thin trio layer: it opens the control connection via
`outbounds.net` (so loop avoidance applies), runs the handshake, and maps the
proxy's reply code to the `FailureReply` the application should see. UDP
ASSOCIATE keeps the TCP control connection open for as long as the session
lives, because the association ends when that connection closes.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Final

import attrs
import trio

from .base import Destination, FailureReply, IPAddress, OutboundError, UdpDrops, redact_url
from .handshake import NEED_DATA, NeedData, ProxyClosed, run_handshake
from .net import (
    PrefixedStream,
    SocketOptions,
    TcpSocketStream,
    error_from_oserror,
    finish_tcp_connect,
    format_endpoint,
    open_tcp,
    open_udp_socket,
    start_tcp_connect,
)
from .net import resolve as _resolve
from .proxyurl import split_proxy_url
from .udpsock import UdpSocket

__all__ = [
    "NEED_DATA",
    "AuthFailed",
    "AuthMethod",
    "Command",
    "ReplyCode",
    "Socks5ClientConnection",
    "Socks5Outbound",
    "Socks5ProtocolError",
    "Socks5Reply",
    "Socks5UdpSession",
    "Socks5UdpStatistics",
    "build_reply",
    "build_request",
    "decode_udp_datagram_untrusted",
    "encode_address",
    "encode_udp_datagram",
    "parse_address_untrusted",
    "parse_request_untrusted",
    "parse_socks5_url",
]

VERSION: Final = 5
AUTH_VERSION: Final = 1  # RFC 1929 sub-negotiation version.


class Socks5ProtocolError(Exception):
    """The proxy (or, for server-side parsers, the client) broke RFC 1928/1929."""


class AuthMethod(enum.IntEnum):
    NO_AUTH = 0x00
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class ReplyCode(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


# Anything not listed (general failure, unsupported command, unknown codes)
# gives the application an RST: it is the least surprising "no".
_REPLY_FAILURES: Final[dict[int, FailureReply]] = {
    ReplyCode.CONNECTION_REFUSED: FailureReply.RESET,
    ReplyCode.HOST_UNREACHABLE: FailureReply.HOST_UNREACHABLE,
    ReplyCode.NETWORK_UNREACHABLE: FailureReply.NET_UNREACHABLE,
    ReplyCode.NOT_ALLOWED: FailureReply.ADMIN_PROHIBITED,
    ReplyCode.TTL_EXPIRED: FailureReply.HOST_UNREACHABLE,
}

# Address types (ATYP).
ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

_PORT = struct.Struct("!H")
# A reply with an IPv4 bound address: VER | REP | RSV | ATYP=1 | BND.ADDR | BND.PORT.
_REPLY_IPV4 = struct.Struct("!xBxx4sH")

# Greeting reply + auth reply + the longest reply (a 255-byte domain), plus one.
_MAX_HANDSHAKE_READS: Final = 2 + 2 + (3 + 2 + 255 + 2) + 1


# --- addresses: ATYP | DST.ADDR | DST.PORT ----------------------------------------
#
#   +------+----------+----------+
#   | ATYP | DST.ADDR | DST.PORT |
#   +------+----------+----------+
#   |  1   | Variable |    2     |
#   +------+----------+----------+
#   IPv4: 4 bytes; DOMAINNAME: 1 length byte + name; IPv6: 16 bytes.


def encode_address(dest: Destination) -> bytes:
    """Encode `dest` as ATYP, address and port."""
    host = dest.host
    # A name first: through fake IPs, most destinations are one.
    if isinstance(host, str):
        name = host.encode("utf-8", "surrogateescape")
        head = bytes((ATYP_DOMAIN, len(name))) + name
    elif isinstance(host, ipaddress.IPv4Address):
        head = bytes((ATYP_IPV4,)) + host.packed
    else:
        head = bytes((ATYP_IPV6,)) + host.packed
    return head + _PORT.pack(dest.port)


def parse_address_untrusted(buf: bytes | bytearray, offset: int) -> tuple[Destination, int] | None:
    """Parse ATYP/address/port at `offset`.

    Returns:
        `(destination, end offset)`, or None when `buf` ends too early.

    Raises:
        Socks5ProtocolError: Unknown address type or an empty domain name.
    """
    if len(buf) < offset + 1:
        return None
    atyp = buf[offset]
    host: str | IPAddress
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv4Address(bytes(buf[offset + 1 : end]))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(buf[offset + 1 : end]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            return None
        length = buf[offset + 1]
        if length == 0:
            raise Socks5ProtocolError("empty domain name in address")
        end = offset + 2 + length
        if len(buf) < end + 2:
            return None
        # surrogateescape keeps any byte string reversible, so a strange name
        # is passed through rather than rejected.
        host = bytes(buf[offset + 2 : end]).decode("utf-8", "surrogateescape")
    else:
        raise Socks5ProtocolError(f"unknown address type 0x{atyp:02x}")
    (port,) = _PORT.unpack_from(buf, end)
    return Destination(host, port), end + 2


# --- client messages (and their server-side parsers, for tests and fuzzing) -------


def build_greeting(methods: tuple[AuthMethod, ...]) -> bytes:
    """VER | NMETHODS | METHODS."""
    return bytes((VERSION, len(methods), *methods))


def greeting_for(credentials: bool, pipeline: bool) -> bytes:
    """The greeting a client sends: with credentials it offers username/password
    too, and only that when pipelining (the request must follow the method the
    proxy will pick)."""
    return _GREETINGS[credentials, pipeline]


# Built once: every connection sends one of these.
_GREETINGS: Final[dict[tuple[bool, bool], bytes]] = {
    (False, False): build_greeting((AuthMethod.NO_AUTH,)),
    (False, True): build_greeting((AuthMethod.NO_AUTH,)),
    (True, True): build_greeting((AuthMethod.USERNAME_PASSWORD,)),
    (True, False): build_greeting((AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD)),
}


def build_auth_request(username: bytes, password: bytes) -> bytes:
    """RFC 1929: VER=1 | ULEN | UNAME | PLEN | PASSWD."""
    return bytes((AUTH_VERSION, len(username))) + username + bytes((len(password),)) + password


def build_request(command: Command, dest: Destination) -> bytes:
    """VER | CMD | RSV=0 | ATYP | DST.ADDR | DST.PORT."""
    return bytes((VERSION, command, 0)) + encode_address(dest)


def parse_request_untrusted(buf: bytes | bytearray) -> tuple[Command, Destination, int] | None:
    """Parse a client request (server side).

    Returns:
        `(command, destination, bytes consumed)` or None when incomplete.

    Raises:
        Socks5ProtocolError: Wrong version or unknown command.
    """
    if len(buf) < 3:
        return None
    if buf[0] != VERSION:
        raise Socks5ProtocolError(f"request has version {buf[0]}, expected 5")
    try:
        command = Command(buf[1])
    except ValueError:
        raise Socks5ProtocolError(f"unknown command 0x{buf[1]:02x}") from None
    parsed = parse_address_untrusted(buf, 3)
    if parsed is None:
        return None
    dest, end = parsed
    return command, dest, end


# --- server messages ------------------------------------------------------------


def build_reply(code: int, bound: Destination) -> bytes:
    """VER | REP | RSV=0 | ATYP | BND.ADDR | BND.PORT (used by test servers)."""
    return bytes((VERSION, code, 0)) + encode_address(bound)


@attrs.frozen
class Socks5Reply:
    """The proxy's answer to a request.

    Attributes:
        code: The REP field (a `ReplyCode` when known, else the raw int).
        bound: BND.ADDR/BND.PORT; for UDP ASSOCIATE, the relay to send to.
    """

    code: int
    bound: Destination

    @property
    def succeeded(self) -> bool:
        return self.code == ReplyCode.SUCCEEDED

    def failure(self) -> FailureReply:
        """What the application should get for this (failed) reply."""
        return _REPLY_FAILURES.get(self.code, FailureReply.RESET)

    def describe(self) -> str:
        try:
            return ReplyCode(self.code).name.lower().replace("_", " ")
        except ValueError:
            return f"unknown reply code 0x{self.code:02x}"


@attrs.frozen
class AuthFailed:
    """The proxy accepted none of our methods, or rejected the credentials."""

    reason: str


_NeedData = NeedData


class _State(enum.Enum):
    AWAIT_METHOD = "await-method"
    AWAIT_AUTH = "await-auth"
    AWAIT_REPLY = "await-reply"
    DONE = "done"


class Socks5ClientConnection:
    """Client side of one SOCKS5 handshake, without I/O.

    Usage: send `data_to_send()`, then repeatedly feed proxy bytes with
    `receive_data`, call `next_event_untrusted()`, and send `data_to_send()`
    again, until the event is a `Socks5Reply` or `AuthFailed`. After that,
    `trailing_data` holds bytes that followed the reply (stream payload).

    Args:
        command: CONNECT or UDP_ASSOCIATE.
        dest: Destination (for UDP ASSOCIATE, usually 0.0.0.0:0).
        username: Offered with `password` via RFC 1929 when both are given.
        password: See `username`.
        pipeline: Send every message up front (greeting, credentials,
            request), without waiting for each answer: one round trip
            instead of two or three. RFC 1928 does not promise that a
            server reads ahead, and some read one message per `recv` and
            lose the rest (microsocks), so only for proxies known to take
            it. With credentials only username/password is offered then,
            since the request must follow the method the proxy will pick.
        greeting_sent: The greeting (`greeting_for` these credentials and
            `pipeline`) already went out on this connection, ahead of the
            request (a proxy connection made ready before it was needed):
            it is not sent again.
    """

    __slots__ = (
        "_buffer",
        "_command",
        "_credentials",
        "_dest",
        "_outgoing",
        "_pipelined",
        "_request_queued",
        "_state",
    )

    def __init__(
        self,
        command: Command,
        dest: Destination,
        username: bytes | None = None,
        password: bytes | None = None,
        *,
        pipeline: bool = False,
        greeting_sent: bool = False,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("username and password must be given together")
        if username is not None and password is not None:
            if not 1 <= len(username) <= 255 or not 1 <= len(password) <= 255:
                raise ValueError("SOCKS5 username and password must be 1..255 bytes each")
            self._credentials: tuple[bytes, bytes] | None = (username, password)
        else:
            self._credentials = None
        self._command = command
        self._dest = dest
        self._buffer = bytearray()
        self._outgoing = bytearray(
            b"" if greeting_sent else greeting_for(self._credentials is not None, pipeline)
        )
        self._state = _State.AWAIT_METHOD
        self._pipelined = pipeline
        self._request_queued = pipeline
        if pipeline:
            if self._credentials is not None:
                self._outgoing += build_auth_request(*self._credentials)
            self._outgoing += build_request(command, dest)

    def data_to_send(self) -> bytes:
        """Bytes to write to the proxy now (possibly empty)."""
        if not self._outgoing:
            return b""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes read from the proxy."""
        self._buffer += data

    @property
    def request_queued(self) -> bool:
        """Whether the request is in `data_to_send` or went out already."""
        return self._request_queued

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the final reply: they belong to the stream."""
        return bytes(self._buffer) if self._state is _State.DONE else b""

    def next_event_untrusted(self) -> _NeedData | Socks5Reply | AuthFailed:
        """Advance the handshake as far as the buffered bytes allow.

        Returns:
            NEED_DATA, the final `Socks5Reply`, or `AuthFailed`.

        Raises:
            Socks5ProtocolError: The proxy sent something RFC 1928/1929 forbids.
        """
        # Each pass consumes one message; at most three messages exist.
        for _ in range(3):
            buf = self._buffer
            if self._state is _State.AWAIT_METHOD:
                if len(buf) < 2:
                    return NEED_DATA
                if buf[0] != VERSION:
                    raise _version_error(buf[0], VERSION, "method selection")
                method = buf[1]
                del buf[:2]
                if method == AuthMethod.NO_ACCEPTABLE:
                    self._state = _State.DONE
                    return AuthFailed("the proxy accepts none of the offered auth methods")
                if method == AuthMethod.USERNAME_PASSWORD and self._credentials is not None:
                    if not self._pipelined:
                        self._outgoing += build_auth_request(*self._credentials)
                    self._state = _State.AWAIT_AUTH
                elif method == AuthMethod.NO_AUTH and (
                    self._credentials is None or not self._pipelined
                ):
                    self._send_request()
                else:
                    raise Socks5ProtocolError(f"proxy chose auth method 0x{method:02x} not offered")
            elif self._state is _State.AWAIT_AUTH:
                if len(buf) < 2:
                    return NEED_DATA
                if buf[0] != AUTH_VERSION:
                    raise _version_error(buf[0], AUTH_VERSION, "auth reply")
                status = buf[1]
                del buf[:2]
                if status != 0:
                    self._state = _State.DONE
                    return AuthFailed(f"the proxy rejected the username/password (status {status})")
                self._send_request()
            elif self._state is _State.AWAIT_REPLY:
                if not buf:
                    return NEED_DATA
                if buf[0] != VERSION:  # Fail early on non-SOCKS5.
                    raise _version_error(buf[0], VERSION, "reply")
                if len(buf) >= 10 and buf[3] == ATYP_IPV4:
                    # The usual reply, an IPv4 bound address, in one unpack.
                    code, address, port = _REPLY_IPV4.unpack_from(buf)
                    bound = Destination(ipaddress.IPv4Address(address), port)
                    end = 10
                else:
                    if len(buf) < 3:
                        return NEED_DATA
                    parsed = parse_address_untrusted(buf, 3)
                    if parsed is None:
                        return NEED_DATA
                    bound, end = parsed
                    code = buf[1]
                del buf[:end]
                self._state = _State.DONE
                return Socks5Reply(code, bound)
            else:
                raise Socks5ProtocolError("handshake already finished")
        return NEED_DATA  # pragma: no cover - every branch above returns or moves on

    def _send_request(self) -> None:
        if not self._pipelined:  # else it went with the greeting
            self._outgoing += build_request(self._command, self._dest)
            self._request_queued = True
        self._state = _State.AWAIT_REPLY


def _version_error(got: int, expected: int, what: str) -> Socks5ProtocolError:
    return Socks5ProtocolError(f"{what} has version {got}, expected {expected}")


# --- UDP ASSOCIATE datagrams ----------------------------------------------------
#
#   +----+------+------+----------+----------+----------+
#   |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
#   +----+------+------+----------+----------+----------+
#   | 2  |  1   |  1   | Variable |    2     | Variable |
#   +----+------+------+----------+----------+----------+


def encode_udp_datagram(data: bytes, dest: Destination) -> bytes:
    """Wrap `data` for the relay (never fragmented: FRAG=0)."""
    return b"\x00\x00\x00" + encode_address(dest) + data


def decode_udp_datagram_untrusted(datagram: bytes) -> tuple[int, Destination, bytes]:
    """Unwrap a relay datagram.

    Returns:
        `(frag, source or destination, payload)`.

    Raises:
        Socks5ProtocolError: Truncated header or unknown address type.
    """
    if len(datagram) < 4:
        raise Socks5ProtocolError("UDP datagram shorter than its header")
    parsed = parse_address_untrusted(datagram, 3)
    if parsed is None:
        raise Socks5ProtocolError("UDP datagram truncated inside its address")
    dest, end = parsed
    return datagram[2], dest, datagram[end:]


# --- trio layer -------------------------------------------------------------------


def parse_socks5_url(url: str, socket_options: SocketOptions | None = None) -> Socks5Outbound:
    """Build an outbound from `socks5://[user:pass@]host:port[?pipeline=1][&tfo=1]`.

    `pipeline=1` sends the whole handshake at once (see
    `Socks5ClientConnection`): only for proxies known to read ahead.
    `tfo=1` asks for TCP Fast Open to the proxy (see `open_tcp`).

    Raises:
        ValueError: One line naming what is wrong with the URL.
    """
    parts = split_proxy_url(url, "SOCKS5", ("socks5", "socks5h"), ("pipeline", "tfo", "preconnect"))
    username, password = parts.username, parts.password
    if (username is None) != (password is None) or username == "" or password == "":
        raise ValueError(
            f"SOCKS5 URL {redact_url(url)!r}: credentials must be user:password, both non-empty"
        )
    return Socks5Outbound(
        parts.host,
        parts.port,
        username,
        password,
        socket_options=socket_options or SocketOptions(),
        pipeline=parts.flags.get("pipeline", False),
        fast_open=parts.flags.get("tfo", False),
        preconnect=parts.flags.get("preconnect", False),
    )


SPARE_MAX_AGE: Final = 5.0
"""Seconds a ready proxy connection (`preconnect`) may wait for its flow; an
older one is closed instead of used, before a proxy's own idle timeout for a
negotiation (Dante's is 30 s) could close it under the request."""


@attrs.define
class _Spare:
    """A proxy connection made ahead of its flow (see `Socks5Outbound`'s `preconnect`)."""

    stream: TcpSocketStream
    born: float  # trio time
    connected: bool  # else its connect and greeting are still to finish


class Socks5Outbound:
    """Connects through a SOCKS5 proxy (CONNECT and UDP ASSOCIATE).

    Args:
        server_host: Proxy host name or address.
        server_port: Proxy port.
        username: Optional RFC 1929 user name (with `password`).
        password: Optional RFC 1929 password.
        socket_options: Loop avoidance for the control socket, and the
            connect timeout that bounds the whole set-up: connect, greeting,
            credentials and the request's reply. The proxy only replies once
            its own connect finished, so running out means the destination
            is unreachable.
        pipeline: Send the greeting, credentials and request in one write
            (one round trip to the proxy instead of two or three); only for
            proxies that read ahead, such as Dante. Off by default.
        fast_open: TCP Fast Open to the proxy: the greeting (with
            `pipeline`, the whole handshake) rides in the SYN once the
            kernel holds the proxy's cookie. Off by default.
        preconnect: Keep one proxy connection ready for the next CONNECT:
            connected and greeted while the current CONNECT waits for its
            reply, so the next flow sends its request at once (the connect
            and the method round trip leave its path). Works with any
            proxy, but holds one idle connection to it; used only within
            `SPARE_MAX_AGE` seconds, and only for a proxy given by address.
            Off by default.
    """

    __slots__ = (
        "_fast_open",
        "_greeting",
        "_label",
        "_password",
        "_pipeline",
        "_preconnect",
        "_server",
        "_spare",
        "_username",
        "name",
        "socket_options",
    )

    def __init__(
        self,
        server_host: str,
        server_port: int,
        username: str | None = None,
        password: str | None = None,
        *,
        socket_options: SocketOptions | None = None,
        pipeline: bool = False,
        fast_open: bool = False,
        preconnect: bool = False,
    ) -> None:
        self._server = Destination.parse_host(server_host, server_port)
        self._username = username.encode() if username is not None else None
        self._password = password.encode() if password is not None else None
        # Validate credentials now, so a bad config fails at startup.
        Socks5ClientConnection(Command.CONNECT, self._server, self._username, self._password)
        self.socket_options = socket_options or SocketOptions()
        self._pipeline = pipeline
        self._fast_open = fast_open
        self._greeting = greeting_for(self._username is not None, pipeline)
        # Only a proxy given by address: resolving a name is not instant.
        self._preconnect = preconnect and not isinstance(self._server.host, str)
        self._spare: _Spare | None = None
        self.name = f"socks5 {self._server}"
        self._label = f"SOCKS5 proxy {self._server}"  # for messages

    @classmethod
    def from_url(cls, url: str, socket_options: SocketOptions | None = None) -> Socks5Outbound:
        """See `parse_socks5_url`."""
        return parse_socks5_url(url, socket_options)

    def __repr__(self) -> str:
        return f"<Socks5Outbound {self._server}>"

    @property
    def pipeline(self) -> bool:
        """Whether the handshake is sent in one write (see `__init__`)."""
        return self._pipeline

    @property
    def fast_open(self) -> bool:
        """Whether connections to the proxy ask for TCP Fast Open."""
        return self._fast_open

    @property
    def preconnect(self) -> bool:
        """Whether a proxy connection is kept ready (see `__init__`)."""
        return self._preconnect

    async def aclose(self) -> None:
        """Release what the outbound holds (a replaced configuration's)."""
        self.close_spare()

    def close_spare(self) -> None:
        """Close the connection kept ready by `preconnect`, if there is one."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.stream.close_now()

    def _make_spare(self) -> None:
        """Connect and greet the next CONNECT's proxy connection now, if none is ready.

        Never waits: a connect still in progress is finished by whoever takes
        the spare. Any failure just leaves no spare (the next flow connects
        as without preconnect, and reports the error if there is one).
        """
        if self._spare is not None:
            return
        host = self._server.host
        assert not isinstance(host, str)  # see __init__
        try:
            sock, connected = start_tcp_connect(host, self._server.port, self.socket_options)
        except (OSError, OutboundError):
            return
        stream = TcpSocketStream(sock)
        if connected and not self._greet(stream):
            return
        self._spare = _Spare(stream, trio.current_time(), connected)

    def _greet(self, stream: TcpSocketStream) -> bool:
        """Send the greeting on a fresh connection; False (and closed) if it failed."""
        try:
            # A few bytes into an empty socket buffer: all or an error.
            if stream.send_nowait(self._greeting) == len(self._greeting):
                return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        stream.close_now()
        return False

    async def _take_spare(self) -> tuple[TcpSocketStream, bytes] | None:
        """The ready connection and what the proxy sent on it so far (its method
        reply, usually); None when there is none or it is unusable (too old,
        failed, closed by the proxy): then the caller connects afresh."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        stream = spare.stream
        try:
            if trio.current_time() - spare.born <= SPARE_MAX_AGE:
                if not spare.connected:
                    await finish_tcp_connect(stream.socket)
                    if not self._greet(stream):
                        return None
                early = stream.receive_nowait(4096)
                # Once more when something came: a close may be behind it.
                after = stream.receive_nowait(4096) if early else None
                if early != b"" and after != b"":  # b"": the proxy closed it
                    return stream, (early or b"") + (after or b"")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except BaseException:
            stream.close_now()
            raise
        stream.close_now()
        return None

    async def _handshake(
        self, command: Command, dest: Destination
    ) -> tuple[TcpSocketStream, Socks5Reply, bytes]:
        """Connect to the proxy and run one request; returns stream, reply, read-ahead."""
        proxy = self._label
        started = trio.current_time()
        preconnect = self._preconnect and command is Command.CONNECT
        spare = await self._take_spare() if preconnect else None
        if spare is not None:
            stream, early = spare
            conn = self._client(command, dest, greeting_sent=True)
            try:
                return await self._request(stream, conn, early, command, dest, preconnect, started)
            except ProxyClosed:
                # The proxy closed the ready connection without answering
                # the request (an idle timeout of its own, a restart): the
                # request goes again on a new connection, once, as HTTP
                # clients retry a request on a reused connection the server
                # closed. A proxy that closes on every such request fails
                # the second time as it would have the first.
                pass
        new_conn: Socks5ClientConnection | None = None
        first = b""
        if command is Command.CONNECT:
            # The first message goes with the connect (in the SYN, with Fast
            # Open). Not for UDP ASSOCIATE: its address's family is that of
            # the connection, known only once it is made (below).
            new_conn = self._client(command, dest)
            first = new_conn.data_to_send()
        try:
            stream = await open_tcp(
                self._server.host,
                self._server.port,
                self.socket_options,
                early_data=first,
                fast_open=self._fast_open,
            )
        except OutboundError as exc:
            raise OutboundError(
                exc.reply, f"{proxy} unreachable: {exc}", proxy_failed=True
            ) from exc
        if new_conn is None:
            if stream.socket.family == socket.AF_INET6:
                # The zeros of UDP ASSOCIATE in the family of this connection:
                # over IPv6, 0.0.0.0 is refused or answered with an IPv4 relay.
                dest = Destination(ipaddress.IPv6Address(0), 0)
            new_conn = self._client(command, dest)
        return await self._request(stream, new_conn, b"", command, dest, preconnect, started)

    def _client(
        self, command: Command, dest: Destination, *, greeting_sent: bool = False
    ) -> Socks5ClientConnection:
        return Socks5ClientConnection(
            command,
            dest,
            self._username,
            self._password,
            pipeline=self._pipeline,
            greeting_sent=greeting_sent,
        )

    def _spare_maker(self, conn: Socks5ClientConnection) -> Callable[[], None]:
        """What makes the next flow's connection once `conn`'s request is
        sent: while this one's request waits for its answer."""
        made = False

        def make() -> None:
            nonlocal made
            if not made and conn.request_queued:
                made = True
                self._make_spare()

        return make

    async def _request(
        self,
        stream: TcpSocketStream,
        conn: Socks5ClientConnection,
        early: bytes,
        command: Command,
        dest: Destination,
        preconnect: bool,
        started: float,
    ) -> tuple[TcpSocketStream, Socks5Reply, bytes]:
        """Run one request on a connection to the proxy; closes it on failure.

        `early` is what the proxy sent on a ready connection (greeted
        already) before the request; `started` is when the set-up began
        (trio time), which the connect timeout counts from.
        """
        proxy = self._label
        ok = False
        try:
            if early:
                conn.receive_data(early)
            before_wait = self._spare_maker(conn) if preconnect else None

            # Every read brings at least one byte and the whole exchange is
            # a few hundred bytes, so the bound is never reached by an
            # honest proxy.
            result: Socks5Reply | AuthFailed = await run_handshake(
                stream,
                conn,
                proxy=proxy,
                what=dest,
                started=started,
                timeout=self.socket_options.connect_timeout,
                protocol_error=Socks5ProtocolError,
                max_reads=_MAX_HANDSHAKE_READS,
                before_wait=before_wait,
            )
            if isinstance(result, AuthFailed):
                raise OutboundError(
                    FailureReply.RESET, f"{proxy}: {result.reason}", proxy_failed=True
                )
            reply = result
            if not reply.succeeded:
                if command is Command.UDP_ASSOCIATE:
                    # There is no destination yet: the proxy refused the
                    # association itself (microsocks has none at all).
                    what = (
                        "does not offer UDP ASSOCIATE (no UDP through it)"
                        if reply.code == ReplyCode.COMMAND_NOT_SUPPORTED
                        else "refused UDP ASSOCIATE"
                    )
                    raise OutboundError(reply.failure(), f"{proxy} {what}: {reply.describe()}")
                raise OutboundError(
                    reply.failure(), f"{proxy} could not reach {dest}: {reply.describe()}"
                )
            ok = True
            return stream, reply, conn.trailing_data
        finally:
            if not ok:
                await trio.aclose_forcefully(stream)

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        """Open a TCP stream to `dest` through the proxy (CONNECT).

        Raises:
            OutboundError: Proxy unreachable, auth failure, or the proxy's reply
                code mapped to a `FailureReply`.
        """
        stream, _reply, trailing = await self._handshake(Command.CONNECT, dest)
        return PrefixedStream(stream, trailing) if trailing else stream

    async def open_udp(self) -> Socks5UdpSession:
        """Open a UDP ASSOCIATE session.

        Raises:
            OutboundError: As for `connect_tcp`, or the relay is unusable.
        """
        # We do not know our own address as the proxy sees it; RFC 1928 says
        # to send zeros then (IPv6 ones over IPv6: see `_handshake`).
        stream, reply, _ = await self._handshake(
            Command.UDP_ASSOCIATE, Destination(ipaddress.IPv4Address(0), 0)
        )
        try:
            relay_host = reply.bound.host
            if not isinstance(relay_host, str) and relay_host.is_unspecified:
                # "Same address as the proxy": use where the control socket went.
                relay_host = ipaddress.ip_address(stream.socket.getpeername()[0])
            family, relay = (await _resolve(relay_host, reply.bound.port, socket.SOCK_DGRAM))[0]
            sock = open_udp_socket(family, self.socket_options)
            try:
                sock.connect(relay)
            except OSError as exc:
                sock.close()
                where = format_endpoint(relay_host, reply.bound.port)
                raise error_from_oserror(exc, f"connecting to SOCKS5 UDP relay {where}") from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return Socks5UdpSession(stream, sock)


@attrs.define(slots=True)
class Socks5UdpStatistics:
    sent: int
    received: int
    dropped_fragments: int
    dropped_malformed: int


# Source headers of relay datagrams, decoded once: a session hears from few
# peers, and decoding an address (a `Destination`) costs more than the rest
# of a datagram's way. Bounded; emptied when full.
_SOURCE_CACHE = 256
_ATYP_ENDS = {1: 10, 4: 22}  # header length for IPv4 / IPv6 sources


class Socks5UdpSession:
    """Datagrams through a SOCKS5 UDP relay; lives as long as its control stream.

    One task may receive at a time (as with trio streams); sends never
    wait. `wait_ended` watches the control connection: the proxy closing it
    ends the association.
    """

    __slots__ = (
        "_closed",
        "_control",
        "_header_for",
        "_last_dest",
        "_last_header",
        "_sock",
        "_sources",
        "_stats",
    )

    def __init__(self, control: TcpSocketStream, sock: UdpSocket) -> None:
        self._control = control
        self._sock = sock
        self._closed = False
        self._stats = Socks5UdpStatistics(0, 0, 0, 0)
        self._sources: dict[bytes, Destination] = {}
        # The header for the destination sent to last: a flow sends to one
        # peer for long stretches, and the identity test is nearly free.
        self._last_dest: Destination | None = None
        self._last_header = b""

    def statistics(self) -> Socks5UdpStatistics:
        """Counters: datagrams sent/received and relay datagrams dropped."""
        return attrs.evolve(self._stats)

    def drops(self) -> UdpDrops:
        stats = self._stats
        return UdpDrops(
            self._sock.send_drops,
            self._sock.receive_drops(),
            stats.dropped_fragments + stats.dropped_malformed,
        )

    def _header(self, dest: Destination) -> bytes:
        if dest is not self._last_dest:
            self._last_header = b"\x00\x00\x00" + encode_address(dest)
            self._last_dest = dest
        return self._last_header

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        """Send `data` to `dest` via the relay, or drop it if the buffer is full.

        Raises:
            OutboundError: The relay socket failed.
        """
        try:
            sent = self._sock.send_nowait(self._header(dest) + data)
        except OSError as exc:
            raise error_from_oserror(exc, f"sending to {dest} via the SOCKS5 relay") from exc
        if sent:
            self._stats.sent += 1
        return sent

    async def send_to(self, data: bytes, dest: Destination) -> None:
        """Send `data` to `dest` via the relay, waiting for buffer room.

        Raises:
            OutboundError: The relay socket failed.
        """
        try:
            await self._sock.send(self._header(dest) + data)
        except OSError as exc:
            raise error_from_oserror(exc, f"sending to {dest} via the SOCKS5 relay") from exc
        self._stats.sent += 1

    def _decode(self, datagram: bytes) -> tuple[bytes, Destination] | None:
        """A relay datagram's payload and source; None (counted) if unusable."""
        stats = self._stats
        end = _ATYP_ENDS.get(datagram[3]) if len(datagram) > 3 else None
        if end is not None and len(datagram) >= end:
            key = datagram[:end]
            source = self._sources.get(key)
            if source is not None:
                if datagram[2] != 0:
                    stats.dropped_fragments += 1
                    return None
                stats.received += 1
                return datagram[end:], source
        try:
            frag, source, payload = decode_udp_datagram_untrusted(datagram)
        except Socks5ProtocolError:
            stats.dropped_malformed += 1
            return None
        if frag != 0:
            stats.dropped_fragments += 1
            return None
        if end is not None:
            if len(self._sources) >= _SOURCE_CACHE:
                self._sources.clear()
            self._sources[datagram[:end]] = source
        stats.received += 1
        return payload, source

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        """Wait for the relay socket, then decode every datagram waiting.

        Fragmented (FRAG != 0) and malformed datagrams are counted and dropped.

        Raises:
            OutboundError: The relay socket failed.
        """
        try:
            return await self._sock.receive_decoded(limit, self._decode)
        except OSError as exc:
            raise error_from_oserror(exc, "receiving from the SOCKS5 UDP relay") from exc

    async def wait_ended(self) -> None:
        """Wait for the proxy to close the control connection; then raise.

        Raises:
            OutboundError: always, once the association is gone.
        """
        try:
            while await self._control.receive_some(512):
                pass  # RFC 1928 defines no messages here; ignore stray bytes.
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        raise OutboundError(
            FailureReply.RESET, "SOCKS5 proxy closed the UDP association's control connection"
        )

    async def receive_from(self) -> tuple[bytes, Destination]:
        """Wait for the next datagram from the relay.

        Fragmented (FRAG != 0) and malformed datagrams are counted and dropped.

        Raises:
            OutboundError: The control connection closed (the association is
                gone) or the relay socket failed.
        """
        while True:
            datagram = await self._receive_raw()
            item = self._decode(datagram)
            if item is not None:
                return item

    async def _receive_raw(self) -> bytes:
        # Race the relay socket against the control stream: EOF there means
        # the proxy ended the association and nothing more will arrive.
        result: bytes | OSError | None = None

        async def watch_control(scope: trio.CancelScope) -> None:
            try:
                while await self._control.receive_some(512):
                    pass  # RFC 1928 defines no messages here; ignore stray bytes.
            except trio.BrokenResourceError:
                pass
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_control, nursery.cancel_scope)
            try:
                result = await self._sock.receive()
            except OSError as exc:
                result = exc
            nursery.cancel_scope.cancel()
        if isinstance(result, OSError):
            raise error_from_oserror(result, "receiving from the SOCKS5 UDP relay")
        if result is None:
            raise OutboundError(
                FailureReply.RESET, "SOCKS5 proxy closed the UDP association's control connection"
            )
        return result

    async def aclose(self) -> None:
        """Close the relay socket and the control connection (ending the association)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._sock.close()
        await trio.aclose_forcefully(self._control)
