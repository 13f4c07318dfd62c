"""The Shadowsocks outbound: AEAD (SIP004) and 2022 (SIP022), TCP and UDP.

The codecs live in `ss_crypto` (ciphers, keys), `ss_aead` (chunk framing,
SIP004 UDP) and `ss_2022` (SIP022 headers and UDP); this module is the thin
trio layer over them plus `ss://` URL parsing (SIP002).

Shadowsocks has no handshake and no reply codes: the client opens a TCP
connection to the server and sends the target address in front of its first
data. So `connect_tcp` can only report that the *server* is unreachable; a
target that refuses or cannot be reached shows up later, when the server
closes the connection without a byte of response. The stream reports that
as `trio.BrokenResourceError` (the application sees a reset after its
handshake already completed), never as a clean EOF.

The address goes out together with the first application data, because a
separate packet for it is both slower and a recognisable pattern. A protocol
in which the server speaks first would then wait forever, so `receive_some`
sends the header alone if no data arrives within `first_data_wait`.

A server that does not accept our key (a wrong password or 2022 key, or a
2022 server whose clock is more than 30 s off ours) answers nothing at all:
it closes, or holds the connection open (against probing), or its replies
do not authenticate. The flows just fail or hang, so each outbound keeps
an `AuthWatch` that says so in the log, rate-limited: when replies do not
authenticate, and when connections in a row end without a byte of
response to their request.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable

import attrs
import trio

from .base import Destination, OutboundError, UdpDrops, redact_url
from .net import SocketOptions, TcpSocketStream, error_from_oserror, open_tcp, open_udp_socket
from .net import resolve as _resolve
from .proxyurl import UNSPLITTABLE
from .ss_2022 import (
    MAX_INITIAL_PAYLOAD,
    Udp2022Client,
    build_request_header,
    response_header_check,
    response_header_size,
)
from .ss_aead import (
    StreamDecryptor,
    StreamEncryptor,
    decode_udp_packet_untrusted,
    encode_udp_packet,
)
from .ss_crypto import (
    CipherSpec,
    ShadowsocksProtocolError,
    cipher_spec,
    encode_target,
    master_key,
)
from .udpsock import UdpSocket

__all__ = [
    "AuthWatch",
    "ShadowsocksOutbound",
    "ShadowsocksProtocolError",
    "ShadowsocksStream",
    "ShadowsocksUdpSession",
    "ShadowsocksUdpStatistics",
    "parse_shadowsocks_url",
]

_RECEIVE_SIZE = 1 << 16

log = logging.getLogger("tun2sx.shadowsocks")

# Connections in a row closed without a response before the log suspects
# the key: one is a refused destination; several, with none answered in
# between, look like a server that does not accept us.
SILENT_CLOSES_TO_WARN = 3
# Seconds between two warnings about one server's key.
AUTH_WARNING_INTERVAL = 300.0


class AuthWatch:
    """Tells the log, rate-limited, that a server seems to reject our key.

    Args:
        label: the server, as the message names it.
    """

    __slots__ = ("_label", "_last", "_silent", "_suppressed")

    def __init__(self, label: str) -> None:
        self._label = label
        self._silent = 0
        self._last: float | None = None
        self._suppressed = 0

    def answered(self) -> None:
        """A response authenticated: the key is right."""
        self._silent = 0

    def closed_silently(self) -> None:
        """A connection ended without a byte of response to its request."""
        self._silent += 1
        if self._silent >= SILENT_CLOSES_TO_WARN:
            self._warn(
                f"answered none of the last {self._silent} connections: wrong password or"
                " key, a 2022 server's clock more than 30 s off ours, or none of those"
                " destinations answered"
            )

    def unauthentic(self, what: str) -> None:
        """A response (TCP) or reply datagram (UDP) did not decrypt."""
        self._warn(
            f"sent {what} that does not authenticate: wrong password or key, or a 2022"
            " server's clock more than 30 s off ours"
        )

    def _warn(self, message: str) -> None:
        now = trio.current_time()
        if self._last is not None and now - self._last < AUTH_WARNING_INTERVAL:
            self._suppressed += 1
            return
        more = ""
        if self._suppressed:
            more = f" ({self._suppressed} more since the last warning)"
        self._last, self._suppressed = now, 0
        log.warning("%s %s%s", self._label, message, more)


class ShadowsocksStream(trio.abc.HalfCloseableStream):
    """A TCP stream to one target through a Shadowsocks server.

    Args:
        sock: The connected socket stream to the server.
        spec: The cipher.
        key: The master key.
        dest: The target, sent in front of the first data.
        clock: Unix time source, for SIP022 timestamps.
        first_data_wait: Seconds `receive_some` waits for a first `send_all`
            before sending the target header alone.
    """

    def __init__(
        self,
        sock: TcpSocketStream,
        spec: CipherSpec,
        key: bytes,
        dest: Destination,
        *,
        clock: Callable[[], float] = time.time,
        first_data_wait: float = 0.05,
        auth_watch: AuthWatch | None = None,
    ) -> None:
        self.socket_stream = sock
        self._auth_watch = auth_watch
        self._authenticated = False  # a response chunk has decrypted
        self._spec = spec
        self._dest = dest
        self._clock = clock
        self._first_data_wait = first_data_wait
        self._enc = StreamEncryptor(spec, key)
        if spec.edition_2022:
            self._dec = StreamDecryptor(
                spec,
                key,
                header_size=response_header_size(spec),
                check_header=response_header_check(self._enc.salt),
            )
        else:
            self._dec = StreamDecryptor(spec, key)
        self._plain = bytearray()
        self._send_lock = trio.StrictFIFOLock()
        self._header_sent = trio.Event()
        self._eof = False

    def _opening(self, data: bytes) -> bytes:
        """The first bytes of the request: target header plus `data`."""
        if self._spec.edition_2022:
            head, rest = data[:MAX_INITIAL_PAYLOAD], data[MAX_INITIAL_PAYLOAD:]
            header = build_request_header(self._enc, self._dest, head, self._clock())
            return header + self._enc.encrypt(rest) if rest else header
        return self._enc.encrypt(encode_target(self._dest) + data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            if self._header_sent.is_set():
                out = self._enc.encrypt(data)
            else:
                out = self._opening(bytes(data))
                self._header_sent.set()
            if out:
                await self.socket_stream.send_all(out)
            else:
                await trio.lowlevel.checkpoint()

    async def _send_header_alone(self) -> None:
        async with self._send_lock:
            if not self._header_sent.is_set():
                out = self._opening(b"")
                self._header_sent.set()
                await self.socket_stream.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.socket_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._send_header_alone()
        async with self._send_lock:
            await self.socket_stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if not self._header_sent.is_set():
            with trio.move_on_after(self._first_data_wait):
                await self._header_sent.wait()
            await self._send_header_alone()
        while not self._plain and not self._eof:
            data = await self.socket_stream.receive_some(_RECEIVE_SIZE)
            if not data:
                self._check_eof()
                self._eof = True
                break
            try:
                plain = self._dec.decrypt_untrusted(data, self._clock())
            except ShadowsocksProtocolError as exc:
                if self._auth_watch is not None and not self._authenticated:
                    self._auth_watch.unauthentic("a response")
                raise trio.BrokenResourceError(f"Shadowsocks server: {exc}") from exc
            if plain:
                self._plain += plain
                if not self._authenticated:
                    self._authenticated = True
                    if self._auth_watch is not None:
                        self._auth_watch.answered()
        if not self._plain:
            await trio.lowlevel.checkpoint()
            return b""
        n = len(self._plain) if max_bytes is None else max_bytes
        chunk = bytes(self._plain[:n])
        del self._plain[:n]
        return chunk

    def _check_eof(self) -> None:
        if self._dec.salt is None:
            raise trio.BrokenResourceError(
                f"Shadowsocks server closed without a response: {self._dest} refused or unreachable"
            )
        if self._dec.buffered:
            raise trio.BrokenResourceError("Shadowsocks server closed in the middle of a chunk")

    def _ending(self) -> None:
        """The flow is done with us: a request that never got a byte back counts."""
        watch, self._auth_watch = self._auth_watch, None  # once per stream
        if watch is not None and self._header_sent.is_set() and not self._authenticated:
            watch.closed_silently()

    async def aclose(self) -> None:
        self._ending()
        self._plain.clear()
        await self.socket_stream.aclose()

    def close_now(self) -> None:
        self._ending()
        self._plain.clear()
        self.socket_stream.close_now()


@attrs.define(slots=True)
class ShadowsocksUdpStatistics:
    sent: int
    received: int
    dropped_malformed: int


class ShadowsocksUdpSession:
    """Datagrams through a Shadowsocks server's UDP relay (one socket per session).

    One task may receive at a time; sends never wait. Each datagram is
    encrypted or decrypted as it passes, inline.
    """

    __slots__ = (
        "_auth_watch",
        "_client",
        "_clock",
        "_closed",
        "_key",
        "_sock",
        "_spec",
        "_stats",
    )

    def __init__(
        self,
        sock: UdpSocket,
        spec: CipherSpec,
        key: bytes,
        clock: Callable[[], float] = time.time,
        auth_watch: AuthWatch | None = None,
    ) -> None:
        self._sock = sock
        self._auth_watch = auth_watch
        self._spec = spec
        self._key = key
        self._clock = clock
        self._client = Udp2022Client(spec, key) if spec.edition_2022 else None
        self._closed = False
        self._stats = ShadowsocksUdpStatistics(0, 0, 0)

    def statistics(self) -> ShadowsocksUdpStatistics:
        """Counters: datagrams sent, received, and dropped as forged or malformed."""
        return attrs.evolve(self._stats)

    def drops(self) -> UdpDrops:
        return UdpDrops(
            self._sock.send_drops, self._sock.receive_drops(), self._stats.dropped_malformed
        )

    def _encode(self, data: bytes, dest: Destination) -> bytes:
        if self._client is not None:
            return self._client.encode(dest, data, self._clock())
        return encode_udp_packet(self._spec, self._key, dest, data)

    def send_to_nowait(self, data: bytes, dest: Destination) -> bool:
        """Send `data` to `dest` via the server, or drop it if the buffer is full.

        Raises:
            OutboundError: The socket failed.
        """
        try:
            sent = self._sock.send_nowait(self._encode(data, dest))
        except OSError as exc:
            raise error_from_oserror(exc, f"sending to {dest} via the Shadowsocks server") from exc
        if sent:
            self._stats.sent += 1
        return sent

    async def send_to(self, data: bytes, dest: Destination) -> None:
        """Send `data` to `dest` via the server, waiting for buffer room.

        Raises:
            OutboundError: The socket failed.
        """
        try:
            await self._sock.send(self._encode(data, dest))
        except OSError as exc:
            raise error_from_oserror(exc, f"sending to {dest} via the Shadowsocks server") from exc
        self._stats.sent += 1

    def _decode(self, packet: bytes) -> tuple[bytes, Destination] | None:
        try:
            if self._client is not None:
                source, payload = self._client.decode_untrusted(packet, self._clock())
            else:
                source, payload = decode_udp_packet_untrusted(self._spec, self._key, packet)
        except ShadowsocksProtocolError:
            stats = self._stats
            stats.dropped_malformed += 1
            if not stats.received and self._auth_watch is not None:
                # Not one reply of this session decrypted yet: the key, most
                # likely, rather than a stray forged datagram.
                self._auth_watch.unauthentic("UDP replies")
            return None
        self._stats.received += 1
        return payload, source

    async def receive_batch(self, limit: int) -> list[tuple[bytes, Destination]]:
        """Wait for the socket, then decrypt every datagram waiting.

        Forged or malformed datagrams are counted and dropped.

        Raises:
            OutboundError: The socket failed (e.g. ICMP port unreachable from the server).
        """
        try:
            return await self._sock.receive_decoded(limit, self._decode)
        except OSError as exc:
            raise error_from_oserror(exc, "receiving from the Shadowsocks server") from exc

    async def receive_from(self) -> tuple[bytes, Destination]:
        """Wait for the next datagram; forged or malformed ones are counted and dropped.

        Raises:
            OutboundError: The socket failed (e.g. ICMP port unreachable from the server).
        """
        while True:
            try:
                packet = await self._sock.receive()
            except OSError as exc:
                raise error_from_oserror(exc, "receiving from the Shadowsocks server") from exc
            item = self._decode(packet)
            if item is not None:
                return item

    async def wait_ended(self) -> None:
        """Shadowsocks has no association to end: waits for ever."""
        await trio.sleep_forever()

    async def aclose(self) -> None:
        """Close the socket; idempotent."""
        self._closed = True
        self._sock.close()
        await trio.lowlevel.checkpoint()


class ShadowsocksOutbound:
    """Connects through a Shadowsocks server (TCP streams and UDP sessions).

    Args:
        host: Server host name or address.
        port: Server port.
        method: One of `ss_crypto.CIPHERS`.
        password: SIP004 password, or for 2022 methods a base64 key of the
            cipher's key length.
        socket_options: Loop avoidance and connect timeout.
        clock: Unix time source (SIP022 timestamps); tests may skew it.

    Raises:
        ValueError: Unknown method or unusable password.
    """

    __slots__ = ("_auth_watch", "_clock", "_key", "_server", "_spec", "name", "socket_options")

    def __init__(
        self,
        host: str,
        port: int,
        method: str,
        password: str,
        *,
        socket_options: SocketOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._server = Destination.parse_host(host, port)
        self._spec = cipher_spec(method)
        self._key = master_key(self._spec, password)
        self.socket_options = socket_options or SocketOptions()
        self._clock = clock
        self.name = f"shadowsocks {self._spec.name} {self._server}"
        self._auth_watch = AuthWatch(f"Shadowsocks server {self._server} ({self._spec.name})")

    @property
    def method(self) -> str:
        return self._spec.name

    def __repr__(self) -> str:
        return f"<ShadowsocksOutbound {self._spec.name} {self._server}>"

    async def connect_tcp(self, dest: Destination) -> ShadowsocksStream:
        """Open a TCP stream to `dest` through the server.

        Raises:
            OutboundError: The server is unreachable (a refused or unreachable
                target cannot be reported here; see the module docstring).
        """
        try:
            sock = await open_tcp(self._server.host, self._server.port, self.socket_options)
        except OutboundError as exc:
            raise OutboundError(
                exc.reply,
                f"Shadowsocks server {self._server} unreachable: {exc}",
                proxy_failed=True,
            ) from exc
        return ShadowsocksStream(
            sock, self._spec, self._key, dest, clock=self._clock, auth_watch=self._auth_watch
        )

    async def open_udp(self) -> ShadowsocksUdpSession:
        """Open a UDP session: one socket connected to the server.

        Raises:
            OutboundError: The server's name does not resolve or the socket fails.
        """
        family, addr = (await _resolve(self._server.host, self._server.port, socket.SOCK_DGRAM))[0]
        sock = open_udp_socket(family, self.socket_options)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            raise error_from_oserror(
                exc, f"connecting to Shadowsocks server {self._server}"
            ) from exc
        return ShadowsocksUdpSession(sock, self._spec, self._key, self._clock, self._auth_watch)


# --- ss:// URLs (SIP002) ---------------------------------------------------------


def _userinfo(url: str, raw: str) -> tuple[str, str]:
    """Split SIP002 userinfo into method and password (plain or base64url form)."""
    if ":" in raw or "%3A" in raw.upper():
        method, sep, password = urllib.parse.unquote(raw).partition(":")
    else:
        padded = raw + "=" * (-len(raw) % 4)
        try:
            data = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
            decoded = data.decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            raise ValueError(
                f"Shadowsocks URL {redact_url(url)!r}: "
                "user info is neither method:password nor base64 of it"
            ) from None
        method, sep, password = decoded.partition(":")
    if not sep or not method or not password:
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: user info must be method:password")
    return method, password


def parse_shadowsocks_url(
    url: str, socket_options: SocketOptions | None = None
) -> ShadowsocksOutbound:
    """Build an outbound from a SIP002 URL.

    Accepted forms: `ss://BASE64URL(method:password)@host:port[/][#tag]` and
    `ss://method:password@host:port` with the password percent-encoded.
    Plugins (`?plugin=`) are not supported.

    Raises:
        ValueError: One line naming what is wrong with the URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        # urllib's own message may quote the whole netloc, password and all.
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: {UNSPLITTABLE}") from None
    if parts.scheme.lower() != "ss":
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: scheme must be ss://")
    if parts.query:
        query = urllib.parse.parse_qs(parts.query)
        if "plugin" in query:
            raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: plugins are not supported")
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: unexpected query {parts.query!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: unexpected path {parts.path!r}")
    userinfo, at, _hostport = parts.netloc.rpartition("@")
    if not at or not userinfo:
        raise ValueError(
            f"Shadowsocks URL {redact_url(url)!r}: missing method:password@ before the host"
        )
    if not parts.hostname:
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: missing host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"Shadowsocks URL {redact_url(url)!r}: port is not a number in 0..65535"
        ) from None
    if not port:
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: missing port")
    method, password = _userinfo(url, userinfo)
    try:
        return ShadowsocksOutbound(
            parts.hostname, port, method, password, socket_options=socket_options
        )
    except ValueError as exc:
        raise ValueError(f"Shadowsocks URL {redact_url(url)!r}: {exc}") from None
