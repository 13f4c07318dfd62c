"""`auto_route` inside throwaway namespaces only, never on the host.

Lab layout:

    client ns: tun0 (10.77.0.1/24, fd00:77::1/64), veth 10.200.0.1/24,
               fd00:200::1/64, default routes via the server
    server ns: veth 10.200.0.2/24, fd00:200::2/64; 192.0.2.1 and
               2001:db8::1 on lo (the "internet"), echo servers on 192.0.2.1

Every test moves only its own thread into the client namespace (`inside`),
so the `ip` commands auto_route runs act there.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tun2sx
from tests.support import require
from tun2sx.control.autoroute import AutoRouteError, auto_route
from tun2sx.dataplane.tun import TunDevice, open_tun
from tun2sx.lab.netns import Lab, Namespace, inside

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
MARK = 0x2A
TABLE = 2022
INTERNET4, INTERNET6 = "192.0.2.1", "2001:db8::1"
_SO_MARK = getattr(socket, "SO_MARK", 36)


class Bed:
    def __init__(self, lab: Lab, client: Namespace, veth: str, tun: TunDevice) -> None:
        self.lab, self.client, self.veth, self.tun = lab, client, veth, tun

    def routing(self) -> dict[str, str]:
        """Everything auto_route may touch, as `ip` prints it."""
        state = {}
        for family in ("-4", "-6"):
            state[f"{family} rule"] = self.client.run(["ip", family, "rule", "show"]).stdout
            state[f"{family} table"] = self.client.run(
                ["ip", family, "route", "show", "table", str(TABLE)], check=False
            ).stdout
            state[f"{family} main"] = self.client.run(["ip", family, "route", "show"]).stdout
        return state

    def route_get(self, *args: str) -> str:
        return self.client.run(["ip", "route", "get", *args]).stdout


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    require()
    with Lab("t2sx-route") as lab:
        client = lab.namespace("client")
        server = lab.namespace("server")
        # Loose reverse-path filtering, the common distribution default:
        # replies to marked sockets come in on the veth while the unmarked
        # route back to their source is the TUN.
        for key in ("all", "default"):
            client.run(["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=2"])
        veth, _ = lab.link(
            client, ["10.200.0.1/24", "fd00:200::1/64"], server, ["10.200.0.2/24", "fd00:200::2/64"]
        )
        server.run(["ip", "addr", "add", f"{INTERNET4}/32", "dev", "lo"])
        server.run(["ip", "addr", "add", f"{INTERNET6}/128", "dev", "lo"])
        client.run(["ip", "route", "add", "default", "via", "10.200.0.2"])
        client.run(["ip", "-6", "route", "add", "default", "via", "fd00:200::2"])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        server.spawn([sys.executable, "-m", "tests.e2e.servers", "--bind", INTERNET4], env=env)
        server.wait_listening(7001)
        with inside(client):
            tun = open_tun(
                "tun0", mtu=1500, offload=False, addresses=("10.77.0.1/24", "fd00:77::1/64")
            )
        with tun:
            yield Bed(lab, client, veth, tun)


def test_rules_and_routes_before_inside_after(bed: Bed) -> None:
    before = bed.routing()
    assert str(TABLE) not in before["-4 rule"] + before["-6 rule"]
    with inside(bed.client), auto_route("tun0", fwmark=MARK, table=TABLE):
        during = bed.routing()
    for family in ("-4", "-6"):
        rules = during[f"{family} rule"]
        assert f"9000:\tnot from all fwmark {hex(MARK)} lookup {TABLE}" in rules
        assert "8999:\tfrom all lookup main suppress_prefixlength 0" in rules
        assert during[f"{family} table"].startswith("default dev tun0")
        assert during[f"{family} main"] == before[f"{family} main"]  # main table untouched
    assert bed.routing() == before


def test_ipv4_only_leaves_ipv6_alone(bed: Bed) -> None:
    before = bed.routing()
    with inside(bed.client), auto_route("tun0", fwmark=MARK, ipv6=False):
        during = bed.routing()
    assert during["-6 rule"] == before["-6 rule"] and during["-6 table"] == before["-6 table"]
    assert str(TABLE) in during["-4 rule"]
    assert bed.routing() == before


def test_kernel_routes_unmarked_into_tun_marked_and_lan_around_it(bed: Bed) -> None:
    with inside(bed.client), auto_route("tun0", fwmark=MARK):
        into_tun = bed.route_get(INTERNET4)
        marked = bed.route_get(INTERNET4, "mark", hex(MARK))
        lan = bed.route_get("10.200.0.2")
        into_tun6 = bed.route_get(INTERNET6)
        marked6 = bed.route_get(INTERNET6, "mark", hex(MARK))
    assert "dev tun0" in into_tun and f"table {TABLE}" in into_tun
    assert "via 10.200.0.2" in marked and "tun0" not in marked
    assert f"dev {bed.veth}" in lan and "tun0" not in lan
    assert "dev tun0" in into_tun6
    assert "via fd00:200::2" in marked6
    assert "via 10.200.0.2" in bed.route_get(INTERNET4)  # undone


def echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_traffic_goes_through_tun2sx_and_its_marked_sockets_bypass_it(bed: Bed) -> None:
    # tun2sx serves its own fd on the same device; its direct outbound marks
    # its sockets, so without the fwmark rule this would loop forever.
    fd = os.dup(bed.tun.fileno())
    with inside(bed.client), auto_route("tun0", fwmark=MARK):
        handle = tun2sx.start(
            tun_fd=fd, config={"outbound": "direct://", "fwmark": MARK, "fake_ip": False}
        )
        try:
            with socket.create_connection((INTERNET4, 7001), timeout=10) as app:
                assert app.getsockname()[0] == "10.77.0.1"  # into the TUN
                assert echo_once(app, b"x" * 100_000) == b"x" * 100_000
            assert handle.stats()["tcp_flows_started"] == 1

            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as own:
                own.settimeout(10)
                own.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK)
                own.connect((INTERNET4, 7001))
                assert own.getsockname()[0] == "10.200.0.1"  # around it
                assert echo_once(own, b"marked") == b"marked"
            assert handle.stats()["tcp_flows_started"] == 1
        finally:
            handle.stop()
            assert handle.wait(10)
    assert handle.error is None


def test_a_strict_reverse_path_filter_is_named_with_the_fix(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    # Loose (the bed's setting): nothing to say.
    with caplog.at_level(logging.WARNING), inside(bed.client), auto_route("tun0", fwmark=MARK):
        pass
    assert "rp_filter" not in caplog.text
    # Strict on the device holding the default route (the kernel takes the
    # larger of `all` and the device's value): replies to the marked
    # sockets would be dropped, and the log says how to fix it.
    keys = [f"net.ipv4.conf.{name}.rp_filter" for name in ("all", bed.veth)]
    bed.client.run(["sysctl", "-qw", *(f"{key}=1" for key in keys)])
    try:
        with caplog.at_level(logging.WARNING), inside(bed.client), auto_route("tun0", fwmark=MARK):
            pass
    finally:
        bed.client.run(["sysctl", "-qw", *(f"{key}=2" for key in keys)])
    assert f"reverse-path filtering is strict on {bed.veth} (rp_filter=1)" in caplog.text
    assert f"net.ipv4.conf.{bed.veth}.rp_filter=2" in caplog.text


def test_body_error_still_undoes(bed: Bed) -> None:
    before = bed.routing()
    with pytest.raises(ZeroDivisionError), inside(bed.client), auto_route("tun0", fwmark=MARK):
        1 / 0  # noqa: B018
    assert bed.routing() == before


def test_changes_already_gone_are_tolerated(bed: Bed) -> None:
    before = bed.routing()
    with inside(bed.client), auto_route("tun0", fwmark=MARK):
        bed.client.run(["ip", "-4", "rule", "del", "priority", "9000"])
        bed.client.run(["ip", "-6", "route", "flush", "table", str(TABLE)])
    assert bed.routing() == before


def test_missing_device_names_the_command_and_changes_nothing(bed: Bed) -> None:
    before = bed.routing()
    with (
        pytest.raises(AutoRouteError, match=r"ip -4 route add default dev nosuch0 table 2022: "),
        inside(bed.client),
        auto_route("nosuch0", fwmark=MARK),
    ):
        pytest.fail("entered")
    assert bed.routing() == before


def test_failure_halfway_rolls_back_what_was_added(bed: Bed) -> None:
    # Table 2022 already routing IPv6 somewhere: the -6 route add fails after
    # every IPv4 change was made, and those must be taken back.
    bed.client.run(["ip", "-6", "route", "add", "default", "dev", bed.veth, "table", str(TABLE)])
    try:
        before = bed.routing()
        router = auto_route("tun0", fwmark=MARK)
        with (
            pytest.raises(AutoRouteError, match=r"ip -6 route add default dev tun0 table 2022"),
            inside(bed.client),
        ):
            router.apply()
        assert router.applied == 0
        assert bed.routing() == before
    finally:
        bed.client.run(["ip", "-6", "route", "flush", "table", str(TABLE)])


@pytest.mark.parametrize("device_went", [True, False])
def test_what_a_killed_run_left_is_removed_then_added(
    bed: Bed, caplog: pytest.LogCaptureFixture, device_went: bool
) -> None:
    """After kill -9 the rules stay; the next start recognises and removes
    them instead of failing with "File exists". With a TUN that outlived
    the run (persistent) the table's route into it stays too."""
    before = bed.routing()
    killed = auto_route("tun0", fwmark=MARK)
    with inside(bed.client):
        killed.apply()  # ... and never undone: the process was killed
    if device_went:  # the usual case: the TUN, and its routes, went with the process
        for family in ("-4", "-6"):
            bed.client.run(["ip", family, "route", "flush", "table", str(TABLE)])
    try:
        with caplog.at_level(logging.WARNING), inside(bed.client), auto_route("tun0", fwmark=MARK):
            during = bed.routing()
    finally:
        with inside(bed.client):
            killed.undo()
    assert "removed what an earlier run of tun2sx left behind" in caplog.text
    for family in ("-4", "-6"):
        rules = during[f"{family} rule"]
        assert rules.count(f"9000:\tnot from all fwmark {hex(MARK)} lookup {TABLE}") == 1
        assert rules.count("8999:\tfrom all lookup main suppress_prefixlength 0") == 1
        assert during[f"{family} table"].startswith("default dev tun0")
    assert bed.routing() == before


def test_a_killed_run_with_another_mark_is_removed_too(bed: Bed) -> None:
    # Its rule would send our marked sockets into the TUN: a loop.
    before = bed.routing()
    killed = auto_route("tun0", fwmark=MARK + 1)
    with inside(bed.client):
        killed.apply()
    try:
        with inside(bed.client), auto_route("tun0", fwmark=MARK):
            during = bed.routing()
    finally:
        with inside(bed.client):
            killed.undo()
    assert hex(MARK + 1) not in during["-4 rule"] + during["-6 rule"]
    assert bed.routing() == before


@pytest.mark.parametrize(
    "kwargs",
    [{"fwmark": 0}, {"fwmark": 1, "table": 254}, {"fwmark": 1, "priority": 32766}],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        auto_route("tun0", **kwargs)


def test_steps_pair_each_add_with_its_delete() -> None:
    steps = auto_route("tun0", fwmark=MARK, ipv6=False).steps
    assert [add for add, _ in steps] == [
        ["ip", "-4", "route", "add", "default", "dev", "tun0", "table", "2022"],
        [
            "ip",
            "-4",
            "rule",
            "add",
            "table",
            "main",
            "suppress_prefixlength",
            "0",
            "priority",
            "8999",
        ],
        ["ip", "-4", "rule", "add", "not", "fwmark", "0x2a", "table", "2022", "priority", "9000"],
    ]
    for add, delete in steps:
        assert delete == [word if word != "add" else "del" for word in add]
