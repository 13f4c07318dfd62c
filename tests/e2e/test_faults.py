"""End to end under faults: what the application sees when things break.

- SYN flood from many spoofed sources into the TUN: a legitimate request
  still gets through, and tun2sx's memory stays bounded (the half-open cap
  and the flow cap hold).
- SYN flood at 1,500 a second from spoofed sources to one destination
  whose connects time out: while it runs, DNS answers and a connection to
  a live server completes in well under a second (the per-destination cap
  leaves the other half-open slots to other destinations), and the SYNs
  the cap dropped are counted.
- tun2sx restarted during traffic: the flow in flight ends (never a silent
  hang) and an idle one gets a reset (an EOF would make a cut-off transfer
  look complete), new flows work, and a fake IP handed out before the
  restart still maps to its name.
- The SOCKS5 server (Dante) killed mid-transfer: the application's
  connection ends promptly instead of hanging, and once Dante is back new
  flows work without restarting tun2sx.
- The TUN deleted under a running tun2sx (mid-transfer): it exits at once
  with status 1 and one line naming the device, no traceback.
- A fake-IP pool of three addresses, four names and more: the newest names
  reach their own servers, the least recently used name's address now
  reaches the newer name, the old name gets an address again, and an
  address whose mapping is gone (table not kept across a restart) is
  refused at once instead of hanging.

A hang shows up as the client's own 15 s socket timeout ("timeout"), which
every assertion here rejects.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e.testbed import ROOT, WHOAMI_NAMES, WHOAMI_PORT, Testbed, rss_kib

pytestmark = pytest.mark.e2e

# The streaming client's writer thread may take the reset (EPIPE or
# ECONNRESET from send) before its reader looks, which then finds the
# socket shut and reads b"": "eof" there is the client's race, not a FIN.
FLOW_ENDS = ("eof", "ECONNRESET", "EPIPE")


def _fault_client(bed: Testbed, *args: object) -> subprocess.Popen[bytes]:
    return bed.client.spawn(
        [sys.executable, "-m", "tests.e2e.faultclient", *map(str, args)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )


def _start_stream(bed: Testbed, host: str) -> subprocess.Popen[bytes]:
    """Start an endless echo stream; return once a MiB has made the round trip."""
    proc = _fault_client(bed, "stream", host, 7001)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "the stream did not start within 30 s"
    line = proc.stdout.readline()
    assert json.loads(line) == {"streaming": True}, line
    return proc


def _stream_end(bed: Testbed, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    """Wait (bounded) for the stream client's final line."""
    out, _ = proc.communicate(timeout=60)
    bed.lab.stop(proc)
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


def _resolve(bed: Testbed, name: str) -> str:
    fake = bed.client_run(["dig", "+short", "+time=3", name, "A"]).stdout.strip()
    assert ipaddress.ip_address(fake) in ipaddress.ip_network("198.18.0.0/15")
    return fake


def test_syn_flood_from_spoofed_sources_leaves_room_for_real_flows(dante: Testbed) -> None:
    testbed = dante
    assert testbed.proc is not None
    pid = testbed.proc.pid
    fake = _resolve(testbed, "echo.test")
    rss_before = rss_kib(pid)
    flood = _fault_client(testbed, "synflood", fake, 7001, 20_000)
    try:
        # While the flood runs (and after), a real client is served.
        curl = testbed.client_run(
            ["curl", "-sS", "--max-time", "20", "http://www.test:8080/"], check=False, timeout=40
        )
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == "<h1>tun2sx e2e</h1>\n"
        out, _ = flood.communicate(timeout=120)
    finally:
        testbed.lab.stop(flood)
    assert json.loads(out) == {"sent": 20_000}
    again = testbed.client_tool("download", "big.test", 7003, 1_000_000)
    assert again == {"received": 1_000_000, "equal": True}
    # 20,000 half-open attempts must not cost 20,000 flows' worth of memory:
    # the half-open cap bounds them (a flow with buffers is ~20 KiB or more).
    assert rss_kib(pid) - rss_before < 64 * 1024
    assert testbed.proc.poll() is None


DEAD_PORT = 7009  # the server namespace drops SYNs to it: connects time out


@pytest.fixture
def dead_port(dante: Testbed) -> Iterator[Testbed]:
    """Dante's connects to the server's `DEAD_PORT` get no answer at all."""
    nft = ["nft", "-f", "-"]
    rules = (
        "table inet t2sx_dead {\n"
        f"  chain input {{ type filter hook input priority 0; tcp dport {DEAD_PORT} drop; }}\n"
        "}\n"
    )
    dante.server.run(nft, input=rules)
    try:
        yield dante
    finally:
        dante.server.run(["nft", "delete", "table", "inet", "t2sx_dead"])


def test_syn_flood_to_a_dead_destination_leaves_others_served_at_once(dead_port: Testbed) -> None:
    testbed = dead_port
    assert testbed.proc is not None
    fake = _resolve(testbed, "echo.test")
    # 10,000 spoofed SYNs at 1,500 a second to a port whose connects time
    # out: each is a pending connect for the whole connect timeout.
    flood = _fault_client(testbed, "synflood", fake, DEAD_PORT, 10_000, 1500)
    try:
        assert flood.stdout is not None
        ready, _, _ = select.select([flood.stdout], [], [], 30)
        assert ready, "the flood did not get under way within 30 s"
        assert json.loads(flood.stdout.readline()) == {"flooding": True}
        dig = testbed.client_run(
            ["dig", "+short", "+time=1", "+tries=1", "www.test", "A"], check=False
        )
        curl = testbed.client_run(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{time_namelookup} %{time_connect}",
                "http://www.test:8080/",
            ],
            check=False,
            timeout=40,
        )
        still_flooding = flood.poll() is None
        out, _ = flood.communicate(timeout=120)
    finally:
        testbed.lab.stop(flood)
    assert json.loads(out) == {"sent": 10_000}
    assert dig.returncode == 0 and ipaddress.ip_address(dig.stdout.strip()), dig
    assert curl.returncode == 0, curl.stderr
    body, times = curl.stdout.rsplit("\n", 1)
    assert body == "<h1>tun2sx e2e</h1>\n"
    lookup, connect = map(float, times.split())
    assert connect < 1.0, (lookup, connect)
    assert still_flooding  # the connection was made while the SYNs poured in
    assert testbed.proc.poll() is None
    testbed.stop()
    line = next(ln for ln in reversed(testbed.log().splitlines()) if "stopped; " in ln)
    testbed.start()
    stats = ast.literal_eval(line.split("stopped; ", 1)[1])
    # What the caps turned away is counted.
    assert stats["syn_dropped_per_destination"] > 0, stats


def test_restart_during_traffic_fails_flows_cleanly_and_keeps_fake_ips(
    dante: Testbed,
) -> None:
    testbed = dante
    fake = _resolve(testbed, "echo.test")
    stream = _start_stream(testbed, "echo.test")
    idle = _fault_client(testbed, "idle", "echo.test", 7001)
    assert idle.stdout is not None
    ready, _, _ = select.select([idle.stdout], [], [], 30)
    assert ready, "the idle client did not get its echo within 30 s"
    assert json.loads(idle.stdout.readline()) == {"idle": True}
    testbed.stop()
    result = _stream_end(testbed, stream)
    idle_result = _stream_end(testbed, idle)
    testbed.start()  # before asserting: later tests need tun2sx running
    # The persisted table: the same name keeps its fake IP, and a client
    # that cached the IP (no new DNS query) still reaches the name.
    assert _resolve(testbed, "echo.test") == fake
    assert testbed.client_tool("download", fake, 7003, 200_000) == {
        "received": 200_000,
        "equal": True,
    }
    assert result["end"] in FLOW_ENDS, result
    assert idle_result == {"end": "ECONNRESET"}


def test_socks_server_killed_mid_transfer_then_back(dante: Testbed) -> None:
    testbed = dante
    stream = _start_stream(testbed, "echo.test")
    testbed.kill_dante()
    result = _stream_end(testbed, stream)
    assert result["end"] in FLOW_ENDS, result
    # Without the proxy, a new flow is refused (not left hanging).
    refused = testbed.client_tool("connect", "echo.test", 7001)
    assert refused == {"error": "ECONNREFUSED"}
    testbed.start_dante()
    assert testbed.client_tool("echo", "echo.test", 7001, 300_000) == {
        "sent": 300_000,
        "received": 300_000,
        "equal": True,
    }
    assert testbed.proc is not None and testbed.proc.poll() is None


def test_tun_deleted_under_tun2sx_ends_it_with_one_line(dante: Testbed) -> None:
    testbed = dante
    assert testbed.proc is not None
    proc = testbed.proc
    offset = len(testbed.log())
    stream = _start_stream(testbed, "echo.test")  # traffic in flight both ways
    try:
        deleted = time.monotonic()
        testbed.client_run(["ip", "link", "del", "tun0"])
        code = proc.wait(10)
        took = time.monotonic() - deleted
    finally:
        testbed.lab.stop(stream)
        testbed.stop()
        run_log = testbed.log()[offset:]
        testbed.start()  # tun2sx recreates tun0; later tests need it
    assert code == 1, run_log[-2000:]
    assert took < 3, took
    # The last line is the one error line: which device, and why.
    assert run_log.rstrip("\n").rsplit("\n", 1)[-1] == (
        "tun2sx: TUN device tun0 is gone (deleted or closed): File descriptor in bad state"
    ), run_log[-2000:]
    assert "Traceback" not in run_log, run_log[-4000:]


@pytest.fixture
def tiny_pool(testbed: Testbed) -> Iterator[Testbed]:
    """tun2sx with a fake-IP pool of 3 addresses and a table kept in memory only."""
    pool = ("--fake-ip-range", "198.18.0.0/29", "--fake-ip-db", ":memory:")
    testbed.stop()
    testbed.start(*pool)
    try:
        yield testbed
    finally:
        testbed.stop()
        testbed.start()


def _whoami(bed: Testbed, ip: str) -> str:
    """Which server address a connection to `ip` reached (curl's error otherwise)."""
    url = f"http://{ip}:{WHOAMI_PORT}/"
    result = bed.client_run(["curl", "-sS", "--max-time", "5", url], check=False)
    return result.stdout if result.returncode == 0 else f"curl {result.returncode}"


def test_tiny_fake_ip_pool_recycles_the_least_recently_used_name(tiny_pool: Testbed) -> None:
    bed = tiny_pool
    n1, n2, n3, n4 = list(WHOAMI_NAMES)[:4]
    pool = ipaddress.ip_network("198.18.0.0/29")

    def resolve(name: str) -> str:
        fake = bed.client_run(["dig", "+short", "+time=3", name, "A"]).stdout.strip()
        assert ipaddress.ip_address(fake) in pool, (name, fake)
        return fake

    first = {name: resolve(name) for name in (n1, n2, n3)}
    assert len(set(first.values())) == 3  # .0, .7 and the three reserved are never used
    # The pool is full: the fourth name takes the least recently used address.
    assert resolve(n4) == first[n1]
    # The newest names reach their own servers; n1's old address now is n4's.
    assert _whoami(bed, first[n2]) == WHOAMI_NAMES[n2]
    assert _whoami(bed, first[n3]) == WHOAMI_NAMES[n3]
    assert _whoami(bed, first[n1]) == WHOAMI_NAMES[n4]
    # Asked again, n1 gets an address of its own back (n2's, used longest ago).
    again = resolve(n1)
    assert again == first[n2]
    assert _whoami(bed, again) == WHOAMI_NAMES[n1]
    # A restart without a kept table forgets every mapping: an application
    # that cached an address is refused at once (RST: curl 7), no hang (28).
    bed.stop()
    bed.start("--fake-ip-range", "198.18.0.0/29", "--fake-ip-db", ":memory:")
    started = time.monotonic()
    assert _whoami(bed, again) == "curl 7"
    assert time.monotonic() - started < 3
    assert "fake IP has no host name" in bed.log()
