"""Mixed traffic for soak tests, run in the client namespace; JSON on stdout.

    python -m tests.e2e.soakclient SECONDS [--short N] [--bulk] [--udp]
        [--resets] [--v6] [--rate MBYTES_PER_S]

runs, for about SECONDS, in threads:
- `--short N`: N clients, each in a loop: resolve a name through the
  fake-IP DNS, open a connection and do one of an echo (send, half-close,
  read the echo: the application closes first), an upload (send,
  half-close, read the hash) or a download (the server closes first), of
  a random size up to 64 KiB, or a download after the application's
  half-close; every byte compared;
- `--bulk`: one long download and one long upload at once, each held to
  `--rate` MB/s, compared by hash at the end;
- `--udp`: DNS queries (A and AAAA) to the fake-IP server, and datagrams
  to the UDP echo (through UDP ASSOCIATE), each compared;
- `--resets`: a client that starts a download or an upload and resets
  it (SO_LINGER 0) partway;
- `--v6`: names are reached over IPv6 (AAAA fake IPs) for half the
  short clients.

After SECONDS it lets running operations finish and prints counts of
operations done and failed per kind, with the first failures' details.
An operation whose connection ends early or whose bytes differ is a
failure: the soak expects none while tun2sx and its proxy stay up.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import socket
import struct
import threading
import time
from collections import Counter

from tests.e2e.servers import pattern

HOST = "echo.test"
ECHO, HASH, SOURCE, UDP_ECHO = 7001, 7002, 7003, 7001
DNS = ("198.18.0.2", 53)
TIMEOUT = 20


class Tally:
    """Counts of done and failed operations; shared by every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.details: list[str] = []
        self.notes: list[str] = []
        self.bytes = 0

    def ok(self, kind: str, size: int = 0) -> None:
        with self.lock:
            self.done[kind] += 1
            self.bytes += size

    def note(self, what: str) -> None:
        with self.lock:
            self.notes.append(what)

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.failed[kind] += 1
            if len(self.details) < 20 or "timeout" in why or "timed out" in why:
                self.details.append(f"{kind}: {why}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{type(exc).__name__}: {exc}"


def _address(family: socket.AddressFamily) -> str:
    infos = socket.getaddrinfo(HOST, None, family, socket.SOCK_STREAM)
    return str(infos[0][4][0])


def _connect(family: socket.AddressFamily, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect((_address(family), port))
    return sock


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def _echo(sock: socket.socket, size: int) -> str | None:
    payload = os.urandom(size)
    got: list[bytes | BaseException] = []

    def read() -> None:
        try:
            got.append(_recv_all(sock))
        except OSError as exc:
            got.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reader.join(TIMEOUT)
    if not got:
        return "echo still reading"
    if isinstance(got[0], BaseException):
        return _why(got[0])
    return None if got[0] == payload else f"echoed {len(got[0])} of {size}, then EOF"


def _upload(sock: socket.socket, size: int) -> str | None:
    payload = os.urandom(size)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    answer = _recv_all(sock)
    return None if answer.decode() == hashlib.sha256(payload).hexdigest() else f"answer {answer!r}"


def _download(sock: socket.socket, size: int) -> str | None:
    sock.sendall(f"{size}\n".encode())
    got = _recv_all(sock)
    return None if got == pattern(size) else f"got {len(got)} of {size}, then EOF"


def _download_after_eof(sock: socket.socket, size: int) -> str | None:
    """The application half-closes first, then the server's data comes."""
    sock.sendall(f"{size}\n".encode())
    sock.shutdown(socket.SHUT_WR)
    got = _recv_all(sock)
    return None if got == pattern(size) else f"got {len(got)} of {size} after our EOF"


def short(tally: Tally, end: float, family: socket.AddressFamily, seed: int) -> None:
    rng = random.Random(seed)
    ops = (
        ("echo", ECHO, _echo),
        ("upload", HASH, _upload),
        ("download", SOURCE, _download),
        ("hcdownload", SOURCE, _download_after_eof),
    )
    suffix = "6" if family == socket.AF_INET6 else "4"
    while time.monotonic() < end:
        name, port, op = rng.choice(ops)
        kind = f"{name}{suffix}"
        size = rng.choice((1, rng.randrange(1, 1500), rng.randrange(1, 65536)))
        try:
            try:
                sock = _connect(family, port)
            except TimeoutError:
                tally.fail(kind, "connect timed out")
                continue
            with sock:
                wrong = op(sock, size)
            if wrong is None:
                tally.ok(kind, size)
            else:
                tally.fail(kind, wrong)
        except Exception as exc:
            tally.fail(kind, _why(exc))


class Pace:
    """Hold a transfer to `rate` bytes a second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.moved = 0

    def wait(self, moved: int) -> None:
        self.moved += moved
        ahead = self.start + self.moved / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def bulk_download(tally: Tally, end: float, rate: float) -> None:
    size = int(rate * max(1.0, end - time.monotonic()))
    block = pattern(1 << 16)
    whole = hashlib.sha256()
    for offset in range(0, size, len(block)):
        whole.update(block[: size - offset])
    expect = whole.hexdigest()
    try:
        with _connect(socket.AF_INET, SOURCE) as sock:
            sock.sendall(f"{size}\n".encode())
            digest, got, pace = hashlib.sha256(), 0, Pace(rate)
            while data := sock.recv(1 << 16):
                digest.update(data)
                got += len(data)
                pace.wait(len(data))
        if got == size and digest.hexdigest() == expect:
            tally.ok("bulk-download", size)
        else:
            equal = digest.hexdigest() == expect
            tally.fail("bulk-download", f"got {got} of {size}, equal={equal}")
    except Exception as exc:
        tally.fail("bulk-download", _why(exc))


def bulk_upload(tally: Tally, end: float, rate: float, family: socket.AddressFamily) -> None:
    rng = random.Random(7)
    digest, sent = hashlib.sha256(), 0
    try:
        with _connect(family, HASH) as sock:
            pace = Pace(rate)
            while time.monotonic() < end:
                chunk = rng.randbytes(rng.randrange(1, 65536))
                sock.sendall(chunk)
                digest.update(chunk)
                sent += len(chunk)
                pace.wait(len(chunk))
            sock.shutdown(socket.SHUT_WR)
            answer = _recv_all(sock).decode()
        if answer == digest.hexdigest():
            tally.ok("bulk-upload", sent)
        else:
            tally.fail("bulk-upload", f"hash differs after {sent}")
    except Exception as exc:
        tally.fail("bulk-upload", _why(exc))


def resets(tally: Tally, end: float, seed: int) -> None:
    """Transfers the application resets partway: what follows must still work."""
    rng = random.Random(seed)
    while time.monotonic() < end:
        download = rng.random() < 0.5
        kind = "reset-download" if download else "reset-upload"
        try:
            sock = _connect(socket.AF_INET, SOURCE if download else HASH)
            if download:
                sock.sendall(b"%d\n" % (8 << 20))
                got = 0
                limit = rng.randrange(1, 1 << 20)
                while got < limit and (data := sock.recv(1 << 16)):
                    got += len(data)
            else:
                sock.sendall(os.urandom(rng.randrange(1, 1 << 19)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            tally.ok(kind)
        except Exception as exc:
            tally.fail(kind, _why(exc))
        time.sleep(rng.uniform(0.01, 0.1))


def _dns_query(name: str, qtype: int, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def udp(tally: Tally, end: float, seed: int) -> None:
    rng = random.Random(seed)
    names = ("echo.test", "www.test", "big.test", *(f"soak{i}.test" for i in range(50)))
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.settimeout(3)
    dns.connect(DNS)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.settimeout(3)
    echo.connect((_address(socket.AF_INET), UDP_ECHO))
    sent = 0
    sent_at: dict[int, float] = {}
    try:
        while time.monotonic() < end:
            qid = rng.randrange(65536)
            qtype = rng.choice((1, 28))
            try:
                dns.send(_dns_query(rng.choice(names), qtype, qid))
                answer = dns.recv(4096)
                rcode = answer[3] & 0x0F
                ancount = struct.unpack("!H", answer[6:8])[0]
                if struct.unpack("!H", answer[:2])[0] == qid and rcode == 0 and ancount >= 1:
                    tally.ok("dns")
                else:
                    tally.fail("dns", f"answer id/rcode/count {answer[:8].hex()}")
            except Exception as exc:
                tally.fail("dns", _why(exc))
            sent += 1
            msg = struct.pack("!I", sent) + rng.randbytes(rng.randrange(0, 1400))
            try:
                echo.send(msg)
                # A datagram may be lost (UDP): a reply to an earlier one
                # that came late is skipped; a wrong one must not arrive.
                sent_at[sent] = time.monotonic()
                while (got := echo.recv(65535))[:4] != msg[:4] and got[:4] < msg[:4]:
                    tally.ok("udp-echo-late")
                    late = struct.unpack("!I", got[:4])[0]
                    tally.note(f"echo {late} came {time.monotonic() - sent_at[late]:.2f} s late")
                if got == msg:
                    tally.ok("udp-echo", len(msg))
                else:
                    tally.fail("udp-echo", "datagram differs")
            except TimeoutError:
                tally.fail("udp-echo", f"timeout (datagram {sent})")
            except Exception as exc:
                tally.fail("udp-echo", _why(exc))
            time.sleep(0.005)
    finally:
        dns.close()
        echo.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("seconds", type=float)
    parser.add_argument("--short", type=int, default=0)
    parser.add_argument("--bulk", action="store_true")
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("--resets", action="store_true")
    parser.add_argument("--v6", action="store_true")
    parser.add_argument("--rate", type=float, default=5.0, help="MB/s per bulk transfer")
    args = parser.parse_args()
    tally = Tally()
    end = time.monotonic() + args.seconds
    threads = []
    for i in range(args.short):
        family = socket.AF_INET6 if args.v6 and i % 2 else socket.AF_INET
        threads.append(threading.Thread(target=short, args=(tally, end, family, i)))
    family6 = socket.AF_INET6 if args.v6 else socket.AF_INET
    if args.bulk:
        rate = args.rate * 1e6
        threads.append(threading.Thread(target=bulk_download, args=(tally, end, rate)))
        threads.append(threading.Thread(target=bulk_upload, args=(tally, end, rate, family6)))
    if args.resets:
        threads.append(threading.Thread(target=resets, args=(tally, end, 99)))
    if args.udp:
        threads.append(threading.Thread(target=udp, args=(tally, end, 5)))
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 4 * TIMEOUT)
    print(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 1),
                "done": dict(tally.done),
                "failed": dict(tally.failed),
                "details": tally.details,
                "notes": tally.notes[:20],
                "bytes": tally.bytes,
                "stuck_threads": sum(t.is_alive() for t in threads),
            }
        ),
        flush=True,
    )
    os._exit(0)


if __name__ == "__main__":
    main()
