"""The UDP benchmark's peers, run inside the lab's namespaces.

    python -m tests.bench.udpclient echo BIND PORT
    python -m tests.bench.udpclient burst HOST PORT [--socks HOST:PORT] [--bursts N]
        [--burst 50] [--pause 0.01] [--size 1200]

`echo` answers every datagram with itself and counts, per run tag, what it
received; a datagram `?` + tag asks for that count (so a burst's loss can
be split into the way there and the way back).

`burst` sends N bursts of `--burst` datagrams back to back, each followed by
`--pause` seconds in which it reads the echoes, then waits a second for
stragglers, and prints JSON: sent, echoed (distinct sequence numbers back),
reached (what the echo server counted), lost_percent. With `--socks` it
speaks SOCKS5 UDP ASSOCIATE itself (the proxy alone, no tun2sx). With
`--down` each burst goes the other way: one request every pause, and the
echo server answers it with the burst, back to back (after a delay the
request may name: `ask_burst`).

Plain blocking sockets with large buffers, and nothing but the loop: the
peers must not be the bottleneck at a few thousand datagrams a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import struct
import sys
import time

_BUFFER = 8 << 20
_SEQ = struct.Struct("!8sI")
_ASK = struct.Struct("!8sIHHH")  # tag, first sequence number, count, size, delay ms


def _big_buffers(sock: socket.socket) -> None:
    # The FORCE variants pass the sysctl caps (root only); fall back silently.
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, _BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, _BUFFER)


def ask_burst(count: int, size: int, delay_ms: int) -> bytes:
    """The request that makes the echo server send `count` datagrams of
    `size` bytes back to its sender, `delay_ms` after it arrives."""
    return b"!" + _ASK.pack(os.urandom(8), 0, count, size, delay_ms)


def echo(bind: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((bind, port))
    counts: dict[bytes, int] = {}
    while True:
        data, peer = sock.recvfrom(65535)
        if data[:1] == b"?":
            reply = b"=" + str(counts.get(data[1:9], 0)).encode()
            sock.sendto(reply, peer)
            continue
        if data[:1] == b"!":
            # A burst the other way: `count` datagrams back to back.
            tag, first, count, size, delay = _ASK.unpack_from(data, 1)
            time.sleep(delay / 1000)
            filler = bytes(max(0, size - _SEQ.size))
            for seq in range(first, first + count):
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(_SEQ.pack(tag, seq) + filler, peer)
            continue
        tag = data[:8]
        counts[tag] = counts.get(tag, 0) + 1
        sock.sendto(data, peer)


class _Path:
    """Where the datagrams go: straight, or wrapped for a SOCKS5 relay."""

    def __init__(self, host: str, port: int, socks: str | None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _big_buffers(sock := self.sock)
        self.control: socket.socket | None = None
        self.header = b""
        if socks is None:
            sock.connect((host, port))
            return
        proxy_host, proxy_port = socks.rsplit(":", 1)
        control = socket.create_connection((proxy_host, int(proxy_port)), timeout=5)
        control.sendall(b"\x05\x01\x00")
        if control.recv(2) != b"\x05\x00":
            raise SystemExit("SOCKS5 proxy refused the greeting")
        control.sendall(b"\x05\x03\x00\x01" + bytes(6))
        reply = control.recv(10)
        if len(reply) < 10 or reply[1] != 0 or reply[3] != 1:
            raise SystemExit(f"SOCKS5 UDP ASSOCIATE failed: {reply!r}")
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        if relay[0] == "0.0.0.0":
            relay = (proxy_host, relay[1])
        self.control = control
        sock.connect(relay)
        self.header = b"\x00\x00\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)

    def send(self, data: bytes) -> None:
        self.sock.send(self.header + data)

    def receive(self) -> bytes | None:
        try:
            data = self.sock.recv(65535)
        except BlockingIOError:
            return None
        return data[len(self.header) :] if self.header else data


def burst(
    host: str,
    port: int,
    socks: str | None,
    bursts: int,
    size: int,
    per_burst: int,
    pause: float,
    down: bool = False,
) -> dict[str, object]:
    path = _Path(host, port, socks)
    path.sock.setblocking(False)
    tag = os.urandom(8)
    filler = bytes(max(0, size - _SEQ.size))
    seen: set[int] = set()
    sent = 0

    def drain(until: float) -> None:
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            if not select.select([path.sock], [], [], left)[0]:
                return
            while (data := path.receive()) is not None:
                if data[:8] == tag and len(data) >= _SEQ.size:
                    seen.add(_SEQ.unpack_from(data)[1])

    started = time.monotonic()
    for _ in range(bursts):
        if down:
            path.send(b"!" + _ASK.pack(tag, sent, per_burst, size, 0))
            sent += per_burst
        else:
            for _ in range(per_burst):
                # Our own buffer full: counted as lost, like any drop.
                with contextlib.suppress(BlockingIOError):
                    path.send(_SEQ.pack(tag, sent) + filler)
                sent += 1
        drain(time.monotonic() + pause)
    elapsed = time.monotonic() - started
    drain(time.monotonic() + 1.0)
    reached = None
    for _ in range(0 if down else 10):
        path.send(b"?" + tag)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if select.select([path.sock], [], [], 0.1)[0]:
                data = path.receive()
                if data is not None and data[:1] == b"=":
                    reached = int(data[1:])
                    break
        if reached is not None:
            break
    if path.control is not None:
        path.control.close()
    path.sock.close()
    return {
        "sent": sent,
        "echoed": len(seen),
        "reached": reached,
        "seconds": round(elapsed, 3),
        "lost_percent": round(100.0 * (sent - len(seen)) / sent, 3) if sent else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="udpclient")
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("bind")
    e.add_argument("port", type=int)
    b = sub.add_parser("burst")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--socks")
    b.add_argument("--bursts", type=int, default=200)
    b.add_argument("--burst", type=int, default=50)
    b.add_argument("--pause", type=float, default=0.01)
    b.add_argument("--size", type=int, default=1200)
    b.add_argument("--down", action="store_true", help="the echo server sends the bursts")
    args = parser.parse_args(argv)
    if args.cmd == "echo":
        echo(args.bind, args.port)
        return 0
    result = burst(
        args.host, args.port, args.socks, args.bursts, args.size, args.burst, args.pause, args.down
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
