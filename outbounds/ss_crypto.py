"""Shadowsocks cipher table, key derivation and the primitives both editions share.

Everything here is pure computation over bytes: which AEAD a method name
means, how the master key comes from the configured password (EVP_BytesToKey
for SIP004, a base64 pre-shared key for SIP022), how each salt or session
turns that key into a subkey (HKDF-SHA1 for SIP004, BLAKE3 derive_key for
SIP022), the little-endian nonce counter, the SOCKS-style target address
both editions carry, and XChaCha20-Poly1305 (SIP022's ChaCha UDP packets use
it, and `cryptography` has no such class). Keeping it apart from the framing
code lets the framing be tested with any cipher from one table.

`ShadowsocksProtocolError` is the single error type that any function
reading server bytes may raise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable
from typing import Final

import attrs
import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .base import Destination
from .socks5 import Socks5ProtocolError, encode_address, parse_address_untrusted

__all__ = [
    "CIPHERS",
    "TAG_SIZE",
    "CipherSpec",
    "ShadowsocksProtocolError",
    "XChaCha20Poly1305",
    "cipher_spec",
    "encode_target",
    "evp_bytes_to_key",
    "master_key",
    "nonce",
    "parse_target_untrusted",
    "session_subkey",
]

TAG_SIZE: Final = 16
NONCE_SIZE: Final = 12
_SIP004_INFO: Final = b"ss-subkey"
_SIP022_CONTEXT: Final = "shadowsocks 2022 session subkey"


class ShadowsocksProtocolError(Exception):
    """The server sent bytes that fail authentication or break SIP004/SIP022."""


AeadFactory = Callable[[bytes], AESGCM | ChaCha20Poly1305]


@attrs.frozen
class CipherSpec:
    """One method name's parameters.

    Attributes:
        name: The method as written in configs and URLs.
        key_size: Master key and subkey length in bytes.
        salt_size: Salt length (equal to the key size for every method here).
        aead: Builds the AEAD object from a (sub)key.
        edition_2022: True for SIP022 methods.
    """

    name: str
    key_size: int
    salt_size: int
    aead: AeadFactory
    edition_2022: bool

    @property
    def max_chunk(self) -> int:
        """Largest payload one chunk may carry (SIP004 reserves the top two bits)."""
        return 0xFFFF if self.edition_2022 else 0x3FFF


def _spec(name: str, size: int, aead: AeadFactory) -> CipherSpec:
    return CipherSpec(name, size, size, aead, name.startswith("2022-"))


CIPHERS: Final[dict[str, CipherSpec]] = {
    s.name: s
    for s in (
        _spec("aes-128-gcm", 16, AESGCM),
        _spec("aes-256-gcm", 32, AESGCM),
        _spec("chacha20-ietf-poly1305", 32, ChaCha20Poly1305),
        _spec("2022-blake3-aes-128-gcm", 16, AESGCM),
        _spec("2022-blake3-aes-256-gcm", 32, AESGCM),
        _spec("2022-blake3-chacha20-poly1305", 32, ChaCha20Poly1305),
    )
}


def cipher_spec(method: str) -> CipherSpec:
    """Look up a method name (case-insensitive).

    Raises:
        ValueError: The method is unknown (the message lists the known ones).
    """
    spec = CIPHERS.get(method.lower())
    if spec is None:
        raise ValueError(f"unsupported Shadowsocks method {method!r} (known: {', '.join(CIPHERS)})")
    return spec


def evp_bytes_to_key(password: bytes, key_size: int) -> bytes:
    """OpenSSL's EVP_BytesToKey with MD5, one iteration, no salt (SIP004 master key).

    Args:
        password: The configured password.
        key_size: Wanted key length.

    Returns:
        `key_size` bytes.
    """
    out = b""
    block = b""
    while len(out) < key_size:
        block = hashlib.md5(block + password).digest()
        out += block
    return out[:key_size]


def master_key(spec: CipherSpec, password: str) -> bytes:
    """Turn the configured password into the master key for `spec`.

    SIP022 passwords are base64 keys of exactly the cipher's key length;
    anything else is refused, because a wrong-length key would only show up
    later as every connection failing authentication.

    Raises:
        ValueError: An empty password, or a SIP022 key that is not valid base64
            of the right length.
    """
    if not password:
        raise ValueError("Shadowsocks password must not be empty")
    if not spec.edition_2022:
        return evp_bytes_to_key(password.encode("utf-8"), spec.key_size)
    try:
        key = base64.b64decode(password.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{spec.name} needs a base64 key as its password") from None
    if len(key) != spec.key_size:
        raise ValueError(
            f"{spec.name} needs a {spec.key_size}-byte key,"
            f" the password decodes to {len(key)} bytes"
        )
    return key


def session_subkey(spec: CipherSpec, key: bytes, salt: bytes) -> bytes:
    """The per-salt (or, for SIP022 UDP, per-session-ID) subkey.

    Args:
        spec: The cipher.
        key: The master key.
        salt: The salt, or the 8-byte session ID for SIP022 UDP.

    Returns:
        `spec.key_size` bytes.
    """
    if spec.edition_2022:
        return blake3.blake3(key + salt, derive_key_context=_SIP022_CONTEXT).digest(
            length=spec.key_size
        )
    hkdf = HKDF(algorithm=hashes.SHA1(), length=spec.key_size, salt=salt, info=_SIP004_INFO)
    return hkdf.derive(key)


def nonce(counter: int) -> bytes:
    """The 12-byte little-endian nonce both editions count with."""
    return counter.to_bytes(NONCE_SIZE, "little")


# --- target address: the SOCKS5 ATYP | ADDR | PORT layout ----------------------


def encode_target(dest: Destination) -> bytes:
    """Encode `dest` as ATYP, address and port (the SOCKS5 layout)."""
    return encode_address(dest)


def parse_target_untrusted(buf: bytes | bytearray, offset: int) -> tuple[Destination, int]:
    """Parse a complete address at `offset` (it must be wholly inside `buf`).

    Returns:
        `(destination, end offset)`.

    Raises:
        ShadowsocksProtocolError: Truncated, unknown type or an empty name.
    """
    try:
        parsed = parse_address_untrusted(buf, offset)
    except Socks5ProtocolError as exc:
        raise ShadowsocksProtocolError(str(exc)) from None
    except ValueError as exc:  # A port or name that `Destination` refuses.
        raise ShadowsocksProtocolError(f"bad address: {exc}") from None
    if parsed is None:
        raise ShadowsocksProtocolError("address truncated")
    return parsed


# --- XChaCha20-Poly1305 -------------------------------------------------------
#
# HChaCha20 is the ChaCha20 block function without the final addition of the
# input state, keeping words 0..3 and 12..15. A ChaCha20 keystream block is
# (rounds(state) + state), and every word of `state` in those positions is
# known (the constants, and the 16 bytes we pass as counter||nonce), so
# subtracting them from the keystream gives HChaCha20 without a Python loop
# over twenty rounds.

_WORDS = struct.Struct("<16I")
_CONSTANTS: Final = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2): a 32-byte subkey."""
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = _WORDS.unpack(block)
    inputs = struct.unpack("<4I", nonce16)
    out = [(words[i] - _CONSTANTS[i]) & 0xFFFFFFFF for i in range(4)]
    out += [(words[12 + i] - inputs[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *out)


class XChaCha20Poly1305:
    """XChaCha20-Poly1305 with a 24-byte nonce, built on ChaCha20-Poly1305.

    Args:
        key: 32 bytes.
    """

    __slots__ = ("_key",)

    NONCE_SIZE: Final = 24

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("XChaCha20-Poly1305 needs a 32-byte key")
        self._key = key

    def _inner(self, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
        if len(nonce24) != self.NONCE_SIZE:
            raise ValueError("XChaCha20-Poly1305 needs a 24-byte nonce")
        return ChaCha20Poly1305(hchacha20(self._key, nonce24[:16])), bytes(4) + nonce24[16:]

    def encrypt(self, nonce24: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        """Seal `data`; returns ciphertext with the 16-byte tag appended."""
        aead, inner_nonce = self._inner(nonce24)
        return aead.encrypt(inner_nonce, data, associated_data)

    def decrypt(self, nonce24: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        """Open `data`; raises `cryptography.exceptions.InvalidTag` when forged."""
        aead, inner_nonce = self._inner(nonce24)
        return aead.decrypt(inner_nonce, data, associated_data)
