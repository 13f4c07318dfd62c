"""A large exact echo transfer with a storm of hostile packets aimed at it.

    python -m tests.e2e.storm HOST PORT SIZE BURST [KIND...]

Run inside the client namespace (whose default route is the TUN). One TCP
connection sends SIZE random bytes to the echo server through tun2sx while
another thread reads the echo (all SIZE bytes, then the socket closes).
Between every chunk the sender writes, the main thread sniffs the flow on
tun0 (a packet socket sees both directions) to learn the application's
sequence number and tun2sx's acknowledgement, then writes BURST crafted
packets into the TUN through a raw IPv4 socket:

- random bytes behind an IPv4 header of a random protocol;
- TCP headers cut short;
- segments of the live flow inside its window, carrying garbage, with a
  broken checksum, or with option bytes that cannot parse, or SYN+FIN;
- IPv4 fragments of segments of the live flow;
- well-formed garbage segments of the live flow that lie wholly before
  what tun2sx has acknowledged (old duplicates) or far beyond its window;
- RSTs and SYNs of the live flow with sequence numbers that are not exact.

Had tun2sx taken any of them as data, the echo would differ. Prints one
JSON object: whether the echo was exact, and how many packets of each kind
were written. KINDs (names in `KINDS`) narrow the storm to those kinds.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import threading
from collections import Counter

from fuzz.segments import ipv4_packet as ip_packet
from fuzz.segments import tcp_packet

CHUNK = 128 * 1024
ETH_P_ALL = 0x0003
ACK, PSH, RST, SYN, FIN = 0x10, 0x08, 0x04, 0x02, 0x01
MALFORMED = {"truncated", "bad_checksum", "bad_options", "syn_fin"}


class Flow:
    """What the sniffer learned of the live flow."""

    def __init__(self, app: tuple[str, int], remote: tuple[str, int]) -> None:
        self.app = socket.inet_aton(app[0])
        self.remote = socket.inet_aton(remote[0])
        self.ports = (app[1], remote[1])
        self.app_next = 0  # next sequence number the application will send
        self.acked = 0  # what tun2sx has acknowledged of the application's bytes
        self.our_next = 0  # what the application acknowledges of tun2sx's bytes
        self.seen = False

    def sniff(self, sock: socket.socket) -> None:
        while True:
            try:
                pkt = sock.recv(70000)
            except BlockingIOError:
                return
            if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            src, dst = pkt[12:16], pkt[16:20]
            sport, dport, seq, ack, off = struct.unpack_from("!HHIIB", pkt, ihl)
            plen = len(pkt) - ihl - (off >> 4) * 4
            if (src, dst, (sport, dport)) == (self.app, self.remote, self.ports):
                self.app_next = (seq + plen) & 0xFFFFFFFF
                self.our_next = ack
                self.seen = True
            elif (dst, src, (dport, sport)) == (self.app, self.remote, self.ports):
                self.acked = ack


KINDS = (
    "junk",
    "truncated",
    "bad_checksum",
    "bad_options",
    "syn_fin",
    "fragment",
    "old",
    "far",
    "rst_syn",
)


def storm_burst(
    rng: random.Random,
    flow: Flow,
    raw: socket.socket,
    n: int,
    tally: Counter[str],
    kinds: tuple[str, ...] = KINDS,
) -> None:
    app, remote, ports = flow.app, flow.remote, flow.ports
    for _ in range(n):
        kind = rng.choice(kinds)
        garbage = rng.randbytes(rng.randrange(1, 600))
        ahead = (flow.acked + rng.randrange(0, 30000)) & 0xFFFFFFFF
        if kind == "junk":
            pkt = ip_packet(app, remote, rng.choice((6, 17, 1, rng.randrange(256))), garbage)
        elif kind == "truncated":
            seg = tcp_packet(app, remote, ports, ahead, flow.our_next, ACK)[20:]
            pkt = ip_packet(app, remote, 6, seg[: rng.randrange(20)])
        elif kind == "bad_checksum":
            pkt = tcp_packet(
                app,
                remote,
                ports,
                ahead,
                flow.our_next,
                ACK | PSH,
                b"",
                garbage,
                good_checksum=False,
            )
        elif kind == "bad_options":
            bogus = bytes((rng.choice((2, 3, 4, 5, 8)), rng.choice((0, 1, 60))))
            pkt = tcp_packet(app, remote, ports, ahead, flow.our_next, ACK | PSH, bogus, garbage)
        elif kind == "syn_fin":
            pkt = tcp_packet(
                app, remote, ports, ahead, flow.our_next, SYN | FIN | ACK, b"", garbage
            )
        elif kind == "fragment":
            seg = tcp_packet(app, remote, ports, ahead, flow.our_next, ACK | PSH, b"", garbage)[20:]
            pkt = ip_packet(app, remote, 6, seg, rng.choice((0x2000, 0x2000 | 8, 16)))
        elif kind == "old":
            seq = flow.acked - rng.randrange(len(garbage), len(garbage) + 50000)
            pkt = tcp_packet(app, remote, ports, seq, flow.our_next, ACK | PSH, b"", garbage)
        elif kind == "far":
            seq = flow.acked + rng.randrange(1 << 24, 1 << 30)
            pkt = tcp_packet(app, remote, ports, seq, flow.our_next, ACK | PSH, b"", garbage)
        else:
            flags = rng.choice((RST, RST | ACK, SYN))
            seq = flow.acked + rng.choice((1, 100, 70000, 1 << 28))
            pkt = tcp_packet(app, remote, ports, seq, flow.our_next, flags)
        try:
            raw.sendto(pkt, (socket.inet_ntoa(remote), 0))
        except OSError:
            tally["send_failed"] += 1
            continue
        tally[kind] += 1


def run(
    host: str, port: int, size: int, burst: int, kinds: tuple[str, ...] = KINDS
) -> dict[str, object]:
    rng = random.Random(0x6)
    payload = os.urandom(size)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sniffer.bind(("tun0", ETH_P_ALL))
    sniffer.setblocking(False)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock = socket.create_connection((host, port), timeout=20)
    flow = Flow(sock.getsockname(), sock.getpeername())
    received = bytearray()

    def reader() -> None:
        # No half-close: microsocks ends both directions at the first EOF.
        while len(received) < size and (data := sock.recv(1 << 18)):
            received.extend(data)

    thread = threading.Thread(target=reader)
    thread.start()
    tally: Counter[str] = Counter()
    try:
        for start in range(0, size, CHUNK):
            sock.sendall(payload[start : start + CHUNK])
            flow.sniff(sniffer)
            if flow.seen:
                storm_burst(rng, flow, raw, burst, tally, kinds)
        thread.join(120)
    finally:
        sock.close()
        raw.close()
        sniffer.close()
    return {
        "sent": size,
        "received": len(received),
        "equal": bytes(received) == payload,
        "injected": dict(tally),
        "malformed": sum(tally[k] for k in MALFORMED),
    }


def main() -> None:
    host, port, size, burst, *kinds = sys.argv[1:]
    addr = socket.gethostbyname(host)
    print(json.dumps(run(addr, int(port), int(size), int(burst), tuple(kinds) or KINDS)))


if __name__ == "__main__":
    main()
