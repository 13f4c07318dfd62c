"""Far-side servers for end-to-end tests, run as a subprocess in a namespace.

    python -m tests.e2e.servers --bind 10.200.0.2

starts, on that address:
- TCP 7001 echo: echoes everything; after the client's EOF, finishes
  echoing and closes (so half-close is visible end to end);
- TCP 7002 hash: reads until EOF, answers the SHA-256 hex of what it got;
- TCP 7003 source: reads a decimal byte count and a newline, then sends
  that many bytes of a deterministic pattern and closes;
- UDP 7001 echo: echoes each datagram;
- DNS 5353 (UDP and TCP): answers TXT queries with "tun2sx-upstream";
- with --whoami, HTTP 7004 on every address of the namespace: answers any
  request with the address it was reached at, so a test can tell which
  name a connection went to.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import struct
from collections.abc import Awaitable, Callable

import trio
from dnslib import QTYPE, RR, TXT, DNSRecord

CHUNK = 65536


def pattern(size: int) -> bytes:
    """The deterministic bytes the source server sends (and tests expect)."""
    block = hashlib.sha256(b"tun2sx").digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(CHUNK):
            await stream.send_all(data)
        await stream.send_eof()


async def hasher(stream: trio.SocketStream) -> None:
    async with stream:
        digest = hashlib.sha256()
        while data := await stream.receive_some(CHUNK):
            digest.update(data)
        await stream.send_all(digest.hexdigest().encode())


async def source(stream: trio.SocketStream) -> None:
    async with stream:
        buf = b""
        while b"\n" not in buf:
            data = await stream.receive_some(64)
            if not data:
                return
            buf += data
        size = int(buf.split(b"\n", 1)[0])
        await stream.send_all(pattern(size))


def dns_answer(query: bytes) -> bytes:
    request = DNSRecord.parse(query)
    reply = request.reply()
    if request.q.qtype == QTYPE.TXT:
        reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("tun2sx-upstream"), ttl=60))
    return bytes(reply.pack())


async def dns_tcp(stream: trio.SocketStream) -> None:
    async with stream:
        buf = b""
        while data := await stream.receive_some(CHUNK):
            buf += data
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                size = struct.unpack("!H", buf[:2])[0]
                answer = dns_answer(buf[2 : 2 + size])
                buf = buf[2 + size :]
                await stream.send_all(struct.pack("!H", len(answer)) + answer)


async def whoami(stream: trio.SocketStream) -> None:
    async with stream:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            data = await stream.receive_some(CHUNK)
            if not data:
                return
            head += data
        body = stream.socket.getsockname()[0].encode()
        await stream.send_all(
            b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )


async def udp_echo(bind: str, port: int, dns: bool) -> None:
    sock = trio.socket.socket(
        trio.socket.AF_INET6 if ":" in bind else trio.socket.AF_INET, trio.socket.SOCK_DGRAM
    )
    await sock.bind((bind, port))
    while True:
        data, addr = await sock.recvfrom(65535)
        await sock.sendto(dns_answer(data) if dns else data, addr)


def tolerant(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Let a connection that a peer resets end alone, not the whole server.

    `trio.serve_tcp` propagates a handler's exception and stops serving;
    fault tests reset connections on purpose (a proxy killed mid-transfer).
    """

    async def run(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await handler(stream)

    return run


async def main(bind: str, with_whoami: bool) -> None:
    async with trio.open_nursery() as nursery:
        if with_whoami:
            nursery.start_soon(functools.partial(trio.serve_tcp, tolerant(whoami), 7004))
        for port, handler in ((7001, echo), (7002, hasher), (7003, source), (5353, dns_tcp)):
            nursery.start_soon(
                functools.partial(trio.serve_tcp, tolerant(handler), port, host=bind)
            )
        nursery.start_soon(udp_echo, bind, 7001, False)
        nursery.start_soon(udp_echo, bind, 5353, True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--whoami", action="store_true")
    args = parser.parse_args()
    trio.run(main, args.bind, args.whoami)
