"""Shadowsocks 2022 (SIP022): TCP request/response headers and UDP packets.

SIP022 keeps SIP004's chunk framing (see `ss_aead`) and adds what the older
edition lacked: every message says which side sent it and when, so a
recorded stream or packet cannot be replayed later or reflected back, and
the response proves it answers *this* request by echoing the request salt.

TCP request, after the salt (each block one AEAD call, in nonce order):

    fixed header:    type = 0 (1) | timestamp (8, BE) | length of next block (2)
    variable header: ATYP | ADDR | PORT | padding length (2) | padding | payload

TCP response, after the server's own salt:

    fixed header:    type = 1 (1) | timestamp (8) | request salt | length (2)
    then the first payload chunk of that length, then ordinary chunks.

UDP (AES methods): a 16-byte separate header, session ID (8) | packet ID (8),
encrypted as one AES block with the pre-shared key; then one AEAD call with
the per-session subkey, whose nonce is the separate header's last 12 bytes:

    client -> server: type 0 | timestamp | padding length | padding | address | payload
    server -> client: type 1 | timestamp | client session ID | padding length
                      | padding | address | payload

UDP (ChaCha method): a random 24-byte nonce, then XChaCha20-Poly1305 with
the pre-shared key over session ID | packet ID | the same body.

The client checks the server's timestamps (30 s window), message types, the
salt echo (TCP) and its own session ID plus a packet-ID window (UDP).
"""

from __future__ import annotations

import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .base import Destination
from .ss_aead import HeaderCheck, StreamEncryptor
from .ss_crypto import (
    TAG_SIZE,
    CipherSpec,
    ShadowsocksProtocolError,
    XChaCha20Poly1305,
    encode_target,
    parse_target_untrusted,
    session_subkey,
)

__all__ = [
    "MAX_PADDING",
    "MAX_TIME_DIFF",
    "Udp2022Client",
    "build_request_header",
    "build_response_header",
    "response_header_check",
    "response_header_size",
]

TYPE_CLIENT: Final = 0
TYPE_SERVER: Final = 1
MAX_TIME_DIFF: Final = 30
MAX_PADDING: Final = 900
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_TYPE_TIME = struct.Struct("!BQ")
_TYPE_TIME_SID = struct.Struct("!BQ8s")
# The largest variable header must still fit its u16 length field.
MAX_INITIAL_PAYLOAD: Final = 0xFFFF - (1 + 1 + 255 + 2) - 2


def _check_time(timestamp: int, now: float) -> None:
    if abs(now - timestamp) > MAX_TIME_DIFF:
        raise ShadowsocksProtocolError(
            f"server timestamp {timestamp} is more than {MAX_TIME_DIFF}s from local time {now:.0f}"
            " (replay, or a clock out of sync)"
        )


# --- TCP -------------------------------------------------------------------------


def build_request_header(
    enc: StreamEncryptor,
    dest: Destination,
    payload: bytes,
    now: float,
    padding: int | None = None,
) -> bytes:
    """The salt, fixed header and variable header that open a SIP022 request.

    Args:
        enc: The request direction's encryptor (nothing sent through it yet).
        dest: The target.
        payload: Initial application data, at most `MAX_INITIAL_PAYLOAD` bytes.
        now: Unix time in seconds.
        padding: Padding length; by default 1..900 random bytes when there is
            no payload (the spec requires padding or payload), else none.

    Returns:
        Bytes to send first.
    """
    if len(payload) > MAX_INITIAL_PAYLOAD:
        raise ValueError(f"initial payload over {MAX_INITIAL_PAYLOAD} bytes")
    if padding is None:
        padding = 0 if payload else 1 + int.from_bytes(os.urandom(2), "big") % MAX_PADDING
    variable = encode_target(dest) + _U16.pack(padding) + os.urandom(padding) + payload
    fixed = _TYPE_TIME.pack(TYPE_CLIENT, int(now)) + _U16.pack(len(variable))
    return enc.seal(fixed) + enc.seal(variable)


def response_header_size(spec: CipherSpec) -> int:
    """Plaintext size of the response's fixed header for `spec`."""
    return _TYPE_TIME.size + spec.salt_size + _U16.size


def response_header_check(request_salt: bytes) -> HeaderCheck:
    """A validator for the response header answering the request with `request_salt`.

    Returns:
        A function taking the header plaintext and the time, returning the
        length of the first payload chunk and raising `ShadowsocksProtocolError`
        for a wrong type, a stale timestamp or a salt that is not ours.
    """

    def check(header: bytes, now: float) -> int:
        kind, timestamp = _TYPE_TIME.unpack_from(header)
        if kind != TYPE_SERVER:
            raise ShadowsocksProtocolError(f"response header has type {kind}, expected 1")
        _check_time(timestamp, now)
        echoed = header[_TYPE_TIME.size : _TYPE_TIME.size + len(request_salt)]
        if echoed != request_salt:
            raise ShadowsocksProtocolError("response does not echo our request salt")
        (length,) = _U16.unpack_from(header, _TYPE_TIME.size + len(request_salt))
        return int(length)

    return check


def build_response_header(
    enc: StreamEncryptor, request_salt: bytes, payload: bytes, now: float
) -> bytes:
    """The server side of `response_header_check` (for tests and fuzz seeds)."""
    fixed = _TYPE_TIME.pack(TYPE_SERVER, int(now)) + request_salt + _U16.pack(len(payload))
    return enc.seal(fixed) + enc.seal(payload)


# --- UDP -------------------------------------------------------------------------


class _ReplayWindow:
    """Accepts each packet ID once, within a sliding window below the highest seen."""

    __slots__ = ("_bits", "_highest")

    SIZE: Final = 1024

    def __init__(self) -> None:
        self._highest = -1
        self._bits = 0  # Bit i set: packet `highest - i` was seen.

    def accept(self, packet_id: int) -> bool:
        if packet_id > self._highest:
            shift = packet_id - self._highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.SIZE) - 1)
            self._highest = packet_id
            return True
        age = self._highest - packet_id
        if age >= self.SIZE or self._bits >> age & 1:
            return False
        self._bits |= 1 << age
        return True


class Udp2022Client:
    """The client's side of one SIP022 UDP session (sans-I/O).

    Args:
        spec: A SIP022 cipher.
        key: The pre-shared key.
        session_id: 8 bytes; random when None.
    """

    __slots__ = (
        "_aead",
        "_ecb",
        "_key",
        "_next_packet_id",
        "_server_aeads",
        "_spec",
        "_windows",
        "_xchacha",
        "session_id",
    )

    # Servers rarely change session ID; remembering a few is enough to
    # accept late packets from the previous one.
    _MAX_SERVER_SESSIONS: Final = 4

    def __init__(self, spec: CipherSpec, key: bytes, session_id: bytes | None = None) -> None:
        if not spec.edition_2022:
            raise ValueError(f"{spec.name} is not a 2022 method")
        self._spec = spec
        self._key = key
        self.session_id = os.urandom(8) if session_id is None else session_id
        self._next_packet_id = 0
        self._xchacha = XChaCha20Poly1305(key) if spec.aead is ChaCha20Poly1305 else None
        self._ecb = None if self._xchacha else Cipher(algorithms.AES(key), modes.ECB())
        self._aead = (
            None if self._xchacha else spec.aead(session_subkey(spec, key, self.session_id))
        )
        self._server_aeads: dict[bytes, AESGCM | ChaCha20Poly1305] = {}
        self._windows: dict[bytes, _ReplayWindow] = {}

    def encode(self, dest: Destination, payload: bytes, now: float, padding: int = 0) -> bytes:
        """Encrypt one datagram for `dest`.

        Args:
            dest: Where the server should send it.
            payload: The datagram.
            now: Unix time in seconds.
            padding: Padding length (0..900).

        Returns:
            The packet to send to the server.
        """
        packet_id = self._next_packet_id
        self._next_packet_id += 1
        header = self.session_id + _U64.pack(packet_id)
        body = (
            _TYPE_TIME.pack(TYPE_CLIENT, int(now))
            + _U16.pack(padding)
            + os.urandom(padding)
            + encode_target(dest)
            + payload
        )
        if self._xchacha is not None:
            nonce24 = os.urandom(XChaCha20Poly1305.NONCE_SIZE)
            return nonce24 + self._xchacha.encrypt(nonce24, header + body, None)
        assert self._ecb is not None and self._aead is not None
        separate = self._ecb.encryptor().update(header)
        return separate + self._aead.encrypt(header[4:], body, None)

    def decode_untrusted(self, packet: bytes, now: float) -> tuple[Destination, bytes]:
        """Decrypt and check one packet from the server.

        Args:
            packet: The datagram as received.
            now: Unix time in seconds.

        Returns:
            `(source address the server reports, payload)`.

        Raises:
            ShadowsocksProtocolError: Forged, replayed, stale, not addressed to
                this session, or malformed.
        """
        if self._xchacha is not None:
            if len(packet) < XChaCha20Poly1305.NONCE_SIZE + 16 + TAG_SIZE:
                raise ShadowsocksProtocolError("UDP packet too short")
            size = XChaCha20Poly1305.NONCE_SIZE
            try:
                plain = self._xchacha.decrypt(packet[:size], packet[size:], None)
            except InvalidTag:
                raise ShadowsocksProtocolError("UDP packet failed authentication") from None
            header, body = plain[:16], plain[16:]
        else:
            if len(packet) < 16 + TAG_SIZE:
                raise ShadowsocksProtocolError("UDP packet too short")
            assert self._ecb is not None
            header = self._ecb.decryptor().update(packet[:16])
            try:
                body = self._server_aead(header[:8]).decrypt(header[4:], packet[16:], None)
            except InvalidTag:
                raise ShadowsocksProtocolError("UDP packet failed authentication") from None
        return self._parse_server_body(header, body, now)

    def _server_aead(self, server_session: bytes) -> AESGCM | ChaCha20Poly1305:
        aead = self._server_aeads.get(server_session)
        if aead is None:
            # Derive once per server session, not per packet: the KDF dominates.
            subkey = session_subkey(self._spec, self._key, server_session)
            aead = self._spec.aead(subkey)
        return aead

    def _parse_server_body(
        self, header: bytes, body: bytes, now: float
    ) -> tuple[Destination, bytes]:
        if len(body) < _TYPE_TIME_SID.size + _U16.size:
            raise ShadowsocksProtocolError("UDP packet body too short")
        kind, timestamp, client_session = _TYPE_TIME_SID.unpack_from(body)
        if kind != TYPE_SERVER:
            raise ShadowsocksProtocolError(f"UDP packet has type {kind}, expected 1")
        _check_time(timestamp, now)
        if client_session != self.session_id:
            raise ShadowsocksProtocolError("UDP packet is for another client session")
        (padding,) = _U16.unpack_from(body, _TYPE_TIME_SID.size)
        start = _TYPE_TIME_SID.size + _U16.size + padding
        if start > len(body):
            raise ShadowsocksProtocolError("UDP packet padding runs past its end")
        source, end = parse_target_untrusted(body, start)
        # Only authenticated packets reach the replay window, so forged ones
        # cannot push it forward.
        server_session = header[:8]
        (packet_id,) = _U64.unpack_from(header, 8)
        if not self._window(server_session).accept(packet_id):
            raise ShadowsocksProtocolError(f"UDP packet {packet_id} replayed or too old")
        if not self._xchacha and server_session not in self._server_aeads:
            self._server_aeads[server_session] = self._server_aead(server_session)
        return source, body[end:]

    def _window(self, server_session: bytes) -> _ReplayWindow:
        window = self._windows.get(server_session)
        if window is None:
            if len(self._windows) >= self._MAX_SERVER_SESSIONS:
                oldest = next(iter(self._windows))
                del self._windows[oldest]
                self._server_aeads.pop(oldest, None)
            window = self._windows[server_session] = _ReplayWindow()
        return window
