"""Soaks, short enough for CI: mixed traffic, then nothing left behind.

tests/e2e/soakclient.py runs, in the client namespace, many short
connections at once (echo with the application's half-close, upload,
download, download after the application's half-close; IPv4 and IPv6;
names through the fake-IP DNS) beside a paced long download and upload,
applications that reset their transfers partway, DNS queries and UDP
through Dante's UDP ASSOCIATE. Every byte is compared. Afterwards tun2sx
must hold no flow, have dropped nothing, and have logged no error.

On both device kinds: with offload, and without it at MTU 1500 (what an
Android VpnService fd gives), where a crowded engine writes a download's
runs in bursts from per-flow queues and a flow alone reads the answers to
its own SYN-ACK and FIN. Then a reload and a stop under that traffic, and
the mix under loss and reordering between the application and the TUN.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.lossy import LossyBed
from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, running_bed
from tests.support import require
from tun2sx.lab.netns import Lab, Namespace

pytestmark = pytest.mark.e2e

STATS = "127.0.0.1:9077"
MIX = ("--short", "16", "--bulk", "--udp", "--resets", "--rate", "5")
DEVICES = {"offload": (), "no-offload": ("--no-offload", "--mtu", "1500")}
# What the short clients and the bulk pair do; each must have happened.
KINDS = ("echo", "upload", "download", "hcdownload")


def _soak(ns: Namespace, seconds: float, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ns.exec_argv([sys.executable, "-m", "tests.e2e.soakclient", str(seconds), *args]),
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )


def _result(proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def _stats(ns: Namespace) -> dict[str, int]:
    out = ns.run(["curl", "-s", "--max-time", "10", f"http://{STATS}/stats"]).stdout
    stats: dict[str, int] = json.loads(out)
    return stats


def _settled(ns: Namespace, timeout: float = 15) -> dict[str, int]:
    """The stats once no TCP flow is left (or as they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(ns)
        if stats["tcp_flows"] == 0 and stats["tcp_connections"] == 0:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.25)


def _log_problems(text: str) -> list[str]:
    words = ("Traceback", "ERROR", "WARNING", "CRITICAL", "Exception")
    return [line for line in text.splitlines() if any(w in line for w in words)]


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    require("danted", "curl")
    with Lab("t2sx-soak") as lab, tempfile.TemporaryDirectory() as tmp:
        testbed = Testbed(lab, Path(tmp))
        testbed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
        testbed.verbosity = []  # flow lines would be thousands here
        try:
            yield testbed
        finally:
            if testbed.proc is not None:
                testbed.stop()


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixed_soak_is_exact_and_leaves_nothing_behind(bed: Testbed, device: str) -> None:
    if bed.proc is not None:
        bed.stop()
    offset = bed.log_path.stat().st_size if bed.log_path.exists() else 0
    bed.start("--stats-listen", STATS, "--stats-interval", "0", *DEVICES[device])
    result = _result(_soak(bed.client, 8, *MIX, "--v6"))
    # A datagram may be lost under load (UDP); TCP and DNS never.
    failed = {k: v for k, v in result["failed"].items() if k != "udp-echo"}
    assert failed == {}, result["details"]
    assert all("timeout" in d for d in result["details"]), result["details"]
    done = result["done"]
    for kind in KINDS:
        assert done.get(f"{kind}4", 0) > 0 and done.get(f"{kind}6", 0) > 0, done
    assert done["bulk-download"] == done["bulk-upload"] == 1, done
    assert done["reset-download"] + done["reset-upload"] > 0, done
    assert done["dns"] > 0 and done["udp-echo"] > 0, done
    assert result["stuck_threads"] == 0
    stats = _settled(bed.client)
    assert (stats["tcp_flows"], stats["tcp_connections"]) == (0, 0), stats
    assert stats["drops"] == 0, stats
    assert stats.get("tcp_flow_errors", 0) == 0, stats
    # Every echo datagram that went up came back down, and DNS was served.
    assert stats["udp_datagrams_up"] == stats["udp_datagrams_down"] > 0, stats
    assert stats["dns_queries"] >= done["dns"]
    assert bed.stop() == 0
    with bed.log_path.open("rb") as f:
        f.seek(offset)
        log = f.read().decode(errors="replace")
    assert _log_problems(log) == []


def test_a_reload_and_a_stop_under_the_mix_reset_every_flow(bed: Testbed) -> None:
    """SIGHUP twice while the mix runs, then SIGTERM: a transfer cut by the
    stop ends with a reset, never with an EOF that makes it look complete;
    tun2sx exits 0 without a traceback."""
    if bed.proc is not None:
        bed.stop()
    config = bed.tmp / "soak.toml"
    config.write_text(
        f'outbound = "dante"\nrules = ["DOMAIN,nothing.test,REJECT"]\n'
        f'[outbounds.dante]\nurl = "socks5://{SERVER_ADDR}:1081"\n'
    )
    saved = bed.proxy_args
    bed.proxy_args = ["--config", str(config)]
    try:
        bed.start("--no-offload", "--mtu", "1500")
    finally:
        bed.proxy_args = saved
    proc = bed.proc
    assert proc is not None
    offset = bed.log_path.stat().st_size
    soak = _soak(bed.client, 5, *MIX, "--v6")
    for _ in range(2):
        time.sleep(1.2)
        proc.send_signal(signal.SIGHUP)
    time.sleep(1.2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    bed.stop()  # closes the log; the process is gone already
    result = _result(soak)
    done = result["done"]
    assert sum(done.get(f"{kind}4", 0) for kind in KINDS) > 0, done
    # Before the stop nothing failed; what the stop cut was reset (a held
    # SYN refused), and what came after found no route or name (the TUN is
    # gone). A connect or a transfer waiting for its own time-out is a hang.
    cut = ("ECONNRESET", "EPIPE", "ECONNREFUSED", "ENETUNREACH", "-2", "-3")
    udp = ("udp-echo:", "dns:")  # a datagram in flight at the stop is lost
    details = result["details"]
    assert [
        d for d in details if not d.startswith(udp) and not d.split(": ")[1].startswith(cut)
    ] == []
    assert code == 0
    with bed.log_path.open("rb") as f:
        f.seek(offset)
        log = f.read().decode(errors="replace")
    assert log.count("reloaded:") == 2, log
    assert _log_problems(log) == []
    assert "stopped; " in log


def _reordering(bed: LossyBed, percent: int) -> None:
    """Send `percent` of the packets crossing the router through a slow lane.

    No netem on this kernel: an HTB class of 40 Mbit/s that nftables picks
    at random (by the packet's priority) holds some packets behind the
    others, so they arrive late and out of order, both ways.
    """
    for dev in (bed.router_app_dev, bed.router_tun_dev):
        # Unclassified packets bypass the classes (HTB's direct queue).
        bed.router.run(f"tc qdisc add dev {dev} root handle 1: htb".split())
        bed.router.run(f"tc class add dev {dev} parent 1: classid 1:20 htb rate 40mbit".split())
    rule = f"add rule inet loss drops numgen random mod 100 < {percent} meta priority set 1:20"
    bed.router.run(["nft", *rule.split()])


def _late(bed: LossyBed) -> int:
    """How many packets took the slow lane towards the application."""
    out = bed.router.run(["tc", "-s", "class", "show", "dev", bed.router_app_dev]).stdout
    return int(out.split(" Sent ", 1)[1].split()[2])


def test_the_mix_under_loss_and_reordering_is_exact_and_settles() -> None:
    """0.5 % loss and 5 % of packets late, both ways, without offload:
    every TCP byte arrives exactly and every flow ends. (Applications that
    reset are left out here: an RST the loss takes is never sent again, by
    any TCP, and its flow waits for the idle timeout.)"""
    require("danted", "nft", "ethtool", "tc", "curl")
    with running_bed("t2sx-soakl", LossyBed, "--no-offload", "--stats-listen", STATS) as lossy:
        lossy.set_loss(5)
        _reordering(lossy, 5)
        result = _result(_soak(lossy.app, 8, "--short", "8", "--bulk", "--udp"))
        # Loss may take a DNS query or an echo datagram (UDP), and a name
        # lookup that lost both its tries fails (-3): nothing TCP carried.
        tcp_failures = [
            d
            for d in result["details"]
            if not d.startswith(("dns:", "udp-echo:")) and "-3" not in d
        ]
        assert tcp_failures == []
        assert result["done"]["bulk-download"] == result["done"]["bulk-upload"] == 1
        assert sum(result["done"].get(f"{kind}4", 0) for kind in KINDS) > 0
        stats = _settled(lossy.tunns, timeout=20)
        assert (stats["tcp_flows"], stats["tcp_connections"]) == (0, 0), stats
        assert lossy.dropped() > 0
        assert _late(lossy) > 0
