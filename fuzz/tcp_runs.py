"""Fuzz the batch paths of one TCP connection against the one-by-one path.

Twin connections get the same program: segments from the application,
gathered into batches, time passing, sends, reads. One twin takes every
segment through `segment_received` and builds its output with
`segments_to_send`; the other takes a batch as `NetStack.receive_batch`
hands a flow's segments over (runs of pure ACKs to `acks_received`, runs of
data to `data_received_run`, anything else one by one) and builds its
output with `output`, runs of full segments as `DataRun` items. Invariant:
after every step both twins say and do the same: the segments sent
(a `DataRun` read as its segments), the events, the state, the next
deadline and the statistics (but the count of skipped ACKs).
"""

from __future__ import annotations

import contextlib
import sys

from fuzz.segments import ByteReader
from stack.errors import LocalProtocolError
from stack.tcp import NEED_DATA, FlowKey, TcpConfig, TcpConnection
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, DataRun, TcpHeader, TcpOptions

KEY = FlowKey(b"\x0a\x00\x00\x02", 40000, b"\xc6\x12\x00\x05", 443)
CONFIG = TcpConfig(mss=600, rcv_buf=20_000, snd_buf=60_000, max_ooo_bytes=8000, max_ooo_ranges=8)
APP_ISN = 0xFFFFFF00
ISS = 0xFFFFFFF0
# Mostly what a bulk transfer carries; now and then FIN, RST, URG, ECE.
_FLAGS = (ACK,) * 12 + (ACK | PSH,) * 3 + (ACK | FIN, RST, ACK | 0x20, ACK | 0x40)
Segments = list[tuple[TcpHeader, bytes]]


def _feed_as_batch(conn: TcpConnection, batch: Segments, now: float) -> None:
    """The flow's share of `NetStack.receive_batch`: runs of pure ACKs and of data."""
    acks: list[TcpHeader] = []
    data: Segments = []
    for hdr, payload in batch:
        plain = not hdr.options.sack_blocks
        if not payload and hdr.flags == ACK and plain:
            if data:
                conn.data_received_run(data, now)
                data = []
            acks.append(hdr)
            continue
        if acks:
            conn.acks_received(acks, now)
            acks = []
        if payload and hdr.flags in (ACK, ACK | PSH) and plain:
            data.append((hdr, payload))
            continue
        if data:
            conn.data_received_run(data, now)
            data = []
        conn.segment_received(hdr, payload, now)
    if data:
        conn.data_received_run(data, now)
    if acks:
        conn.acks_received(acks, now)


def _observe(one: TcpConnection, batch: TcpConnection, now: float) -> Segments:
    """Assert the twins agree; return the segments they sent."""
    sent = [(hdr, bytes(payload)) for hdr, payload in one.segments_to_send(now)]
    runs: Segments = []
    for hdr, payload in batch.output(now):
        if isinstance(hdr, DataRun):
            runs += [(h, bytes(p)) for h, p in hdr.segments()]
        else:
            runs.append((hdr, bytes(payload)))
    assert sent == runs
    for conn in (one, batch):
        while conn.next_event() is not NEED_DATA:
            pass
    assert one.state is batch.state
    assert one.next_deadline() == batch.next_deadline()
    assert one.statistics() == batch.statistics()._replace(acks_coalesced=0)
    return sent


def TestOneInput(data: bytes) -> None:
    r = ByteReader(data)
    sack = bool(r.num(1) & 1)
    stamps = bool(r.num(1) & 1)
    syn_opts = TcpOptions(
        mss=1460, wscale=r.num(1) % 9, sack_permitted=sack, timestamp=(5, 0) if stamps else None
    )
    syn = TcpHeader(40000, 443, APP_ISN, 0, SYN, 65535, options=syn_opts)
    one, batch = (TcpConnection(KEY, syn, ISS, 0.0, CONFIG) for _ in range(2))
    now = 0.0
    app_next = (APP_ISN + 1) & 0xFFFFFFFF
    # Our sequence space as offsets from ISS: what we sent, what the
    # application acknowledges (SYN-ACK included).
    sent = acked = 1
    tsval = 5
    pending: Segments = []
    while r.more():
        action = r.num(1) % 8
        if action <= 3:
            flags = _FLAGS[r.num(1) % len(_FLAGS)]
            mode = r.num(1)
            seq = app_next if mode < 200 else (app_next + (mode - 228) * 50) & 0xFFFFFFFF
            mode = r.num(1)
            if mode < 120:  # on towards what we sent, 300 octets a step
                acked = min(acked + 300 * (mode % 5), sent)
            at = acked if mode < 240 else acked + (mode - 248) * 300
            ack = (ISS + at) & 0xFFFFFFFF
            size = r.num(2) % 1300 if r.num(1) & 1 else 0
            payload = bytes([mode]) * size
            tsval += r.num(1) % 3
            ts = ((tsval - 50 if r.num(1) == 0 else tsval) & 0xFFFFFFFF, 0) if stamps else None
            blocks: tuple[tuple[int, int], ...] = ()
            if r.num(1) < 30:
                left = (ISS + acked + 600 * (1 + r.num(1) % 8)) & 0xFFFFFFFF
                blocks = ((left, (left + 600) & 0xFFFFFFFF),)
            window = (0, 1, 300, 65535, 65535, 65535, 65535, 65535)[r.num(1) % 8]
            options = TcpOptions(sack_blocks=blocks, timestamp=ts)
            pending.append(
                (TcpHeader(40000, 443, seq, ack, flags, window, options=options), payload)
            )
            if seq == app_next and not flags & RST:
                app_next = (app_next + size + (1 if flags & FIN else 0)) & 0xFFFFFFFF
            continue
        if action == 4:
            for hdr, payload in pending:
                one.segment_received(hdr, payload, now)
            _feed_as_batch(batch, pending, now)
            pending = []
        elif action == 5:
            deadline = one.next_deadline()
            now = deadline if deadline is not None and r.num(1) & 1 else now + r.num(1) / 200
            one.handle_timeout(now)
            batch.handle_timeout(now)
        elif action == 6:
            size = r.num(2) % 40_000
            for conn in (one, batch):
                with contextlib.suppress(LocalProtocolError):
                    conn.send(bytes(size))
        elif r.num(1) < 32:
            one.close()
            batch.close()
        for hdr, payload in _observe(one, batch, now):
            if not hdr.flags & RST:
                end = (
                    hdr.seq - ISS + len(payload) + (1 if hdr.flags & (SYN | FIN) else 0)
                ) & 0xFFFFFFFF
                sent = max(sent, end)


if __name__ == "__main__":
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
