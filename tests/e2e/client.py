"""Kernel-socket clients for end-to-end tests, run inside the client namespace.

Each subcommand prints one JSON object on stdout; a socket error is
reported as {"error": "<errno name>"} so tests can assert on what the
application saw (RST -> ECONNREFUSED, ICMP unreachable -> EHOSTUNREACH...).

    python -m tests.e2e.client echo HOST PORT SIZE      # send, half-close, read echo
    python -m tests.e2e.client upload HOST PORT SIZE    # send, half-close, read hash
    python -m tests.e2e.client download HOST PORT SIZE  # ask the source server
    python -m tests.e2e.client connect HOST PORT        # just connect
    python -m tests.e2e.client udp HOST PORT COUNT      # datagrams to the UDP echo
    python -m tests.e2e.client held-upload HOST PORT SIZE    # upload, stopping halfway
    python -m tests.e2e.client held-download HOST PORT SIZE  # download, stopping halfway
    python -m tests.e2e.client wait HOST PORT SECONDS   # echo once, print, wait for the end

The held transfers print "half" when halfway and go on once a line arrives
on stdin, so a test can change something while the flow is open.

`wait` prints {"ready": ...} once its connection has echoed, then waits
up to SECONDS for the connection to end and prints how: {"ended":
"ECONNRESET"} for a reset, {"ended": "eof"} for a FIN, {"ended":
"timeout"} when nothing came.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import socket
import sys
import threading

from tests.e2e.servers import pattern


def _connect(host: str, port: int, timeout: float = 20) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 18):
        chunks.append(data)
    return b"".join(chunks)


def echo(host: str, port: int, size: int) -> dict[str, object]:
    payload = os.urandom(size)
    with _connect(host, port) as sock:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(_recv_all(sock)))
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
    got = received[0] if received else b""
    return {"sent": size, "received": len(got), "equal": got == payload}


def _halfway() -> None:
    print("half", flush=True)
    sys.stdin.readline()


def upload(host: str, port: int, size: int, *, hold: bool = False) -> dict[str, object]:
    """Send `size` random octets, half-close, compare the hash server's answer.

    With `hold`, wait halfway (see the module's docstring)."""
    payload = os.urandom(size)
    half = size // 2 if hold else size
    with _connect(host, port) as sock:
        sock.sendall(payload[:half])
        if hold:
            _halfway()
            sock.sendall(payload[half:])
        sock.shutdown(socket.SHUT_WR)
        answer = _recv_all(sock).decode()
    return {"sent": size, "equal": answer == hashlib.sha256(payload).hexdigest()}


def download(host: str, port: int, size: int, *, hold: bool = False) -> dict[str, object]:
    """Ask the source server for `size` octets; with `hold`, wait once half arrived."""
    with _connect(host, port) as sock:
        sock.sendall(f"{size}\n".encode())
        got = bytearray()
        if hold:
            while len(got) < size // 2 and (data := sock.recv(1 << 18)):
                got += data
            _halfway()
        got += _recv_all(sock)
    return {"received": len(got), "equal": bytes(got) == pattern(size)}


def connect(host: str, port: int) -> dict[str, object]:
    with _connect(host, port, timeout=8):
        return {"connected": True}


def udp(host: str, port: int, count: int) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        ok = 0
        for i in range(count):
            msg = f"datagram {i} ".encode() * 20
            sock.send(msg)
            if sock.recv(65535) == msg:
                ok += 1
        peer = sock.getpeername()[0]
    return {"echoed": ok, "peer": peer}


def bigudp(host: str, port: int, size: int) -> dict[str, object]:
    """One datagram of `size` octets to the UDP echo and back (the kernel
    fragments it at the TUN's MTU, and tun2sx's reply too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    msg = pattern(size)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        sock.send(msg)
        got = sock.recv(65535)
    return {"received": len(got), "equal": got == msg}


def wait(host: str, port: int, seconds: int) -> dict[str, object]:
    with _connect(host, port) as sock:
        sock.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += sock.recv(4 - len(got))
        print(json.dumps({"ready": got.decode(), "port": sock.getsockname()[1]}), flush=True)
        sock.settimeout(seconds)
        try:
            data = sock.recv(1024)
        except TimeoutError:
            return {"ended": "timeout"}
        except OSError as exc:
            return {"ended": errno.errorcode.get(exc.errno or 0, type(exc).__name__)}
        return {"ended": "eof" if not data else f"data {data!r}"}


def main() -> None:
    cmd, host, port, *rest = sys.argv[1:]
    handlers = {
        "echo": echo,
        "upload": upload,
        "download": download,
        "udp": udp,
        "bigudp": bigudp,
        "held-upload": functools.partial(upload, hold=True),
        "held-download": functools.partial(download, hold=True),
        "wait": wait,
    }
    try:
        if cmd == "connect":
            result = connect(host, int(port))
        else:
            result = handlers[cmd](host, int(port), int(rest[0]))
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        result = {"error": name if exc.errno else type(exc).__name__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
