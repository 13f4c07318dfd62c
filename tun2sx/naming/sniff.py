"""Sniffing: the host name an application's first bytes name.

An application that resolved a name elsewhere (DNS over HTTPS, a hard-coded
address) arrives with a real IP, and domain rules cannot see the name. Its
first bytes usually carry it: the SNI of a TLS ClientHello, the Host of an
HTTP/1 request, the SNI inside a QUIC Initial (tun2sx.naming.quic).

This module is sans-I/O: the flow reads, hands over everything read so far,
and gets back one of three answers:

- a `Sniffed` (protocol and host): done;
- `NEED_DATA`: the bytes are a prefix of something recognisable, read more
  (the caller bounds the wait and the size);
- None: not recognised, or recognised without a usable name (a ClientHello
  without SNI, an HTTP Host that is an IP literal): route as before.

Every input is untrusted: a parser may return None for anything it does
not like, and never raises (tests/tun2sx/naming/test_sniff.py and the fuzz
harness fuzz/sniff.py hold it to that).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from typing import Final, Literal, NamedTuple

import attrs

# The most bytes a TCP flow's sniffing reads before giving up: a ClientHello
# with a post-quantum key share is about 1.8 kB, a browser's HTTP request
# head a few kB; 16 KiB leaves room for large extension lists and cookies.
MAX_SNIFF_BYTES = 16 * 1024
_MAX_NAME = 253

# https://www.iana.org/assignments/http-methods (the common ones).
HTTP_METHODS: Final = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
)
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-._")


class Protocol(enum.Enum):
    """What a flow was recognised as."""

    TLS = "tls"
    HTTP = "http"
    QUIC = "quic"


class Sniffed(NamedTuple):
    """A recognised first message and the host name it names (lower case)."""

    protocol: Protocol
    host: str


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
SniffResult = Sniffed | _NeedData | None


def host_name(raw: bytes) -> str | None:
    """`raw` as a lower-case DNS name, or None when it is not one.

    IP literals are not names (they add nothing to the destination address),
    nor are empty labels, labels over 63 bytes or characters outside
    letters, digits, '-', '_' and '.'.
    """
    name = raw.lower().rstrip(b".")
    if not name or len(name) > _MAX_NAME or not _NAME_CHARS.issuperset(name):
        return None
    labels = name.split(b".")
    if any(not label or len(label) > 63 for label in labels):
        return None
    text = name.decode("ascii")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text
    return None


# -- TLS -------------------------------------------------------------------
#
# RFC 8446 section 5.1, a record:           section 4, a handshake message:
#   ContentType type (22 = handshake)         HandshakeType msg_type (1 = client_hello)
#   ProtocolVersion legacy_record_version     uint24 length
#   uint16 length                             body
#   opaque fragment[length]
#
# One handshake message may be fragmented over several records (and those
# over several TCP segments): the fragments are joined before parsing.

_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_MAX_RECORD = (1 << 14) + 256  # a TLSPlaintext fragment, with slack for odd stacks
_EXT_SERVER_NAME = 0


def sniff_tls(data: bytes | bytearray | memoryview) -> SniffResult:
    """The SNI of a TLS ClientHello at the start of `data` (a TCP stream's first bytes)."""
    view = memoryview(data)
    handshake = bytearray()
    pos = 0
    while True:
        if len(view) - pos < 5:
            if pos == 0 and len(view) and view[0] != _TLS_HANDSHAKE:
                return None
            return NEED_DATA
        if view[pos] != _TLS_HANDSHAKE or view[pos + 1] != 3:
            return None
        length = int.from_bytes(view[pos + 3 : pos + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            return None
        fragment = view[pos + 5 : pos + 5 + length]
        handshake += fragment
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                return None
            body_length = int.from_bytes(handshake[1:4], "big")
            if body_length > MAX_SNIFF_BYTES:
                return None
            if len(handshake) >= 4 + body_length:
                host = client_hello_sni(memoryview(handshake)[4 : 4 + body_length])
                return None if host is None else Sniffed(Protocol.TLS, host)
        if len(fragment) < length:
            return NEED_DATA
        pos += 5 + length


class _Reader:
    """Bounds-checked reads over a ClientHello; `ok` turns False on overrun."""

    __slots__ = ("data", "ok", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0
        self.ok = True

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            self.ok = False
            return self.data[0:0]
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> memoryview:
        return self.take(self.number(length_bytes))


def client_hello_sni(body: memoryview) -> str | None:
    """The server_name of a ClientHello body (after the 4-byte handshake header).

    RFC 8446 section 4.1.2 for the layout, RFC 6066 section 3 for the
    extension; also used for the ClientHello inside QUIC's CRYPTO frames.
    """
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy_version, random
    reader.vector(1)  # legacy_session_id
    reader.vector(2)  # cipher_suites
    reader.vector(1)  # legacy_compression_methods
    if not reader.ok or reader.pos == len(body):
        return None  # no extensions at all
    extensions = _Reader(reader.vector(2))
    while reader.ok and extensions.ok and extensions.pos < len(extensions.data):
        kind = extensions.number(2)
        content = extensions.vector(2)
        if extensions.ok and kind == _EXT_SERVER_NAME:
            return _server_name(content)
    return None


def _server_name(content: memoryview) -> str | None:
    names = _Reader(content)
    entries = _Reader(names.vector(2))
    while names.ok and entries.ok and entries.pos < len(entries.data):
        name_type = entries.number(1)
        name = entries.vector(2)
        if entries.ok and name_type == 0:  # host_name
            return host_name(bytes(name))
    return None


# -- HTTP/1 ------------------------------------------------------------------
#
# RFC 9112 section 3: request-line = method SP request-target SP HTTP-version,
# then header fields, then an empty line. The absolute form of the target
# ("GET http://host/path HTTP/1.1", sent to proxies) names the host itself
# and wins over the Host field (section 3.2.2).

_MAX_METHOD = max(len(m) for m in HTTP_METHODS)


def sniff_http(data: bytes | bytearray | memoryview) -> SniffResult:
    """The host an HTTP/1 request names, from its request line or Host field."""
    head = bytes(data[:MAX_SNIFF_BYTES])
    space = head.find(b" ", 0, _MAX_METHOD + 1)
    if space < 0:
        if len(head) > _MAX_METHOD or not any(m.startswith(head) for m in HTTP_METHODS):
            return None
        return NEED_DATA
    if head[:space] not in HTTP_METHODS:
        return None
    line_end = head.find(b"\r\n")
    if line_end < 0:
        return NEED_DATA if b"\n" not in head else None
    parts = head[:line_end].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    target = parts[1]
    if parts[0] == b"CONNECT":  # authority form, "host:port" (RFC 9112 3.2.3)
        host = _authority_host(target)
        return None if host is None else Sniffed(Protocol.HTTP, host)
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        authority = target.split(b"://", 1)[1]
        for stop in (b"/", b"?", b"#"):
            authority = authority.split(stop, 1)[0]
        host = _authority_host(authority.rpartition(b"@")[2])
        return None if host is None else Sniffed(Protocol.HTTP, host)
    end = head.find(b"\r\n\r\n", line_end)
    # Only whole lines: "Host: exa" may still become "Host: example.com".
    fields = head[line_end + 2 : end if end >= 0 else head.rfind(b"\r\n")]
    for line in fields.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"host":
            host = _authority_host(value.strip())
            return None if host is None else Sniffed(Protocol.HTTP, host)
    if end < 0:
        return NEED_DATA
    return None  # a whole request head without Host (HTTP/1.0)


def _authority_host(authority: bytes) -> str | None:
    """The host of `host[:port]` (an `[IPv6]` literal is no name)."""
    if authority.startswith(b"["):
        return None
    host, _, port = authority.partition(b":")
    if port and not port.isdigit():
        return None
    return host_name(host)


# -- choosing ----------------------------------------------------------------

_STREAM_SNIFFERS = {Protocol.TLS: sniff_tls, Protocol.HTTP: sniff_http}


def sniff_stream(
    data: bytes | bytearray | memoryview, protocols: Iterable[Protocol]
) -> SniffResult:
    """Try each of `protocols` (TLS, HTTP) on a TCP stream's first bytes.

    Returns the first `Sniffed`; else NEED_DATA while any of them still
    wants more (and `data` is under `MAX_SNIFF_BYTES`); else None.
    """
    waiting = False
    for protocol in protocols:
        sniffer = _STREAM_SNIFFERS.get(protocol)
        if sniffer is None:
            continue
        result = sniffer(data)
        if isinstance(result, Sniffed):
            return result
        if result is NEED_DATA:
            waiting = True
    if waiting and len(data) < MAX_SNIFF_BYTES:
        return NEED_DATA
    return None


# -- configuration -------------------------------------------------------------

SniffMode = Literal["off", "route", "override"]
SNIFF_MODES: Final = ("off", "route", "override")
PortRanges = tuple[tuple[int, int], ...]
# mihomo's defaults: HTTP on 80 and 8080-8880, TLS and QUIC on 443 and 8443.
DEFAULT_HTTP_PORTS: Final[PortRanges] = ((80, 80), (8080, 8880))
DEFAULT_TLS_PORTS: Final[PortRanges] = ((443, 443), (8443, 8443))
DEFAULT_QUIC_PORTS: Final[PortRanges] = ((443, 443), (8443, 8443))
# sing-box's default wait for the first bytes.
DEFAULT_SNIFF_TIMEOUT = 0.3


def parse_ports(value: object) -> PortRanges:
    """Ports as a list of numbers and "LOW-HIGH" strings, or one string of them
    separated by commas ("80,8080-8880").

    Raises:
        ValueError: what is wrong with which item.
    """
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError('expected a list of ports and ranges, e.g. [80, "8080-8880"]')
    ranges = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            lo, hi = item
        elif isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str):
            lo_text, sep, hi_text = item.partition("-")
            try:
                lo = int(lo_text)
                hi = int(hi_text) if sep else lo
            except ValueError:
                raise ValueError(f"{item!r} is not a port or LOW-HIGH") from None
        else:
            raise ValueError(f"{item!r} is not a port or LOW-HIGH")
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 0xFFFF):
            raise ValueError(f"{item!r} is not a port range within 1-65535")
        ranges.append((lo, hi))
    return tuple(ranges)


def _within(port: int, ranges: PortRanges) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


@attrs.frozen
class SniffConfig:
    """Which flows are sniffed, and what the name is used for.

    Attributes:
        mode: "off"; "route" (the name meets the rules, the outbound still
            gets the address); "override" (the outbound gets the name too).
        timeout: the longest wait for a flow's first bytes, seconds.
        http_ports / tls_ports / quic_ports: the destination ports whose
            flows are read as HTTP/1, TLS (TCP) and QUIC (UDP).
        fake_ip: sniff flows that came through a fake IP too (they already
            carry the name the application resolved).
    """

    mode: SniffMode = "off"
    timeout: float = DEFAULT_SNIFF_TIMEOUT
    http_ports: PortRanges = DEFAULT_HTTP_PORTS
    tls_ports: PortRanges = DEFAULT_TLS_PORTS
    quic_ports: PortRanges = DEFAULT_QUIC_PORTS
    fake_ip: bool = False

    def stream_protocols(self, port: int, *, fake_ip: bool) -> tuple[Protocol, ...]:
        """What a TCP flow to `port` is read as (empty: not sniffed)."""
        if self.mode == "off" or (fake_ip and not self.fake_ip):
            return ()
        protocols = []
        if _within(port, self.tls_ports):
            protocols.append(Protocol.TLS)
        if _within(port, self.http_ports):
            protocols.append(Protocol.HTTP)
        return tuple(protocols)

    def sniffs_quic(self, port: int, *, fake_ip: bool) -> bool:
        """Whether a UDP flow to `port` is read as QUIC."""
        if self.mode == "off" or (fake_ip and not self.fake_ip):
            return False
        return _within(port, self.quic_ports)
