"""tun2sx with a per-connection timeline recorder wrapped around it (bench only).

    TIMELINE_OUT=/path/file.json python -m tests.bench.timeline_hooks TUN2SX-ARGS...

Runs the command line like `python -m tun2sx`, after wrapping the few
places a TCP flow passes: the SYN reaching `TcpFlows.start`, the flow task
starting, the outbound's connect (as the SOCKS5 dialer calls it), each send,
receive, EOF and close on the outbound socket, the SYN-ACK going out in
`_accept`, and the flow's end. Each event is a `time.perf_counter()` stamp
in the flow's list; trio's I/O waits (when the process sleeps in epoll) and
every TUN write go into one list beside them. Everything is written as JSON
at exit. tests/bench/timeline.py runs it and reads the result.

The wrappers reach into private methods on purpose: they measure where a
connection's time goes without leaving a switch in the hot path. A rename
there breaks this tool, not tun2sx.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from outbounds import net, socks5
from tun2sx.control.cli import main
from tun2sx.dataplane import engine as engine_module
from tun2sx.dataplane import tcpflow, tun

Events = list[tuple[str, float]]

_now = time.perf_counter
_flows: list[Events] = []
_io: Events = []  # "wait" / "woke" around epoll sleeps, "tun write" per packet
_current: contextvars.ContextVar[Events | None] = contextvars.ContextVar("flow", default=None)
_by_socket: dict[int, Events] = {}


_syn_at: dict[Any, float] = {}
_original_start = tcpflow.TcpFlows.start
_run_guarded = tcpflow.TcpFlows._run_guarded


def _start(self: tcpflow.TcpFlows, request: Any) -> None:
    _syn_at[request.key] = _now()
    _original_start(self, request)


async def _traced_run_guarded(
    self: tcpflow.TcpFlows, request: Any, *args: Any, **kwargs: Any
) -> None:
    # The wrapped methods' other arguments are passed through as they
    # come: a new one there (the SYN's time was one) must not break the
    # wrapper.
    events: Events = [("syn", _syn_at.pop(request.key, _now())), ("task", _now())]
    _flows.append(events)
    _current.set(events)
    try:
        await _run_guarded(self, request, *args, **kwargs)
    finally:
        events.append(("end", _now()))


_take_spare = socks5.Socks5Outbound._take_spare


async def _traced_take_spare(self: socks5.Socks5Outbound) -> Any:
    spare = await _take_spare(self)
    events = _current.get()
    if events is not None and spare is not None:
        events.append(("spare taken", _now()))
        _by_socket[id(spare[0])] = events
    return spare


_open_tcp = socks5.open_tcp


async def _traced_open_tcp(*args: Any, **kwargs: Any) -> net.TcpSocketStream:
    events = _current.get()
    if events is not None:
        events.append(("dial", _now()))
    stream = await _open_tcp(*args, **kwargs)
    if events is not None:
        events.append(("connected", _now()))
        _by_socket[id(stream)] = events
    return stream


def _mark(name: str, label: str, is_async: bool) -> None:
    """Record `label` in the flow's list each time the stream method returns."""
    inner: Callable[..., Any] = getattr(net.TcpSocketStream, name)

    def record(stream: net.TcpSocketStream) -> None:
        events = _by_socket.get(id(stream))
        if events is not None:
            events.append((label, _now()))

    if is_async:

        async def wrapper_async(self: net.TcpSocketStream, *args: Any, **kwargs: Any) -> Any:
            result = await inner(self, *args, **kwargs)
            record(self)
            return result

        setattr(net.TcpSocketStream, name, wrapper_async)
    else:

        def wrapper(self: net.TcpSocketStream, *args: Any, **kwargs: Any) -> Any:
            result = inner(self, *args, **kwargs)
            record(self)
            return result

        setattr(net.TcpSocketStream, name, wrapper)


_accept = tcpflow.TcpFlows._accept


def _traced_accept(self: tcpflow.TcpFlows, request: Any, *args: Any, **kwargs: Any) -> Any:
    stream = _accept(self, request, *args, **kwargs)
    events = _current.get()
    if events is not None:
        events.append(("syn-ack out", _now()))
    return stream


class _IoWaits(trio.abc.Instrument):
    def before_io_wait(self, timeout: float) -> None:
        _io.append(("wait", _now()))

    def after_io_wait(self, timeout: float) -> None:
        _io.append(("woke", _now()))


_write = tun.TunDevice.write


def _traced_write(self: tun.TunDevice, packet: Any) -> None:
    _write(self, packet)
    _io.append(("tun write", _now()))


_run = engine_module.Engine.run


async def _traced_run(self: engine_module.Engine, **kwargs: Any) -> None:
    trio.lowlevel.add_instrument(_IoWaits())
    await _run(self, **kwargs)


def recorded() -> dict[str, Any]:
    """What the wrappers recorded so far: each flow's events, and the I/O list."""
    return {"flows": _flows, "io": _io}


def _dump(path: str) -> None:
    with open(path, "w") as f:
        json.dump(recorded(), f)


def install(path: str) -> None:
    """Wrap the flow's waypoints; write the record to `path` at exit."""
    wrap()
    atexit.register(_dump, path)


def wrap() -> None:
    """Wrap the flow's waypoints (tests/bench/test_timeline_hooks.py puts
    the originals back)."""
    tcpflow.TcpFlows.start = _start  # type: ignore[method-assign]
    tcpflow.TcpFlows._run_guarded = _traced_run_guarded  # type: ignore[method-assign]
    socks5.Socks5Outbound._take_spare = _traced_take_spare  # type: ignore[method-assign]
    tcpflow.TcpFlows._accept = _traced_accept  # type: ignore[method-assign]
    socks5.open_tcp = _traced_open_tcp
    _mark("receive_after_wait", "proxy recv", True)
    _mark("receive_some", "proxy recv", True)
    _mark("send_nowait", "proxy send", False)
    _mark("send_eof_nowait", "proxy eof", False)
    _mark("close_now", "proxy close", False)
    tun.TunDevice.write = _traced_write  # type: ignore[method-assign]
    engine_module.Engine.run = _traced_run  # type: ignore[method-assign]


if __name__ == "__main__":
    install(os.environ["TIMELINE_OUT"])
    sys.exit(main())
