"""Capture golden packets from the real Linux kernel through a TUN device.

The wire tests need bytes that tun2sx did not produce itself, so a bug shared
by a parser and its emitter cannot hide. This script writes them into
`tests/data/golden/`:

    sudo .venv/bin/python -m tests.data.capture_golden [--out DIR]

It creates a network namespace named `t2sx-golden-<pid>`, re-runs itself
inside it (`ip netns exec`), creates a TUN device there with 10.0.0.1/24 and
fd00::1/64, and makes the kernel talk to the (absent) peers 10.0.0.2 and
fd00::2, so every packet the kernel emits lands in the TUN:

* TCP over IPv4: the kernel's SYN (MSS, SACK-permitted, timestamps, window
  scale); a SYN-ACK built by `stack.wire.packet` is written back, so the
  kernel answers with its ACK, a data segment (PSH) and, after we ACK the
  data and the socket shuts down for writing, a FIN.
* TCP over IPv6: the kernel's SYN.
* An RST: the kernel's answer to our SYN for a closed port.
* UDP datagrams over IPv4 and IPv6.
* `ping -c1` echo requests over IPv4 and IPv6 (the real ping binary).
* ICMP and ICMPv6 port unreachable: the kernel's answer to our UDP datagrams
  for a closed port; these quote our packet, useful for `build_icmp_error`.

Nothing leaves the namespace, and the namespace is deleted in a `finally`.
`MANIFEST.txt` records the kernel version and what each file holds.
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from stack.errors import BadPacket
from stack.wire.icmp import IcmpHeader
from stack.wire.packet import Packet, build_tcp_packet, build_udp_packet, parse_packet_untrusted
from stack.wire.tcp import ACK, SYN, TcpHeader, TcpOptions

DEFAULT_OUT = Path(__file__).resolve().parent / "golden"
DEV = "t2sxg0"
OUR4, PEER4 = (
    socket.inet_pton(socket.AF_INET, "10.0.0.1"),
    socket.inet_pton(socket.AF_INET, "10.0.0.2"),
)
OUR6, PEER6 = (
    socket.inet_pton(socket.AF_INET6, "fd00::1"),
    socket.inet_pton(socket.AF_INET6, "fd00::2"),
)
CLOSED_PORT = 9  # discard: nothing listens in a fresh namespace


class Tun:
    """A TUN device opened with pytun (no packet-information prefix)."""

    def __init__(self) -> None:
        import pytun  # only needed here; the tests read the captured files

        self.dev = pytun.TunTapDevice(name=DEV, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        self.dev.mtu = 1500

    def write(self, packet: bytes) -> None:
        self.dev.write(packet)

    def read_until(self, want: Callable[[Packet], bool], timeout: float = 5.0) -> bytes:
        """Return the first packet that parses and matches `want`.

        Other packets (IPv6 router solicitations, MLD reports, retransmissions)
        are skipped.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.dev.fileno()], [], [], left)
            if not ready:
                break
            raw: bytes = self.dev.read(65535)
            try:
                packet = parse_packet_untrusted(memoryview(raw))
            except BadPacket:
                continue
            if want(packet):
                return raw
        raise TimeoutError("the expected packet never came")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _tcp_to(port: int, flags: int) -> Callable[[Packet], bool]:
    def want(p: Packet) -> bool:
        return isinstance(p.l4, TcpHeader) and p.l4.dst_port == port and p.l4.flags & flags == flags

    return want


def _proto(proto: int, version: int) -> Callable[[Packet], bool]:
    return lambda p: p.proto == proto and p.version == version


def _icmp(proto: int, version: int, types: tuple[int, int]) -> Callable[[Packet], bool]:
    return lambda p: (
        _proto(proto, version)(p) and isinstance(p.l4, IcmpHeader) and p.l4.type in types
    )


def capture_inside(out: Path) -> dict[str, str]:
    """Run inside the namespace: make the kernel emit packets, return files."""
    tun = Tun()
    _run("ip", "link", "set", "lo", "up")
    _run("ip", "addr", "add", "10.0.0.1/24", "dev", DEV)
    _run("ip", "addr", "add", "fd00::1/64", "dev", DEV, "nodad")
    _run("ip", "link", "set", DEV, "up")
    files: dict[str, bytes] = {}
    notes: dict[str, str] = {}

    def keep(name: str, raw: bytes, note: str) -> None:
        files[name] = raw
        notes[name] = note

    # TCP over IPv4: a whole handshake, data and FIN from the kernel's side.
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    client.connect_ex(("10.0.0.2", 80))
    syn_raw = tun.read_until(_tcp_to(80, SYN))
    keep("kernel_tcp_syn_v4.bin", syn_raw, "kernel SYN to 10.0.0.2:80")
    syn = parse_packet_untrusted(memoryview(syn_raw))
    assert isinstance(syn.l4, TcpHeader) and syn.l4.options.timestamp is not None
    kport, kseq = syn.l4.src_port, syn.l4.seq
    ts_peer = syn.l4.options.timestamp[0]
    iss = 1_000_000
    synack = TcpHeader(
        80,
        kport,
        iss,
        kseq + 1,
        SYN | ACK,
        65535,
        0,
        0,
        TcpOptions(1460, 7, True, (), (1, ts_peer)),
    )
    tun.write(build_tcp_packet(PEER4, OUR4, synack))
    keep("kernel_tcp_ack_v4.bin", tun.read_until(_tcp_to(80, ACK)), "kernel ACK of our SYN-ACK")
    select.select([], [client], [], 2)
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    data_raw = tun.read_until(lambda p: _tcp_to(80, ACK)(p) and len(p.payload) > 0)
    keep("kernel_tcp_data_v4.bin", data_raw, "kernel data segment (PSH) with an HTTP request")
    data = parse_packet_untrusted(memoryview(data_raw))
    assert isinstance(data.l4, TcpHeader) and data.l4.options.timestamp is not None
    ack = TcpHeader(
        80,
        kport,
        iss + 1,
        data.l4.seq + len(data.payload),
        ACK,
        65535,
        options=TcpOptions(timestamp=(2, data.l4.options.timestamp[0])),
    )
    tun.write(build_tcp_packet(PEER4, OUR4, ack))
    client.shutdown(socket.SHUT_WR)
    keep("kernel_tcp_fin_v4.bin", tun.read_until(_tcp_to(80, 0x01)), "kernel FIN after shutdown")
    client.close()

    # TCP over IPv6: the SYN is the interesting part.
    client6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    client6.setblocking(False)
    client6.connect_ex(("fd00::2", 80))
    keep("kernel_tcp_syn_v6.bin", tun.read_until(_tcp_to(80, SYN)), "kernel SYN to [fd00::2]:80")
    client6.close()

    # RST: the kernel refusing our SYN to a closed port.
    probe = TcpHeader(40000, CLOSED_PORT, 12345, 0, SYN, 65535, options=TcpOptions(mss=1460))
    tun.write(build_tcp_packet(PEER4, OUR4, probe))
    keep("kernel_tcp_rst_v4.bin", tun.read_until(_tcp_to(40000, 0x04)), "kernel RST-ACK")

    # UDP datagrams from the kernel.
    for family, host, name in (
        (socket.AF_INET, "10.0.0.2", "kernel_udp_v4.bin"),
        (socket.AF_INET6, "fd00::2", "kernel_udp_v6.bin"),
    ):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"golden datagram\n", (host, 5353))
            version = 4 if family == socket.AF_INET else 6
            keep(name, tun.read_until(_proto(17, version)), f"kernel UDP to {host}:5353")

    # Echo requests from the real ping binary.
    for flag, host, proto, version, name in (
        ("-4", "10.0.0.2", 1, 4, "kernel_icmp_echo_request_v4.bin"),
        ("-6", "fd00::2", 58, 6, "kernel_icmpv6_echo_request_v6.bin"),
    ):
        ping = subprocess.Popen(
            ["ping", flag, "-c1", "-W1", host], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            raw = tun.read_until(_icmp(proto, version, (8, 128)))
            keep(name, raw, f"ping -c1 {host}: echo request")
        finally:
            ping.wait(timeout=5)

    # ICMP errors from the kernel, quoting our datagram to a closed port.
    for src, dst, proto, version, name in (
        (PEER4, OUR4, 1, 4, "kernel_icmp_port_unreach_v4.bin"),
        (PEER6, OUR6, 58, 6, "kernel_icmpv6_port_unreach_v6.bin"),
    ):
        tun.write(build_udp_packet(src, dst, 5555, CLOSED_PORT, b"to a closed port\n"))
        raw = tun.read_until(_icmp(proto, version, (3, 1)))
        keep(name, raw, "kernel port unreachable for our UDP to port 9")

    out.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (out / name).write_bytes(raw)
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        notes = capture_inside(args.out)
        lines = [
            "Golden packets written by the Linux kernel into a TUN device.",
            "Regenerate: sudo .venv/bin/python -m tests.data.capture_golden",
            f"Kernel: {platform.release()}; captured {time.strftime('%Y-%m-%d')}.",
            "",
            *(f"{name}: {note}" for name, note in sorted(notes.items())),
        ]
        (args.out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
        return 0
    if os.geteuid() != 0:
        print("capture_golden: needs root (network namespace and TUN device)", file=sys.stderr)
        return 1
    netns = f"t2sx-golden-{os.getpid()}"
    root = Path(__file__).resolve().parents[2]
    _run("ip", "netns", "add", netns)
    try:
        cmd = [sys.executable, "-m", "tests.data.capture_golden", "--inside", "--out"]
        subprocess.run(
            ["ip", "netns", "exec", netns, *cmd, str(args.out.resolve())], check=True, cwd=root
        )
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(f"capture_golden: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
