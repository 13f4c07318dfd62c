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
