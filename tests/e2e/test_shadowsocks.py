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
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, running_bed
from tests.support import require
from tun2sx.lab.netns import Lab

pytestmark = pytest.mark.e2e

SS_PORT = 8388
METHOD = "chacha20-ietf-poly1305"
PASSWORD = "e2e-pa:ss@word"


def _start_ss_server(bed: Testbed) -> subprocess.Popen[bytes]:
    proc = bed.server.spawn(
        ["ss-server", "-s", SERVER_ADDR, "-p", str(SS_PORT), "-k", PASSWORD, "-m", METHOD, "-u"]
    )
    bed.server.wait_listening(SS_PORT)
    bed.server.wait_listening(SS_PORT, udp=True)
    return proc


def _ss_url() -> str:
    userinfo = base64.urlsafe_b64encode(f"{METHOD}:{PASSWORD}".encode()).decode().rstrip("=")
    return f"ss://{userinfo}@{SERVER_ADDR}:{SS_PORT}"


@pytest.fixture(scope="module")
def shadowsocks(testbed: Testbed) -> Iterator[Testbed]:
    require("ss-server")
    _start_ss_server(testbed)
    testbed.stop()
    testbed.proxy_args = ["--proxy", _ss_url()]
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


def test_shadowsocks_server_killed_mid_transfer_then_back() -> None:
    """A crashed ss-server ends the flow in flight promptly (never a hang),
    new flows fail fast while it is down, and work again once it is back,
    without restarting tun2sx."""
    require("ss-server")
    servers: list[subprocess.Popen[bytes]] = []

    def make(lab: Lab, tmp: Path) -> Testbed:
        bed = Testbed(lab, tmp)
        servers.append(_start_ss_server(bed))
        bed.proxy_args = ["--proxy", _ss_url()]
        return bed

    with running_bed("t2sx-sskill", make) as bed:
        [server] = servers
        download = bed.client.spawn(
            [
                sys.executable,
                "-m",
                "tests.e2e.client",
                "download",
                "big.test",
                "7003",
                str(1 << 30),
            ],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=str(ROOT),
        )
        # Kill only once bytes flow: the server has set up the relay.
        bed.server.wait_established(SS_PORT)
        server.kill()
        server.wait(10)
        bed.lab.processes = [(p, a) for p, a in bed.lab.processes if p is not server]
        out, _ = download.communicate(timeout=30)
        bed.lab.stop(download)
        ended = json.loads(out.splitlines()[-1])
        assert ended.get("error") in ("ECONNRESET", "EPIPE") or ended.get("equal") is False, ended
        # While the server is down a new flow is refused at once.
        assert bed.client_tool("connect", "echo.test", 7001) == {"error": "ECONNREFUSED"}
        _start_ss_server(bed)
        assert bed.client_tool("download", "big.test", 7003, 1 << 20) == {
            "received": 1 << 20,
            "equal": True,
        }
        assert bed.proc is not None and bed.proc.poll() is None
