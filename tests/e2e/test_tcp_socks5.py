"""End to end through a real TUN and microsocks: what a user's programs see.

Every client here is a real kernel socket (curl, dig, ping, Python) in the
client namespace; the names resolve through tun2sx's fake-IP DNS and the
bytes go through microsocks in the server namespace.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time

import pytest

from tests.e2e.testbed import Testbed

pytestmark = pytest.mark.e2e

FAKE4 = ipaddress.ip_network("198.18.0.0/15")
FAKE6 = ipaddress.ip_network("fc00::/18")


def resolve(testbed: Testbed, name: str, qtype: str = "A") -> list[str]:
    out = testbed.client_run(["dig", "+short", "+tries=1", "+time=3", name, qtype]).stdout
    return out.split()


def test_dns_answers_fake_ips(testbed: Testbed) -> None:
    (a,) = resolve(testbed, "www.test", "A")
    (aaaa,) = resolve(testbed, "www.test", "AAAA")
    assert ipaddress.ip_address(a) in FAKE4
    assert ipaddress.ip_address(aaaa) in FAKE6
    # Same name, same answer; names are case-insensitive.
    assert resolve(testbed, "WWW.Test", "A") == [a]


def test_dns_other_types_go_upstream_through_the_proxy(testbed: Testbed) -> None:
    assert resolve(testbed, "anything.test", "TXT") == ['"tun2sx-upstream"']


def test_dns_over_tcp_is_answered(testbed: Testbed) -> None:
    out = testbed.client_run(["dig", "+tcp", "+short", "+time=3", "www.test", "A"]).stdout
    assert ipaddress.ip_address(out.strip()) in FAKE4


def test_curl_fetches_a_page_by_name(testbed: Testbed) -> None:
    result = testbed.client_run(["curl", "-sS", "--max-time", "20", "http://www.test:8080/"])
    assert result.stdout == "<h1>tun2sx e2e</h1>\n"
    assert "www.test:8080" in testbed.log()


def test_curl_downloads_five_megabytes_exactly(testbed: Testbed) -> None:
    result = testbed.client.run(
        ["sh", "-c", "curl -sS --max-time 60 http://big.test:8080/big.bin | sha256sum"]
    )
    expected = hashlib.sha256((testbed.www / "big.bin").read_bytes()).hexdigest()
    assert result.stdout.split()[0] == expected


def test_curl_over_ipv6_fake_address(testbed: Testbed) -> None:
    result = testbed.client_run(["curl", "-6", "-sS", "--max-time", "20", "http://www.test:8080/"])
    assert result.stdout == "<h1>tun2sx e2e</h1>\n"


def test_download_sixteen_megabytes_exactly(testbed: Testbed) -> None:
    size = 16 * 1024 * 1024
    assert testbed.client_tool("download", "big.test", 7003, size) == {
        "received": size,
        "equal": True,
    }


def test_refused_by_far_side_gives_rst(testbed: Testbed) -> None:
    start = time.monotonic()
    assert testbed.client_tool("connect", "echo.test", 7999) == {"error": "ECONNREFUSED"}
    assert time.monotonic() - start < 5


def test_unreachable_network_gives_icmp(testbed: Testbed) -> None:
    # The server namespace has no route to 10.99.0.0/16: microsocks reports
    # "network unreachable" and the application must see that, not a reset.
    result = testbed.client_tool("connect", "10.99.0.1", 80)
    assert result in ({"error": "ENETUNREACH"}, {"error": "EHOSTUNREACH"})


def test_unknown_fake_ip_fails_fast_with_a_log_line(testbed: Testbed) -> None:
    start = time.monotonic()
    assert testbed.client_tool("connect", "198.18.250.250", 80) == {"error": "ECONNREFUSED"}
    assert time.monotonic() - start < 5
    assert "has no host name" in testbed.log()


def test_ping_is_answered_locally(testbed: Testbed) -> None:
    out = testbed.client_run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "198.18.7.7"]).stdout
    assert "2 received" in out
    out6 = testbed.client_run(["ping", "-6", "-c", "1", "-W", "2", "fc00::77"]).stdout
    assert "1 received" in out6


@pytest.mark.parametrize("address", ["198.18.7.7", "fc00::77"])
def test_a_ping_larger_than_the_mtu_is_answered(testbed: Testbed, address: str) -> None:
    # `ping -s 20000` leaves the kernel in fragments; the reply comes back in
    # fragments too, which the kernel puts together.
    out = testbed.client_run(
        ["ping", "-s", "20000", "-c", "2", "-i", "0.2", "-W", "2", address], check=False
    ).stdout
    assert "2 received" in out, out
    assert "20008 bytes from" in out


def test_fake_ip_table_survives_restart(testbed: Testbed) -> None:
    (before,) = resolve(testbed, "echo.test")
    testbed.stop()
    testbed.start()
    # The application kept the fake IP in its cache: connecting to it with
    # no new DNS query must still reach echo.test.
    assert testbed.client_tool("download", before, 7003, 1000) == {
        "received": 1000,
        "equal": True,
    }
    assert resolve(testbed, "echo.test") == [before]
