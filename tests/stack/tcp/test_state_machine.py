"""Hypothesis rule-based testing of one connection against a scripted application.

The application sends slices of a known stream in any order (and again),
acknowledges any amount of our data, SACKs, closes, resets; time jumps to
deadlines; the runtime sends, reads and closes. Everything is judged from
outside: every payload we send is exactly the runtime's bytes at its
offset, our acknowledgement never moves back nor past what the application
sent, delivered data is exactly a prefix of the stream (never twice, never
out of order), and nothing but LocalProtocolError escapes.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stack.errors import LocalProtocolError
from stack.tcp import DataReceived, EofReceived, TcpState

from .fixtures import established
from .helpers import ACK, APP_ISN, FIN, RST, SRV_ISS, SYN, drain, s

STREAM = bytes(i % 251 for i in range(200_000))


class ConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conn, self.app = established()
        self.now = 0.01
        self.delivered = bytearray()
        self.eof = False
        self.app_fin_sent = False
        self.highest = 0  # highest stream offset the app has sent
        self.queued = bytearray()  # what the runtime's send() accepted
        self.close_called = False
        self.snd_una = 1  # our send positions as the app last acknowledged them
        self.snd_max = 1  # and the highest it has seen us send
        self.ack_seen = 1  # our acknowledgement, relative to the app's ISN

    def feed(
        self,
        flags: int,
        seq: int,
        data: bytes = b"",
        ack: int | None = None,
        sack: tuple[tuple[int, int], ...] = (),
    ) -> None:
        hdr, payload = self.app.seg(flags, data, seq=seq, ack=ack, sack=sack)
        self.conn.segment_received(hdr, payload, self.now)

    @rule(offset=st.integers(0, 30_000), length=st.integers(0, 3000), fin=st.booleans())
    def app_sends(self, offset: int, length: int, fin: bool) -> None:
        offset = min(offset, self.highest + 2000)
        data = STREAM[offset : offset + length]
        fin = fin and not self.app_fin_sent and offset + len(data) >= self.highest
        if fin:
            self.app_fin_sent = True
        self.highest = max(self.highest, offset + len(data))
        self.feed(ACK | (FIN if fin else 0), s(APP_ISN + 1 + offset), data)

    @rule(fraction=st.floats(0, 1), window=st.integers(0, 600), sack=st.booleans())
    def app_acks(self, fraction: float, window: int, sack: bool) -> None:
        ack = self.snd_una + int((self.snd_max - self.snd_una) * fraction)
        blocks: tuple[tuple[int, int], ...] = ()
        if sack and self.snd_max - ack > 2000:
            blocks = ((s(SRV_ISS + ack + 1000), s(SRV_ISS + self.snd_max)),)
        self.snd_una = ack
        self.app.window = window
        self.feed(ACK, self.app.nxt, ack=s(SRV_ISS + ack), sack=blocks)

    @rule(delta=st.integers(-5, 5))
    def app_resets_or_syns(self, delta: int) -> None:
        flags = RST if delta % 2 else SYN
        self.feed(flags, s(self.ack_seen + APP_ISN + delta))

    @rule(data=st.binary(max_size=5000))
    def runtime_sends(self, data: bytes) -> None:
        try:
            accepted = self.conn.send(data)
        except LocalProtocolError:
            assert self.close_called
        else:
            assert 0 <= accepted <= len(data)
            self.queued += data[:accepted]

    @rule()
    def runtime_closes(self) -> None:
        self.conn.close()
        self.close_called = True

    @precondition(lambda self: self.conn.state is not TcpState.CLOSED)
    @rule(small=st.booleans())
    def time_passes(self, small: bool) -> None:
        deadline = self.conn.next_deadline()
        self.now = self.now + 0.001 if small or deadline is None else max(self.now, deadline)
        self.conn.handle_timeout(self.now)

    @rule()
    def output_and_events(self) -> None:
        for hdr, payload in self.conn.segments_to_send(self.now):
            assert len(payload) <= 1000
            assert not (hdr.flags & SYN and hdr.flags & (FIN | RST))
            if hdr.flags & RST:
                continue
            # Our data is exactly what the runtime queued, at its offset.
            pos = s(hdr.seq - SRV_ISS)
            if payload:
                assert bytes(payload) == self.queued[pos - 1 : pos - 1 + len(payload)]
            self.snd_max = max(self.snd_max, pos + len(payload) + (1 if hdr.flags & FIN else 0))
            # RCV.NXT never moves back, nor past what the application sent
            # (its SYN, the stream, and its FIN).
            ack = s(hdr.ack - APP_ISN)
            assert self.ack_seen <= ack <= self.highest + 2
            self.ack_seen = ack
        for ev in drain(self.conn):
            if isinstance(ev, DataReceived):
                assert not self.eof
                self.delivered += ev.data
            elif isinstance(ev, EofReceived):
                assert not self.eof
                self.eof = True

    @invariant()
    def delivered_is_a_prefix_of_the_stream(self) -> None:
        assert self.delivered == STREAM[: len(self.delivered)]


ConnectionMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestConnectionMachine = ConnectionMachine.TestCase
