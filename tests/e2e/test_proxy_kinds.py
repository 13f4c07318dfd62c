"""End to end through HTTP CONNECT (tinyproxy), SOCKS4 (Dante) and TCP Fast Open.

tun2sx runs in the client namespace with each kind of proxy in turn as its
outbound; applications there are real kernel sockets, and what they see
(data, or the errno of a refusal) is what is asserted. tinyproxy ends a
tunnel at the first EOF, so its tests download instead of echoing. tinyproxy allows
CONNECT only to the ports in its ConnectPort lines, which gives a forbidden
destination (403); a port nobody listens on gives its refusal (500). TCP
Fast Open is shown with the client namespace's own counters
(TcpExtTCPFastOpenActive: connections whose SYN carried data the server
took), against a SOCKS5 server that enables it on its listening socket
(tests/e2e/testproxy.py) and against Dante, which does not. Dante does not
speak SOCKS4a, so names through socks4a:// go to tests/e2e/testproxy.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.testbed import (
    DANTE_PORT,
    ROOT,
    SERVER_ADDR,
    WHOAMI_NAMES,
    WHOAMI_PORT,
    Testbed,
)
from tests.support import require

pytestmark = pytest.mark.e2e

# The literal addresses are the whoami server's: the client reaches them
# only through the TUN, while 10.200.0.2 is on its own link.
WHOAMI_ADDR = WHOAMI_NAMES["n1.test"]
TINYPROXY_PORT = 8888
TINYPROXY_AUTH_PORT = 8889
TEST_PROXY_PORT = 1090
PROXY_USER = "tun2sx"
PROXY_PASSWORD = "pa55-w0rd"  # tinyproxy's config takes no colon here

TINYPROXY_CONF = """\
Port {port}
Listen {addr}
Timeout 60
MaxClients 50
LogLevel Info
Allow 10.200.0.0/24
ConnectPort 7001
ConnectPort 7003
ConnectPort 7005
ConnectPort 7004
DisableViaHeader Yes
{auth}
"""


@pytest.fixture(scope="module")
def proxies(testbed: Testbed) -> Iterator[Testbed]:
    """The testbed's server namespace with two tinyproxies and tests/e2e/testproxy.py."""
    require("tinyproxy", "nstat")
    for port, auth in (
        (TINYPROXY_PORT, ""),
        (TINYPROXY_AUTH_PORT, f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}"),
    ):
        conf = testbed.tmp / f"tinyproxy-{port}.conf"
        conf.write_text(TINYPROXY_CONF.format(port=port, addr=SERVER_ADDR, auth=auth))
        # -d: in the foreground, so the lab owns (and ends) the process.
        testbed.server.spawn(["tinyproxy", "-d", "-c", str(conf)])
    # The server bit of net.ipv4.tcp_fastopen, in this namespace only.
    testbed.server.run(["sysctl", "-q", "-w", "net.ipv4.tcp_fastopen=3"])
    testbed.server.spawn(
        [
            sys.executable,
            "-m",
            "tests.e2e.testproxy",
            "--bind",
            SERVER_ADDR,
            "--port",
            str(TEST_PROXY_PORT),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    for port in (TINYPROXY_PORT, TINYPROXY_AUTH_PORT, TEST_PROXY_PORT):
        testbed.server.wait_listening(port)
    yield testbed


def whoami(bed: Testbed, address: str) -> str:
    """The address the whoami server says `address`:7004 reached (curl's output)."""
    url = f"http://{address}:{WHOAMI_PORT}/"
    return bed.client_run(["curl", "-sS", "--max-time", "10", url]).stdout


def restart(bed: Testbed, url: str) -> None:
    bed.stop()
    bed.proxy_args = ["--proxy", url]
    bed.start()


def fast_open_active(bed: Testbed) -> int:
    """The client namespace's count of connects whose SYN data was taken."""
    out = bed.client_run(["nstat", "-asz", "TcpExtTCPFastOpenActive"]).stdout.split()
    return int(out[out.index("TcpExtTCPFastOpenActive") + 1])


ECHO = {"sent": 100_000, "received": 100_000, "equal": True}


# --- HTTP CONNECT ---------------------------------------------------------------


# tinyproxy ends the whole tunnel at the application's first EOF (as
# microsocks does), so these exchanges keep their write side open: the
# download asks, then reads until the server closes.
DOWNLOAD = {"received": 3 * 1024 * 1024, "equal": True}


def test_http_connect_carries_names_both_ways(proxies: Testbed) -> None:
    restart(proxies, f"http://{SERVER_ADDR}:{TINYPROXY_PORT}")
    assert proxies.client_tool("download", "echo.test", 7003, 3 * 1024 * 1024) == DOWNLOAD
    # By address too (an IPv4 literal in the request): one the client
    # reaches only through the TUN (10.200.0.2 is on its own link).
    assert whoami(proxies, WHOAMI_ADDR) == WHOAMI_ADDR


@pytest.mark.parametrize(("family", "error"), [("A", "EHOSTUNREACH"), ("AAAA", "EACCES")])
def test_http_forbidden_port_is_admin_prohibited_in_one_line(
    proxies: Testbed, family: str, error: str
) -> None:
    restart(proxies, f"http://{SERVER_ADDR}:{TINYPROXY_PORT}")
    fake = proxies.client_run(["dig", "+short", "+time=3", "echo.test", family]).stdout.strip()
    before = len(proxies.log())
    # 8080 is not a ConnectPort: tinyproxy answers 403, which the
    # application hears as an ICMP administratively prohibited; Linux
    # reports that as EHOSTUNREACH over IPv4 and EACCES over IPv6.
    assert proxies.client_tool("connect", fake, 8080) == {"error": error}
    log = proxies.log()[before:]
    assert "Traceback" not in log
    lines = [ln for ln in log.splitlines() if "could not reach echo.test:8080: 403" in ln]
    assert len(lines) == 1, log


def test_http_refused_destination_is_econnrefused(proxies: Testbed) -> None:
    restart(proxies, f"http://{SERVER_ADDR}:{TINYPROXY_PORT}")
    # Port 7005 is allowed but nothing listens there: tinyproxy says 500.
    assert proxies.client_tool("connect", "echo.test", 7005) == {"error": "ECONNREFUSED"}


def test_http_basic_auth(proxies: Testbed) -> None:
    restart(proxies, f"http://{PROXY_USER}:{PROXY_PASSWORD}@{SERVER_ADDR}:{TINYPROXY_AUTH_PORT}")
    assert proxies.client_tool("download", "echo.test", 7003, 3 * 1024 * 1024) == DOWNLOAD


def test_http_without_credentials_is_told_to_give_them(proxies: Testbed) -> None:
    restart(proxies, f"http://{SERVER_ADDR}:{TINYPROXY_AUTH_PORT}")
    before = len(proxies.log())
    assert proxies.client_tool("connect", "echo.test", 7001) == {"error": "ECONNREFUSED"}
    assert "wants credentials (407)" in proxies.log()[before:]


def test_http_wrong_password_is_refused_and_named(proxies: Testbed) -> None:
    restart(proxies, f"http://{PROXY_USER}:wrong@{SERVER_ADDR}:{TINYPROXY_AUTH_PORT}")
    before = len(proxies.log())
    assert proxies.client_tool("connect", "echo.test", 7001) == {"error": "ECONNREFUSED"}
    log = proxies.log()[before:]
    assert "rejected the credentials" in log and "wrong" not in log


def test_udp_through_http_gets_port_unreachable(proxies: Testbed) -> None:
    restart(proxies, f"http://{SERVER_ADDR}:{TINYPROXY_PORT}")
    before = len(proxies.log())
    assert proxies.client_tool("udp", "echo.test", 7001, 1) == {"error": "ECONNREFUSED"}
    log = proxies.log()[before:]
    assert "Traceback" not in log
    assert len([ln for ln in log.splitlines() if "carries no UDP" in ln]) == 1, log


# --- SOCKS4 through Dante -------------------------------------------------------------


def test_socks4_through_dante_by_address(proxies: Testbed) -> None:
    restart(proxies, f"socks4://tun2sx@{SERVER_ADDR}:{DANTE_PORT}")
    before = len(proxies.log())
    assert whoami(proxies, WHOAMI_ADDR) == WHOAMI_ADDR
    assert proxies.client_tool("connect", WHOAMI_ADDR, 7005) == {"error": "ECONNREFUSED"}
    log = proxies.log()[before:]
    assert f"{WHOAMI_ADDR}:7005" in log and "Traceback" not in log


def test_socks4_refuses_names_and_ipv6_at_once(proxies: Testbed) -> None:
    restart(proxies, f"socks4://{SERVER_ADDR}:{DANTE_PORT}")
    before = len(proxies.log())
    # A fake-IP flow is a name: SOCKS4 cannot send it.
    assert proxies.client_tool("connect", "echo.test", 7001) == {"error": "EHOSTUNREACH"}
    assert proxies.client_tool("connect", "fd00:7e::99", 7001) == {"error": "ENETUNREACH"}
    log = proxies.log()[before:]
    assert "use socks4a://" in log and "carries no IPv6" in log and "Traceback" not in log


def test_socks4a_sends_names(proxies: Testbed) -> None:
    restart(proxies, f"socks4a://tun2sx@{SERVER_ADDR}:{TEST_PROXY_PORT}?tfo=1")
    assert proxies.client_tool("echo", "echo.test", 7001, 100_000) == ECHO
    assert proxies.client_tool("connect", "echo.test", 7005) == {"error": "ECONNREFUSED"}


# --- TCP Fast Open --------------------------------------------------------------------


def test_tfo_puts_the_greeting_in_the_syn(proxies: Testbed) -> None:
    restart(proxies, f"socks5://{SERVER_ADDR}:{TEST_PROXY_PORT}?tfo=1&pipeline=1")
    before = fast_open_active(proxies)
    for _ in range(6):
        assert proxies.client_tool("echo", "echo.test", 7001, 100_000) == ECHO
    # The first connect fetches the cookie; the later ones carry data.
    assert fast_open_active(proxies) - before >= 5


def test_without_tfo_no_syn_carries_data(proxies: Testbed) -> None:
    restart(proxies, f"socks5://{SERVER_ADDR}:{TEST_PROXY_PORT}")
    before = fast_open_active(proxies)
    for _ in range(3):
        assert proxies.client_tool("echo", "echo.test", 7001, 100_000) == ECHO
    assert fast_open_active(proxies) == before


def test_tfo_falls_back_with_a_server_without_it(proxies: Testbed) -> None:
    # Dante does not enable TFO on its socket: connects are plain ones.
    restart(proxies, f"socks5://{SERVER_ADDR}:{DANTE_PORT}?tfo=1")
    before = fast_open_active(proxies)
    for _ in range(3):
        assert proxies.client_tool("echo", "echo.test", 7001, 100_000) == ECHO
    assert proxies.client_tool("connect", "echo.test", 7005) == {"error": "ECONNREFUSED"}
    assert fast_open_active(proxies) == before


def test_tfo_connect_errors_surface_as_before(proxies: Testbed) -> None:
    # The proxy's port is closed: its refusal is the application's, at once.
    restart(proxies, f"http://{SERVER_ADDR}:7999?tfo=1")
    assert proxies.client_tool("connect", "echo.test", 7001) == {"error": "ECONNREFUSED"}


def test_tfo_and_pipeline_switched_on_in_the_config_file(proxies: Testbed) -> None:
    config = proxies.tmp / "switches.toml"
    config.write_text(
        f"""\
outbound = "fast"
[outbounds.fast]
url = "socks5://{SERVER_ADDR}:{TEST_PROXY_PORT}"
pipeline = true
tfo = true
"""
    )
    proxies.stop()
    proxies.proxy_args = ["--config", str(config)]
    proxies.start()
    before = fast_open_active(proxies)
    for _ in range(4):
        assert proxies.client_tool("echo", "echo.test", 7001, 100_000) == ECHO
    # The first connect fetches the cookie; the later SYNs carry the
    # (pipelined) handshake, as with ?tfo=1&pipeline=1 in the URL.
    assert fast_open_active(proxies) - before >= 3
