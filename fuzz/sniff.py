"""Fuzz harness for sniffing: any first bytes or datagrams a client could send.

Invariant: `sniff_stream` and `QuicSniffer.feed` return a `Sniffed`,
NEED_DATA or None, never raise; and more bytes never change an answer
already given (a prefix that named a host names the same host whole).

The first input byte picks the reader: even, the TCP sniffers (TLS and
HTTP) on the rest; odd, the QUIC sniffer on datagrams, each written as a
2-byte length and its bytes.
Seeds: `python -m fuzz.sniff --write-seeds` (needs aioquic).
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from pathlib import Path

from tun2sx.naming.quic import QuicSniffer
from tun2sx.naming.sniff import NEED_DATA, Protocol, Sniffed, SniffResult, sniff_stream

_BOTH = (Protocol.TLS, Protocol.HTTP)


def _check(result: SniffResult) -> None:
    assert result is None or result is NEED_DATA or isinstance(result, Sniffed), result


def _datagrams(body: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos + 2 <= len(body):
        size = int.from_bytes(body[pos : pos + 2], "big")
        out.append(body[pos + 2 : pos + 2 + size])
        pos += 2 + size
    return out


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    if selector & 1:
        sniffer = QuicSniffer()
        answer: SniffResult = NEED_DATA
        for datagram in _datagrams(body):
            result = sniffer.feed(datagram)
            _check(result)
            if isinstance(answer, Sniffed):
                assert result == answer, "a QUIC answer changed"
            answer = result
        return
    whole = sniff_stream(body, _BOTH)
    _check(whole)
    for cut in (len(body) // 2, len(body) - 1, selector % (len(body) + 1)):
        part = sniff_stream(body[: max(cut, 0)], _BOTH)
        _check(part)
        if isinstance(part, Sniffed):
            assert part == whole, "more bytes changed a sniffed name"


def _tls_hello(name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def _quic(version: int, padding: int) -> bytes:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(
        is_client=True,
        server_name="quic.example",
        alpn_protocols=["h3"] + ["x" * 200] * padding,
        original_version=version,
        supported_versions=[version],
    )
    conn = QuicConnection(configuration=config)
    conn.connect(("192.0.2.1", 443), now=0.0)
    datagrams = [d for d, _ in conn.datagrams_to_send(now=0.0)]
    return b"\x01" + b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)


def _seeds() -> dict[str, bytes]:
    hello = _tls_hello("tls.example")
    body = hello[5:]
    split = b"".join(
        hello[:3] + len(body[i : i + 64]).to_bytes(2, "big") + body[i : i + 64]
        for i in range(0, len(body), 64)
    )
    return {
        "tls-hello": b"\x00" + hello,
        "tls-hello-split-records": b"\x00" + split,
        "http-host": b"\x00GET / HTTP/1.1\r\nHost: http.example:8080\r\nAccept: */*\r\n\r\n",
        "http-absolute": b"\x00GET http://abs.example/x HTTP/1.1\r\nHost: o.example\r\n\r\n",
        "http-partial": b"\x00POST /upload HTTP/1.1\r\nContent-Length: 5\r\nHo",
        "ssh-banner": b"\x00SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        "quic-v1": _quic(1, 0),
        "quic-v1-three-datagrams": _quic(1, 10),
        "quic-v2": _quic(0x6B3343CF, 0),
    }


if __name__ == "__main__" and sys.argv[1:] == ["--write-seeds"]:
    target = Path(__file__).resolve().parent / "corpus" / "sniff"
    target.mkdir(parents=True, exist_ok=True)
    for name, seed in _seeds().items():
        (target / name).write_bytes(seed)
