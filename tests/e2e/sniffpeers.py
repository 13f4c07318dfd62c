"""Peers for the sniffing end-to-end tests, each run inside a namespace.

Server side (they log one JSON line per event to stdout):

    python -m tests.e2e.sniffpeers socks --bind ADDR --port P --to ADDR
        a SOCKS5 server (no auth, CONNECT only) that logs the host each
        CONNECT names and relays to `--to` at that port, whatever the host
    python -m tests.e2e.sniffpeers banner --bind ADDR --port P
        a server that speaks first (an SSH-style banner), then echoes
    python -m tests.e2e.sniffpeers udp --bind ADDR --port P
        logs the source address and QUIC Destination Connection ID of
        every datagram

Client side (one JSON object on stdout):

    python -m tests.e2e.sniffpeers quic HOST PORT NAME [--version V]
        sends a QUIC client's first datagrams (aioquic; v1, or V such as
        0x6b3343cf for v2) for NAME, then
        waits 2 s for an answer or an error (there is no QUIC server)
    python -m tests.e2e.sniffpeers first-byte HOST PORT
        seconds from connect() to the server's first byte
    python -m tests.e2e.sniffpeers hold-tls HOST PORT NAME STATS_PORT
        completes a TLS handshake with SNI NAME, then, with the connection
        still open, returns tun2sx's /connections
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import ssl
import sys
import time
import urllib.request

import trio

from tests.support.hellos import quic_initials

BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"


def _log(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _relay(a: trio.SocketStream, b: trio.SocketStream) -> None:
    async def one_way(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, a, b)
        nursery.start_soon(one_way, b, a)


async def _read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise trio.BrokenResourceError("EOF in the SOCKS5 request")
        data += chunk
    return data


async def socks(bind: str, port: int, to: str) -> None:
    async def handle(client: trio.SocketStream) -> None:
        try:
            greeting = await _read_exactly(client, 2)
            await _read_exactly(client, greeting[1])
            await client.send_all(b"\x05\x00")
            _ver, cmd, _rsv, atyp = await _read_exactly(client, 4)
            if atyp == 1:
                host = socket.inet_ntoa(await _read_exactly(client, 4))
            elif atyp == 3:
                host = (await _read_exactly(client, (await _read_exactly(client, 1))[0])).decode()
            else:
                host = socket.inet_ntop(socket.AF_INET6, await _read_exactly(client, 16))
            dport = int.from_bytes(await _read_exactly(client, 2), "big")
            _log(event="connect", host=host, port=dport, command=cmd)
            upstream = await trio.open_tcp_stream(to, dport)
            await client.send_all(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00")
            async with upstream:
                await _relay(client, upstream)
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            await client.aclose()

    await trio.serve_tcp(handle, port, host=bind)


async def banner(bind: str, port: int) -> None:
    async def handle(client: trio.SocketStream) -> None:
        try:
            await client.send_all(BANNER)
            while data := await client.receive_some(65536):
                await client.send_all(data)
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            await client.aclose()

    await trio.serve_tcp(handle, port, host=bind)


async def udp(bind: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((bind, port))
    while True:
        data, (addr, _src_port) = await sock.recvfrom(65536)
        _log(event="datagram", source=addr, size=len(data), dcid=_dcid(data).hex())


def _dcid(datagram: bytes) -> bytes:
    """The Destination Connection ID of a long-header packet (RFC 9000 17.2)."""
    if len(datagram) < 6:
        return b""
    return datagram[6 : 6 + datagram[5]]


def quic(host: str, port: int, name: str, version: int = 1) -> dict[str, object]:
    datagrams = quic_initials(name, version=version, alpn_padding=10)  # several datagrams
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        for datagram in datagrams:
            sock.send(datagram)
        sock.settimeout(2)
        try:
            sock.recv(65536)
            outcome = "answer"
        except TimeoutError:
            outcome = "no answer"
        except OSError as exc:
            outcome = errno.errorcode.get(exc.errno or 0, str(exc))
    return {"sent": len(datagrams), "dcid": _dcid(datagrams[0]).hex(), "outcome": outcome}


def first_byte(host: str, port: int) -> dict[str, object]:
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as sock:
        data = sock.recv(100)
    return {"seconds": round(time.monotonic() - start, 3), "data": data.decode(errors="replace")}


def hold_tls(host: str, port: int, name: str, stats_port: int) -> dict[str, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=name),
    ):
        url = f"http://127.0.0.1:{stats_port}/connections"
        with urllib.request.urlopen(url, timeout=10) as answer:
            connections = json.loads(answer.read())
    return {"connections": connections}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("socks", "banner", "udp"):
        server = sub.add_parser(name)
        server.add_argument("--bind", required=True)
        server.add_argument("--port", type=int, required=True)
        if name == "socks":
            server.add_argument("--to", required=True)
    client = sub.add_parser("quic")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("name")
    client.add_argument("--version", type=lambda text: int(text, 0), default=1)
    client = sub.add_parser("first-byte")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client = sub.add_parser("hold-tls")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("name")
    client.add_argument("stats_port", type=int)
    args = parser.parse_args()
    if args.command == "socks":
        trio.run(socks, args.bind, args.port, args.to)
    elif args.command == "banner":
        trio.run(banner, args.bind, args.port)
    elif args.command == "udp":
        trio.run(udp, args.bind, args.port)
    else:
        try:
            if args.command == "quic":
                result = quic(args.host, args.port, args.name, args.version)
            elif args.command == "first-byte":
                result = first_byte(args.host, args.port)
            else:
                result = hold_tls(args.host, args.port, args.name, args.stats_port)
        except OSError as exc:
            result = {"error": type(exc).__name__, "detail": str(exc)}
        print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
