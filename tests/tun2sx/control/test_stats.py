"""Statistics: the loopback endpoint, the summary line, per-flow accounting, wiring."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from outbounds.base import Destination
from stack.netstack import NetStack, NetStackConfig
from tun2sx.control import app
from tun2sx.control.stats import (
    is_loopback_host,
    log_summaries,
    open_stats_listeners,
    parse_endpoint,
    parse_loopback_endpoint,
    summary_line,
)
from tun2sx.dataplane.context import FlowInfo
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.splice import splice
from tun2sx.naming.router import Router


class FakeEngine:
    def __init__(self) -> None:
        self.flows: set[FlowInfo] = set()
        self.counters = {"tcp_flows": 0, "tcp_flows_started": 0, "bytes_up": 0, "bytes_down": 0}

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)


def flow(
    host: str,
    started: float,
    up: int = 0,
    down: int = 0,
    sniffed: str | None = None,
    source: str = "none",
    **route: Any,
) -> FlowInfo:
    dest = Destination.parse_host(host, 443)
    info = FlowInfo(
        "tcp",
        "10.0.0.2:40000",
        dest,
        "proxy",
        started,
        sniffed=sniffed,
        host_source=source,
        **route,
    )
    info.bytes_up, info.bytes_down = up, down
    return info


# -- addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("127.8.0.1:0", ("127.8.0.1", 0)),
        ("[::1]:9090", ("::1", 9090)),
        ("localhost:80", ("127.0.0.1", 80)),
    ],
)
def test_loopback_endpoints(value: str, expected: tuple[str, int]) -> None:
    assert parse_loopback_endpoint(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.0.0.0:9090", "not a loopback address"),
        ("[::]:9090", "not a loopback address"),
        ("192.168.1.1:9090", "not a loopback address"),
        ("example.com:9090", "not an IP address or localhost"),
        ("9090", "expected HOST:PORT"),
        ("127.0.0.1:x", "bad port"),
        ("127.0.0.1:70000", "outside"),
    ],
)
def test_non_loopback_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loopback_endpoint(value)


# -- the controller's address ---------------------------------------------------


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:9090", True),
        ("localhost", True),
        ("[::1]:9090", True),
        ("::1", True),
        ("evil.example:9090", False),
        ("evil.example", False),
        ("[2001:db8::1]:80", False),
    ],
)
def test_rebinding_host_headers_are_told_apart(host: str, allowed: bool) -> None:
    assert is_loopback_host(host) is allowed


def test_any_address_with_a_secret() -> None:
    assert parse_endpoint("0.0.0.0:9090", any_address=True) == ("0.0.0.0", 9090)
    with pytest.raises(ValueError, match="without a secret"):
        parse_endpoint("0.0.0.0:9090", any_address=False)
    public = app.Settings(stats_listen="192.0.2.1:9090")
    with pytest.raises(app.ConfigError, match=r"^stats_listen: 192\.0\.2\.1 is not a loopback"):
        app.check_settings(public)
    app.check_settings(attrs.evolve(public, secret="s3cret"))
    with pytest.raises(app.ConfigError, match=r"^secret: must be") as caught:
        app.check_settings(attrs.evolve(public, secret="two words"))
    assert "two words" not in str(caught.value)
    assert "s3cret" not in repr(attrs.evolve(public, secret="s3cret"))


async def http_get(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        chunks = []
        while data := await stream.receive_some():
            chunks.append(data)
    return b"".join(chunks)


async def test_listeners_refuse_other_addresses() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await open_stats_listeners("0.0.0.0", 0)


# -- the summary line -------------------------------------------------------------


def test_summary_line_totals_and_deltas() -> None:
    before = {"tcp_flows_started": 10, "bytes_up": 1024, "bytes_down": 0, "udp_queue_drops": 1}
    now = {
        "tcp_flows": 3,
        "tcp_flows_started": 15,
        "udp_sessions": 1,
        "udp_sessions_started": 2,
        "bytes_up": 3072,
        "bytes_down": 5 * 1024 * 1024,
        "udp_queue_drops": 4,
        "dns_forward_drops": 1,
    }
    assert summary_line(now, before) == (
        "tcp 3 open (+5), udp 1 open (+2), up 3.0 KiB (+2.0 KiB), "
        "down 5.0 MiB (+5.0 MiB), drops 5 (+4: dns_forward_drops +1, udp_queue_drops +3)"
    )


async def test_summary_is_logged_every_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tun2sx.stats")
    engine = FakeEngine()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log_summaries, engine, 60.0)
        await trio.sleep(59)
        assert caplog.messages == []
        engine.counters["tcp_flows_started"] = 7
        await trio.sleep(2)
        assert len(caplog.messages) == 1
        assert "(+7)" in caplog.messages[0]
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    assert len(caplog.messages) == 3
    assert "tcp 0 open (+0)" in caplog.messages[2]


# -- accounting --------------------------------------------------------------------


class IdleDevice:
    name = "fake0"
    mtu = 1500
    offload = False

    def __init__(self) -> None:
        self.closed = False

    def read_ready(self, limit: int = 256) -> list[Any]:
        return []  # nothing held outside read_batch

    async def read_batch(self, limit: int = 256) -> list[Any]:
        await trio.sleep_forever()
        raise AssertionError

    def write(self, packet: bytes) -> None:
        raise AssertionError("nothing should be sent")

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.closed = True


async def test_splice_counts_bytes_each_way() -> None:
    engine = Engine(IdleDevice(), NetStack(NetStackConfig()), Router(None))  # type: ignore[arg-type]
    dest = Destination("a.test", 80)
    info = engine.open_flow("tcp", "10.0.0.2:1", dest, "proxy")
    app_side, app_peer = trio.testing.memory_stream_pair()
    up_side, up_peer = trio.testing.memory_stream_pair()

    async def peers() -> None:
        await app_peer.send_all(b"x" * 1000)
        await app_peer.send_eof()
        await up_peer.send_all(b"y" * 3000)
        await up_peer.send_eof()
        assert await up_peer.receive_some() == b"x" * 1000
        assert await app_peer.receive_some() == b"y" * 3000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers)
        await splice(app_side, up_side, 65536, info)  # type: ignore[arg-type]
    assert (info.bytes_up, info.bytes_down) == (1000, 3000)
    stats = engine.statistics()
    assert (stats["bytes_up"], stats["bytes_down"]) == (1000, 3000)
    engine.close_flow(info)
    assert engine.flows == set()
    stats = engine.statistics()
    assert (stats["bytes_up"], stats["bytes_down"]) == (1000, 3000)


# -- serve wiring: auto-route and the stats endpoint ---------------------------------


async def test_serve_wires_auto_route_and_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def fake_auto_route(device: str, *, fwmark: int) -> Iterator[None]:
        calls.append(("enter", (device, fwmark)))
        try:
            yield
        finally:
            calls.append(("exit", device))

    import tun2sx.control.autoroute

    monkeypatch.setattr(tun2sx.control.autoroute, "auto_route", fake_auto_route)
    opened: list[trio.SocketListener] = []

    async def recording_listeners(
        host: str, port: int, *, any_address: bool = False
    ) -> list[trio.SocketListener]:
        listeners = await open_stats_listeners(host, port)
        opened.extend(listeners)
        return listeners

    monkeypatch.setattr(app, "open_stats_listeners", recording_listeners)
    settings = app.Settings(
        auto_route=True,
        stats_listen="127.0.0.1:0",
        fake_ip_db=":memory:",
        outbounds={"p": "socks5://127.0.0.1:1"},
        rules=("DOMAIN,a.test,p",),
    )
    device = IdleDevice()
    async with trio.open_nursery() as nursery:
        engine = await nursery.start(
            lambda task_status: app.serve(
                settings, device=device, handle_signals=False, task_status=task_status
            )
        )
        assert calls == [("enter", ("fake0", app.DEFAULT_AUTO_ROUTE_FWMARK))]
        assert engine.router.name_of(engine.router.route(Destination("a.test", 1), "tcp")) == "p"
        port = opened[0].socket.getsockname()[1]
        status, _, body = split(
            await http_get(
                port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
        )
        assert status == "HTTP/1.1 200 OK"
        assert json.loads(body)["tcp_flows"] == 0
        nursery.cancel_scope.cancel()
    assert calls[-1] == ("exit", "fake0")
    assert device.closed
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_serve_refuses_a_public_stats_address() -> None:
    settings = app.Settings(stats_listen="0.0.0.0:9090", fake_ip_db=":memory:")
    with pytest.raises(app.ConfigError, match=r"^stats_listen: 0\.0\.0\.0 is not a loopback"):
        await app.serve(settings, device=IdleDevice(), handle_signals=False)  # type: ignore[arg-type]
