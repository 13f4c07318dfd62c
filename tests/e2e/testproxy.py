"""A minimal SOCKS5 and SOCKS4a server (no auth, CONNECT) that takes TCP Fast Open.

    python -m tests.e2e.testproxy --bind 10.200.0.2 --port 1090

Neither Dante nor microsocks sets TCP_FASTOPEN on its listening socket, so
the end-to-end test of tun2sx's `tfo` option runs against this one (in a
namespace whose net.ipv4.tcp_fastopen has the server bit). It reads ahead,
so a pipelined SOCKS5 handshake works too. It also answers SOCKS4a, which
Dante does not speak, resolving the name it is sent. The first byte of a
connection tells the version.
"""

from __future__ import annotations

import argparse
import socket

import trio

from outbounds.base import Destination
from outbounds.socks5 import build_reply, parse_request_untrusted

TCP_FASTOPEN = getattr(socket, "TCP_FASTOPEN", 23)
OK = build_reply(0, Destination.parse_host("0.0.0.0", 0))
REFUSED = build_reply(5, Destination.parse_host("0.0.0.0", 0))


async def _copy(source: trio.abc.Stream, sink: trio.abc.HalfCloseableStream) -> None:
    try:
        while data := await source.receive_some(1 << 16):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _socks4(client: trio.SocketStream, buf: bytearray) -> None:
    """VN CD DSTPORT DSTIP USERID NUL [HOST NUL]: answer 90 or 91, then splice."""
    while len(buf) < 9 or buf.count(0, 8) < (2 if buf[4:7] == bytes(3) and buf[7] else 1):
        data = await client.receive_some(512)
        if not data:
            return
        buf += data
    port = int.from_bytes(buf[2:4], "big")
    fields = bytes(buf[8:]).split(b"\x00")
    if buf[4:7] == bytes(3) and buf[7]:
        host, rest = fields[1].decode(), b"\x00".join(fields[2:])
    else:
        host, rest = socket.inet_ntoa(bytes(buf[4:8])), b"\x00".join(fields[1:])
    try:
        upstream = await trio.open_tcp_stream(host, port)
    except OSError:
        await client.send_all(b"\x00\x5b" + bytes(6))
        return
    async with upstream:
        await client.send_all(b"\x00\x5a" + bytes(6))
        if rest:
            await upstream.send_all(rest)
        await _splice(client, upstream)


async def _splice(client: trio.SocketStream, upstream: trio.SocketStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_copy, client, upstream)
        nursery.start_soon(_copy, upstream, client)


async def handle(client: trio.SocketStream) -> None:
    async with client:
        buf = bytearray()
        first = await client.receive_some(512)
        if not first:
            return
        buf += first
        if buf[0] == 4:
            await _socks4(client, buf)
            return
        while len(buf) < 2 or len(buf) < 2 + buf[1]:
            data = await client.receive_some(512)
            if not data:
                return
            buf += data
        del buf[: 2 + buf[1]]
        await client.send_all(b"\x05\x00")
        while (parsed := parse_request_untrusted(buf)) is None:
            data = await client.receive_some(512)
            if not data:
                return
            buf += data
        _command, dest, end = parsed
        try:
            upstream = await trio.open_tcp_stream(str(dest.host), dest.port)
        except OSError:
            await client.send_all(REFUSED)
            return
        async with upstream:
            await client.send_all(OK)
            if buf[end:]:
                await upstream.send_all(bytes(buf[end:]))
            await _splice(client, upstream)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await sock.bind((args.bind, args.port))
    # The queue of connections still in their handshake that may have
    # carried data in their SYN (RFC 7413 section 5.1).
    sock.setsockopt(trio.socket.IPPROTO_TCP, TCP_FASTOPEN, 64)
    sock.listen(128)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


if __name__ == "__main__":
    trio.run(main)
