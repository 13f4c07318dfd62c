"""Clients for fault tests, run in the client namespace; JSON on stdout.

python -m tests.e2e.faultclient stream HOST PORT
    Streams to an echo server without end and counts the echo. After
    the first MiB has come back it prints {"streaming": true} (so a
    test knows the flow is mid-transfer), then runs until the
    connection ends and prints {"received": N, "end": "eof" | errno}.
    A connection that goes silent ends as "timeout" after 15 s: that
    is the hang a fault test must never see.
python -m tests.e2e.faultclient idle HOST PORT
    Sends one line to an echo server, reads it back, prints
    {"idle": true}, then waits without sending until the connection
    ends and prints {"end": "eof" | errno}.
python -m tests.e2e.faultclient synflood DST PORT COUNT [RATE]
    Sends COUNT TCP SYNs to DST:PORT from random source addresses in
    10.99.0.0/16 through a raw socket (they are routed into the TUN),
    as fast as it can or RATE a second, prints {"sent": COUNT}. With a
    RATE it first prints {"flooding": true} once a third of them (and at
    least two thousand, past the half-open cap) are out.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import struct
import sys
import threading
import time

from fuzz.segments import tcp_packet

MIB = 1 << 20


def _end_name(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def stream(host: str, port: int) -> None:
    sock = socket.create_connection((host, port), timeout=15)
    chunk = os.urandom(64 * 1024)
    stop = threading.Event()

    def write() -> None:
        try:
            while not stop.is_set():
                sock.sendall(chunk)
        except OSError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    received = 0
    announced = False
    end = "eof"
    try:
        while data := sock.recv(1 << 18):
            received += len(data)
            if not announced and received >= MIB:
                announced = True
                print(json.dumps({"streaming": True}), flush=True)
    except OSError as exc:
        end = _end_name(exc)
    stop.set()
    sock.close()
    print(json.dumps({"received": received, "end": end}), flush=True)


def syn_packet(src: str, sport: int, dst: str, dport: int, isn: int) -> bytes:
    """An IPv4 SYN with an MSS option and correct checksums."""
    mss = struct.pack("!BBH", 2, 4, 1460)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    return tcp_packet(s, d, (sport, dport), isn, 0, 0x02, mss, window=64240)


def synflood(dst: str, port: int, count: int, rate: float | None = None) -> None:
    rng = random.Random(2026)
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for i in range(count):
            src = f"10.99.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            packet = syn_packet(src, rng.randrange(1024, 65536), dst, port, rng.getrandbits(32))
            raw.sendto(packet, (dst, 0))
            if rate is not None and i + 1 == max(count // 3, min(count, 2000)):
                print(json.dumps({"flooding": True}), flush=True)
            if rate is not None and i % 50 == 49:
                # Paced in bursts of 50: a sleep per packet would be too coarse.
                ahead = start + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    print(json.dumps({"sent": count}))


def idle(host: str, port: int) -> None:
    sock = socket.create_connection((host, port), timeout=15)
    sock.sendall(b"ping\n")
    echoed = b""
    while len(echoed) < 5 and (data := sock.recv(5 - len(echoed))):
        echoed += data
    print(json.dumps({"idle": echoed == b"ping\n"}), flush=True)
    end = "eof"
    try:
        sock.recv(1)
    except OSError as exc:
        end = _end_name(exc)
    sock.close()
    print(json.dumps({"end": end}), flush=True)


def main() -> None:
    cmd, host, port, *rest = sys.argv[1:]
    if cmd == "stream":
        stream(host, int(port))
    elif cmd == "idle":
        idle(host, int(port))
    elif cmd == "synflood":
        synflood(host, int(port), int(rest[0]), float(rest[1]) if len(rest) > 1 else None)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
