"""The demux's moved deadline against its heap: a timer kept from
`take_moved_deadline` is never later than `next_deadline`.

A runtime sleeps until `next_deadline`, then, after each output
collection, pulls its sleep earlier only by what `take_moved_deadline`
reports (tun2sx.dataplane.engine). Hypothesis drives several flows
through handshakes, data both ways, ACKs, FINs, resets, aborts and
timeouts; after every collection the timer so kept must come no later
than the heap's own answer, or a retransmission would be late.
"""

from __future__ import annotations

import math

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from stack.tcp import ConnectionRequest, FlowKey, TcpConfig, TcpDemux, TcpState
from stack.wire.tcp import DataRun

from .helpers import ACK, FIN, KEY, RST, SRV_ISS, App, drain

PORTS = (40000, 40001, 40002)


def key(port: int) -> FlowKey:
    return KEY._replace(app_port=port)


class TimerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.demux = TcpDemux(TcpConfig())
        self.apps: dict[int, App] = {}
        self.now = 0.0
        self.timer = math.inf
        self.restart_timer()

    def restart_timer(self) -> None:
        """What the engine's timer task does at the start of each sleep."""
        deadline = self.demux.next_deadline()
        self.demux.take_moved_deadline()
        self.timer = math.inf if deadline is None else deadline

    def collect(self) -> None:
        """What the engine's flush does: output, then the moved deadline."""
        if not self.demux.has_output():
            return
        for k, hdr, payload in self.demux.output(self.now):
            app = self.apps.get(k.app_port)
            if app is not None:
                segments = hdr.segments() if type(hdr) is DataRun else [(hdr, payload)]
                app.absorb([(h, bytes(p)) for h, p in segments])
        moved = self.demux.take_moved_deadline()
        if moved is not None and moved < self.timer:
            self.timer = moved

    @rule(port=st.sampled_from(PORTS))
    def app_connects(self, port: int) -> None:
        if port in self.apps:
            return
        app = App()
        got = self.demux.segment_received(key(port), app.syn(), b"", self.now)
        if isinstance(got, ConnectionRequest):
            self.demux.accept(key(port), SRV_ISS, self.now)
            self.apps[port] = app

    @rule(port=st.sampled_from(PORTS), size=st.integers(0, 3000), fin=st.booleans())
    def app_sends(self, port: int, size: int, fin: bool) -> None:
        app = self.apps.get(port)
        if app is not None:
            hdr, payload = app.seg(ACK | (FIN if fin else 0), bytes(size))
            self.demux.segment_received(key(port), hdr, payload, self.now)

    @rule(port=st.sampled_from(PORTS))
    def app_resets(self, port: int) -> None:
        app = self.apps.pop(port, None)
        if app is not None:
            self.demux.segment_received(key(port), *app.seg(RST), self.now)

    @rule(port=st.sampled_from(PORTS), size=st.integers(0, 20_000), close=st.booleans())
    def runtime_sends(self, port: int, size: int, close: bool) -> None:
        conn = self.demux.connections.get(key(port))
        if conn is None or conn.state is not TcpState.ESTABLISHED:
            return
        conn.send(bytes(size))
        drain(conn)
        if close:
            conn.close()

    @rule(port=st.sampled_from(PORTS))
    def runtime_aborts(self, port: int) -> None:
        conn = self.demux.connections.get(key(port))
        if conn is not None:
            conn.abort()

    @rule(step=st.floats(0, 2))
    def time_passes(self, step: float) -> None:
        self.now += step

    @rule()
    def flush(self) -> None:
        self.collect()

    @rule()
    def timer_fires(self) -> None:
        if self.timer <= self.now:
            self.demux.handle_timeout(self.now)
            self.collect()
            self.restart_timer()

    @invariant()
    def timer_is_never_late(self) -> None:
        # Between flushes the engine's timer may be behind (the flush comes);
        # after one, it must not be.
        if self.demux.has_output():
            return
        deadline = self.demux.next_deadline()
        assert deadline is None or self.timer <= deadline


TimerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestTimerMachine = TimerMachine.TestCase
