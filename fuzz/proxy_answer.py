"""Fuzz harness for the one-request proxy clients: HTTP CONNECT and SOCKS4/4a.

Invariant: `HttpConnectClient.next_event_untrusted` and
`Socks4ClientConnection.next_event_untrusted` return or raise their
protocol's error, nothing else; and feeding the same bytes in one piece or
byte by byte gives the same answer, with the rest of the bytes kept as the
stream's first bytes when fed whole.

The first input byte picks the client: even HTTP, odd SOCKS4a.
Seeds: `python -m fuzz.proxy_answer --write-seeds`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from outbounds.base import Destination
from outbounds.handshake import NEED_DATA, OneRequestClient
from outbounds.http import HttpConnectClient, HttpConnectReply, HttpProtocolError
from outbounds.socks4 import Socks4ClientConnection, Socks4ProtocolError, Socks4Reply

_TARGET = Destination("example.com", 443)


def _client(selector: int) -> OneRequestClient[HttpConnectReply] | OneRequestClient[Socks4Reply]:
    if selector & 1:
        return Socks4ClientConnection(_TARGET, b"user", names=True)
    return HttpConnectClient(_TARGET, "Basic dTpw")


def _run(selector: int, chunks: list[bytes]) -> tuple[object, bytes] | None:
    client = _client(selector)
    client.data_to_send()
    try:
        for chunk in chunks:
            client.receive_data(chunk)
            event = client.next_event_untrusted()
            if event is not NEED_DATA:
                return event, client.trailing_data
    except (HttpProtocolError, Socks4ProtocolError):
        return None
    return NEED_DATA, b""


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    whole = _run(selector, [body])
    single = _run(selector, [body[i : i + 1] for i in range(len(body))])
    if whole is not None and single is not None:
        assert whole[0] == single[0], "the answer depends on the read split"


def _seeds() -> dict[str, bytes]:
    return {
        "http-ok": b"\x00HTTP/1.1 200 Connection established\r\n\r\nbanner",
        "http-interim": b"\x00HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nVia: x\r\n\r\n",
        "http-bare-lf": b"\x00HTTP/1.1 200 OK\nX: y\n\nrest",
        "http-407": b"\x00HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="p"\r\n\r\n',
        "http-garbage": b"\x00\x05\x00",
        "socks4-granted": b"\x01\x00\x5a\x00\x00\x00\x00\x00\x00banner",
        "socks4-rejected": b"\x01\x00\x5b\x00\x00\x00\x00\x00\x00",
        "socks4-v4-echo": b"\x01\x04\x5a\x01\xbb\x0a\x00\x00\x01",
    }


if __name__ == "__main__" and sys.argv[1:] == ["--write-seeds"]:
    target = Path(__file__).resolve().parent / "corpus" / "proxy_answer"
    target.mkdir(parents=True, exist_ok=True)
    for name, seed in _seeds().items():
        (target / name).write_bytes(seed)
