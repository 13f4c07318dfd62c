"""Proxy groups end to end: Dante and microsocks in groups, one killed mid-run.

tun2sx runs from a config file whose groups hold the testbed's two proxies
(Dante on 1081, microsocks on 1080), health-checked by an HTTP GET of the
server's web page through each; one test puts tinyproxy (HTTP CONNECT) and
Dante's SOCKS4 in a group checked by TCP connects instead. The stats endpoint's `/connections` shows
which member carried each live flow (its `chain`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import (
    DANTE_CONF,
    ROOT,
    SERVER_ADDR,
    WHOAMI_NAMES,
    WHOAMI_PORT,
    Testbed,
)
from tests.support import require

pytestmark = pytest.mark.e2e

STATS = "127.0.0.1:9090"
CHECK_URL = f"http://{SERVER_ADDR}:8080/"
INTERVAL, TIMEOUT = 2, 1
HOLD_CLIENT = """
import socket, sys
targets = [arg.rsplit(":", 1) for arg in sys.argv[1:]]
socks = [socket.create_connection((host, int(port)), timeout=20) for host, port in targets]
print("connected", flush=True)
if sys.stdin.readline().strip() == "echo":
    for sock in socks:
        sock.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000 and (data := sock.recv(4096)):
            got += data
        print("echoed" if got == b"x" * 1000 else "lost", flush=True)
"""


def config(groups: str, rules: str = "[]") -> str:
    return f"""
outbound = "main"
rules = {rules}

[outbounds.dante]
url = "socks5://{SERVER_ADDR}:1081"

[outbounds.micro]
url = "socks5://{SERVER_ADDR}:1080"

[stats]
listen = "{STATS}"
interval = 0
{groups}
"""


def group(name: str, kind: str, members: str, interval: float = INTERVAL, extra: str = "") -> str:
    return f"""
[groups.{name}]
type = "{kind}"
members = {members}
url = "{CHECK_URL}"
interval = {interval}
timeout = {TIMEOUT}
{extra}
"""


@pytest.fixture
def grouped(testbed: Testbed) -> Iterator[Testbed]:
    """The testbed, to be started on a config file by the test; Dante alive after."""
    testbed.stop()
    yield testbed
    if testbed.proc is not None:
        testbed.stop()
    if testbed.dante.poll() is not None:
        testbed.start_dante()
    testbed.proxy_args = ["--socks", f"{SERVER_ADDR}:1080"]
    testbed.start()


def start_on(bed: Testbed, text: str) -> None:
    path = Path(bed.tmp) / "groups.toml"
    path.write_text(text)
    bed.proxy_args = ["--config", str(path)]
    bed.start()


def connections(bed: Testbed) -> list[dict[str, object]]:
    """The live flows, from the controller's Clash-shaped list: host (the
    name, else the address), port, chain, rule, network and bytes down."""
    out = bed.client_run(["curl", "-s", "--noproxy", "*", f"http://{STATS}/connections"])
    return [
        {
            "host": row["metadata"]["host"] or row["metadata"]["destinationIP"],
            "port": int(row["metadata"]["destinationPort"]),
            "chain": row["chains"],
            "rule": row["rule"],
            "network": row["metadata"]["network"],
            "bytes_down": row["download"],
        }
        for row in json.loads(out.stdout)["connections"]
    ]


def wait_log(bed: Testbed, text: str, since: int, timeout: float) -> float:
    """Seconds until `text` appears in the log after offset `since`."""
    start = time.monotonic()
    while text not in bed.log()[since:]:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{text!r} not logged within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


class Holder:
    """Connections held open from the client namespace until `close`."""

    def __init__(self, bed: Testbed, *targets: str) -> None:
        argv = [sys.executable, "-c", HOLD_CLIENT, *targets]
        self.proc = subprocess.Popen(
            bed.client.exec_argv(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "connected", line

    def echo(self) -> list[str]:
        """Send 1000 bytes on each connection; whether each came back whole."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("echo\n")
        self.proc.stdin.flush()
        return [line.strip() for line in self.proc.stdout]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def held_flows(bed: Testbed, *targets: str) -> list[dict[str, object]]:
    """The live flows while connections to `targets` are held open."""
    held = Holder(bed, *targets)
    try:
        return connections(bed)
    finally:
        held.close()


def echo_flow(bed: Testbed) -> dict[str, object]:
    """The flow of one connection to the echo server, while it is open."""
    (flow,) = [c for c in held_flows(bed, "echo.test:7001") if c["port"] == 7001]
    return flow


@pytest.mark.parametrize("kind", ["fallback", "url-test"])
def test_new_flows_leave_a_killed_proxy_within_one_interval(grouped: Testbed, kind: str) -> None:
    bed = grouped
    # `main` prefers Dante (url-test: the first member until another is
    # faster by more than the tolerance, which no loopback proxy is);
    # `slow` prefers microsocks and carries big.test.
    start_on(
        bed,
        config(
            group("main", kind, '["dante", "micro"]', extra="tolerance = 5000")
            + group("slow", "fallback", '["micro", "dante"]'),
            rules='["DOMAIN,big.test,slow"]',
        ),
    )
    flow = echo_flow(bed)
    assert flow["chain"] == ["dante", "main"] and flow["rule"] == "Match"
    # A download through microsocks, at 1 MB/s for about five seconds.
    download = subprocess.Popen(
        bed.client.exec_argv(
            ["curl", "-sS", "--limit-rate", "1M", "-o", "-", "http://big.test:8080/big.bin"]
        ),
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(1)
        (flow,) = [c for c in connections(bed) if c["port"] == 8080]
        assert flow["chain"] == ["micro", "slow"] and flow["rule"] == "Domain"
        offset = len(bed.log())
        bed.kill_dante()
        # No flow goes to Dante meanwhile: the health checks alone find it.
        found = wait_log(bed, "group main: dante is down", offset, INTERVAL + TIMEOUT + 5)
        assert found <= INTERVAL + 1, found
        assert echo_flow(bed)["chain"] == ["micro", "main"]
        body, _ = download.communicate(timeout=30)
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert download.returncode == 0
    assert body == (bed.www / "big.bin").read_bytes()
    log = bed.log()[offset:]
    assert "Traceback" not in log and " ERROR " not in log
    # Dante back: the next round of checks returns fallback to it; url-test
    # stays where it is, Dante being no faster by more than the tolerance.
    offset = len(bed.log())
    bed.start_dante()
    wait_log(bed, "group main: dante is up", offset, INTERVAL + TIMEOUT + 5)
    assert echo_flow(bed)["chain"] == ["dante" if kind == "fallback" else "micro", "main"]


def test_a_flow_refused_by_a_dead_proxy_moves_the_next_at_once(grouped: Testbed) -> None:
    bed = grouped
    # Checks every ten minutes: only the failing flow can tell.
    start_on(bed, config(group("main", "fallback", '["dante", "micro"]', interval=600)))
    assert bed.client_tool("echo", "echo.test", 7001, 1000)["equal"] is True
    offset = len(bed.log())
    bed.kill_dante()
    # The client tries the name's AAAA, then its A: the first connect goes
    # to Dante and is refused (RST), which marks Dante down, and the
    # second, a moment later, goes to microsocks.
    assert bed.client_tool("connect", "echo.test", 7001) == {"connected": True}
    log = bed.log()[offset:]
    assert "group main: dante is down" in log
    assert log.count("via main: SOCKS5 proxy 10.200.0.2:1081 unreachable") == 1, log
    assert bed.client_tool("download", "big.test", 7003, 1_000_000) == {
        "received": 1_000_000,
        "equal": True,
    }
    assert echo_flow(bed)["chain"] == ["micro", "main"]


def test_load_balance_keeps_each_site_on_one_proxy(grouped: Testbed) -> None:
    bed = grouped
    start_on(bed, config(group("main", "load-balance", '["dante", "micro"]')))
    names = [f"n{i}.test" for i in range(1, 6)]
    # Each name twice, at the same time; whoami answers only once asked.
    live = held_flows(bed, *(f"{name}:7004" for name in names * 2))
    chains: dict[str, set[tuple[str, ...]]] = {}
    for flow in live:
        chains.setdefault(str(flow["host"]), set()).add(tuple(flow["chain"]))  # type: ignore[arg-type]
    assert sorted(chains) == names
    assert all(len(seen) == 1 for seen in chains.values()), chains
    members = {next(iter(seen))[0] for seen in chains.values()}
    assert members == {"dante", "micro"}, chains  # both carry some sites
    before = {host: next(iter(seen))[0] for host, seen in chains.items()}
    # Dante dies: only its sites move.
    offset = len(bed.log())
    bed.kill_dante()
    wait_log(bed, "group main: dante is down", offset, INTERVAL + TIMEOUT + 5)
    live = held_flows(bed, *(f"{name}:7004" for name in names))
    after = {str(flow["host"]): flow["chain"][0] for flow in live}  # type: ignore[index]
    assert after == dict.fromkeys(names, "micro")
    assert [h for h in names if before[h] != after[h]] == [h for h in names if before[h] == "dante"]


def test_a_select_group_switched_at_run_time(grouped: Testbed) -> None:
    bed = grouped
    path = Path(bed.tmp) / "select.toml"
    path.write_text(
        config(group("pick", "select", '["dante", "micro"]')).replace(
            'outbound = "main"', 'outbound = "pick"'
        )
        + f"""
[tun]
name = "tun0"
addresses = ["198.18.0.1/15", "fd00:7e::1/64"]
[dns]
fake_ip_db = "{bed.fakeip_db}"
upstream = "{SERVER_ADDR}:5353"
"""
    )
    driver = subprocess.Popen(
        bed.client.exec_argv([sys.executable, "-m", "tests.e2e.selectdriver", str(path)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert driver.stdin is not None and driver.stdout is not None
    try:
        assert driver.stdout.readline().strip() == "serving"
        bed.client_run(["ip", "route", "replace", "default", "dev", "tun0"])
        bed.client_run(["ip", "-6", "route", "replace", "default", "dev", "tun0"])
        first = Holder(bed, "echo.test:7001")
        try:
            driver.stdin.write("pick micro\n")
            driver.stdin.flush()
            assert driver.stdout.readline().strip() == "selected micro"
            second = Holder(bed, "echo.test:7001")
            try:
                chains = sorted(tuple(c["chain"]) for c in connections(bed))  # type: ignore[arg-type]
                assert chains == [("dante", "pick"), ("micro", "pick")]
            finally:
                second.close()
            # The flow that began before the switch is still Dante's, and whole.
            assert first.echo() == ["echoed"]
        finally:
            first.close()
        driver.stdin.write("pick nobody\n")
        driver.stdin.flush()
        assert driver.stdout.readline().startswith("error: group pick has no member")
    finally:
        driver.stdin.close()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()


def test_after_reloads_one_set_of_health_checks_runs(grouped: Testbed) -> None:
    """A reload replaces the groups' checks: a proxy going down is one log
    line (and one round of probes), not one per configuration ever loaded."""
    bed = grouped
    start_on(bed, config(group("main", "fallback", '["dante", "micro"]')))
    assert bed.proc is not None
    for _ in range(2):
        offset = len(bed.log())
        bed.proc.send_signal(signal.SIGHUP)
        wait_log(bed, "tun2sx: reloaded", offset, 15)
    offset = len(bed.log())
    bed.kill_dante()
    wait_log(bed, "group main: dante is down", offset, INTERVAL + TIMEOUT + 5)
    # Every set of checks still running has had a whole round by now.
    time.sleep(INTERVAL + TIMEOUT + 1)
    assert bed.log()[offset:].count("group main: dante is down") == 1
    assert "Traceback" not in bed.log()


TARPIT = f"""
import socket, time
sock = socket.socket()
sock.bind(("{SERVER_ADDR}", 1090))
sock.listen()  # connections complete in the backlog and hear nothing
time.sleep(300)
"""


def test_after_a_reload_new_flows_keep_away_from_a_proxy_found_down(grouped: Testbed) -> None:
    """The group built by a reload remembers what the checks found: it does
    not send flows to a silent proxy again while its own first check waits."""
    bed = grouped
    tarpit = bed.server.spawn([sys.executable, "-c", TARPIT])
    try:
        bed.server.wait_listening(1090)
        checks = f"""
[groups.main]
type = "fallback"
members = ["silent", "micro"]
url = "{CHECK_URL}"
interval = 60
timeout = 5

[outbounds.silent]
url = "socks5://{SERVER_ADDR}:1090"
"""
        start_on(bed, config(checks))
        assert bed.proc is not None
        # A reload while the first check of the silent proxy waits (5 s):
        # that check ends with its routing, the new routing's finds it down.
        bed.proc.send_signal(signal.SIGHUP)
        wait_log(bed, "tun2sx: reloaded", 0, 4)
        wait_log(bed, "group main: silent is down", 0, 15)
        offset = len(bed.log())
        bed.proc.send_signal(signal.SIGHUP)
        wait_log(bed, "tun2sx: reloaded", offset, 15)
        # Within the new group's first check of the silent proxy (5 s): sent
        # there, the connect would wait for the proxy's answer until it gives up.
        start = time.monotonic()
        (flow,) = [c for c in held_flows(bed, "n1.test:7004") if c["port"] == 7004]
        assert time.monotonic() - start < 4
        assert flow["chain"] == ["micro", "main"]
        log = bed.log()
        assert log.count("group main: silent is down") == 1
        assert "Traceback" not in log and "Cancelled" not in log
    finally:
        bed.lab.stop(tarpit)


TINYPROXY_PORT = 8890
WHOAMI_ADDR = WHOAMI_NAMES["n1.test"]
TINYPROXY_CONF = f"""\
Port {TINYPROXY_PORT}
Listen {SERVER_ADDR}
MaxClients 20
Allow 10.200.0.0/24
ConnectPort 7003
ConnectPort {WHOAMI_PORT}
"""


def test_http_and_socks4_members_checked_by_tcp_connect(grouped: Testbed) -> None:
    require("tinyproxy")
    bed = grouped
    conf = bed.tmp / "group-tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF)
    tinyproxy = bed.server.spawn(["tinyproxy", "-d", "-c", str(conf)])
    try:
        bed.server.wait_listening(TINYPROXY_PORT)
        members = f"""
[outbounds.web]
url = "http://{SERVER_ADDR}:{TINYPROXY_PORT}"
[outbounds.four]
url = "socks4://tun2sx@{SERVER_ADDR}:1081"
"""
        start_on(
            bed,
            config(group("main", "fallback", '["web", "four"]'))
            .replace(f'url = "{CHECK_URL}"', f'url = "tcp://{SERVER_ADDR}:7003"')
            .replace("[stats]", members + "[stats]"),
        )
        # By address (SOCKS4 carries no names): one the client reaches only
        # through the TUN, where the whoami server answers with it.
        held = held_flows(bed, f"{WHOAMI_ADDR}:{WHOAMI_PORT}")
        assert [c["chain"] for c in held] == [["web", "main"]], held
        offset = len(bed.log())
        bed.lab.processes = [(p, a) for p, a in bed.lab.processes if p is not tinyproxy]
        os.kill(tinyproxy.pid, signal.SIGKILL)
        tinyproxy.wait(10)
        found = wait_log(bed, "group main: web is down", offset, INTERVAL + TIMEOUT + 5)
        assert found <= INTERVAL + 1, found
        held = held_flows(bed, f"{WHOAMI_ADDR}:{WHOAMI_PORT}")
        assert [c["chain"] for c in held] == [["four", "main"]], held
        url = f"http://{WHOAMI_ADDR}:{WHOAMI_PORT}/"
        assert bed.client_run(["curl", "-sS", "--max-time", "10", url]).stdout == WHOAMI_ADDR
        assert "Traceback" not in bed.log()[offset:]
    finally:
        if tinyproxy.poll() is None:
            bed.lab.stop(tinyproxy)


# --- UDP through groups ---------------------------------------------------------------


DEAD_PROXY = f"socks5://{SERVER_ADDR}:1099"  # nothing listens there


def udp_flows(bed: Testbed) -> list[dict[str, object]]:
    """The UDP sessions tun2sx holds (each lives `udp_timeout` after its last datagram)."""
    return [c for c in connections(bed) if c["network"] == "udp"]


def test_udp_through_nested_groups_reaches_dantes_udp_associate(grouped: Testbed) -> None:
    bed = grouped
    # `main` falls back from a proxy that is not there to `inner`, a select
    # group whose first member, Dante, carries UDP (microsocks does not).
    start_on(
        bed,
        config(
            group("main", "fallback", '["dead", "inner"]')
            + group("inner", "select", '["dante", "micro"]')
        ).replace("[stats]", f'[outbounds.dead]\nurl = "{DEAD_PROXY}"\n\n[stats]'),
    )
    assert bed.client_tool("udp", "echo.test", 7001, 20)["echoed"] == 20
    (flow,) = udp_flows(bed)
    assert (flow["host"], flow["port"]) == ("echo.test", 7001)
    assert flow["chain"] == ["dante", "inner", "main"]
    tcp = [c for c in held_flows(bed, "echo.test:7001") if c["network"] == "tcp"]
    assert [c["chain"] for c in tcp] == [["dante", "inner", "main"]]


def test_udp_flow_through_a_dead_member_moves_the_next_one(grouped: Testbed) -> None:
    bed = grouped
    # Checks every ten minutes, the first before any flow: only then is
    # Dante killed, so only the failing UDP flow can tell.
    start_on(bed, config(group("main", "fallback", '["dante", "micro"]', interval=600)))
    assert bed.client_tool("udp", "echo.test", 7001, 3)["echoed"] == 3
    offset = len(bed.log())
    bed.kill_dante()
    # The UDP flow through the dead Dante fails as a real network would.
    assert bed.client_tool("udp", "echo.test", 7001, 1) == {"error": "ECONNREFUSED"}
    log = bed.log()[offset:]
    assert "group main: dante is down" in log
    assert "Traceback" not in log
    # TCP flows now take microsocks without a failed connect of their own.
    assert echo_flow(bed)["chain"] == ["micro", "main"]


@pytest.mark.parametrize(
    ("member", "error"), [("REJECT", "EHOSTUNREACH"), ("micro", "ECONNREFUSED")]
)
def test_udp_through_a_member_that_carries_none_is_refused_in_one_line(
    grouped: Testbed, member: str, error: str
) -> None:
    bed = grouped
    start_on(bed, config(group("main", "select", f'["{member}", "dante"]')))
    before = len(bed.log())
    assert bed.client_tool("udp", "echo.test", 7001, 1) == {"error": error}
    log = bed.log()[before:]
    assert "Traceback" not in log
    if member == "micro":
        # microsocks refuses UDP ASSOCIATE: that is no failure of the proxy,
        # which stays up for TCP.
        assert "does not offer UDP ASSOCIATE" in log
        assert "is down" not in log
        assert echo_flow(bed)["chain"] == ["micro", "main"]
    else:
        # REJECT refuses TCP too: an RST to the SYN.
        assert bed.client_tool("connect", "echo.test", 7001) == {"error": "ECONNREFUSED"}
        assert "via main: group main: REJECT" in bed.log()[before:]


SECOND_DANTE_PORT = 1082
# Sends a datagram to the echo every 50 ms on one socket for `seconds`,
# and prints, as JSON, when each echo came back and when an error was
# reported (an ICMP error ends only that recv).
STEADY_UDP_CLIENT = """
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((host, port))
sock.settimeout(0.05)
start = time.monotonic()
echoes, errors = [], []
print("started", flush=True)
while (now := time.monotonic() - start) < seconds:
    try:
        sock.send(b"steady")
        while sock.recv(100) == b"steady":
            echoes.append(round(time.monotonic() - start, 2))
    except TimeoutError:
        pass
    except OSError as exc:
        errors.append([round(now, 2), exc.errno])
print(json.dumps({"echoes": echoes, "errors": errors}), flush=True)
"""


def test_udp_goes_on_through_the_next_member_when_its_proxy_is_killed(
    grouped: Testbed,
) -> None:
    bed = grouped
    conf = bed.tmp / "danted-2.conf"
    conf.write_text(DANTE_CONF.format(addr=SERVER_ADDR).replace("1081", str(SECOND_DANTE_PORT)))
    second = bed.server.spawn(["danted", "-f", str(conf)])
    try:
        bed.server.wait_listening(SECOND_DANTE_PORT)
        start_on(
            bed,
            config(group("main", "fallback", '["dante", "dante2"]')).replace(
                "[stats]",
                f'[outbounds.dante2]\nurl = "socks5://{SERVER_ADDR}:{SECOND_DANTE_PORT}"\n[stats]',
            ),
        )
        client = subprocess.Popen(
            bed.client.exec_argv(
                [sys.executable, "-c", STEADY_UDP_CLIENT, "echo.test", "7001", "8"]
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "started"
        started = time.monotonic()
        # Ten echoes through Dante first.
        while not (flows := udp_flows(bed)) or int(flows[0]["bytes_down"]) < 60:  # type: ignore[call-overload]
            assert time.monotonic() - started < 5, f"no steady UDP session: {flows}"
            time.sleep(0.05)
        (flow,) = flows
        assert flow["chain"] == ["dante", "main"]
        offset = len(bed.log())
        killing = time.monotonic() - started
        bed.kill_dante()
        killed = time.monotonic() - started
        result = json.loads(client.communicate(timeout=30)[0])
        echoes = result["echoes"]
        # Echoes before the kill, and after it on the same socket, through
        # the second Dante, within one round of checks.
        assert echoes[0] < killed < echoes[-1], (killed, result)
        after = [t for t in echoes if t > killed]
        assert after[0] - killed <= INTERVAL + TIMEOUT + 1, (killed, result)
        assert echoes[-1] > 7, result
        # The session through the dead Dante ended, and the next datagram's
        # new one through it was refused: the application heard of that
        # (ECONNREFUSED, as from a host that lost its port), nothing before.
        assert all(when >= killing - 0.1 for when, _errno in result["errors"]), result
        (flow,) = udp_flows(bed)
        assert flow["chain"] == ["dante2", "main"]
        log = bed.log()[offset:]
        assert "group main: dante is down" in log and "Traceback" not in log
    finally:
        if second.poll() is None:
            bed.lab.stop(second)
