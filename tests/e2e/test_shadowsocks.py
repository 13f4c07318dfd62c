"""End to end through a real Shadowsocks server: shadowsocks-libev's ss-server.

tun2sx runs with `--proxy ss://...` (SIP002, base64 user info); ss-server
listens in the server namespace with its UDP relay on. Names resolve to fake
IPs in the client namespace and reach the server only as names, so these
tests also show that the target address travels as a domain. ss-server
closes both directions at the client's first EOF, so no test here relies on
half-close (tests/outbounds/test_shadowsocks_interop.py covers it with sing-box).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import require
from tests.e2e.testbed import SERVER_ADDR, Testbed

pytestmark = pytest.mark.e2e

SS_PORT = 8388
METHOD = "chacha20-ietf-poly1305"
PASSWORD = "e2e-pa:ss@word"


@pytest.fixture(scope="module")
def shadowsocks(testbed: Testbed) -> Iterator[Testbed]:
    require("ss-server")
    testbed.server.spawn(
        ["ss-server", "-s", SERVER_ADDR, "-p", str(SS_PORT), "-k", PASSWORD, "-m", METHOD, "-u"]
    )
    testbed.server.wait_listening(SS_PORT)
    testbed.server.wait_listening(SS_PORT, udp=True)
    userinfo = base64.urlsafe_b64encode(f"{METHOD}:{PASSWORD}".encode()).decode().rstrip("=")
    testbed.stop()
    testbed.proxy_args = ["--proxy", f"ss://{userinfo}@{SERVER_ADDR}:{SS_PORT}"]
    testbed.start()
    yield testbed


def test_download_by_name(shadowsocks: Testbed) -> None:
    size = 3 * 1024 * 1024
    assert shadowsocks.client_tool("download", "big.test", 7003, size) == {
        "received": size,
        "equal": True,
    }


def test_udp_echo_by_name(shadowsocks: Testbed) -> None:
    fake = shadowsocks.client_run(["dig", "+short", "+time=3", "echo.test", "A"]).stdout.strip()
    assert ipaddress.ip_address(fake) in ipaddress.ip_network("198.18.0.0/15")
    # Replies come back from the fake IP the application sent to.
    assert shadowsocks.client_tool("udp", "echo.test", 7001, 20) == {"echoed": 20, "peer": fake}
