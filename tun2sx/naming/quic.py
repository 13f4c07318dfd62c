"""QUIC Initial sniffing: the SNI of the ClientHello a QUIC client opens with.

A client's Initial packets are encrypted, but with keys anyone can derive:
from the Destination Connection ID and a salt each version publishes
(RFC 9001 section 5.2 for QUIC v1, RFC 9369 section 3.3 for v2). So the
ClientHello is readable once the header protection is removed and the
payload decrypted (RFC 9001 sections 5.3 and 5.4).

The ClientHello is carried in CRYPTO frames at offsets, and a large one
(a post-quantum key share makes it 1.8 kB and more; Chrome also shuffles
and splits its frames) spans several Initial packets, coalesced in one
datagram or spread over several. `QuicSniffer` keeps the CRYPTO bytes of
one client across datagrams, bounded, until the ClientHello is whole.

Only the parsing and decryption are here (sans-I/O); the UDP flow feeds
datagrams. Inputs are untrusted: anything malformed makes `feed` return
None (not QUIC, or given up), never raise.
"""

from __future__ import annotations

from typing import Final

from tun2sx.naming.sniff import NEED_DATA, Protocol, Sniffed, SniffResult, client_hello_sni

VERSION_1: Final = 0x00000001
VERSION_2: Final = 0x6B3343CF

# version -> (initial salt, label prefix, Initial packet type in the long header).
_VERSIONS: Final = {
    VERSION_1: (bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"), b"quic ", 0),
    VERSION_2: (bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"), b"quicv2 ", 1),
}
# The CRYPTO stream bytes kept per client: a ClientHello is rarely above
# 4 kB; this leaves room and bounds what a flood of fake Initials can hold.
MAX_CRYPTO_BYTES = 16 * 1024
_MAX_CID = 20
_SAMPLE = 16
_TAG = 16


class _Keys:
    """A client's Initial keys for one (version, Destination Connection ID)."""

    __slots__ = ("aead", "hp", "iv")

    def __init__(self, version: int, dcid: bytes) -> None:
        # Imported here: only a run that sniffs QUIC needs cryptography's AEADs.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.hmac import HMAC
        from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

        salt, prefix, _ = _VERSIONS[version]

        def expand(secret: bytes, label: bytes, length: int) -> bytes:
            # HKDF-Expand-Label (RFC 8446 section 7.1), empty context.
            full = b"tls13 " + label
            info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
            return HKDFExpand(hashes.SHA256(), length, info).derive(secret)

        # HKDF-Extract is HMAC(salt, input keying material).
        extract = HMAC(salt, hashes.SHA256())
        extract.update(dcid)
        client = expand(extract.finalize(), b"client in", 32)
        self.aead = AESGCM(expand(client, prefix + b"key", 16))
        self.iv = expand(client, prefix + b"iv", 12)
        hp_key = expand(client, prefix + b"hp", 16)
        self.hp = Cipher(algorithms.AES(hp_key), modes.ECB()).encryptor()

    def mask(self, sample: bytes) -> bytes:
        return self.hp.update(sample)

    def open(self, packet_number: int, header: bytes, payload: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        nonce = (int.from_bytes(self.iv, "big") ^ packet_number).to_bytes(12, "big")
        try:
            return self.aead.decrypt(nonce, payload, header)
        except InvalidTag:
            return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A QUIC variable-length integer (RFC 9000 section 16) at `pos`: (value,
    next position); (-1, pos) when truncated."""
    if pos >= len(data):
        return -1, pos
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        return -1, pos
    value = int.from_bytes(data[pos : pos + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, pos + size


def is_initial(datagram: bytes) -> bool:
    """Whether `datagram` starts with a long-header Initial of a known version."""
    if len(datagram) < 7 or datagram[0] & 0xC0 != 0xC0:
        return False
    known = _VERSIONS.get(int.from_bytes(datagram[1:5], "big"))
    return known is not None and (datagram[0] >> 4) & 3 == known[2]


class QuicSniffer:
    """The ClientHello of one QUIC client, gathered from its Initial packets.

    Feed the client's datagrams in order with `feed`; it answers as
    `tun2sx.naming.sniff` does: a `Sniffed`, NEED_DATA (the ClientHello is
    not whole yet) or None (not a QUIC Initial, or not recoverable).
    """

    def __init__(self) -> None:
        self._keys: _Keys | None = None
        self._key_id: tuple[int, bytes] | None = None
        self._chunks: dict[int, bytes] = {}
        self._size = 0
        self._opened = False  # an Initial decrypted and its frames read
        self._result: SniffResult = NEED_DATA

    def feed(self, datagram: bytes) -> SniffResult:
        """Take one datagram the client sent; see the class docstring."""
        if self._result is not NEED_DATA:
            return self._result
        try:
            self._result = self._datagram(bytes(datagram))
        except (ValueError, IndexError, OverflowError):
            # A field that made no sense: ask no more of this client.
            self._result = None
        return self._result

    def _datagram(self, data: bytes) -> SniffResult:
        pos = 0
        seen_initial = False
        while pos < len(data) and data[pos] & 0x80:
            step = self._packet(data, pos)
            if step is None:
                break
            pos, recognised = step
            seen_initial = seen_initial or recognised
        if seen_initial:
            self._opened = True
        elif not self._opened:
            return None  # the first datagram must carry a readable Initial
        return self._client_hello()

    def _packet(self, data: bytes, start: int) -> tuple[int, bool] | None:
        """Decrypt the long-header packet at `start` if it is an Initial.

        Returns the position after it and whether it was a usable Initial,
        or None when no packet can follow (malformed, or a different
        version or connection ID than the first).
        """
        first = data[start]
        if first & 0x40 == 0 or len(data) - start < 7:
            return None  # the fixed bit (RFC 9000 17.2)
        version = int.from_bytes(data[start + 1 : start + 5], "big")
        known = _VERSIONS.get(version)
        if known is None:
            return None
        pos = start + 5
        dcid_len = data[pos]
        if dcid_len > _MAX_CID:
            return None
        dcid = data[pos + 1 : pos + 1 + dcid_len]
        pos += 1 + dcid_len
        scid_len = data[pos] if pos < len(data) else 0xFF
        if scid_len > _MAX_CID:
            return None
        pos += 1 + scid_len
        packet_type = (first >> 4) & 3
        if packet_type == known[2]:
            token_len, pos = _varint(data, pos)
            if token_len < 0:
                return None
            pos += token_len
        length, pos = _varint(data, pos)
        if length < 0 or pos + length > len(data):
            return None
        end = pos + length
        if packet_type != known[2]:
            return end, False  # 0-RTT or Handshake: not ours to read
        key_id = (version, dcid)
        if self._key_id is None:
            self._keys, self._key_id = _Keys(version, dcid), key_id
        elif key_id != self._key_id:
            return None
        assert self._keys is not None
        payload = self._unprotect(data, start, pos, end)
        if payload is None:
            return end, False
        return end, self._frames(payload)

    def _unprotect(self, data: bytes, start: int, pn_offset: int, end: int) -> bytes | None:
        """Remove header protection and decrypt (RFC 9001 sections 5.3, 5.4)."""
        assert self._keys is not None
        if pn_offset + 4 + _SAMPLE > end:
            return None
        mask = self._keys.mask(data[pn_offset + 4 : pn_offset + 4 + _SAMPLE])
        first = data[start] ^ (mask[0] & 0x0F)
        pn_len = (first & 3) + 1
        protected = data[pn_offset : pn_offset + pn_len]
        pn_bytes = bytes(a ^ b for a, b in zip(protected, mask[1 : 1 + pn_len], strict=True))
        header = bytes([first]) + data[start + 1 : pn_offset] + pn_bytes
        if end - (pn_offset + pn_len) < _TAG:
            return None
        packet_number = int.from_bytes(pn_bytes, "big")
        return self._keys.open(packet_number, header, data[pn_offset + pn_len : end])

    def _frames(self, payload: bytes) -> bool:
        """Keep the CRYPTO frames of a decrypted Initial; False if malformed."""
        pos = 0
        while pos < len(payload):
            kind = payload[pos]
            pos += 1
            if kind in (0x00, 0x01):  # PADDING, PING
                continue
            if kind == 0x06:  # CRYPTO: offset, length, data
                offset, pos = _varint(payload, pos)
                length, pos = _varint(payload, pos)
                if offset < 0 or length < 0 or pos + length > len(payload):
                    return False
                if not self._keep(offset, payload[pos : pos + length]):
                    return False
                pos += length
            elif kind in (0x02, 0x03):  # ACK, ACK with ECN counts
                pos = self._skip_ack(payload, pos, ecn=kind == 0x03)
                if pos < 0:
                    return False
            else:
                # CONNECTION_CLOSE or a frame an Initial may not carry.
                return False
        return True

    @staticmethod
    def _skip_ack(payload: bytes, pos: int, *, ecn: bool) -> int:
        values = 3
        _, pos = _varint(payload, pos)  # largest acknowledged
        _, pos = _varint(payload, pos)  # delay
        count, pos = _varint(payload, pos)
        if count < 0 or count > len(payload):
            return -1
        values = 1 + 2 * count + (3 if ecn else 0)  # first range, gaps and ranges
        for _ in range(values):
            value, pos = _varint(payload, pos)
            if value < 0:
                return -1
        return pos

    def _keep(self, offset: int, chunk: bytes) -> bool:
        if offset + len(chunk) > MAX_CRYPTO_BYTES:
            return False
        if chunk and len(chunk) > len(self._chunks.get(offset, b"")):
            self._size += len(chunk) - len(self._chunks.get(offset, b""))
            self._chunks[offset] = chunk
        return self._size <= 2 * MAX_CRYPTO_BYTES

    def _client_hello(self) -> SniffResult:
        """Parse the ClientHello once the CRYPTO stream holds it from offset 0."""
        stream = bytearray()
        for offset in sorted(self._chunks):
            if offset > len(stream):
                break  # a gap: wait for the datagram that fills it
            stream += self._chunks[offset][len(stream) - offset :]
        if len(stream) < 4:
            return NEED_DATA
        if stream[0] != 0x01:  # the client's first handshake message is a ClientHello
            return None
        length = int.from_bytes(stream[1:4], "big")
        if 4 + length > MAX_CRYPTO_BYTES:
            return None
        if len(stream) < 4 + length:
            return NEED_DATA
        host = client_hello_sni(memoryview(stream)[4 : 4 + length])
        return None if host is None else Sniffed(Protocol.QUIC, host)
