"""Micro-benchmark of the TCP stack's per-segment and per-connection cost.

    python -m tests.bench tcp [--mb 8] [--conns 2000] [--repeat 5] [--offload]
                              [--app-acks each] [--trust-app] [--ipv6]

In process, no TUN: IP packets go into `NetStack.receive` and come out of
`NetStack.packets_to_send`, as the engine drives them, and the runtime's
side of each flow is played by direct calls (`send`, `close`,
`next_event`), as `TcpStream` makes them. Only the stack's calls are timed.

- `upload`: the application sends `--mb` MB in 1448-byte segments; the
  stack takes them in, ACKs, and the runtime reads the data.
- `download`: the runtime sends `--mb` MB; the stack cuts it into 1448-byte
  segments and takes the application's ACKs.
  Both report µs per data segment (all stack work of the transfer divided
  by the data segments carried). The application's side is a second
  `TcpConnection` (opened from the stack's SYN-ACK seen as a SYN, as the
  tests do), untimed. By default (`--app-acks round`) it takes a whole
  round of segments before it answers, so a download brings one ACK per
  round; with `--app-acks each` it answers after every segment, as a
  Linux application reading a TUN does (an ACK per second full segment),
  and the stack gets all of a round's ACKs in one batch, as the engine
  hands it a TUN read.
- `connect`: a scripted application opens a connection, sends one byte and
  FIN; the runtime answers one byte and closes; the application ACKs. µs
  per connection, all of it through `NetStack`.

Without `--offload` every packet's checksum is verified and computed in
full (a TUN without offload); with it, as with IFF_VNET_HDR offload.
`--trust-app` makes the application's address the TUN's own, whose
packets tun2sx does not verify (`NetStackConfig.trusted_sources`). Prints
the best and the median of `--repeat` runs per case.

Time is this thread's CPU time by default (`--clock cpu`): on a small
shared VM, wall time also counts the moments another process held the
core, which made runs differ by 2x. `--clock wall` uses `perf_counter`.
Reading the CPU clock costs about 0.2 µs, a fixed cost included in every
timed call; compare numbers taken with the same clock only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import attrs

from stack.netstack import GsoPacket, NetStack, NetStackConfig, UdpDatagram
from stack.seq import MASK
from stack.tcp import (
    NEED_DATA,
    ConnectionRequest,
    DataReceived,
    FlowKey,
    TcpConfig,
    TcpConnection,
)
from stack.wire.packet import build_tcp_packet, parse_packet_untrusted
from stack.wire.tcp import ACK, FIN, PSH, SYN, TcpHeader, TcpOptions

APP = bytes([10, 0, 0, 2])
REMOTE = bytes([198, 18, 0, 5])
APP6 = bytes.fromhex("fd00007e000000000000000000000001")
REMOTE6 = bytes.fromhex("fc000000000000000000000000000005")
APP_ISN = 0xFFFFFF00  # near the wrap, as in the tests
SRV_ISS = 0x7FFFFFF0
MSS = 1460  # 1448-byte payloads with the timestamp option
STEP = 0.0001  # simulated seconds per exchange round

T = TypeVar("T")

_clock = time.thread_time
_TRUST_APP = False


class _Stack:
    """The stack under test, with the time spent in it accumulated."""

    def __init__(self, offload: bool) -> None:
        config = NetStackConfig(tcp=TcpConfig(mss=MSS), partial_checksum=offload)
        if _TRUST_APP:
            # The application's address as the TUN's own (what tun2sx does
            # with `Settings.trust_local_checksums`).
            config = attrs.evolve(config, trusted_sources=frozenset({APP}))
        self.net = NetStack(config)
        self.trusted = offload
        self.spent = 0.0

    def receive(
        self, packets: list[bytes], now: float
    ) -> list[ConnectionRequest | TcpConnection | UdpDatagram | None]:
        """Feed one batch, as the engine feeds a TUN read."""
        net, trusted = self.net, self.trusted
        batch = [(memoryview(p), trusted) for p in packets]
        start = _clock()
        if hasattr(net, "receive_batch"):
            events: list[ConnectionRequest | TcpConnection | UdpDatagram | None]
            events = list(net.receive_batch(batch, now))
        else:  # a tree from before batches (A/B runs against it)
            events = [net.receive(p, now, checksum_trusted=t) for p, t in batch]
        self.spent += _clock() - start
        return events

    def output(self, now: float) -> list[bytes]:
        """Collect the packets due and run due timers, as the engine does."""
        net = self.net
        start = _clock()
        packets = net.packets_to_send(now)
        deadline = net.tcp.next_deadline()
        if deadline is not None and deadline <= now:
            net.tcp.handle_timeout(now)
            packets += net.packets_to_send(now)
        self.spent += _clock() - start
        return [p.data if isinstance(p, GsoPacket) else p for p in packets]

    def timed(self, fn: Callable[..., T], *args: object) -> T:
        start = _clock()
        result = fn(*args)
        self.spent += _clock() - start
        return result


def _segments(packets: list[bytes]) -> list[tuple[TcpHeader, memoryview]]:
    out = []
    for p in packets:
        pkt = parse_packet_untrusted(memoryview(p), verify_checksum=False)
        assert isinstance(pkt.l4, TcpHeader)
        out.append((pkt.l4, pkt.payload))
    return out


def _packets(segments: list[tuple[TcpHeader, bytes | bytearray]]) -> list[bytes]:
    return [build_tcp_packet(APP, REMOTE, hdr, payload) for hdr, payload in segments]


def _open(stack: _Stack, now: float) -> tuple[TcpConnection, TcpConnection]:
    """Open a connection through the stack; return (stack side, application side)."""
    key = FlowKey(APP, 40000, REMOTE, 443)
    syn = TcpHeader(
        40000,
        443,
        APP_ISN,
        0,
        SYN,
        65535,
        options=TcpOptions(MSS, 7, True, (), ((int(now * 1000) + APP_ISN) & MASK, 0)),
    )
    [request] = stack.receive(_packets([(syn, b"")]), now)
    assert isinstance(request, ConnectionRequest)
    conn = stack.net.tcp.accept(key, SRV_ISS, now)
    [(synack, _)] = _segments(stack.output(now))
    # The application's side, opened from the SYN-ACK seen as a SYN.
    mirror = FlowKey(REMOTE, 443, APP, 40000)
    app = TcpConnection(mirror, synack._replace(flags=SYN, ack=0), APP_ISN, now, TcpConfig(mss=MSS))
    app.segments_to_send(now)
    ts = synack.options.timestamp
    assert ts is not None
    app.segment_received(
        TcpHeader(
            443,
            40000,
            (SRV_ISS + 1) & MASK,
            (APP_ISN + 1) & MASK,
            ACK,
            synack.window,
            options=TcpOptions(timestamp=(ts[0], ts[1])),
        ),
        b"",
        now,
    )
    app.segments_to_send(now)
    ack = TcpHeader(
        40000,
        443,
        (APP_ISN + 1) & MASK,
        (SRV_ISS + 1) & MASK,
        ACK,
        65535 >> 0,
        options=TcpOptions(timestamp=((int(now * 1000) + APP_ISN) & MASK, ts[0])),
    )
    stack.receive(_packets([(ack, b"")]), now)
    stack.output(now)
    return conn, app


def bulk(total: int, upload: bool, offload: bool, each: bool = False) -> float:
    """Move `total` bytes one way; return µs of stack time per data segment."""
    stack = _Stack(offload)
    now = 1.0
    conn, app = _open(stack, now)
    chunk = bytes(64 * 1024)
    sender, receiver = (app, conn) if upload else (conn, app)
    queued = received = 0
    data_segments = 0
    pending: list[bytes] = []
    while received < total:
        now += STEP
        # The sending side's program keeps its send buffer full.
        while queued < total:
            piece = memoryview(chunk)[: total - queued]
            n = stack.timed(sender.send, piece) if sender is conn else sender.send(piece)
            if not n:
                break
            queued += n
        deadline = app.next_deadline()
        if deadline is not None and deadline <= now:
            app.handle_timeout(now)
        inbound = _packets(app.segments_to_send(now))
        inbound = pending + inbound
        pending = []
        if upload:
            data_segments += sum(1 for p in inbound if len(p) > 52 + 20)
        stack.receive(inbound, now)
        # The receiving side's program reads what arrived.
        while True:
            event = stack.timed(receiver.next_event) if receiver is conn else receiver.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, DataReceived):
                received += len(event.data)
        outbound = stack.output(now)
        if not upload:
            data_segments += sum(1 for p in outbound if len(p) > 52 + 20)
        for hdr, payload in _segments(outbound):
            app.segment_received(hdr, payload, now)
            if each:
                # Its ACKs reach the stack with the next round's batch.
                pending += _packets(app.segments_to_send(now))
        while (event := app.next_event()) is not NEED_DATA:
            if isinstance(event, DataReceived):
                received += len(event.data)
    return stack.spent / data_segments * 1e6


def _drain(conn: TcpConnection) -> None:
    while conn.next_event() is not NEED_DATA:
        pass


def _answer(conn: TcpConnection) -> None:
    _drain(conn)
    conn.send(b"b")
    conn.close()


def connect_loop(count: int, offload: bool) -> float:
    """Open, exchange a byte each way and close `count` connections; µs each."""
    stack = _Stack(offload)
    net = stack.net
    now = 1.0
    for i in range(count):
        now += STEP
        port = 10000 + i % 50000
        key = FlowKey(APP, port, REMOTE, 443)
        isn = (APP_ISN + i * 7919) & MASK
        tsval = (1000 + i) & MASK
        syn_opts = TcpOptions(MSS, 7, True, (), (tsval, 0))
        syn = TcpHeader(port, 443, isn, 0, SYN, 65535, options=syn_opts)
        [request] = stack.receive([build_tcp_packet(APP, REMOTE, syn)], now)
        assert isinstance(request, ConnectionRequest)
        conn = stack.timed(net.tcp.accept, key, SRV_ISS, now)
        [(synack, _)] = _segments(stack.output(now))
        assert synack.options.timestamp is not None
        opts = TcpOptions(timestamp=(tsval, synack.options.timestamp[0]))

        def seg(flags: int, seq: int, ack: int, data: bytes = b"") -> bytes:
            hdr = TcpHeader(port, 443, seq & MASK, ack & MASK, flags, 1024, options=opts)  # noqa: B023
            return build_tcp_packet(APP, REMOTE, hdr, data)

        iss = synack.seq
        stack.receive(
            [
                seg(ACK, isn + 1, iss + 1),
                seg(ACK | PSH, isn + 1, iss + 1, b"a"),
                seg(ACK | FIN, isn + 2, iss + 1),
            ],
            now,
        )
        stack.timed(_answer, conn)
        [(reply, payload)] = _segments(stack.output(now))
        assert reply.flags & FIN and bytes(payload) == b"b", reply
        now += STEP
        stack.receive([seg(ACK, isn + 3, iss + 3)], now)
        stack.timed(_drain, conn)
        stack.output(now)
        assert key not in net.tcp.connections
    return stack.spent / count * 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench tcp")
    parser.add_argument("--mb", type=float, default=8.0, help="MB per bulk transfer")
    parser.add_argument("--conns", type=int, default=2000, help="connections per connect run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--offload", action="store_true", help="checksums offloaded")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument(
        "--app-acks",
        choices=("round", "each"),
        default="round",
        help="the application ACKs once per round, or after each segment (as Linux)",
    )
    parser.add_argument("--ipv6", action="store_true", help="IPv6 flows (default IPv4)")
    parser.add_argument(
        "--trust-app",
        action="store_true",
        help="the application's address is the TUN's own: its checksums are not verified",
    )
    parser.add_argument(
        "--case", choices=("upload", "download", "connect"), action="append", help="default: all"
    )
    args = parser.parse_args(argv)
    global _clock, _TRUST_APP, APP, REMOTE
    if args.ipv6:
        APP, REMOTE = APP6, REMOTE6
    _clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    _TRUST_APP = args.trust_app
    total = int(args.mb * 1_000_000)
    each = args.app_acks == "each"
    cases: dict[str, Callable[[], float]] = {
        "upload": lambda: bulk(total, True, args.offload, each),
        "download": lambda: bulk(total, False, args.offload, each),
        "connect": lambda: connect_loop(args.conns, args.offload),
    }
    chosen = args.case or list(cases)
    print(
        f"offload={'on' if args.offload else 'off'}, clock={args.clock}, "
        f"app-acks={args.app_acks}, trust-app={'on' if args.trust_app else 'off'}, "
        f"ipv{6 if args.ipv6 else 4}, "
        f"{args.repeat} runs each"
    )
    print("| case | unit | best | median |")
    print("|---|---|---|---|")
    for name in chosen:
        runs = [cases[name]() for _ in range(args.repeat)]
        unit = "µs/connection" if name == "connect" else "µs/segment"
        print(f"| {name} | {unit} | {min(runs):.2f} | {statistics.median(runs):.2f} |")
        sys.stdout.flush()
    return 0
