"""Fuzz harness for the Shadowsocks decoders: any bytes a server could send.

Invariant: `StreamDecryptor.decrypt_untrusted` (SIP004 and SIP022, the
latter with its response-header check), `decode_udp_packet_untrusted` and
`Udp2022Client.decode_untrusted` return or raise `ShadowsocksProtocolError`,
nothing else; and the stream decoder's output does not depend on how the
input was split into reads.

The first input byte picks the cipher and a split point; the rest is the
stream. Random bytes almost never pass an AEAD tag, so the seeds are valid
server streams (`python -m fuzz.shadowsocks_stream --write-seeds`) that the
fuzzer then mutates, reaching the length and header checks behind the tags.
"""

from __future__ import annotations

import sys
from pathlib import Path

from outbounds.ss_2022 import (
    Udp2022Client,
    build_response_header,
    response_header_check,
    response_header_size,
)
from outbounds.ss_aead import (
    StreamDecryptor,
    StreamEncryptor,
    decode_udp_packet_untrusted,
    encode_udp_packet,
)
from outbounds.ss_crypto import CIPHERS, CipherSpec, ShadowsocksProtocolError

_METHODS = sorted(CIPHERS)
NOW = 1_700_000_000.0
# Fixed keys, salt and session so that seeds stay valid across runs.
_REQUEST_SALT = bytes(range(32))
_SESSION = b"client!!"


def _key(spec: CipherSpec) -> bytes:
    return bytes(range(100, 100 + spec.key_size))


def decryptor(spec: CipherSpec, key: bytes, request_salt: bytes) -> StreamDecryptor:
    """The client's decoder of a server's stream (SIP022: checks the response header)."""
    if not spec.edition_2022:
        return StreamDecryptor(spec, key)
    return StreamDecryptor(
        spec,
        key,
        header_size=response_header_size(spec),
        check_header=response_header_check(request_salt),
    )


def server_stream(
    spec: CipherSpec,
    key: bytes,
    request_salt: bytes,
    chunks: list[bytes],
    *,
    salt: bytes | None = None,
) -> bytes:
    """What a server sends: salt, (SIP022 response header,) then chunks.

    The salt is random unless given (seeds fix it to stay reproducible).
    """
    enc = StreamEncryptor(spec, key, salt)
    first, rest = chunks[0], chunks[1:]
    if spec.edition_2022:
        out = build_response_header(enc, request_salt, first, NOW)
    else:
        out = enc.encrypt(first)
    for chunk in rest:
        out += enc.encrypt(chunk)
    return out


def _decode_stream(spec: CipherSpec, data: bytes, cut: int) -> bytes | None:
    dec = decryptor(spec, _key(spec), _REQUEST_SALT[: spec.salt_size])
    try:
        return dec.decrypt_untrusted(data[:cut], NOW) + dec.decrypt_untrusted(data[cut:], NOW)
    except ShadowsocksProtocolError:
        return None


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    spec = CIPHERS[_METHODS[data[0] % len(_METHODS)]]
    body = data[1:]
    cut = (data[0] * 7919) % (len(body) + 1)
    split = _decode_stream(spec, body, cut)
    whole = _decode_stream(spec, body, len(body))
    # An error may come earlier with a different split, but output never differs.
    assert split is None or whole is None or split == whole, "output depends on read split"
    try:
        if spec.edition_2022:
            Udp2022Client(spec, _key(spec), _SESSION).decode_untrusted(body, NOW)
        else:
            decode_udp_packet_untrusted(spec, _key(spec), body)
    except ShadowsocksProtocolError:
        pass


def _seeds() -> dict[str, bytes]:
    from outbounds.base import Destination

    seeds: dict[str, bytes] = {}
    for index, method in enumerate(_METHODS):
        spec = CIPHERS[method]
        stream = server_stream(
            spec,
            _key(spec),
            _REQUEST_SALT[: spec.salt_size],
            [b"HTTP/1.1 200 OK\r\n", b"x" * 300],
            salt=bytes(spec.salt_size),
        )
        seeds[f"tcp-{method}"] = bytes([index]) + stream
        dest = Destination("example.com", 53)
        if not spec.edition_2022:
            seeds[f"udp-{method}"] = bytes([index]) + encode_udp_packet(
                spec, _key(spec), dest, b"dns", bytes(spec.salt_size)
            )
    return seeds


if __name__ == "__main__" and sys.argv[1:] == ["--write-seeds"]:
    target = Path(__file__).resolve().parent / "corpus" / "shadowsocks_stream"
    target.mkdir(parents=True, exist_ok=True)
    for name, seed in _seeds().items():
        (target / name).write_bytes(seed)
