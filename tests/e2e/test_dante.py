"""End to end through Dante: TCP half-close, UDP ASSOCIATE, UDP errors.

tun2sx runs here with Dante as its outbound, which carries both CONNECT and
UDP ASSOCIATE; a UDP session whose relay is refused ends with an ICMP error
to the application. Half-close is tested here because microsocks closes both
directions at the first EOF. UDP replies must come back from the address
the application sent to (the fake IP), not from the real address the
proxy used.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.e2e.testbed import SERVER_ADDR, Testbed

pytestmark = pytest.mark.e2e


def test_udp_echo_by_name_through_udp_associate(dante: Testbed) -> None:
    fake = dante.client_run(["dig", "+short", "+time=3", "echo.test", "A"]).stdout.strip()
    assert ipaddress.ip_address(fake) in ipaddress.ip_network("198.18.0.0/15")
    result = dante.client_tool("udp", "echo.test", 7001, 50)
    assert result == {"echoed": 50, "peer": fake}


@pytest.mark.parametrize("family", ["A", "AAAA"])
def test_a_20_kb_udp_datagram_comes_back_whole(dante: Testbed, family: str) -> None:
    # Larger than the TUN's MTU both ways: the kernel's fragments are
    # reassembled, and the reply goes back in fragments the kernel takes.
    fake = dante.client_run(["dig", "+short", "+time=3", "echo.test", family]).stdout.strip()
    assert dante.client_tool("bigudp", fake, 7001, 20_000) == {"received": 20_000, "equal": True}


def test_tcp_also_works_through_dante(dante: Testbed) -> None:
    assert dante.client_tool("echo", "echo.test", 7001, 200_000) == {
        "sent": 200_000,
        "received": 200_000,
        "equal": True,
    }


def test_udp_to_unknown_fake_ip_gets_port_unreachable(dante: Testbed) -> None:
    # A connected UDP socket reports ICMP port unreachable as ECONNREFUSED.
    assert dante.client_tool("udp", "198.18.250.251", 7001, 1) == {"error": "ECONNREFUSED"}


@pytest.mark.parametrize("size", [1, 3 * 1024 * 1024])
def test_half_close_echo_both_ways(dante: Testbed, size: int) -> None:
    # The client sends everything, shuts down its write side, and must still
    # receive the whole echo that the server sends after seeing our FIN.
    result = dante.client_tool("echo", "echo.test", 7001, size)
    assert result == {"sent": size, "received": size, "equal": True}


def test_upload_eight_megabytes_exactly(dante: Testbed) -> None:
    assert dante.client_tool("upload", "echo.test", 7002, 8 * 1024 * 1024) == {
        "sent": 8 * 1024 * 1024,
        "equal": True,
    }


def test_udp_to_a_closed_port_through_dante_is_refused_in_one_line(dante: Testbed) -> None:
    # The relay's socket is refused; the application hears of it at once
    # (ECONNREFUSED, not its own timeout) and the log says it in one line.
    before = len(dante.log())
    assert dante.client_tool("udp", "echo.test", 7999, 3) == {"error": "ECONNREFUSED"}
    log = dante.log()[before:]
    assert "Traceback" not in log and " ERROR " not in log
    ended = [ln for ln in log.splitlines() if "UDP session" in ln and "ended" in ln]
    assert len(ended) == 1 and "UDP session 198.18.0.1:" in ended[0], ended


def test_flows_through_connections_made_ready_ahead(dante: Testbed) -> None:
    # ?preconnect=1: each flow's proxy connection was connected and greeted
    # while the previous flow waited for Dante; data, half-close and a
    # refusal come through it as through a new one.
    dante.stop()
    dante.proxy_args = ["--proxy", f"socks5://{SERVER_ADDR}:1081?preconnect=1"]
    try:
        dante.start()
        before = len(dante.log())
        for size in (1, 100_000, 1, 3 * 1024 * 1024):
            result = dante.client_tool("echo", "echo.test", 7001, size)
            assert result == {"sent": size, "received": size, "equal": True}
        assert dante.client_tool("connect", "echo.test", 7999) == {"error": "ECONNREFUSED"}
        assert dante.client_tool("echo", "echo.test", 7001, 10) == {
            "sent": 10,
            "received": 10,
            "equal": True,
        }
        assert "Traceback" not in dante.log()[before:]
    finally:
        dante.stop()
        dante.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
        dante.start()
