"""DIRECT by host name while the client's resolver points into the TUN.

The client namespace resolves through tun2sx (`nameserver 198.18.0.2`), so
`web.x.lan` is a fake IP there. A rule sends `x.lan` DIRECT; the name is
known only to a DNS server in the server namespace (`--direct-dns`). A web
server there logs each client's address: a request that came directly is
from the client's veth address (10.200.0.1), one through the proxy from
the proxy's own (10.200.0.2, microsocks in the server namespace).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed

pytestmark = pytest.mark.e2e

CLIENT_ADDR = "10.200.0.1"
WEB_PORT = 8090
CONFIG = f"""\
outbound = "proxy"
rules = ["DOMAIN-SUFFIX,x.lan,DIRECT", "MATCH,proxy"]
[outbounds.proxy]
url = "socks5://{SERVER_ADDR}:1080"
"""


class Lan:
    """The server namespace's DNS server and logging web server."""

    def __init__(self, testbed: Testbed) -> None:
        self.testbed = testbed
        tmp = testbed.tmp
        self.dns_log = tmp / "lan-dns.log"
        self.web_log = tmp / "lan-web.log"
        (tmp / "lan").mkdir()
        (tmp / "lan" / "index.html").write_text("<h1>web.x.lan</h1>\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        dns = ["-m", "tests.outbounds.dns_server", "--bind", SERVER_ADDR]
        web = ["-m", "http.server", str(WEB_PORT), "--bind", SERVER_ADDR]
        with self.dns_log.open("wb") as dns_out, self.web_log.open("wb") as web_out:
            testbed.server.spawn(
                [sys.executable, *dns, "--record", f"web.x.lan={SERVER_ADDR}"],
                env=env,
                stdout=dns_out,
            )
            testbed.server.spawn(
                [sys.executable, *web, "--directory", str(tmp / "lan")], stderr=web_out
            )
        testbed.server.wait_listening(53, udp=True)
        testbed.server.wait_listening(WEB_PORT)
        self.config = tmp / "direct.toml"
        self.config.write_text(CONFIG)

    def restart(self, *extra: str) -> None:
        """tun2sx again, on the config with the DIRECT rule, with `extra` flags."""
        self.testbed.stop()
        self.testbed.proxy_args = ["--config", str(self.config)]
        self.testbed.start(*extra)

    def curl(self, host: str) -> str:
        url = f"http://{host}:{WEB_PORT}/"
        return self.testbed.client_run(["curl", "-sS", "--max-time", "20", url]).stdout

    def web_clients(self) -> list[str]:
        """The client address of each request the web server logged."""
        lines = self.web_log.read_text().splitlines()
        return [line.split()[0] for line in lines if '"GET / ' in line]


@pytest.fixture(scope="module")
def lan(testbed: Testbed) -> Iterator[Lan]:
    yield Lan(testbed)


def wait_for(path: Path, text: str, timeout: float = 10) -> None:
    """Until `text` is in the file `path` (servers log after answering)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {path.name}: {path.read_text()!r}"
        time.sleep(0.05)


def test_direct_rule_by_name_resolves_with_its_own_server(lan: Lan) -> None:
    lan.restart("--direct-dns", SERVER_ADDR)
    assert lan.curl("web.x.lan") == "<h1>web.x.lan</h1>\n"
    wait_for(lan.web_log, '"GET / ')
    # Straight from the client namespace, not from the proxy.
    assert lan.web_clients() == [CLIENT_ADDR]
    # The name was asked of the LAN server, and tun2sx says which way it went.
    assert "query web.x.lan A udp" in lan.dns_log.read_text()
    assert f"(web.x.lan:{WEB_PORT}) via direct: connected" in lan.testbed.log()
    # The same web server through the proxy, for comparison: from its address.
    assert lan.curl("www.test") == "<h1>web.x.lan</h1>\n"
    wait_for(lan.web_log, f"{SERVER_ADDR} - - [")
    assert lan.web_clients() == [CLIENT_ADDR, SERVER_ADDR]


def test_without_a_usable_server_the_flow_fails_with_one_line(lan: Lan) -> None:
    # The client's resolv.conf names only tun2sx itself: nothing is left.
    lan.restart()
    log = lan.testbed.log()
    assert "the direct outbound has no DNS server that is not tun2sx itself" in log
    before = lan.web_clients()
    start = time.monotonic()
    result = lan.testbed.client_run(
        ["curl", "-sS", "--max-time", "20", f"http://web.x.lan:{WEB_PORT}/"], check=False
    )
    assert result.returncode == 7  # could not connect: refused or unreachable, no hang
    assert time.monotonic() - start < 10
    assert "cannot resolve 'web.x.lan': the direct outbound has no DNS server" in (
        lan.testbed.log()
    )
    assert lan.web_clients() == before
