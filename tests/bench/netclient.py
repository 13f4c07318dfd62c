"""Load generators the end-to-end benchmark runs inside the client namespace.

    python -m tests.bench.netclient cps HOST PORT SECONDS WORKERS
    python -m tests.bench.netclient latency HOST PORT ROUNDS [SECONDS]
    python -m tests.bench.netclient firstbyte HOST PORT ROUNDS
    python -m tests.bench.netclient hold HOST PORT COUNT   # then waits for stdin EOF
    python -m tests.bench.netclient mss HOST PORT

Each prints one JSON line. The servers are those of tests/e2e/servers.py
(7001 is the echo server).
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import sys
import threading
import time


def cps(host: str, port: int, seconds: float, workers: int) -> dict[str, float]:
    """Connections per second: connect, one byte each way, close.

    The name is resolved once, as an application with a DNS cache would:
    this measures connection setup, not the resolver.
    """
    host = socket.gethostbyname(host)
    counts = [0] * workers
    failures = [0] * workers
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            try:
                with socket.create_connection((host, port), timeout=5) as sock:
                    sock.sendall(b"x")
                    if sock.recv(1) == b"x":
                        counts[i] += 1
            except OSError:
                failures[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {"cps": sum(counts) / elapsed, "failures": sum(failures)}


def latency(host: str, port: int, rounds: int, seconds: float | None = None) -> dict[str, float]:
    """Round trips of 64 bytes on one connection: p50 and p99 in ms.

    With `seconds`, stops after that long even if fewer than `rounds` were
    done: under a bulk transfer a round trip can take milliseconds, and the
    transfer must still be running when the last one is timed.
    """
    samples = []
    stop = None if seconds is None else time.monotonic() + seconds
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"p" * 64
        for _ in range(rounds):
            if stop is not None and time.monotonic() > stop:
                break
            t0 = time.perf_counter()
            sock.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += sock.recv(64 - len(got))
            samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[max(0, int(len(samples) * 0.99) - 1)],
        "rounds": len(samples),
    }


def firstbyte(host: str, port: int, rounds: int) -> dict[str, float]:
    """Time from connect() to the first byte back on a new connection: p50 and p99 in ms.

    Each round connects, sends one byte and waits for its echo; through a
    proxy this includes the proxy handshake, which is what pipelining and
    TCP Fast Open shorten. One connection at a time, so nothing queues.
    """
    host = socket.gethostbyname(host)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise SystemExit("echo server answered wrongly")
            samples.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_ms": statistics.median(samples), "p99_ms": cuts[98]}


def hold(host: str, port: int, count: int) -> None:
    """Open `count` connections, check each echoes, report, wait for EOF."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    ok = 0
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"h")
        if sock.recv(1) == b"h":
            ok += 1
        socks.append(sock)
    print(json.dumps({"open": len(socks), "echoed": ok}), flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()


def mss(host: str, port: int) -> dict[str, int]:
    """The MSS the client's kernel uses on a connection (TCP_MAXSEG).

    It follows the MTU of the route the connection takes (the TUN's, for
    a proxied path) and the options in use, so it shows what segment size
    the proxy really receives.
    """
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"m")
        sock.recv(1)
        return {"mss": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)}


def main() -> None:
    cmd, host, port, *rest = sys.argv[1:]
    if cmd == "cps":
        print(json.dumps(cps(host, int(port), float(rest[0]), int(rest[1]))))
    elif cmd == "latency":
        seconds = float(rest[1]) if len(rest) > 1 else None
        print(json.dumps(latency(host, int(port), int(rest[0]), seconds)))
    elif cmd == "firstbyte":
        print(json.dumps(firstbyte(host, int(port), int(rest[0]))))
    elif cmd == "mss":
        print(json.dumps(mss(host, int(port))))
    elif cmd == "hold":
        hold(host, int(port), int(rest[0]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
