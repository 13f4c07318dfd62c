"""The embedding API on a TUN fd the test opened itself, as a VPN app would.

Lab layout:

    client ns: tun0.. (10.77.0.1/24, opened by the test, no offload)
               10.200.0.2/32 -> the TUN (what the app's traffic hits)
               fwmark 0x2a -> table 100: 10.200.0.0/24 via the veth
    server ns: 10.200.0.2 (veth), tests/e2e/servers.py (TCP/UDP echo :7001)

The server is only reachable without the TUN for marked sockets, and the
test's `protect` callback is what marks them, as Android's VpnService.protect
exempts a socket from the VPN. So a working round trip proves that protect
ran on every outbound socket before it connected.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

import tun2sx
from tests.support import require
from tun2sx.control.app import ConfigError, Settings
from tun2sx.dataplane.tun import TunError, open_tun
from tun2sx.lab.netns import Lab, Namespace, inside

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
SERVER = "10.200.0.2"
MARK = 0x2A
_SO_MARK = getattr(socket, "SO_MARK", 36)


class Recorder:
    """A protect(fd) callback: marks the socket and notes what it saw."""

    def __init__(self) -> None:
        self.calls: list[dict[str, int | bool]] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> bool:
        sock = socket.socket(fileno=fd)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK)
            try:
                sock.getpeername()
                connected = True
            except OSError as exc:
                assert exc.errno == errno.ENOTCONN
                connected = False
            seen = {
                "fd": fd,
                "type": sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                "connected": connected,
            }
        finally:
            sock.detach()  # the fd stays the outbound's
        with self.lock:
            self.calls.append(seen)
        return True

    def of_type(self, kind: int) -> list[dict[str, int | bool]]:
        with self.lock:
            return [call for call in self.calls if call["type"] == kind]


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, Namespace]]:
    require()
    with Lab("t2sx-api") as lab:
        client = lab.namespace("client")
        server = lab.namespace("server")
        # Replies to marked sockets arrive on the veth although the unmarked
        # route to their source is the TUN: strict reverse-path filtering
        # would drop them.
        for key in ("all", "default"):
            client.run(["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"])
        veth, _ = lab.link(client, ["10.200.0.1/24"], server, [f"{SERVER}/24"])
        client.run(["ip", "route", "add", "10.200.0.0/24", "dev", veth, "table", "100"])
        client.run(["ip", "rule", "add", "fwmark", hex(MARK), "lookup", "100", "priority", "100"])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        server.spawn([sys.executable, "-m", "tests.e2e.servers", "--bind", SERVER], env=env)
        server.wait_listening(7001)
        server.wait_listening(7001, udp=True)
        yield lab, client


_tun_count = 0


def open_app_tun(client: Namespace) -> tuple[str, int]:
    """Open a TUN in the client ns, route the server into it, return a dup'd fd.

    Only the dup keeps the (non-persistent) device alive afterwards, so the
    device disappearing proves tun2sx closed the fd it was given.
    """
    global _tun_count
    _tun_count += 1
    name = f"tun{_tun_count}"
    with inside(client):
        device = open_tun(name, mtu=1500, offload=False, addresses=("10.77.0.1/24",))
    fd = os.dup(device.fileno())
    device.close()
    client.run(["ip", "route", "replace", f"{SERVER}/32", "dev", name])
    return name, fd


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def device_exists(client: Namespace, name: str) -> bool:
    return client.run(["ip", "link", "show", name], check=False).returncode == 0


def tun2sx_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tun2sx" and t.is_alive()]


def test_threaded_handle_tcp_udp_protect_stats_stop(lab: tuple[Lab, Namespace]) -> None:
    _, client = lab
    name, fd = open_app_tun(client)
    protect = Recorder()
    with inside(client):
        # The new thread starts in the client namespace, where outbound
        # sockets must be created.
        handle = tun2sx.start(
            tun_fd=fd, config={"outbound": "direct://", "fake_ip": False}, protect=protect
        )
    try:
        assert not handle.wait(0)  # serving
        with inside(client):
            tcp = socket.create_connection((SERVER, 7001), timeout=10)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with tcp, udp:
            assert tcp.getsockname()[0] == "10.77.0.1"  # it left through the TUN
            payload = os.urandom(200_000)
            tcp.sendall(payload)
            tcp.shutdown(socket.SHUT_WR)
            echoed = b""
            while chunk := tcp.recv(65536):
                echoed += chunk
            assert echoed == payload
            udp.settimeout(10)
            udp.sendto(b"datagram through the TUN", (SERVER, 7001))
            assert udp.recvfrom(2048) == (b"datagram through the TUN", (SERVER, 7001))

            stats = handle.stats()
            assert stats["tcp_flows_started"] == 1
            assert stats["udp_sessions_started"] == 1
            assert stats["udp_sessions"] == 1
            assert stats["flows"] >= 1
            assert stats["drops"] == 0
            assert stats["tun_rx_bytes"] > len(payload)
            assert stats["tun_tx_bytes"] > len(payload)
        # One protect call per outbound socket, each before its connect.
        assert [c["connected"] for c in protect.of_type(socket.SOCK_STREAM)] == [False]
        assert [c["connected"] for c in protect.of_type(socket.SOCK_DGRAM)] == [False]
    finally:
        handle.stop()
        assert handle.wait(10), "tun2sx did not stop"
    assert not handle.running and handle.error is None
    wait_until(lambda: not tun2sx_threads(), "the tun2sx thread to end")
    wait_until(lambda: not device_exists(client, name), f"{name} to be released")
    final = handle.stats()
    assert final["tcp_flows_started"] == 1 and final["udp_sessions_started"] == 1
    handle.stop()  # idempotent after the end


def test_stop_from_another_thread_ends_blocking_run(lab: tuple[Lab, Namespace]) -> None:
    _, client = lab
    name, fd = open_app_tun(client)
    handle = tun2sx.Tun2sx(tun_fd=fd)
    with inside(client):
        runner = threading.Thread(target=handle.run, name="app-worker")
        runner.start()
    wait_until(lambda: handle.running, "the run to start")
    assert handle.stats()["tun_tx_packets"] == 0
    handle.stop()  # from the main thread, which is not the run's
    runner.join(10)
    assert not runner.is_alive() and handle.error is None
    wait_until(lambda: not device_exists(client, name), f"{name} to be released")


def test_stop_before_running_is_kept(lab: tuple[Lab, Namespace]) -> None:
    _, client = lab
    name, fd = open_app_tun(client)
    handle = tun2sx.Tun2sx(tun_fd=fd)
    handle.stop()
    handle.run()  # returns at once instead of serving
    assert handle.error is None and handle.stats() == {}
    wait_until(lambda: not device_exists(client, name), f"{name} to be released")
    with pytest.raises(RuntimeError, match="runs only once"):
        handle.start()


async def test_run_async_reports_engine_and_releases_fd(lab: tuple[Lab, Namespace]) -> None:
    _, client = lab
    name, fd = open_app_tun(client)
    async with trio.open_nursery() as nursery:
        engine = await nursery.start(
            lambda task_status: tun2sx.run_async(
                tun_fd=fd, config={"fake_ip": False}, task_status=task_status
            )
        )
        assert engine.statistics()["tcp_flows"] == 0
        nursery.cancel_scope.cancel()
    assert not device_exists(client, name)


def test_start_on_a_non_tun_fd_raises_and_closes_it() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TunError, match="not a TUN device"):
            tun2sx.start(tun_fd=read_end)
        with pytest.raises(OSError) as info:
            os.fstat(read_end)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(write_end)


def test_make_settings_from_mapping() -> None:
    settings = tun2sx.make_settings(
        7,
        {
            "outbound": "socks5://10.0.0.1:1080",
            "fake_ip_range": "10.64.0.0/10",
            "dns_upstream": "[2001:db8::53]:53",
            "fake_ip_filter": ["*.lan"],
        },
    )
    assert settings.tun_fd == 7 and settings.tun is None
    assert settings.fake_ip_db == ":memory:"
    assert str(settings.fake_ip_range) == "10.64.0.0/10"
    assert str(settings.dns_upstream.host) == "2001:db8::53"
    assert settings.fake_ip_filter == ("*.lan",)
    sized = tun2sx.make_settings(
        7, {"udp_buffer": "16M", "tun_txqueuelen": 2048, "tun_write_burst": "64K"}
    )
    assert (sized.udp_buffer, sized.tun_txqueuelen) == (16 << 20, 2048)
    assert sized.tun_write_burst == 64 << 10  # the config file's form


def test_make_settings_from_settings_keeps_its_fields() -> None:
    settings = tun2sx.make_settings(3, Settings(tun="tun0", fake_ip_db="/tmp/x.sqlite", mtu=1400))
    assert (settings.tun, settings.tun_fd, settings.mtu) == (None, 3, 1400)
    assert settings.fake_ip_db == "/tmp/x.sqlite"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tun": "tun0"}, "tun: pass the device as tun_fd"),
        ({"no_such": 1}, "no_such: unknown setting"),
        ({"fake_ip_range": "10.0.0.300/8"}, "fake_ip_range:"),
        ({"dns_upstream": "1.1.1.1"}, "dns_upstream:"),
        ({"workers": 2}, "workers:"),
        ({"udp_buffer": "lots"}, "udp_buffer: expected bytes"),
        ({"udp_buffer": 1000}, "udp_buffer: 1000 is not 0"),
        ({"tun_txqueuelen": 0}, "tun_txqueuelen: 0 is not between"),
        ({"tun_write_burst": 32}, "tun_write_burst: 0 .whole runs. or 1500 to"),
        ({"tun_txqueuelen": "10"}, "tun_txqueuelen: expected an integer"),
        # What the command line checks, the embedding API checks too.
        ({"udp_timeout": 0}, "udp_timeout: 1 to 86400 seconds, got 0"),
        ({"connect_timeout": float("nan")}, "connect_timeout: 0.1 to 600 seconds, got nan"),
        ({"udp_timeout": "60"}, "udp_timeout: expected a number"),
        ({"connect_timeout": -1}, "connect_timeout: 0.1 to 600 seconds, got -1"),
        ({"mtu": 100}, "mtu: 100 is not between 576 and 65535"),
        ({"fake_ip_range": "198.18.0.0/31"}, "fake_ip_range: 198.18.0.0/31 leaves no address"),
        ({"fake_ip_range6": "fc00::/127"}, "fake_ip_range6: fc00::/127 leaves no address"),
        ({"stats_listen": "0.0.0.0:9090"}, "stats_listen: 0.0.0.0 is not a loopback address"),
        ({"rules": ["MATCH,nowhere"]}, "unknown outbound 'nowhere'"),
        ({"outbound": "socks5://me:TopSecretPw@h"}, r"outbound: SOCKS5 URL 'socks5://me:\*\*\*@h'"),
    ],
)
def test_make_settings_rejects(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        tun2sx.make_settings(3, config)
    assert "TopSecretPw" not in str(info.value)


def test_make_settings_checks_a_given_settings_value() -> None:
    with pytest.raises(ConfigError, match="udp_timeout: 1 to 86400 seconds, got 0"):
        tun2sx.make_settings(3, Settings(udp_timeout=0))
