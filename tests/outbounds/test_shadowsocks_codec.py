"""The sans-I/O Shadowsocks codecs: keys, chunk framing, SIP022 headers, UDP packets."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.shadowsocks_stream import NOW, decryptor, server_stream
from outbounds.base import Destination
from outbounds.ss_2022 import (
    MAX_TIME_DIFF,
    Udp2022Client,
    build_request_header,
)
from outbounds.ss_aead import (
    StreamDecryptor,
    StreamEncryptor,
    decode_udp_packet_untrusted,
    encode_udp_packet,
)
from outbounds.ss_crypto import (
    CIPHERS,
    CipherSpec,
    ShadowsocksProtocolError,
    XChaCha20Poly1305,
    cipher_spec,
    encode_target,
    evp_bytes_to_key,
    hchacha20,
    master_key,
    parse_target_untrusted,
    session_subkey,
)

TARGET = Destination("example.com", 443)
ALL = sorted(CIPHERS)
SIP004 = [m for m in ALL if not CIPHERS[m].edition_2022]
SIP022 = [m for m in ALL if CIPHERS[m].edition_2022]


def key_for(spec: CipherSpec) -> bytes:
    return bytes(range(spec.key_size))


# --- keys ---------------------------------------------------------------------


def test_evp_bytes_to_key_matches_openssl() -> None:
    # `openssl enc -aes-256-cbc -k foobar -nosalt -md md5 -P`
    expected = "3858F62230AC3C915F300C664312C63F568378529614D22DDB49237D2F60BFDF"
    assert evp_bytes_to_key(b"foobar", 32).hex().upper() == expected
    assert evp_bytes_to_key(b"foobar", 16).hex().upper() == expected[:32]


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1.
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert hchacha20(bytes(range(32)), nonce).hex() == expected


def test_xchacha_round_trip_and_forgery() -> None:
    aead = XChaCha20Poly1305(os.urandom(32))
    nonce = os.urandom(24)
    sealed = aead.encrypt(nonce, b"payload", b"ad")
    assert aead.decrypt(nonce, sealed, b"ad") == b"payload"
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"ad")


def test_sip022_keys_must_be_base64_of_the_key_length() -> None:
    spec = cipher_spec("2022-blake3-aes-256-gcm")
    with pytest.raises(ValueError, match="32-byte key, the password decodes to 16"):
        master_key(spec, "AAAAAAAAAAAAAAAAAAAAAA==")
    with pytest.raises(ValueError, match="base64 key"):
        master_key(spec, "not base64!")
    assert master_key(spec, "A" * 43 + "=") == bytes(32)


def test_unknown_method_and_empty_password() -> None:
    with pytest.raises(ValueError, match="unsupported Shadowsocks method 'rc4-md5'"):
        cipher_spec("rc4-md5")
    with pytest.raises(ValueError, match="must not be empty"):
        master_key(cipher_spec("aes-128-gcm"), "")


def test_subkeys_differ_per_salt_and_edition() -> None:
    key = bytes(32)
    a = session_subkey(cipher_spec("aes-256-gcm"), key, bytes(32))
    b = session_subkey(cipher_spec("aes-256-gcm"), key, b"\x01" + bytes(31))
    c = session_subkey(cipher_spec("2022-blake3-aes-256-gcm"), key, bytes(32))
    assert len({a, b, c}) == 3 and all(len(k) == 32 for k in (a, b, c))


# --- stream framing -------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("mode", ["whole", "byte-by-byte", "trailing"])
def test_stream_decoder_feeding(method: str, mode: str) -> None:
    spec = CIPHERS[method]
    key = key_for(spec)
    request_salt = os.urandom(spec.salt_size)
    chunks = [b"first", os.urandom(spec.max_chunk + 100), b"", b"last"]
    wire = server_stream(spec, key, request_salt, chunks)
    dec = decryptor(spec, key, request_salt)
    if mode == "whole":
        got = dec.decrypt_untrusted(wire, NOW)
    elif mode == "byte-by-byte":
        got = b"".join(dec.decrypt_untrusted(wire[i : i + 1], NOW) for i in range(len(wire)))
    else:
        # A partial next block stays buffered and yields nothing yet.
        got = dec.decrypt_untrusted(wire + b"\x00\x01\x02", NOW)
        assert dec.buffered == 3
    assert got == b"".join(chunks)
    if mode != "trailing":
        assert dec.buffered == 0


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(SIP004),
    pieces=st.lists(st.binary(max_size=40_000), min_size=1, max_size=5),
    cut=st.integers(min_value=1, max_value=5000),
)
def test_round_trip_any_split(method: str, pieces: list[bytes], cut: int) -> None:
    spec = CIPHERS[method]
    key = os.urandom(spec.key_size)
    enc = StreamEncryptor(spec, key)
    wire = b"".join(enc.encrypt(p) for p in pieces)
    dec = StreamDecryptor(spec, key)
    got = b"".join(dec.decrypt_untrusted(wire[i : i + cut]) for i in range(0, len(wire), cut))
    assert got == b"".join(pieces)


@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(SIP022), payload=st.binary(max_size=3000), position=st.data())
def test_tampered_byte_is_a_protocol_error(
    method: str, payload: bytes, position: st.DataObject
) -> None:
    spec = CIPHERS[method]
    key = key_for(spec)
    salt = os.urandom(spec.salt_size)
    wire = bytearray(server_stream(spec, key, salt, [payload, b"more"]))
    # Any flipped bit after the salt breaks a tag (a flipped salt bit changes the subkey).
    index = position.draw(st.integers(0, len(wire) - 1))
    wire[index] ^= 0x40
    with pytest.raises(ShadowsocksProtocolError):
        decryptor(spec, key, salt).decrypt_untrusted(bytes(wire), NOW)


@pytest.mark.parametrize("method", SIP004)
def test_wrong_key_and_oversized_length(method: str) -> None:
    spec = CIPHERS[method]
    wire = StreamEncryptor(spec, key_for(spec)).encrypt(b"data")
    with pytest.raises(ShadowsocksProtocolError, match="authentication failed"):
        StreamDecryptor(spec, bytes(spec.key_size)).decrypt_untrusted(wire)
    enc = StreamEncryptor(spec, key_for(spec))
    forged = enc.seal(struct.pack("!H", 0x4000))  # Above SIP004's 0x3FFF.
    with pytest.raises(ShadowsocksProtocolError, match="exceeds the maximum"):
        StreamDecryptor(spec, key_for(spec)).decrypt_untrusted(forged)


# --- SIP022 headers ----------------------------------------------------------------


def _response(spec: CipherSpec, key: bytes, fixed: bytes, payload: bytes = b"x") -> bytes:
    enc = StreamEncryptor(spec, key)
    return enc.seal(fixed) + enc.seal(payload)


@pytest.mark.parametrize(
    ("kind", "skew", "salt_ok", "error"),
    [
        (0, 0, True, "type 0, expected 1"),
        (1, MAX_TIME_DIFF + 1, True, "more than 30s"),
        (1, -(MAX_TIME_DIFF + 1), True, "more than 30s"),
        (1, 0, False, "does not echo our request salt"),
    ],
)
def test_response_header_checks(kind: int, skew: int, salt_ok: bool, error: str) -> None:
    spec = cipher_spec("2022-blake3-aes-128-gcm")
    key = key_for(spec)
    salt = os.urandom(16)
    echoed = salt if salt_ok else os.urandom(16)
    fixed = struct.pack("!BQ", kind, int(NOW) + skew) + echoed + struct.pack("!H", 1)
    with pytest.raises(ShadowsocksProtocolError, match=error):
        decryptor(spec, key, salt).decrypt_untrusted(_response(spec, key, fixed), NOW)


def test_response_header_inside_window_is_accepted() -> None:
    spec = cipher_spec("2022-blake3-aes-128-gcm")
    key, salt = key_for(spec), os.urandom(16)
    fixed = struct.pack("!BQ", 1, int(NOW) + MAX_TIME_DIFF) + salt + struct.pack("!H", 1)
    assert decryptor(spec, key, salt).decrypt_untrusted(_response(spec, key, fixed), NOW) == b"x"


@pytest.mark.parametrize("payload", [b"", b"GET / HTTP/1.1\r\n\r\n"])
def test_request_header_layout(payload: bytes) -> None:
    """Open the request as a server would and check every field."""
    spec = cipher_spec("2022-blake3-aes-256-gcm")
    key = key_for(spec)
    enc = StreamEncryptor(spec, key)
    wire = build_request_header(enc, TARGET, payload, NOW)
    salt, rest = wire[:32], wire[32:]
    aead = spec.aead(session_subkey(spec, key, salt))
    fixed = aead.decrypt(bytes(12), rest[: 11 + 16], None)
    kind, timestamp, length = struct.unpack("!BQH", fixed)
    assert (kind, timestamp) == (0, int(NOW))
    variable = aead.decrypt((1).to_bytes(12, "little"), rest[27:], None)
    assert len(variable) == length
    dest, end = parse_target_untrusted(variable, 0)
    (padding,) = struct.unpack_from("!H", variable, end)
    assert dest == TARGET
    assert variable[end + 2 + padding :] == payload
    # The spec demands padding when there is no payload.
    assert (1 <= padding <= 900) if not payload else padding == 0


# --- UDP ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", SIP004)
def test_sip004_udp_round_trip_and_forgery(method: str) -> None:
    spec = CIPHERS[method]
    key = key_for(spec)
    dest = Destination(ipaddress.IPv6Address("::1"), 53)
    packet = encode_udp_packet(spec, key, dest, b"query")
    assert decode_udp_packet_untrusted(spec, key, packet) == (dest, b"query")
    with pytest.raises(ShadowsocksProtocolError, match="authentication"):
        decode_udp_packet_untrusted(spec, key, packet[:-1] + bytes([packet[-1] ^ 1]))
    with pytest.raises(ShadowsocksProtocolError, match="shorter"):
        decode_udp_packet_untrusted(spec, key, packet[:20])


def server_packet(
    spec: CipherSpec,
    key: bytes,
    client_session: bytes,
    packet_id: int,
    *,
    server_session: bytes = b"S" * 8,
    kind: int = 1,
    when: float = NOW,
    padding: int = 3,
) -> bytes:
    """A SIP022 server-to-client packet built from the spec's layout."""
    header = server_session + struct.pack("!Q", packet_id)
    body = (
        struct.pack("!BQ", kind, int(when))
        + client_session
        + struct.pack("!H", padding)
        + bytes(padding)
        + encode_target(TARGET)
        + b"answer"
    )
    if spec.aead.__name__ == "ChaCha20Poly1305":
        nonce = os.urandom(24)
        return nonce + XChaCha20Poly1305(key).encrypt(nonce, header + body, None)
    separate = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(header)
    aead = spec.aead(session_subkey(spec, key, server_session))
    return separate + aead.encrypt(header[4:], body, None)


@pytest.mark.parametrize("method", SIP022)
def test_sip022_udp_server_packets(method: str) -> None:
    spec = CIPHERS[method]
    key = key_for(spec)
    client = Udp2022Client(spec, key)
    sid = client.session_id
    assert client.decode_untrusted(server_packet(spec, key, sid, 5), NOW) == (TARGET, b"answer")
    assert client.decode_untrusted(server_packet(spec, key, sid, 3), NOW)[1] == b"answer"
    cases = [
        (server_packet(spec, key, sid, 5), "replayed"),
        (server_packet(spec, key, sid, 6, kind=0), "type 0"),
        (server_packet(spec, key, sid, 7, when=NOW - 31), "more than 30s"),
        (server_packet(spec, key, b"x" * 8, 8), "another client session"),
        (server_packet(spec, key, sid, 9, padding=0)[:-1], "authentication"),
        (server_packet(spec, key, sid, 5000)[:20], "too short"),
    ]
    for packet, error in cases:
        with pytest.raises(ShadowsocksProtocolError, match=error):
            client.decode_untrusted(packet, NOW)


@pytest.mark.parametrize("method", SIP022)
def test_sip022_udp_client_packet_layout(method: str) -> None:
    spec = CIPHERS[method]
    key = key_for(spec)
    client = Udp2022Client(spec, key)
    for expected_id in (0, 1):
        packet = client.encode(TARGET, b"hello", NOW, padding=4)
        if spec.aead.__name__ == "ChaCha20Poly1305":
            plain = XChaCha20Poly1305(key).decrypt(packet[:24], packet[24:], None)
            header, body = plain[:16], plain[16:]
        else:
            header = Cipher(algorithms.AES(key), modes.ECB()).decryptor().update(packet[:16])
            aead = spec.aead(session_subkey(spec, key, header[:8]))
            body = aead.decrypt(header[4:], packet[16:], None)
        assert header == client.session_id + struct.pack("!Q", expected_id)
        kind, when, padding = struct.unpack_from("!BQH", body)
        assert (kind, when, padding) == (0, int(NOW), 4)
        dest, end = parse_target_untrusted(body, 11 + padding)
        assert (dest, body[end:]) == (TARGET, b"hello")
