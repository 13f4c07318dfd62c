"""Shadowsocks AEAD stream framing (SIP004 and SIP022) and SIP004 UDP packets.

Both editions frame a TCP direction the same way after the salt:

    [salt][len (2) + tag][payload + tag][len (2) + tag][payload + tag] ...

each AEAD call using the session subkey and a little-endian nonce counter
that advances once per call. SIP022 only changes the maximum chunk size and
puts a fixed-length header chunk right after the salt (built and checked by
`ss_2022`, sealed and opened here so the nonce sequence stays in one place).

The decryptor is sans-I/O and fed whatever the socket produced: a chunk may
arrive one byte at a time, or several at once. It buffers until a whole
length or payload block is there, so no read boundary ever matters. Its
only exception is `ShadowsocksProtocolError`; a forged or corrupted block
fails the AEAD tag and ends the stream, because an AEAD stream cannot be
resynchronised.

UDP (SIP004) is one AEAD call per packet with a fresh salt and a zero nonce:

    [salt][ATYP | ADDR | PORT | payload + tag]
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .base import Destination
from .ss_crypto import (
    TAG_SIZE,
    CipherSpec,
    ShadowsocksProtocolError,
    encode_target,
    nonce,
    parse_target_untrusted,
    session_subkey,
)

__all__ = [
    "StreamDecryptor",
    "StreamEncryptor",
    "decode_udp_packet_untrusted",
    "encode_udp_packet",
]

_LENGTH = struct.Struct("!H")
# Once the nonce counter would wrap, the key must not be used again; 2**64
# AEAD calls are unreachable, but the check costs nothing.
_MAX_COUNTER: Final = (1 << 64) - 1


class StreamEncryptor:
    """Encrypts one direction of a Shadowsocks TCP stream.

    The salt goes out in front of the first output, so callers just send
    whatever `encrypt` / `seal` return, in order.

    Args:
        spec: The cipher.
        key: The master key.
        salt: The salt to use (random when None; tests pass a fixed one).
    """

    __slots__ = ("_aead", "_counter", "_max_chunk", "_pending", "salt")

    def __init__(self, spec: CipherSpec, key: bytes, salt: bytes | None = None) -> None:
        self.salt = os.urandom(spec.salt_size) if salt is None else salt
        if len(self.salt) != spec.salt_size:
            raise ValueError(f"{spec.name} needs a {spec.salt_size}-byte salt")
        self._aead = spec.aead(session_subkey(spec, key, self.salt))
        self._counter = 0
        self._max_chunk = spec.max_chunk
        self._pending = self.salt

    def _take_pending(self) -> bytes:
        out, self._pending = self._pending, b""
        return out

    def seal(self, plaintext: bytes) -> bytes:
        """One AEAD call with the next nonce (SIP022 header chunks use this).

        Returns:
            The ciphertext with its tag, preceded by the salt the first time.
        """
        if self._counter >= _MAX_COUNTER:
            raise ShadowsocksProtocolError("nonce space exhausted")
        sealed = self._aead.encrypt(nonce(self._counter), plaintext, None)
        self._counter += 1
        pending = self._take_pending()
        return pending + sealed if pending else sealed

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """Frame `data` into length + payload chunks.

        Args:
            data: Application bytes; empty input produces only a pending salt.

        Returns:
            Bytes to write to the server.
        """
        parts = [self._take_pending()]
        view = memoryview(data)
        for start in range(0, len(view), self._max_chunk):
            piece = bytes(view[start : start + self._max_chunk])
            parts.append(self.seal(_LENGTH.pack(len(piece))))
            parts.append(self.seal(piece))
        return b"".join(parts)


class _Need(enum.Enum):
    SALT = "salt"
    HEADER = "header"
    LENGTH = "length"
    PAYLOAD = "payload"


HeaderCheck = Callable[[bytes, float], int]
"""Checks a SIP022 response header's plaintext at time `now`; gives the first chunk's length."""


class StreamDecryptor:
    """Decrypts one direction of a Shadowsocks TCP stream, fed in any pieces.

    Args:
        spec: The cipher.
        key: The master key.
        header_size: For SIP022, the plaintext size of the fixed header chunk
            that follows the salt; 0 for SIP004.
        check_header: For SIP022, validates that header (see `HeaderCheck`).
    """

    __slots__ = (
        "_aead",
        "_buffer",
        "_check_header",
        "_counter",
        "_header_size",
        "_key",
        "_max_chunk",
        "_need",
        "_payload_size",
        "_spec",
        "salt",
    )

    def __init__(
        self,
        spec: CipherSpec,
        key: bytes,
        *,
        header_size: int = 0,
        check_header: HeaderCheck | None = None,
    ) -> None:
        if (header_size == 0) != (check_header is None):
            raise ValueError("header_size and check_header go together")
        self._spec = spec
        self._key = key
        self._header_size = header_size
        self._check_header = check_header
        self._max_chunk = spec.max_chunk
        self._buffer = bytearray()
        self._need = _Need.SALT
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._counter = 0
        self._payload_size = 0
        self.salt: bytes | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back because they do not yet form a whole block."""
        return len(self._buffer)

    def _wanted(self) -> int:
        need = self._need
        if need is _Need.SALT:
            return self._spec.salt_size
        if need is _Need.HEADER:
            return self._header_size + TAG_SIZE
        if need is _Need.LENGTH:
            return _LENGTH.size + TAG_SIZE
        return self._payload_size + TAG_SIZE

    def _open(self, block: bytes) -> bytes:
        aead = self._aead
        if aead is None:  # pragma: no cover - the salt state always comes first
            raise ShadowsocksProtocolError("block before salt")
        try:
            plain = aead.decrypt(nonce(self._counter), block, None)
        except InvalidTag:
            raise ShadowsocksProtocolError(
                "authentication failed (wrong password or method, or tampered data)"
            ) from None
        self._counter += 1
        return plain

    def decrypt_untrusted(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> bytes:
        """Buffer `data` and return all plaintext that is now complete.

        Args:
            data: Bytes read from the server (any amount, possibly empty).
            now: Unix time in seconds, for SIP022's timestamp check.

        Returns:
            The decrypted payload bytes (empty when a block is still partial).

        Raises:
            ShadowsocksProtocolError: Authentication failed, an invalid length,
                or a SIP022 header that fails its checks.
        """
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        pos = 0
        while True:
            wanted = self._wanted()
            if len(buf) - pos < wanted:
                break
            block = bytes(buf[pos : pos + wanted])
            pos += wanted
            need = self._need
            if need is _Need.SALT:
                self.salt = block
                self._aead = self._spec.aead(session_subkey(self._spec, self._key, block))
                self._need = _Need.HEADER if self._header_size else _Need.LENGTH
            elif need is _Need.HEADER:
                assert self._check_header is not None
                self._payload_size = self._check_header(self._open(block), now)
                self._need = _Need.PAYLOAD
            elif need is _Need.LENGTH:
                (size,) = _LENGTH.unpack(self._open(block))
                if size > self._max_chunk:
                    raise ShadowsocksProtocolError(
                        f"chunk length {size} exceeds the maximum {self._max_chunk}"
                    )
                self._payload_size = size
                self._need = _Need.PAYLOAD
            else:
                out.append(self._open(block))
                self._need = _Need.LENGTH
        del buf[:pos]
        return b"".join(out)


# --- SIP004 UDP --------------------------------------------------------------------


def encode_udp_packet(
    spec: CipherSpec, key: bytes, dest: Destination, payload: bytes, salt: bytes | None = None
) -> bytes:
    """Encrypt one SIP004 UDP packet for `dest`.

    Args:
        spec: A SIP004 cipher.
        key: The master key.
        dest: Where the server should send `payload`.
        payload: The datagram.
        salt: Fixed salt for tests; random when None.

    Returns:
        The packet to send to the server.
    """
    salt = os.urandom(spec.salt_size) if salt is None else salt
    aead = spec.aead(session_subkey(spec, key, salt))
    return salt + aead.encrypt(nonce(0), encode_target(dest) + payload, None)


def decode_udp_packet_untrusted(
    spec: CipherSpec, key: bytes, packet: bytes
) -> tuple[Destination, bytes]:
    """Decrypt one SIP004 UDP packet from the server.

    Returns:
        `(source address the server reports, payload)`.

    Raises:
        ShadowsocksProtocolError: Too short, forged, or a bad address.
    """
    if len(packet) < spec.salt_size + TAG_SIZE:
        raise ShadowsocksProtocolError("UDP packet shorter than salt and tag")
    salt = packet[: spec.salt_size]
    aead = spec.aead(session_subkey(spec, key, salt))
    try:
        plain = aead.decrypt(nonce(0), packet[spec.salt_size :], None)
    except InvalidTag:
        raise ShadowsocksProtocolError("UDP packet failed authentication") from None
    source, end = parse_target_untrusted(plain, 0)
    return source, plain[end:]
