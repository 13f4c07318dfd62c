"""A download's steps taken at the round's end agree with the task's own.

While other flows are active the engine passes a download's reads on at the
end of trio's rounds (`Engine.bulk_step` calls the splice's step), a
duplicate of what the download's task does itself. Whatever the outbound
delivers in whatever pieces, whatever the application's window takes, and
however many of the steps run at a round's end before the task goes on,
the application gets the same bytes in the same order, the outbound's EOF
as a FIN behind them (or its reset as a break after them), and the flow's
byte count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from outbounds.base import Destination, NowaitStream
from tun2sx.dataplane.context import FlowInfo
from tun2sx.dataplane.splice import splice


class _Outbound(NowaitStream):
    """Delivers `payload` as it "arrives", then its EOF or a reset."""

    def __init__(self, payload: bytes, arrivals: list[int], reset: bool) -> None:
        self.payload = payload
        self.arrivals: Iterator[int] = iter(arrivals)
        self.arrived = 0
        self.taken = 0
        self.reset = reset
        self.eof_sent = False

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        # Each look finds what arrived since the last (0: nothing new).
        step = next(self.arrivals, None)
        self.arrived = len(self.payload) if step is None else self.arrived + step
        self.arrived = min(self.arrived, len(self.payload))
        if self.taken < self.arrived:
            end = min(self.arrived, self.taken + max_bytes)
            data = self.payload[self.taken : end]
            self.taken = end
            return data
        if self.arrived < len(self.payload):
            return None
        if self.reset:
            self.reset = False  # a socket reports its reset once, then EOF
            raise trio.BrokenResourceError("connection reset")
        return b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        while (data := self.receive_nowait(max_bytes or 65536)) is None:
            pass
        return data

    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        return len(data)

    def send_eof_nowait(self) -> None:
        self.eof_sent = True

    def close_now(self) -> None:
        pass

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.eof_sent = True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _App(NowaitStream):
    """An application that sent its EOF, and whose window takes what it
    takes at each send (then the rest waits for `send_all`)."""

    def __init__(self, windows: list[int]) -> None:
        self.windows: Iterator[int] = iter(windows)
        self.got = bytearray()
        self.eof = False

    def send_nowait(self, data: bytes | bytearray | memoryview, *, eof: bool = False) -> int:
        assert not self.eof
        taken = min(len(data), next(self.windows, len(data)))
        self.got += data[:taken]
        if eof and taken == len(data):
            self.eof = True
        return taken

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        assert not self.eof
        self.got += data

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        return b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    def send_eof_nowait(self) -> None:
        self.eof = True

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.eof = True

    def close_now(self) -> None:
        pass

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _rounds(plan: list[int]) -> tuple[Callable[..., object], list[int]]:
    """A `bulk_step` that, per call, runs the step at up to `plan`'s next
    count of round ends (0: the task goes on at once), as the engine does
    while others are active (and stops at once when they go quiet)."""
    taken: list[int] = []
    counts = iter(plan)

    async def bulk_step(step: Callable[[], bool], read: int | None) -> None:
        rounds = next(counts, 0)
        if not rounds:
            if read is None:
                await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint()
        for _ in range(rounds):
            taken.append(1)
            if not step():
                return

    return bulk_step, taken


@settings(max_examples=300)
@given(
    size=st.integers(0, 300_000),
    arrivals=st.lists(st.integers(0, 70_000), max_size=40),
    windows=st.lists(st.integers(0, 70_000), max_size=40),
    plan=st.lists(st.integers(0, 4), max_size=40),
    reset=st.booleans(),
    read=st.sampled_from([1000, 16384, 65536]),
)
def test_steps_at_the_round_end_pass_on_what_the_task_would(
    size: int,
    arrivals: list[int],
    windows: list[int],
    plan: list[int],
    reset: bool,
    read: int,
) -> None:
    payload = bytes(i % 251 for i in range(size))
    results = []
    for bulk in (False, True):
        outbound = _Outbound(payload, arrivals, reset)
        app = _App(windows)
        info = FlowInfo("tcp", "10.0.0.2:40000", Destination("example.test", 80), "proxy", 0.0)
        bulk_step, _ = _rounds(plan)

        async def main() -> None:
            await splice(  # each run awaits its own (B023)
                app,  # noqa: B023
                outbound,  # noqa: B023
                65536,
                info,  # noqa: B023
                lambda: read,
                bulk_step if bulk else None,  # type: ignore[arg-type]  # noqa: B023
            )

        trio.run(main)
        # (A reset breaks the flow: whether the upload's EOF went before
        # is a matter of task order, not of the download.)
        results.append((bytes(app.got), app.eof, info.bytes_down, outbound.eof_sent or reset))
    plain, stepped = results
    assert stepped == plain
    assert plain == (payload, not reset, size, True)


def test_a_download_with_room_everywhere_is_passed_on_by_the_steps() -> None:
    """The comparison above is not of two runs of the task: with data
    always waiting and a window that takes it, the steps pass it on."""
    payload = bytes(range(256)) * 1000
    outbound = _Outbound(payload, [70_000] * 10, reset=False)
    app = _App([])
    bulk_step, taken = _rounds([4] * 20)

    async def main() -> None:
        await splice(app, outbound, 16384, None, None, bulk_step)  # type: ignore[arg-type]

    trio.run(main)
    assert bytes(app.got) == payload and app.eof
    assert len(taken) >= len(payload) // 16384 - 4
