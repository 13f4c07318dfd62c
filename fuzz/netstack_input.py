"""Fuzz `NetStack.receive` with hostile packets beside one live TCP flow.

The packet parser harness checks the wire layer alone; this one checks the
whole input path the runtime drives: parse, demultiplex, the TCP state
machine of an established connection, UDP and ICMP handling, and the
packets built in reply. Each input is a little program. Every step picks a
kind of packet from one byte and takes its arguments from the following
bytes: raw bytes as a whole packet, raw bytes behind a valid IPv4 or IPv6
header, a segment aimed at the live flow's 4-tuple with fuzzed flags,
sequence and acknowledgement numbers, options and payload (with a good or
a broken checksum), a segment for another flow, a UDP datagram or an ICMP
message; or time passes and timers fire (TCP's and reassembly's). IPv4
packets with fuzzed fragment fields go through reassembly.

Invariants: `receive` never raises; every packet the stack emits parses
back with verified checksums (or, for a reply longer than the MTU, as a
fragment); the counters account for every packet fed
(`rx_packets`); and the bytes the live connection had delivered before the
storm stay what the application sent.
"""

from __future__ import annotations

import struct
import sys

from fuzz.segments import ByteReader, ipv4_packet
from fuzz.segments import ipv4_header as ipv4_header  # tests/stack/test_netstack.py uses it
from fuzz.segments import tcp_packet as raw_tcp_packet
from stack.errors import BadPacket
from stack.netstack import GsoPacket, NetStack, NetStackConfig, UdpDatagram
from stack.tcp import ConnectionRequest, DataReceived, FlowKey, TcpConfig, TcpConnection
from stack.wire.fragment import parse_fragment_untrusted
from stack.wire.ipv4 import is_fragment_error
from stack.wire.packet import (
    build_icmp_packet,
    build_tcp_packet,
    build_udp_packet,
    parse_packet_untrusted,
)
from stack.wire.tcp import ACK, PSH, SYN, TcpHeader, TcpOptions

APP = b"\x0a\x00\x00\x02"
REMOTE = b"\xc6\x12\x00\x05"
APP6 = b"\xfd\x00" + bytes(13) + b"\x02"
REMOTE6 = b"\xfc\x00" + bytes(13) + b"\x05"
APP_PORT = 40000
REMOTE_PORT = 443
APP_ISN = 0xFFFFFF00
ISS = 0x7FFFFFF0
GREETING = b"hello through the stack"
CONFIG = NetStackConfig(
    tcp=TcpConfig(mss=600, rcv_buf=20_000, snd_buf=20_000, max_ooo_bytes=8000, max_ooo_ranges=8)
)


def open_flow(stack: NetStack, now: float) -> TcpConnection:
    """Drive a handshake and one data segment; return the live connection."""
    key = FlowKey(APP, APP_PORT, REMOTE, REMOTE_PORT)
    syn = TcpHeader(
        APP_PORT,
        REMOTE_PORT,
        APP_ISN,
        0,
        SYN,
        65535,
        options=TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0)),
    )
    request = stack.receive(memoryview(build_tcp_packet(APP, REMOTE, syn)), now)
    assert isinstance(request, ConnectionRequest), request
    conn = stack.tcp.accept(key, ISS, now)
    synack = [parse_packet_untrusted(memoryview(p)) for p in stack.packets_to_send(now)]
    assert len(synack) == 1
    seq = (APP_ISN + 1) & 0xFFFFFFFF
    ack = (ISS + 1) & 0xFFFFFFFF
    opts = TcpOptions(timestamp=(2, 0))
    for flags, payload in ((ACK, b""), (ACK | PSH, GREETING)):
        hdr = TcpHeader(APP_PORT, REMOTE_PORT, seq, ack, flags, 512, options=opts)
        stack.receive(memoryview(build_tcp_packet(APP, REMOTE, hdr, payload)), now)
    event = conn.next_event()
    assert event == DataReceived(GREETING), event
    return conn


def _segment(r: ByteReader, live: TcpConnection, good_checksum: bool) -> bytes:
    key = live.key if r.num(1) & 1 else FlowKey(APP, r.num(2), REMOTE, r.num(2))
    base_seq = (APP_ISN + 1 + len(GREETING)) & 0xFFFFFFFF
    mode = r.num(1)
    seq = (base_seq + (mode - 128) * 97) & 0xFFFFFFFF if mode < 250 else r.num(4)
    ack = (ISS + 1 + r.num(1) - 128) & 0xFFFFFFFF if r.num(1) < 250 else r.num(4)
    ts = (r.num(1) + 2, r.num(4)) if r.num(1) & 1 else None
    blocks = ((r.num(4), r.num(4)),) if r.num(1) & 1 else ()
    mss = r.num(2) or None
    opts = TcpOptions(mss=mss, sack_blocks=blocks, timestamp=ts)
    flags = r.num(1)
    payload = r.take(r.num(2) % 1400)
    hdr = TcpHeader(key.app_port, key.remote_port, seq, ack, flags, r.num(2), options=opts)
    try:
        pkt = bytearray(build_tcp_packet(key.app_addr, key.remote_addr, hdr, payload))
    except ValueError:
        # The builder refuses what no parser produces (SYN with FIN or RST,
        # options too long): write those bytes by hand.
        ports = (key.app_port, key.remote_port)
        return raw_tcp_packet(APP, REMOTE, ports, seq, ack, flags, r.take(12), payload)
    if not good_checksum:
        pkt[36] ^= 0x5A
    return bytes(pkt)


def _packet(r: ByteReader, live: TcpConnection) -> bytes:
    kind = r.num(1) % 9
    if kind == 0:
        return r.take(r.num(1))
    if kind in (1, 2):
        proto = (6, 17, 1, r.num(1))[r.num(1) % 4]
        body = r.take(r.num(1))
        frag = r.num(2) if kind == 2 else 0
        return ipv4_packet(APP, REMOTE, proto, body, frag)
    if kind == 3:
        body = r.take(r.num(1))
        head = bytes([0x60, 0, 0, 0]) + struct.pack("!HBB", len(body), r.num(1), 64)
        return head + APP6 + REMOTE6 + body
    if kind in (4, 5):
        return _segment(r, live, good_checksum=kind == 4)
    if kind == 6:
        return build_udp_packet(APP, REMOTE, r.num(2), r.num(2), r.take(r.num(1)))
    if kind == 7:
        return build_icmp_packet(APP, REMOTE, r.num(1), r.num(1), r.num(4), b"x")
    if r.num(1) & 1:
        return build_tcp_packet(APP6, REMOTE6, TcpHeader(r.num(2), r.num(2), 1, 0, ACK, 100))
    ports = (APP_PORT, REMOTE_PORT) if r.num(1) & 1 else (r.num(2), r.num(2))
    return raw_tcp_packet(APP, REMOTE, ports, r.num(4), r.num(4), r.num(1), r.take(r.num(1) % 44))


def _check_emitted(packet: bytes | GsoPacket) -> None:
    """A packet we send parses, or is a well-formed fragment of a reply
    longer than the MTU (which reassembly in the tests puts together)."""
    try:
        parse_packet_untrusted(memoryview(packet))  # type: ignore[arg-type]
    except BadPacket as exc:
        if not is_fragment_error(exc):
            raise
        parse_fragment_untrusted(memoryview(packet))  # type: ignore[arg-type]


def TestOneInput(data: bytes) -> None:
    r = ByteReader(data)
    stack = NetStack(CONFIG)
    now = 0.0
    live = open_flow(stack, now)
    fed = stack.counters["rx_packets"]
    for _ in range(200):
        if not r.more():
            break
        if r.num(1) % 8 == 0:
            now += r.num(1) / 16
            stack.handle_timeout(now)
        else:
            pkt = _packet(r, live)
            fed += 1
            event = stack.receive(memoryview(pkt), now)
            if isinstance(event, UdpDatagram):
                stack.send_udp(event.dst, event.dst_port, event.src, event.src_port, b"r")
            elif isinstance(event, ConnectionRequest) and r.num(1) & 1:
                stack.tcp.refuse(event.key, now)
        for out in stack.packets_to_send(now):
            _check_emitted(out)
    assert stack.counters["rx_packets"] == fed


def write_seeds() -> None:
    """Write the seed corpus: one input per packet kind, and a mixed one."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent / "corpus" / "netstack_input"
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {
        "raw": b"\x01\x10" + bytes(range(16)),
        "ipv4-junk": b"\x01\x01\x00\x20" + bytes(range(32)),
        "ipv4-fragment": b"\x01\x02\x00\x10" + bytes(16) + b"\x20\x00",
        "ipv6-junk": b"\x01\x03\x10" + bytes(16) + b"\x06",
        "live-segment": b"\x01\x04\x01\x80\x00\x00\x01\x00\x00\x00\x10" + b"A" * 16,
        "live-bad-checksum": b"\x01\x05\x01\x80\x00\x00\x01\x00\x00\x00\x10" + b"B" * 16,
        "udp": b"\x01\x06\x00\x35\x00\x35\x04abcd",
        "icmp": b"\x01\x07\x08\x00\x00\x01\x00\x01",
        "tcp6": b"\x01\x08" + bytes(range(1, 18)),
        "timers": b"\x00\xff\x00\xff\x00\xff\x00\xff",
    }
    seeds["mixed"] = b"".join(seeds.values())
    for name, blob in seeds.items():
        (folder / name).write_bytes(blob)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-seeds"]:
        write_seeds()
    else:
        for arg in sys.argv[1:]:
            with open(arg, "rb") as f:
                TestOneInput(f.read())
