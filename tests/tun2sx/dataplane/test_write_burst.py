"""A flow's long run of packets is written a burst per round, at the round's
end; a sparse flow's packet goes first."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import defaultdict

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from stack.netstack import GsoPacket
from stack.tcp import FlowKey, TcpConfig, TcpConnection
from stack.wire.tcp import SYN, TcpHeader
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine, burst_end
from tun2sx.dataplane.tun import RxPacket, TunDevice, TunError
from tun2sx.naming.router import Router

APP = socket.inet_aton("10.0.0.2")
REMOTE = socket.inet_aton("198.51.100.7")
BULK = FlowKey(APP, 40000, REMOTE, 5201)
SMALL = FlowKey(APP, 40001, REMOTE, 7001)


class _ScriptedStack:
    """What the engine asks of a `NetStack`, with the output a test hands it."""

    def __init__(self) -> None:
        self.output: list[tuple[FlowKey | None, list[bytes]]] = []
        self.tcp = self  # `reset_all` walks `stack.tcp.connections`
        self.connections: dict[FlowKey, _Connection] = {}
        # What the stack makes when it takes the next batch (an answer).
        self.on_read: list[tuple[FlowKey | None, list[bytes]]] = []

    def give(self, key: FlowKey | None, packets: list[bytes]) -> None:
        self.output.append((key, packets))

    def has_output(self) -> bool:
        return bool(self.output)

    def packets_by_flow(self, now: float) -> list[tuple[FlowKey | None, list[bytes]]]:
        out, self.output = self.output, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def take_moved_deadline(self) -> float | None:
        return None

    def receive_batch(self, batch: list[RxPacket], now: float) -> list[object]:
        # Every batch carries segments of both flows: they are both active.
        self.output += self.on_read
        self.on_read = []
        return [_connection(BULK), _connection(SMALL)] if batch else []


class _Connection:
    """A connection whose abort queues its RST, as a `TcpConnection` does."""

    def __init__(self, stack: _ScriptedStack, key: FlowKey, rst: bytes) -> None:
        self.stack, self.key, self.rst = stack, key, rst

    def abort(self) -> None:
        self.stack.give(self.key, [self.rst])


def _connection(key: FlowKey) -> TcpConnection:
    syn = TcpHeader(key.app_port, key.remote_port, 1, 0, SYN, 65535)
    return TcpConnection(key, syn, 1000, 0.0, TcpConfig())


class _Tun:
    """A device that reads what the test hands it and records what is written."""

    def __init__(self) -> None:
        self.written: list[bytes | GsoPacket] = []
        self.send, self.receive = trio.open_memory_channel[list[RxPacket] | OSError](1)
        self.refused: bytes | None = None  # a packet every write of which fails

    def read_ready(self, limit: int = 256) -> list[RxPacket]:
        return []  # nothing held outside read_batch

    async def read_batch(self) -> list[RxPacket]:
        batch = await self.receive.receive()
        if isinstance(batch, OSError):
            raise batch
        return batch

    async def both_flows_move(self) -> None:
        """A batch with segments of both flows (see `_ScriptedStack`)."""
        await self.send.send([RxPacket(memoryview(b"segments"), False)])
        await trio.testing.wait_all_tasks_blocked()

    def write(self, packet: bytes | GsoPacket) -> None:
        if packet == self.refused:
            # Not one of the errors a `TunDevice` drops and counts: it raises.
            raise OSError(errno.EINVAL, "Invalid argument")
        self.written.append(packet)


_SIZE = 100  # octets of each packet of a run
_BURST = 4 * _SIZE  # a burst: four packets of a run


def _packets(name: str, count: int) -> list[bytes]:
    return [f"{name}{i}".encode().ljust(_SIZE, b".") for i in range(count)]


async def test_a_long_run_leaves_a_burst_per_round_and_another_flow_goes_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A download's 10 segments: 4 (a burst's bytes) leave at the end of
    the round, the rest at the ends of the next ones; a round trip's
    answer made meanwhile leaves at once, not behind them, and the
    download's own next segment waits behind its run."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk, answer = _packets("bulk", 11), b"answer"
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        stack.give(BULK, bulk[:10])
        engine.flush()
        assert device.written == []
        stack.give(SMALL, [answer])
        stack.give(BULK, bulk[10:])
        engine.flush()
        assert device.written == [answer]
        await trio.lowlevel.checkpoint()  # the round ends
        assert device.written == [answer, *bulk[:4]]
        await trio.lowlevel.checkpoint()
        assert device.written == [answer, *bulk[:8]]
        await trio.testing.wait_all_tasks_blocked()
        assert device.written == [answer, *bulk]
        nursery.cancel_scope.cancel()


async def test_an_answer_goes_before_a_download_made_in_the_same_round(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Trio runs the tasks ready in a round in an order of its own (in
    turn forwards and backwards): whichever of a download's step and a
    round trip's step runs first, the answer leaves first, and the
    download's burst at the round's end."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 6)

    async def step(go: trio.Event, key: FlowKey, packets: list[bytes]) -> None:
        await go.wait()
        stack.give(key, list(packets))
        engine.flush()

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        for round_ in range(16):
            go, answer = trio.Event(), b"answer%d" % round_
            nursery.start_soon(step, go, BULK, bulk)
            nursery.start_soon(step, go, SMALL, [answer])
            await trio.testing.wait_all_tasks_blocked()
            del device.written[:]
            go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert device.written == [answer, *bulk]
        nursery.cancel_scope.cancel()


@given(
    sizes=st.lists(st.integers(1, 70_000), max_size=40),
    budget=st.integers(1, 200_000),
)
def test_a_burst_is_the_packets_that_start_within_its_bytes(sizes: list[int], budget: int) -> None:
    """A burst writes packets while fewer than its budget of bytes went
    before them: at least one packet, never a packet that starts past the
    budget; a super-segment counts its whole length."""
    packets: list[bytes | GsoPacket] = [
        GsoPacket(b"s" * n, 1500) if i % 2 else b"p" * n for i, n in enumerate(sizes)
    ]
    end = burst_end(packets, budget)
    before = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if not sizes:
        assert end == 0
        return
    assert 1 <= end <= len(sizes)
    assert all(before[i] < budget for i in range(1, end))  # each one started within it
    assert end == len(sizes) or before[end] >= budget  # the next would start past it


THIRD = FlowKey(APP, 40002, REMOTE, 443)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([BULK, SMALL, THIRD, None]),
            st.lists(st.integers(40, 9000), min_size=1, max_size=12),
            st.booleans(),  # the round ends after this step
        ),
        max_size=24,
    )
)
def test_every_packet_leaves_once_in_its_flows_order(
    steps: list[tuple[FlowKey | None, list[int], bool]],
) -> None:
    """Whatever runs the flows make, in whatever rounds: every packet is
    written once, each flow's in the order it made them; datagrams, and
    a flow's lone packet of up to 1500 octets when nothing of it waits,
    leave in the step that made them."""

    async def main() -> None:
        stack, device = _ScriptedStack(), _Tun()
        engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=3000))  # type: ignore[arg-type]
        made: dict[FlowKey | None, list[bytes]] = defaultdict(list)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await device.both_flows_move()
            for n, (key, sizes, round_ends) in enumerate(steps):
                packets = [b"%r-%d-%d-" % (key, n, i) for i in range(len(sizes))]
                packets = [p.ljust(size, b".") for p, size in zip(packets, sizes, strict=True)]
                waiting = set(made[key]) - set(device.written)
                made[key] += packets
                stack.give(key, list(packets))
                engine.flush()
                if key is None or (len(packets) == 1 and sizes[0] <= 1500 and not waiting):
                    assert set(packets) <= set(device.written)
                if round_ends:
                    await trio.lowlevel.checkpoint()
            await trio.testing.wait_all_tasks_blocked()
            written = device.written
            assert len(written) == len(set(written)) == sum(map(len, made.values()))
            for packets in made.values():
                mine = set(packets)
                assert [p for p in written if p in mine] == packets
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_super_segments_leave_one_per_round_beside_another_flow(
    autojump_clock: trio.abc.Clock,
) -> None:
    """With offload a download's window is a few 64 KiB super-segments,
    each as costly a write as a run of small packets of its size: under a
    burst of 48 KiB one leaves per round, and a round trip's answer made
    meanwhile goes before it, while packets of 1500 octets leave 33 a round
    under the same budget."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=48 * 1024))  # type: ignore[arg-type]
    supers = [GsoPacket(bytes([i]) * 65_000, 8960) for i in range(4)]
    small = [bytes([i]) * 1500 for i in range(40)]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        stack.give(BULK, list(supers))  # type: ignore[list-item]
        engine.flush()
        stack.give(SMALL, [b"answer"])
        engine.flush()
        assert device.written == [b"answer"]
        await trio.lowlevel.checkpoint()
        assert device.written == [b"answer", supers[0]]
        await trio.testing.wait_all_tasks_blocked()
        assert device.written == [b"answer", *supers]
        del device.written[:]
        stack.give(SMALL, list(small))
        engine.flush()
        await trio.lowlevel.checkpoint()
        assert device.written == small[:33]
        await trio.testing.wait_all_tasks_blocked()
        assert device.written == small
        nursery.cancel_scope.cancel()


async def test_runs_after_a_long_quiet_spell_still_leave_a_burst_per_round(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The round's end is taken off after a thousand rounds with nothing
    queued (so a trio round costs nothing more while no flow is paced),
    and put back by the next run that waits."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for name in ("before", "after"):
            await device.both_flows_move()
            run = _packets(name, 6)
            stack.give(BULK, list(run))
            engine.flush()
            await trio.lowlevel.checkpoint()
            assert device.written[-4:] == run[:4]
            await trio.lowlevel.checkpoint()
            assert device.written[-6:] == run
            for _ in range(1500):  # quiet rounds
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()


async def test_a_burst_of_zero_writes_whole_runs_while_crowded(
    autojump_clock: trio.abc.Clock,
) -> None:
    """`write_burst = 0` (`tun.write_burst`): a download's run goes out in
    the step that made it even with another flow active, and a reload
    that sets a burst paces the next run."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=0))  # type: ignore[arg-type]
    bulk = _packets("bulk", 40)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        stack.give(BULK, bulk[:20])
        engine.flush()
        assert device.written == bulk[:20]
        engine.config = EngineConfig(write_burst=_BURST)  # what a reload does
        stack.give(BULK, bulk[20:])
        engine.flush()
        assert device.written == bulk[:20]
        await trio.lowlevel.checkpoint()
        assert device.written == bulk[:24]
        await trio.testing.wait_all_tasks_blocked()
        assert device.written == bulk
        nursery.cancel_scope.cancel()


async def test_datagrams_and_a_lone_packet_leave_at_once_and_a_run_at_the_round_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    """UDP and ICMP never wait, nor does a flow's single packet of up to
    an MTU of 1500 (an answer, an ACK); a run within the burst leaves
    whole, at the end of the round."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        datagrams, run, lone = _packets("udp", 9), _packets("tcp", 4), b"x" * 1500
        stack.give(None, list(datagrams))
        stack.give(BULK, list(run))
        stack.give(SMALL, [lone])
        engine.flush()
        assert device.written == [*datagrams, lone]
        await trio.lowlevel.checkpoint()
        assert device.written == [*datagrams, lone, *run]
        nursery.cancel_scope.cancel()


async def test_a_flow_alone_writes_its_run_whole_and_in_bursts_once_others_move(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Pacing costs a trip through the scheduler per burst: a download with
    nothing beside it does not pay it, and stops paying a second after the
    others stopped moving."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        first = _packets("first", 10)
        stack.give(BULK, list(first))
        engine.flush()
        assert device.written == first
        await device.both_flows_move()
        second = _packets("second", 10)
        stack.give(BULK, list(second))
        engine.flush()
        assert device.written == first
        await trio.lowlevel.checkpoint()
        assert device.written == [*first, *second[:4]]
        await trio.sleep(1.5)
        assert device.written == [*first, *second]
        third = _packets("third", 10)
        stack.give(BULK, list(third))
        engine.flush()
        assert device.written == [*first, *second, *third]
        nursery.cancel_scope.cancel()


async def test_stopping_the_engine_writes_what_is_queued(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The queue is written before the engine goes, in order: the resets the
    engine sends last must not overtake a flow's data."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 10)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await device.both_flows_move()
            stack.give(BULK, list(bulk))
            engine.flush()
            scope.cancel()
    assert device.written == bulk


async def test_a_run_made_as_the_engine_stops_is_written_whole(
    autojump_clock: trio.abc.Clock,
) -> None:
    """What the last flush finds (the resets of every flow, data made just
    before) goes out in full, though the drain task is gone by then."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 10)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await device.both_flows_move()
            stack.give(BULK, list(bulk))
            scope.cancel()
    assert device.written == bulk


async def test_a_write_that_fails_in_the_drain_ends_the_engine_with_every_flow_reset_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An error the device does not absorb ends the engine, as it does in
    any other flush; as the engine stops, no packet the drain wrote goes
    out twice and the flow still gets its RST, last: without it the
    application retransmits into a TUN nobody reads until its own timeout."""
    stack, device = _ScriptedStack(), _Tun()
    stack.connections[BULK] = _Connection(stack, BULK, b"rst")
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 10)
    device.refused = bulk[6]
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await device.both_flows_move()
            stack.give(BULK, list(bulk))
            engine.flush()
            await trio.sleep_forever()
    assert raised.value.subgroup(lambda e: getattr(e, "errno", None) == errno.EINVAL)
    written = device.written
    assert len(set(written)) == len(written), written
    assert written[-1] == b"rst"
    assert written[:-1] == [p for p in bulk if p in written]  # in order


async def test_flows_with_queues_take_turns_a_burst_each(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two downloads' runs: a burst of each per round, the older flow
    first, so neither waits for the other's whole run."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    first, second = _packets("a", 10), _packets("b", 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        stack.give(BULK, list(first))
        stack.give(SMALL, list(second))
        engine.flush()
        await trio.testing.wait_all_tasks_blocked()
        assert device.written == [
            *first[:4],
            *second[:4],
            *first[4:8],
            *second[4:8],
            *first[8:],
            *second[8:],
        ]
        nursery.cancel_scope.cancel()


async def test_the_reader_takes_a_batch_and_answers_while_a_run_drains(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The drain writes a burst and lets the others run: a batch that
    arrives while a long run drains is answered before the run's end, and
    a datagram made meanwhile does not wait behind it."""
    stack, device = _ScriptedStack(), _ArrivingTun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 40)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        stack.give(BULK, list(bulk))
        engine.flush()
        stack.give(None, [b"datagram"])
        engine.flush()
        assert device.written == [b"datagram"]
        # A request arrives as the drain writes the run's ninth packet.
        stack.on_read = [(SMALL, [b"answer"])]
        device.arrives_after = bulk[8]
        await trio.testing.wait_all_tasks_blocked()
        written = device.written
        assert [p for p in written if p.startswith(b"bulk")] == bulk
        assert written.index(b"answer") < written.index(bulk[-1])
        nursery.cancel_scope.cancel()


class _ArrivingTun(_Tun):
    """A batch becomes readable right after a given packet is written."""

    arrives_after: bytes | None = None

    def write(self, packet: bytes) -> None:
        super().write(packet)
        if packet == self.arrives_after:
            self.send.send_nowait([RxPacket(memoryview(b"request"), False)])


async def test_a_flow_reset_as_the_engine_stops_gets_its_queued_data_then_its_rst(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The engine's own RST of a flow goes behind the flow's queued data,
    as a reset leaves behind what the kernel already handed to its device:
    the application reads what was sent, then sees the reset."""
    stack, device = _ScriptedStack(), _Tun()
    stack.connections[BULK] = _Connection(stack, BULK, b"rst")
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 10)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await device.both_flows_move()
            stack.give(BULK, list(bulk))
            engine.flush()
            scope.cancel()
    assert device.written == [*bulk, b"rst"]


async def test_a_tun_that_fails_ends_the_engine_after_the_queue_and_the_resets(
    autojump_clock: trio.abc.Clock,
) -> None:
    stack, device = _ScriptedStack(), _Tun()
    stack.connections[BULK] = _Connection(stack, BULK, b"rst")
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = _packets("bulk", 10)
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await device.both_flows_move()
            stack.give(BULK, list(bulk))
            engine.flush()
            await device.send.send(TunError("TUN device is gone"))
            await trio.sleep_forever()
    assert raised.value.subgroup(lambda e: isinstance(e, TunError))
    assert device.written == [*bulk, b"rst"]


async def test_a_full_device_queue_drops_queued_packets_and_the_engine_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A `TunDevice` whose queue is full drops and counts what the drain
    writes into it, as any write; every packet is either written once, in
    order, or counted as dropped, and the engine keeps serving."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = TunDevice(ours.detach(), name="fake0", mtu=1500, offload=False)
    stack = _ScriptedStack()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    bulk = [b"%04d" % i + b"b" * 1000 for i in range(1000)]  # more than the pair holds
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            theirs.send(b"segments")  # both flows move (see `_ScriptedStack`)
            await trio.testing.wait_all_tasks_blocked()
            stack.give(BULK, list(bulk))
            engine.flush()
            await trio.testing.wait_all_tasks_blocked()
            assert device.statistics_tx_drops > 0
            assert device.tx_packets + device.statistics_tx_drops == len(bulk)
            theirs.setblocking(False)
            received = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    received.append(theirs.recv(2000))
            assert len(received) == device.tx_packets
            assert received == [p for p in bulk if p in set(received)]  # in order
            stack.give(SMALL, [b"answer"])
            engine.flush()
            assert theirs.recv(2000) == b"answer"
            nursery.cancel_scope.cancel()
    finally:
        device.close()
        theirs.close()


async def test_a_queue_that_never_emptied_goes_whole_once_the_others_are_quiet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A download whose window keeps its queue full is paced only while
    others are active: once they have been quiet for the crowded time,
    the next round's end writes its queue whole."""
    stack, device = _ScriptedStack(), _Tun()
    engine = Engine(device, stack, Router(None), config=EngineConfig(write_burst=_BURST))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await device.both_flows_move()
        first = _packets("first", 10)
        stack.give(BULK, list(first))
        engine.flush()
        await trio.lowlevel.checkpoint()
        assert device.written == first[:4]
        # The others go quiet; no round ends meanwhile, and more of the
        # download joins its queue behind what is left.
        autojump_clock.jump(2.0)
        second = _packets("second", 10)
        stack.give(BULK, list(second))
        engine.flush()
        await trio.lowlevel.checkpoint()
        assert device.written == [*first, *second]
        nursery.cancel_scope.cancel()
