"""Fixtures: real SOCKS5 servers (microsocks, Dante) and echo servers on loopback."""

from __future__ import annotations

import functools
import ipaddress
import os
import tempfile
from collections.abc import Iterator

import pytest
import trio

from outbounds.base import Destination
from tests.support import ServerProcess, free_port, require_binary, run_server
from tests.support.outbounds import PROXY_PASSWORD, PROXY_USER


@pytest.fixture(scope="module")
def microsocks() -> Iterator[ServerProcess]:
    """microsocks without authentication on 127.0.0.1."""
    binary = require_binary("microsocks")
    port = free_port()
    with run_server([binary, "-i", "127.0.0.1", "-p", str(port)], "127.0.0.1", port) as server:
        yield server


@pytest.fixture(scope="module")
def microsocks_auth() -> Iterator[ServerProcess]:
    """microsocks requiring RFC 1929 username/password."""
    binary = require_binary("microsocks")
    port = free_port()
    argv = [binary, "-i", "127.0.0.1", "-p", str(port), "-u", PROXY_USER, "-P", PROXY_PASSWORD]
    with run_server(argv, "127.0.0.1", port) as server:
        yield server


_DANTE_CONFIG = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: lo
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
  from: 127.0.0.0/8 to: 0/0
}}
socks pass {{
  from: 127.0.0.0/8 to: 0/0
  command: connect udpassociate
}}
socks pass {{
  from: 0/0 to: 0/0
  command: udpreply
}}
"""


@pytest.fixture(scope="module")
def danted() -> Iterator[ServerProcess]:
    """Dante without authentication, allowing CONNECT and UDP ASSOCIATE."""
    binary = require_binary("danted")
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("danted here is configured to run as root")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tun2sx-dante-") as tmp:
        config = os.path.join(tmp, "danted.conf")
        with open(config, "w") as f:
            f.write(_DANTE_CONFIG.format(port=port))
        argv = [binary, "-f", config, "-p", os.path.join(tmp, "pid"), "-N", "1"]
        with run_server(argv, "127.0.0.1", port) as server:
            yield server


async def _echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close: exercises both directions' FIN."""
    try:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def _start_tcp_echo(nursery: trio.Nursery, host: str) -> Destination:
    serve = functools.partial(trio.serve_tcp, _echo, 0, host=host)
    listeners = await nursery.start(serve)
    port = listeners[0].socket.getsockname()[1]
    return Destination(ipaddress.ip_address(host), port)


@pytest.fixture
async def tcp_echo(nursery: trio.Nursery) -> Destination:
    """A TCP echo server on 127.0.0.1."""
    return await _start_tcp_echo(nursery, "127.0.0.1")


@pytest.fixture
async def tcp_echo_v6(nursery: trio.Nursery) -> Destination:
    """A TCP echo server on ::1."""
    return await _start_tcp_echo(nursery, "::1")


async def _udp_echo(sock: trio.socket.SocketType) -> None:
    with sock:
        while True:
            data, source = await sock.recvfrom(65535)
            await sock.sendto(data, source)


@pytest.fixture
async def udp_echo(nursery: trio.Nursery) -> Destination:
    """A UDP echo server on 127.0.0.1."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    nursery.start_soon(_udp_echo, sock)
    return Destination(ipaddress.IPv4Address("127.0.0.1"), sock.getsockname()[1])


@pytest.fixture
async def udp_echo_v6(nursery: trio.Nursery) -> Destination:
    """A UDP echo server on ::1."""
    sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
    await sock.bind(("::1", 0))
    nursery.start_soon(_udp_echo, sock)
    return Destination(ipaddress.IPv6Address("::1"), sock.getsockname()[1])
