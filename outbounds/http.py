"""HTTP CONNECT proxies (RFC 9110 section 9.3.6) with Basic auth (RFC 7617).

The codec is sans-I/O. `HttpConnectClient` sends one CONNECT request and
buffers the proxy's answer until its header section is whole (an answer
may arrive a byte at a time). After a 2xx the connection is the tunnel: the
bytes that followed the blank line belong to the application (a server
that speaks first) and are handed back, never dropped; a 2xx answer to
CONNECT has no body, whatever its headers say (RFC 9110 section 9.3.6).
Interim 1xx answers are skipped. Functions that read proxy bytes end in
`_untrusted` and raise only `HttpProtocolError`.

A refusal is a status code, and each is mapped to what the application
would get from a real network (`STATUS_FAILURES`; docs/usage.md lists the
errno each gives). HTTP CONNECT carries TCP only: a UDP session through
this outbound fails at once with an ICMP port unreachable.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Final

import attrs
import trio

from .base import Destination, FailureReply, OutboundError, UdpSession, redact_url
from .handshake import NEED_DATA, NeedData, OneRequestClient, open_tunnel
from .net import PrefixedStream, SocketOptions
from .proxyurl import split_proxy_url

__all__ = [
    "STATUS_FAILURES",
    "HttpConnectClient",
    "HttpConnectReply",
    "HttpOutbound",
    "HttpProtocolError",
    "build_connect_request",
    "parse_http_url",
]

# The longest answer head taken; a proxy's error page may follow it, but the
# head of a CONNECT answer is a few hundred bytes.
MAX_HEAD: Final = 16 * 1024

# What an application gets when the proxy answers CONNECT with these; any
# other non-2xx status gives a reset. The application's errno (Linux):
#   RESET             -> ECONNREFUSED (an RST to its SYN)
#   ADMIN_PROHIBITED  -> EHOSTUNREACH over IPv4, EACCES over IPv6
#   HOST_UNREACHABLE  -> EHOSTUNREACH
STATUS_FAILURES: Final[dict[int, FailureReply]] = {
    # The proxy's policy said no: a firewall's "administratively prohibited".
    403: FailureReply.ADMIN_PROHIBITED,
    451: FailureReply.ADMIN_PROHIBITED,
    # Our credentials are missing or wrong: SOCKS5's auth failure is a reset
    # too. tinyproxy answers wrong ones with 401 rather than 407.
    401: FailureReply.RESET,
    407: FailureReply.RESET,
    # The proxy's own connect failed: refused, or a name that did not
    # resolve (tinyproxy says 500, Squid 503, others 502).
    500: FailureReply.RESET,
    502: FailureReply.RESET,
    503: FailureReply.RESET,
    # The destination did not answer the proxy: as a connect time-out here.
    504: FailureReply.HOST_UNREACHABLE,
}

# RFC 3986 reg-name without percent-encoding: what a name may be in a
# request target. Anything else (spaces, CR, LF, non-ASCII) could rewrite
# the request, so such a name is never sent.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=]+\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([1-9][0-9][0-9])(?: (.*))?\Z")


class HttpProtocolError(Exception):
    """The proxy's answer is not an HTTP/1.x response head."""


def request_target(dest: Destination) -> str:
    """`dest` in authority form (`host:port`), IPv6 literals bracketed.

    Raises:
        ValueError: A host name that cannot be written into a request.
    """
    host = dest.host
    if isinstance(host, ipaddress.IPv6Address):
        return f"[{host}]:{dest.port}"
    if isinstance(host, str) and not _REG_NAME.match(host):
        raise ValueError(f"host name {host!r} cannot be sent in an HTTP request")
    return f"{host}:{dest.port}"


def basic_credentials(username: str, password: str) -> str:
    """The Basic credentials of RFC 7617 (UTF-8, as its charset parameter says)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def build_connect_request(dest: Destination, authorization: str | None = None) -> bytes:
    """The CONNECT request for `dest`, with a Proxy-Authorization when given.

    Raises:
        ValueError: See `request_target`.
    """
    target = request_target(dest)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if authorization is not None:
        lines.append(f"Proxy-Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


@attrs.frozen
class HttpConnectReply:
    """The proxy's final answer to CONNECT.

    Attributes:
        status: The status code.
        reason: The reason phrase (may be empty), decoded as Latin-1.
        headers: `(name lower case, value)` pairs in order.
    """

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300

    def failure(self) -> FailureReply:
        """What the application should get for this (failed) answer."""
        return STATUS_FAILURES.get(self.status, FailureReply.RESET)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def describe(self) -> str:
        reason = self.reason[:80].encode("ascii", "backslashreplace").decode("ascii")
        return f"{self.status} {reason}".rstrip()


def _head_end(buf: bytearray) -> tuple[int, int] | None:
    """Where the head's blank line starts and ends, or None if not yet there.

    Lines end in CRLF; a bare LF is taken too (RFC 9112 section 2.2).
    """
    at = buf.find(b"\n\r\n")
    bare = buf.find(b"\n\n")
    if at == -1 and bare == -1:
        return None
    if bare != -1 and (at == -1 or bare < at):
        return bare, bare + 2
    return at, at + 3


def parse_head_untrusted(head: bytes) -> HttpConnectReply:
    """Parse a response head (status line and header lines, no blank line).

    Raises:
        HttpProtocolError: The status line is not HTTP/1.x with a 3-digit code.
    """
    lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        shown = lines[0][:40].decode("latin-1").encode("ascii", "backslashreplace").decode()
        raise HttpProtocolError(f"not an HTTP/1.x status line: {shown!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # A line without a colon (or an obsolete folded one) says nothing a
        # CONNECT client needs: skipped, not fatal.
        if colon and name and not name[-1:].isspace() and not name[:1].isspace():
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    reason = (match.group(2) or b"").decode("latin-1")
    return HttpConnectReply(int(match.group(1)), reason, tuple(headers))


class HttpConnectClient(OneRequestClient[HttpConnectReply]):
    """Client side of one CONNECT exchange, without I/O (see `OneRequestClient`).

    Args:
        dest: Where the tunnel should go.
        authorization: A Proxy-Authorization value (`basic_credentials`).

    Raises:
        ValueError: `dest` cannot be written into a request.
    """

    __slots__ = ()

    def __init__(self, dest: Destination, authorization: str | None = None) -> None:
        super().__init__(build_connect_request(dest, authorization))

    def _protocol_error(self, message: str) -> Exception:
        return HttpProtocolError(message)

    def _answer_untrusted(self, buf: bytearray) -> NeedData | HttpConnectReply:
        """The final answer once its head is whole (1xx skipped), else NEED_DATA.

        Raises:
            HttpProtocolError: Not HTTP/1.x, or a head longer than `MAX_HEAD`.
        """
        while True:
            if buf and buf[0] != ord("H"):
                # Fail at once on a proxy that speaks something else.
                raise HttpProtocolError(f"answer starts with {bytes(buf[:1])!r}, not HTTP/")
            end = _head_end(buf)
            if end is None or end[0] > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    raise HttpProtocolError(f"answer head longer than {MAX_HEAD} bytes")
                return NEED_DATA
            reply = parse_head_untrusted(bytes(buf[: end[0]]))
            del buf[: end[1]]
            if reply.status >= 200:
                return reply
            # 1xx: interim, the final answer follows.


def parse_http_url(url: str, socket_options: SocketOptions | None = None) -> HttpOutbound:
    """Build an outbound from `http://[user:pass@]host:port[?tfo=1]`.

    The credentials are percent-decoded; the user name must not hold a
    colon (RFC 7617), the password may be empty.

    Raises:
        ValueError: One line naming what is wrong with the URL.
    """
    parts = split_proxy_url(url, "HTTP proxy", ("http",), ("tfo",))
    if parts.username is not None and (not parts.username or ":" in parts.username):
        raise ValueError(
            f"HTTP proxy URL {redact_url(url)!r}: the user name must be non-empty, without ':'"
        )
    return HttpOutbound(
        parts.host,
        parts.port,
        parts.username,
        parts.password,
        socket_options=socket_options,
        fast_open=parts.flags.get("tfo", False),
    )


class HttpOutbound:
    """Connects through an HTTP proxy with CONNECT; no UDP.

    Args:
        server_host: Proxy host name or address.
        server_port: Proxy port.
        username: Basic auth user name, or None for no authentication.
        password: Basic auth password (None: empty).
        socket_options: Loop avoidance, and the connect timeout that bounds
            the whole set-up: connect and answer (sent once the proxy's own
            connect is done).
        fast_open: TCP Fast Open to the proxy: the request rides in the SYN.
    """

    __slots__ = (
        "_authorization",
        "_fast_open",
        "_label",
        "_server",
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
        fast_open: bool = False,
    ) -> None:
        self._server = Destination.parse_host(server_host, server_port)
        self._authorization = (
            basic_credentials(username, password or "") if username is not None else None
        )
        self.socket_options = socket_options or SocketOptions()
        self._fast_open = fast_open
        self.name = f"http {self._server}"
        self._label = f"HTTP proxy {self._server}"

    def __repr__(self) -> str:
        return f"<HttpOutbound {self._server}>"

    @property
    def fast_open(self) -> bool:
        """Whether connections to the proxy ask for TCP Fast Open."""
        return self._fast_open

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        """Open a tunnel to `dest` through the proxy.

        Raises:
            OutboundError: Proxy unreachable, a name that cannot be sent, or
                the proxy's status mapped by `STATUS_FAILURES`.
        """
        proxy = self._label
        try:
            client = HttpConnectClient(dest, self._authorization)
        except ValueError as exc:
            raise OutboundError(FailureReply.HOST_UNREACHABLE, f"{proxy}: {exc}") from None
        stream, reply = await open_tunnel(
            self._server,
            self.socket_options,
            client,
            fast_open=self._fast_open,
            proxy=proxy,
            what=str(dest),
            protocol_error=HttpProtocolError,
            max_reads=MAX_HEAD + 8,
        )
        if not reply.succeeded:
            stream.close_now()
            # Refused credentials are the proxy's failure, not the destination's.
            raise OutboundError(
                reply.failure(),
                self._refusal(reply, dest),
                proxy_failed=reply.status in (401, 407),
            )
        trailing = client.trailing_data
        return PrefixedStream(stream, trailing) if trailing else stream

    def _refusal(self, reply: HttpConnectReply, dest: Destination) -> str:
        if reply.status in (401, 407):
            if self._authorization is None:
                return (
                    f"{self._label} wants credentials ({reply.status}); give user:pass in its URL"
                )
            return f"{self._label} rejected the credentials ({reply.describe()})"
        return f"{self._label} could not reach {dest}: {reply.describe()}"

    async def open_udp(self) -> UdpSession:
        """There is no UDP through HTTP CONNECT.

        Raises:
            OutboundError: always, PORT_UNREACHABLE (what a UDP application
                gets from a host that takes no datagrams).
        """
        await trio.lowlevel.checkpoint()
        raise OutboundError(
            FailureReply.PORT_UNREACHABLE,
            f"{self._label} carries no UDP (HTTP CONNECT is TCP only); "
            "route UDP elsewhere with a NETWORK,udp,... rule",
        )
