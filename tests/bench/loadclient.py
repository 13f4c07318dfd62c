"""Load generators for the load benchmark, run inside the client namespace.

    python -m tests.bench.loadclient tcp HOST PORT COUNT SIZE
    python -m tests.bench.loadclient dns SERVER COUNT

`tcp` opens COUNT connections to the echo server and holds them all open,
prints `{"stage": "held", ...}`, waits for a line on stdin, then makes every
connection send SIZE random bytes and read back its echo, all at once,
prints `{"stage": "exchanged", ...}`, waits for another line, closes every
connection (half-close first, so the echo server's EOF ends each flow),
and prints `{"stage": "closed", ...}`. The parent samples tun2sx between
stages, which is why the stages wait for it.

`dns` sends COUNT A queries with distinct names to SERVER:53 over UDP as
fast as a bounded number in flight allows (a burst, not a flood that the
client's own socket buffer would drop), retrying a query once after two
seconds, and prints how many got an answer and how long it took.

One trio task per connection: 10,000 threads would measure the client.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import sys
import time

import trio

CONNECT_CONCURRENCY = 256
DNS_IN_FLIGHT = 256
DNS_RETRY_S = 2.0


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _wait_for_parent() -> None:
    await trio.to_thread.run_sync(sys.stdin.readline)


async def _open(
    host: str, port: int, limiter: trio.CapacityLimiter, out: list[trio.SocketStream]
) -> None:
    async with limiter:
        for _attempt in range(3):
            try:
                with trio.fail_after(30):
                    out.append(await trio.open_tcp_stream(host, port))
                return
            except (OSError, trio.TooSlowError):
                await trio.sleep(0.5)


async def _exchange(stream: trio.SocketStream, size: int, results: list[bool]) -> None:
    payload = os.urandom(size)
    got = bytearray()
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                while len(got) < size:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    got += data
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        pass
    results.append(bytes(got) == payload)


async def _close(stream: trio.SocketStream, clean: list[bool]) -> None:
    try:
        with trio.fail_after(60):
            await stream.send_eof()
            rest = await stream.receive_some(1)
            clean.append(rest == b"")
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        clean.append(False)
    finally:
        await stream.aclose()


async def tcp(host: str, port: int, count: int, size: int) -> None:
    """Hold `count` echo connections, exchange `size` bytes on each, close them."""
    host = socket.gethostbyname(host)  # once, as an application's DNS cache would
    streams: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(_open, host, port, limiter, streams)
    _report(stage="held", open=len(streams), seconds=round(time.monotonic() - started, 2))
    await _wait_for_parent()
    results: list[bool] = []
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(_exchange, stream, size, results)
    took = round(time.monotonic() - started, 2)
    _report(stage="exchanged", echoed=sum(results), bytes_each=size, seconds=took)
    await _wait_for_parent()
    clean: list[bool] = []
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(_close, stream, clean)
    _report(stage="closed", clean=sum(clean))


def _query(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + b"\0\x01\0\x01"


async def dns(server: str, count: int, tag: str) -> None:
    """Burst `count` distinct A queries at `server`:53; count the answers."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.connect((server, 53))
    answered: set[int] = set()
    with_address = 0
    sent_at: dict[int, float] = {}
    retried: set[int] = set()
    slots = trio.Semaphore(DNS_IN_FLIGHT)
    started = time.monotonic()

    async def receiver() -> None:
        nonlocal with_address
        while len(answered) < count:
            reply = await sock.recv(4096)
            if len(reply) < 12:
                continue
            qid, flags, _qd, ancount = struct.unpack_from("!HHHH", reply)
            if qid in sent_at and qid not in answered and flags & 0x8000:
                answered.add(qid)
                with_address += ancount > 0
                slots.release()

    async def resender() -> None:
        while True:
            await trio.sleep(0.5)
            now = time.monotonic()
            for qid, at in list(sent_at.items()):
                if qid not in answered and qid not in retried and now - at > DNS_RETRY_S:
                    retried.add(qid)
                    await sock.send(_query(qid, f"q{qid}.{tag}.load.test"))

    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resender)
            async with trio.open_nursery() as inner:
                inner.start_soon(receiver)
                for qid in range(count):
                    await slots.acquire()
                    sent_at[qid] = time.monotonic()
                    await sock.send(_query(qid, f"q{qid}.{tag}.load.test"))
            nursery.cancel_scope.cancel()
    sock.close()
    _report(
        sent=count,
        answered=len(answered),
        with_address=with_address,
        retried=len(retried),
        seconds=round(time.monotonic() - started, 2),
    )


def main() -> None:
    _raise_nofile()
    cmd, *args = sys.argv[1:]
    if cmd == "tcp":
        host, port, count, size = args
        trio.run(tcp, host, int(port), int(count), int(size))
    elif cmd == "dns":
        server, count = args[:2]
        tag = args[2] if len(args) > 2 else "burst"
        trio.run(dns, server, int(count), tag)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
