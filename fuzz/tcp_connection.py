"""Fuzz one TCP connection with random segments, timeouts, sends, reads and closes.

The input is a little program: each step picks an action from one byte and
takes its arguments from the following bytes. Segments carry random flags,
sequence and acknowledgement numbers near (or far from) the connection's
own, random windows, timestamps and SACK blocks. Invariant: nothing escapes
but `LocalProtocolError` from `send` after `close`, and every emitted header
serialises.
"""

from __future__ import annotations

import contextlib
import sys

from fuzz.segments import ByteReader
from stack.errors import LocalProtocolError
from stack.tcp import NEED_DATA, FlowKey, TcpConfig, TcpConnection
from stack.wire.tcp import SYN, TcpHeader, TcpOptions, emit_tcp_header

KEY = FlowKey(b"\x0a\x00\x00\x02", 40000, b"\xc6\x12\x00\x05", 443)
CONFIG = TcpConfig(mss=600, rcv_buf=20_000, snd_buf=20_000, max_ooo_bytes=8000, max_ooo_ranges=8)
APP_ISN = 0xFFFFFF00
ISS = 0xFFFFFFF0


def _near(r: ByteReader, base: int) -> int:
    mode = r.num(1)
    if mode < 200:
        return (base + (mode - 100) * 37) & 0xFFFFFFFF
    return r.num(4)


def TestOneInput(data: bytes) -> None:
    r = ByteReader(data)
    syn_opts = TcpOptions(
        mss=r.num(2) or None, wscale=r.num(1) % 16, sack_permitted=True, timestamp=(5, 0)
    )
    conn = TcpConnection(
        KEY, TcpHeader(40000, 443, APP_ISN, 0, SYN, 65535, options=syn_opts), ISS, 0.0, CONFIG
    )
    now = 0.0
    app_next = (APP_ISN + 1) & 0xFFFFFFFF
    our_next = (ISS + 1) & 0xFFFFFFFF
    while r.more():
        action = r.num(1) % 7
        if action <= 2:
            flags = r.num(1)
            seq = _near(r, app_next)
            ack = _near(r, our_next)
            payload = bytes(r.num(2) % 1500)
            ts = (r.num(1) + int(now * 10), r.num(4)) if r.num(1) & 1 else None
            blocks = ()
            if r.num(1) & 1:
                left = _near(r, our_next)
                blocks = ((left, (left + r.num(2)) & 0xFFFFFFFF),)
            hdr = TcpHeader(
                40000,
                443,
                seq,
                ack,
                flags,
                r.num(2),
                options=TcpOptions(sack_blocks=blocks, timestamp=ts),
            )
            conn.segment_received(hdr, payload, now)
        elif action == 3:
            deadline = conn.next_deadline()
            now = deadline if deadline is not None and r.num(1) & 1 else now + r.num(1) / 100
            conn.handle_timeout(now)
        elif action == 4:
            with contextlib.suppress(LocalProtocolError):
                conn.send(bytes(r.num(2) % 30_000))
        elif action == 5:
            while conn.next_event() is not NEED_DATA:
                pass
        else:
            if r.num(1) & 1:
                conn.close()
            elif r.num(1) & 1:
                conn.abort()
        for hdr, payload in conn.segments_to_send(now):
            emit_tcp_header(hdr)
            assert len(payload) <= 65535
            if hdr.flags & SYN:
                our_next = (hdr.seq + 1) & 0xFFFFFFFF
            else:
                our_next = (hdr.seq + len(payload)) & 0xFFFFFFFF
                app_next = hdr.ack


if __name__ == "__main__":
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
