"""Test helpers: a scripted application peer, and a connection pair over a lossy link.

`App` plays the application (the active opener) segment by segment, so a
test says exactly what arrives and compares exactly what comes back.
`open_pair` joins two `TcpConnection`s: the server is opened from a real
SYN; the client is the same class opened from the server's SYN-ACK seen as
a SYN (TCP is symmetric after the handshake), so both directions run the
full stack. `LossyLink` moves segments between them with seeded drops,
duplicates, reordering and delay on a simulated clock.
"""

from __future__ import annotations

import heapq
import random
from typing import NamedTuple

from stack.seq import MASK
from stack.tcp import (
    NEED_DATA,
    Closed,
    ConnectionReset,
    DataReceived,
    EofReceived,
    Event,
    FlowKey,
    TcpConfig,
    TcpConnection,
)
from stack.tcp.options import window_shift
from stack.wire.tcp import ACK, FIN, RST, SYN, TcpHeader, TcpOptions, emit_tcp_header

KEY = FlowKey(b"\x0a\x00\x00\x02", 40000, b"\xc6\x12\x00\x05", 443)
KEY6 = FlowKey(b"\xfd" + b"\x00" * 14 + b"\x02", 40000, b"\xfc" + b"\x00" * 14 + b"\x05", 443)
APP_ISN = 0xFFFFFF00  # close to the wrap, so wrapping is always exercised
SRV_ISS = 0xFFFFFFF0


class Seg(NamedTuple):
    """What a test compares of an emitted segment."""

    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions
    payload: bytes


def seg_of(hdr: TcpHeader, payload: bytes) -> Seg:
    """Return the comparable view of an emitted segment (ports checked here)."""
    assert 443 in (hdr.src_port, hdr.dst_port)
    emit_tcp_header(hdr)  # every emitted header must be serialisable
    return Seg(hdr.seq, hdr.ack, hdr.flags, hdr.window, hdr.options, bytes(payload))


def drain(conn: TcpConnection) -> list[Event]:
    """Take every pending event."""
    events: list[Event] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def s(value: int) -> int:
    """Wrap a sequence number."""
    return value & MASK


class App:
    """The application side, scripted: builds segments and tracks sequence numbers.

    Attributes:
        nxt: the next sequence number the app sends.
        rcv_nxt: the next sequence number the app expects from us.
        tsval: the app's timestamp clock (advanced by tests at will).
        ts_recent: the last TSval seen from us.
    """

    def __init__(
        self,
        *,
        isn: int = APP_ISN,
        mss: int | None = 1460,
        wscale: int | None = 7,
        sack: bool = True,
        ts: bool = True,
        window: int = 65535,
    ) -> None:
        self.isn = isn
        self.nxt = isn
        self.rcv_nxt = 0
        self.tsval = 1000 if ts else None
        self.ts_recent = 0
        self.mss = mss
        self.wscale = wscale
        self.sack = sack
        self.window = window

    def syn(self) -> TcpHeader:
        """Return the app's SYN (and count it in sequence space)."""
        ts = (self.tsval, 0) if self.tsval is not None else None
        hdr = TcpHeader(
            40000,
            443,
            self.isn,
            0,
            SYN,
            self.window,
            options=TcpOptions(self.mss, self.wscale, self.sack, (), ts),
        )
        self.nxt = s(self.isn + 1)
        return hdr

    def seg(
        self,
        flags: int = ACK,
        data: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        sack: tuple[tuple[int, int], ...] = (),
        tsval: int | None = None,
    ) -> tuple[TcpHeader, bytes]:
        """Build a segment; with the default seq it advances the app's SND.NXT."""
        if seq is None:
            seq = self.nxt
            self.nxt = s(self.nxt + len(data) + (1 if flags & (SYN | FIN) else 0))
        if tsval is None:
            tsval = self.tsval
        ts = (tsval, self.ts_recent) if tsval is not None else None
        hdr = TcpHeader(
            40000,
            443,
            seq,
            self.rcv_nxt if ack is None else ack,
            flags,
            self.window if window is None else window,
            options=TcpOptions(sack_blocks=sack, timestamp=ts),
        )
        return hdr, data

    def absorb(self, segments: list[tuple[TcpHeader, bytes | bytearray]]) -> list[Seg]:
        """Read our segments as the app would; return their comparable view."""
        out = []
        for hdr, payload in segments:
            if not hdr.flags & RST:
                end = s(hdr.seq + len(payload) + (1 if hdr.flags & (SYN | FIN) else 0))
                if hdr.flags & SYN or hdr.seq == self.rcv_nxt:
                    self.rcv_nxt = end
                if hdr.options.timestamp is not None:
                    self.ts_recent = hdr.options.timestamp[0]
            out.append(seg_of(hdr, bytes(payload)))
        return out


def open_pair(
    server_cfg: TcpConfig, client_cfg: TcpConfig, now: float = 0.0
) -> tuple[TcpConnection, TcpConnection]:
    """Return (server, client), both ESTABLISHED with each other."""
    c_iss, s_iss = APP_ISN, SRV_ISS
    c_shift = window_shift(client_cfg.rcv_buf) if client_cfg.window_scaling else None
    c_ts = (int(now * 1000) + c_iss) & MASK
    syn = TcpHeader(
        KEY.app_port,
        KEY.remote_port,
        c_iss,
        0,
        SYN,
        65535,
        options=TcpOptions(
            client_cfg.mss,
            c_shift,
            client_cfg.sack,
            (),
            (c_ts, 0) if client_cfg.timestamps else None,
        ),
    )
    server = TcpConnection(KEY, syn, s_iss, now, server_cfg)
    [(synack, _)] = server.segments_to_send(now)
    mirror = FlowKey(KEY.remote_addr, KEY.remote_port, KEY.app_addr, KEY.app_port)
    fake_syn = synack._replace(flags=SYN, ack=0)
    client = TcpConnection(mirror, fake_syn, c_iss, now, client_cfg)
    [(c_synack, _)] = client.segments_to_send(now)
    s_ts = synack.options.timestamp
    s_shift = synack.options.wscale or 0
    c_shift = c_synack.options.wscale or 0
    client.segment_received(
        TcpHeader(
            443,
            40000,
            s(s_iss + 1),
            s(c_iss + 1),
            ACK,
            min(0xFFFF, server_cfg.rcv_buf >> s_shift),
            options=TcpOptions(timestamp=(s_ts[0], c_ts) if s_ts else None),
        ),
        b"",
        now,
    )
    server.segment_received(
        TcpHeader(
            40000,
            443,
            s(c_iss + 1),
            s(s_iss + 1),
            ACK,
            min(0xFFFF, client_cfg.rcv_buf >> c_shift),
            options=TcpOptions(timestamp=(c_ts, s_ts[0]) if s_ts else None),
        ),
        b"",
        now,
    )
    client.segments_to_send(now)
    server.segments_to_send(now)
    return server, client


class LossyLink:
    """Two one-way paths with seeded loss, duplication, reordering and delay.

    With `rate` (octets per second), each path is also a bottleneck: a
    segment (payload plus 40 octets of headers) waits for those ahead of it
    to be sent, and is dropped when more than `buffer` octets are queued
    (tail drop, counted in `overflows`), as at a router with a full queue.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.005,
        rate: float | None = None,
        buffer: int = 64 * 1024,
    ) -> None:
        self.rng = rng
        self.loss = loss
        self.dup = dup
        self.reorder = reorder
        self.delay = delay
        self.rate = rate
        self.buffer = buffer
        self.queue: list[tuple[float, int, int, TcpHeader, bytes]] = []
        self.count = 0
        self.dropped = 0
        self.overflows = 0
        self._busy_until = [0.0, 0.0]

    def put(self, now: float, dst: int, hdr: TcpHeader, payload: bytes) -> None:
        """Send a segment towards endpoint `dst` (0 = server, 1 = client)."""
        rng = self.rng
        start = now
        if self.rate is not None:
            size = len(payload) + 40
            busy = max(now, self._busy_until[dst])
            if (busy - now) * self.rate + size > self.buffer:
                self.overflows += 1
                return
            start = self._busy_until[dst] = busy + size / self.rate
        if rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if rng.random() < self.dup else 1
        for _ in range(copies):
            delay = self.delay + start - now
            if rng.random() < self.reorder:
                delay += rng.random() * 4 * self.delay
            self.count += 1
            heapq.heappush(self.queue, (now + delay, self.count, dst, hdr, payload))

    def next_arrival(self) -> float | None:
        """Return when the next segment arrives."""
        return self.queue[0][0] if self.queue else None

    def due(self, now: float) -> list[tuple[int, TcpHeader, bytes]]:
        """Pop every segment that has arrived by `now`."""
        out = []
        while self.queue and self.queue[0][0] <= now:
            _, _, dst, hdr, payload = heapq.heappop(self.queue)
            out.append((dst, hdr, payload))
        return out


class Endpoint:
    """One side of a transfer: what it must send, and what it received."""

    def __init__(self, conn: TcpConnection, data: bytes, read_chunk: int | None = None) -> None:
        self.conn = conn
        self.data = data
        self.sent = 0
        self.closed = False
        self.received = bytearray()
        self.events: list[type] = []
        self.read_chunk = read_chunk

    def pump(self) -> None:
        """Offer data while the send buffer takes it, close at the end, read events."""
        conn = self.conn
        while self.sent < len(self.data):
            n = conn.send(memoryview(self.data)[self.sent : self.sent + 65536])
            if n == 0:
                break
            self.sent += n
        if self.sent == len(self.data) and not self.closed:
            conn.close()
            self.closed = True
        for ev in drain(conn):
            self.events.append(type(ev))
            if isinstance(ev, DataReceived):
                self.received += ev.data

    def finished(self) -> bool:
        """Return True once both directions ended cleanly for this side."""
        return Closed in self.events and EofReceived in self.events


def run_transfer(
    seed: int,
    a_data: bytes,
    b_data: bytes,
    *,
    loss: float = 0.0,
    dup: float = 0.0,
    reorder: float = 0.0,
    server_cfg: TcpConfig | None = None,
    client_cfg: TcpConfig | None = None,
    time_limit: float = 600.0,
    delay: float = 0.005,
    link: LossyLink | None = None,
) -> tuple[Endpoint, Endpoint, float]:
    """Transfer `a_data` client->server and `b_data` server->client; return ends and end time.

    `link` replaces the link built from `loss`, `dup`, `reorder` and `delay`.
    """
    server_cfg = server_cfg or TcpConfig()
    client_cfg = client_cfg or TcpConfig()
    server, client = open_pair(server_cfg, client_cfg)
    if link is None:
        link = LossyLink(random.Random(seed), loss=loss, dup=dup, reorder=reorder, delay=delay)
    ends = [Endpoint(server, b_data), Endpoint(client, a_data)]
    now = 0.0
    while now < time_limit:
        for dst, hdr, payload in link.due(now):
            ends[dst].conn.segment_received(hdr, payload, now)
        for i, end in enumerate(ends):
            deadline = end.conn.next_deadline()
            if deadline is not None and deadline <= now:
                end.conn.handle_timeout(now)
            end.pump()
            for hdr, payload in end.conn.segments_to_send(now):
                link.put(now, 1 - i, hdr, payload)
        if all(e.finished() for e in ends) and not link.queue:
            break
        candidates = [link.next_arrival()] + [e.conn.next_deadline() for e in ends]
        upcoming = [c for c in candidates if c is not None]
        if not upcoming:
            break
        now = max(now, min(upcoming))
    return ends[0], ends[1], now


__all__ = [
    "ACK",
    "APP_ISN",
    "FIN",
    "KEY",
    "KEY6",
    "RST",
    "SRV_ISS",
    "SYN",
    "App",
    "Closed",
    "ConnectionReset",
    "DataReceived",
    "Endpoint",
    "EofReceived",
    "LossyLink",
    "Seg",
    "drain",
    "open_pair",
    "run_transfer",
    "s",
    "seg_of",
]
