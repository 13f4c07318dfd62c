"""First flights of real clients, for the sniffing tests.

A TLS ClientHello from Python's ssl module (over a MemoryBIO, no socket)
and QUIC Initial datagrams from aioquic's client, so the sniffer is tested
on what real stacks send, not on bytes written to fit it.
"""

from __future__ import annotations

import contextlib
import ssl


def tls_client_hello(server_name: str | None = "www.example.org") -> bytes:
    """The first bytes a TLS client sends (one record with the ClientHello)."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake re-framed into TLS records of at most `size` bytes each.

    RFC 8446 section 5.1 allows a handshake message to span records; some
    clients and middleboxes do it.
    """
    assert hello[0] == 0x16
    header, body = hello[:3], hello[5:]
    out = bytearray()
    for start in range(0, len(body), size):
        part = body[start : start + size]
        out += header + len(part).to_bytes(2, "big") + part
    return bytes(out)


def quic_initials(
    server_name: str = "video.example.com", *, version: int = 1, alpn_padding: int = 0
) -> list[bytes]:
    """The datagrams an aioquic client sends first (its Initial packets).

    `alpn_padding` long ALPN names make the ClientHello span several
    datagrams, as a post-quantum key share does for Chrome.
    """
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    alpn = ["h3"] + [f"{'x' * 200}{i}" for i in range(alpn_padding)]
    config = QuicConfiguration(
        is_client=True,
        server_name=server_name,
        alpn_protocols=alpn,
        original_version=version,
        supported_versions=[version],
    )
    conn = QuicConnection(configuration=config)
    conn.connect(("192.0.2.1", 443), now=0.0)
    return [data for data, _ in conn.datagrams_to_send(now=0.0)]


def client_hello_of(datagrams: list[bytes], version: int = 1) -> tuple[bytes, bytes]:
    """The Destination Connection ID and the CRYPTO stream (the ClientHello)
    of a client's Initial datagrams, decrypted with aioquic's server side."""
    from aioquic.buffer import Buffer
    from aioquic.quic.crypto import CryptoPair
    from aioquic.quic.packet import pull_quic_header

    stream = bytearray()
    dcid = b""
    for datagram in datagrams:
        buf = Buffer(data=datagram)
        header = pull_quic_header(buf, host_cid_length=8)
        dcid = header.destination_cid
        server = CryptoPair()
        server.setup_initial(dcid, is_client=False, version=version)
        # aioquic sends one Initial per datagram here.
        packet = datagram[: header.packet_length]
        _, payload, _ = server.decrypt_packet(packet, buf.tell(), 0)
        frames = Buffer(data=payload)
        while not frames.eof():
            kind = frames.pull_uint_var()
            if kind == 0x06:
                at, size = frames.pull_uint_var(), frames.pull_uint_var()
                if at != len(stream):
                    raise AssertionError("aioquic sent its CRYPTO frames out of order")
                stream += frames.pull_bytes(size)
            elif kind not in (0x00, 0x01):
                raise AssertionError(f"unexpected frame {kind:#x} in an Initial")
    return dcid, bytes(stream)


def chaos_initials(server_name: str, *, version: int = 1, seed: int = 7) -> list[bytes]:
    """Initials shaped as Chrome sends a large ClientHello: the CRYPTO stream
    cut into pieces sent out of order, PING and PADDING frames between them,
    spread over several packets, two of them coalesced in one datagram.

    The ClientHello and the connection ID come from aioquic's client; the
    packets are protected with aioquic's Initial keys (RFC 9001 5.2).
    """
    import random

    from aioquic.quic.crypto import CryptoPair

    initials = quic_initials(server_name, version=version, alpn_padding=10)
    dcid, hello = client_hello_of(initials, version)
    rng = random.Random(seed)
    pieces = []
    at = 0
    while at < len(hello):
        size = rng.randint(40, 400)
        pieces.append((at, hello[at : at + size]))
        at += size
    rng.shuffle(pieces)
    packets: list[bytes] = []
    client = CryptoPair()
    client.setup_initial(dcid, is_client=True, version=version)
    initial_type = 1 if version == 0x6B3343CF else 0
    for number, start in enumerate(range(0, len(pieces), 3)):
        payload = bytearray()
        for offset, data in pieces[start : start + 3]:
            payload += b"\x01" + b"\x00" * rng.randint(0, 5)  # PING, PADDING
            payload += b"\x06" + _varint(offset) + _varint(len(data)) + data
        # PADDING; a datagram of its own is padded to 1200 bytes (RFC 9000 14.1).
        payload += b"\x00" * (20 if number < 2 else max(20, 1150 - len(payload)))
        length = 2 + len(payload) + 16  # packet number, payload, AEAD tag
        header = (
            bytes([0xC0 | initial_type << 4 | 0x01])  # 2-byte packet number
            + version.to_bytes(4, "big")
            + bytes([len(dcid)])
            + dcid
            + b"\x00"  # no source connection ID
            + b"\x00"  # no token
            + (0x4000 | length).to_bytes(2, "big")
            + number.to_bytes(2, "big")
        )
        packets.append(client.encrypt_packet(header, bytes(payload), number))
    # The first two packets share a datagram; the rest go one by one.
    return [packets[0] + packets[1], *packets[2:]]


def _varint(value: int) -> bytes:
    """A QUIC variable-length integer, in the 2-byte form (values below 16384)."""
    assert value < 1 << 14
    return (0x4000 | value).to_bytes(2, "big")
