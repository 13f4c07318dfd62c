"""Load benchmark: thousands of concurrent flows and a DNS burst through tun2sx.

    ./dev bench load [--connections 10000] [--size 4096] [--dns 10000]

Builds the end-to-end testbed with Dante as the proxy and tun2sx's stats
endpoint on the client namespace's loopback, then:

1. opens N TCP connections from the client namespace to the echo server by
   its fake IP and holds them (tun2sx RSS and flow counts sampled);
2. makes every connection send SIZE bytes and read back the exact echo, all
   at once (sampled again);
3. closes them all and polls the stats until the flow table is back to
   zero; then stops tun2sx and reads `tcp_connections` from its final
   `stopped; {...}` line as well;
4. bursts M DNS queries with distinct names at the fake-IP resolver over
   UDP and counts the answers.

The steps are functions the CI version (tests/e2e/test_load.py) calls with
smaller numbers. Results print as Markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, rss_kib
from tun2sx.lab.netns import Lab, missing_capabilities

STATS_ADDR = "127.0.0.1:9077"
NOFILE = 65536


def raise_nofile() -> None:
    """Raise this process's open-file limit; every lab process inherits it.

    tun2sx holds two sockets per flow, Dante and the echo server one or two,
    so 10,000 flows need more than the usual 1024 (or 20000) descriptors.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(NOFILE, hard), max(NOFILE, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_bed(lab: Lab, tmp: Path) -> Testbed:
    """The testbed with Dante as proxy, no flow logging, the stats endpoint on."""
    bed = Testbed(lab, tmp)
    bed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
    bed.verbosity = []
    # The application side of 10,000 flows to one address and port needs
    # 10,000 local ports; widen the range in the client namespace only.
    bed.client.run(["sysctl", "-w", "net.ipv4.ip_local_port_range=10000 65000"])
    bed.start("--stats-listen", STATS_ADDR, "--stats-interval", "0")
    return bed


def tun2sx_stats(bed: Testbed) -> dict[str, int]:
    """tun2sx's counters from its stats endpoint (inside the client namespace)."""
    out = bed.client.run(["curl", "-s", "--max-time", "10", f"http://{STATS_ADDR}/stats"]).stdout
    stats: dict[str, int] = json.loads(out)
    return stats


def wait_flows_zero(bed: Testbed, timeout: float = 60) -> dict[str, int]:
    """Poll the stats until no TCP flow or connection is left (or time out)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = tun2sx_stats(bed)
        if stats["tcp_connections"] == 0 and stats["tcp_flows"] == 0:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.25)


def final_stats(bed: Testbed) -> dict[str, int]:
    """Stop tun2sx and parse the `stopped; {...}` line it logs at exit."""
    bed.stop()
    line = next(ln for ln in reversed(bed.log().splitlines()) if "stopped; " in ln)
    stats: dict[str, int] = ast.literal_eval(line.split("stopped; ", 1)[1])
    return stats


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def tcp_load(bed: Testbed, count: int, size: int) -> dict[str, Any]:
    """Hold `count` connections, exchange `size` bytes each, close them all.

    Returns the client's report per stage plus tun2sx's RSS (KiB) and flow
    counts at each stage; `after_close` is the stats once the table drained.
    """
    assert bed.proc is not None
    pid = bed.proc.pid
    result: dict[str, Any] = {"rss_idle": rss_kib(pid)}
    argv = [sys.executable, "-m", "tests.bench.loadclient", "tcp", "echo.test", "7001"]
    proc = bed.client.spawn(
        [*argv, str(count), str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_env(),
        cwd=str(ROOT),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for stage in ("held", "exchanged"):
            report = json.loads(proc.stdout.readline())
            assert report["stage"] == stage, report
            result[stage] = report
            result[f"rss_{stage}"] = rss_kib(pid)
            result[f"stats_{stage}"] = tun2sx_stats(bed)
            proc.stdin.write(b"next\n")
            proc.stdin.flush()
        result["closed"] = json.loads(proc.stdout.readline())
        proc.wait(60)
    finally:
        if proc.poll() is None:
            bed.lab.stop(proc)
    result["after_close"] = wait_flows_zero(bed)
    result["rss_closed"] = rss_kib(pid)
    return result


def dns_burst(bed: Testbed, count: int, tag: str = "burst") -> dict[str, Any]:
    """Send `count` distinct A queries to the fake-IP resolver; its report + RSS."""
    assert bed.proc is not None
    out = bed.client.run(
        [sys.executable, "-m", "tests.bench.loadclient", "dns", "198.18.0.2", str(count), tag],
        timeout=120,
        env=_env(),
        cwd=str(ROOT),
    ).stdout
    report: dict[str, Any] = json.loads(out)
    report["rss"] = rss_kib(bed.proc.pid)
    return report


def run(connections: int, size: int, queries: int) -> str:
    raise_nofile()
    with Lab("t2sx-load") as lab, tempfile.TemporaryDirectory() as tmp:
        bed = start_bed(lab, Path(tmp))
        tcp = tcp_load(bed, connections, size)
        dns = dns_burst(bed, queries)
        final = final_stats(bed)
    mib = 1024

    def flows(stats: dict[str, int]) -> str:
        return f"{stats['tcp_flows']} flows / {stats['tcp_connections']} TCP connections"

    rows = [
        ("idle", f"{tcp['rss_idle'] / mib:.1f}", "-", "-"),
        (
            f"{tcp['held']['open']} connections held",
            f"{tcp['rss_held'] / mib:.1f}",
            flows(tcp["stats_held"]),
            f"opened in {tcp['held']['seconds']} s",
        ),
        (
            f"all exchanging {size} B",
            f"{tcp['rss_exchanged'] / mib:.1f}",
            flows(tcp["stats_exchanged"]),
            f"{tcp['exchanged']['echoed']} exact echoes in {tcp['exchanged']['seconds']} s",
        ),
        (
            "all closed",
            f"{tcp['rss_closed'] / mib:.1f}",
            flows(tcp["after_close"]),
            f"{tcp['closed']['clean']} clean closes",
        ),
        (
            f"DNS burst, {dns['sent']} names",
            f"{dns['rss'] / mib:.1f}",
            "-",
            f"{dns['answered']} answered ({dns['retried']} retried) in {dns['seconds']} s",
        ),
        (
            "at exit (final stats line)",
            "-",
            f"tcp_connections={final['tcp_connections']}",
            f"syn_refused_max_connections={final.get('syn_refused_max_connections', 0)}",
        ),
    ]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"kernel {platform.release()}; {time.strftime('%Y-%m-%d')}",
        "",
        "| stage | tun2sx RSS MiB | tun2sx flow table | client saw |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench load")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--dns", type=int, default=10_000)
    args = parser.parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"bench load: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    print(run(args.connections, args.size, args.dns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
