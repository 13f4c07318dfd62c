"""UDP benchmark: datagram rates and bursts through tun2sx, beside the kernel.

    ./dev bench udp [--seconds 5] [--rates 200,500] [--bursts 200]

Builds the end-to-end testbed with Dante (UDP ASSOCIATE) as tun2sx's
outbound and its stats endpoint on, then measures, each beside a path
without tun2sx in the same run:

- iperf3 -u with 1200-byte datagrams (QUIC-sized) at each offered rate, up
  and down (-R): delivered Mbit/s and loss, against the same iperf3 straight
  over the veth (the kernel path);
- tun2sx's CPU per delivered datagram in those runs (utime + stime from
  /proc/PID/stat over the run, divided by the datagrams that arrived);
- bursts of 50 datagrams with 10 ms pauses, sent by the client to an echo
  server and, the other way, by the server on request: loss through
  tun2sx and Dante, through Dante alone (a plain UDP ASSOCIATE client on
  the client namespace's veth), and with no proxy at all;
- tun2sx's drop counters after all of it, by the place they happened.

`measure(bed, ...)` runs the measures on an already-built testbed (tun2sx
running with Dante, port 1081, as its outbound) and returns the rows; the
end-to-end benchmark calls it that way. `main` builds its own testbed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tests.e2e.testbed import DANTE_PORT, ROOT, SERVER_ADDR, Testbed
from tun2sx.lab.netns import Lab, LabError, Namespace, missing_capabilities

IPERF_PORT = 5202
ECHO_PORT = 7101
STATS_ADDR = "127.0.0.1:9078"
DATAGRAM = 1200
_TICKS = os.sysconf("SC_CLK_TCK")


class Row(NamedTuple):
    """One line of the results: what, through tun2sx, without it."""

    measure: str
    tun2sx: str
    kernel: str


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class IperfResult(NamedTuple):
    mbps: float  # delivered
    lost_percent: float
    delivered: int  # datagrams that arrived


def iperf_udp(bed: Testbed, host: str, mbps: int, seconds: float, reverse: bool) -> IperfResult:
    """One iperf3 -u run from the client namespace at `mbps` offered."""
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-u", "-l", str(DATAGRAM)]
    argv += ["-b", f"{mbps}M", "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    result: dict[str, Any] = {}
    for attempt in range(5):
        out = bed.client.run(argv, timeout=seconds + 60, check=False).stdout
        result = json.loads(out) if out.strip() else {"error": "no output"}
        if "server is busy" not in str(result.get("error", "")):
            break
        time.sleep(0.5 * (attempt + 1))
    if "error" in result:
        raise LabError(f"iperf3 -u to {host} failed: {result['error']}")
    total = result["end"]["sum"]
    packets, lost = int(total["packets"]), int(total["lost_packets"])
    delivered = max(0, packets - lost)
    span = float(total["seconds"]) or seconds
    return IperfResult(
        delivered * DATAGRAM * 8 / span / 1e6,
        100.0 * lost / packets if packets else 100.0,
        delivered,
    )


def burst(
    bed: Testbed, host: str, bursts: int, socks: str | None = None, *, down: bool = False
) -> dict[str, Any]:
    """The burst pattern from the client namespace to the bench's echo server."""
    argv = [sys.executable, "-m", "tests.bench.udpclient", "burst", host, str(ECHO_PORT)]
    argv += ["--bursts", str(bursts)]
    if down:
        argv.append("--down")
    if socks is not None:
        argv += ["--socks", socks]
    out = bed.client.run(
        argv, timeout=bursts * 0.05 + 60, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def stats(bed: Testbed, addr: str | None) -> dict[str, int]:
    """tun2sx's counters from its stats endpoint ({} when it has none)."""
    if addr is None:
        return {}
    out = bed.client.run(
        ["curl", "-s", "--max-time", "10", f"http://{addr}/stats"], check=False
    ).stdout
    return json.loads(out) if out.strip() else {}  # type: ignore[no-any-return]


def kernel_udp_drops(ns: Namespace) -> int:
    """Datagrams the kernel dropped at full socket buffers in `ns` so far
    (RcvbufErrors + SndbufErrors of /proc/net/snmp, all sockets there)."""
    lines = [ln.split() for ln in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    names, values = (ln for ln in lines if ln[0] == "Udp:")
    counts = dict(zip(names[1:], map(int, values[1:]), strict=True))
    return counts["RcvbufErrors"] + counts["SndbufErrors"]


@contextlib.contextmanager
def echo_server(bed: Testbed) -> Iterator[None]:
    """The burst echo server (tests/bench/udpclient.py) on ECHO_PORT, for the block."""
    proc = bed.server.spawn(
        [sys.executable, "-m", "tests.bench.udpclient", "echo", SERVER_ADDR, str(ECHO_PORT)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )
    try:
        bed.server.wait_listening(ECHO_PORT, udp=True)
        yield
    finally:
        bed.lab.stop(proc)


def fake_ip(bed: Testbed, name: str) -> str:
    """The fake IP tun2sx hands out for `name` (asked through the TUN)."""
    return _fake_ip(bed, name)


def _fake_ip(bed: Testbed, name: str) -> str:
    return bed.client.run(["dig", "+short", "+time=3", name, "A"]).stdout.strip()


def _loss(result: dict[str, Any]) -> str:
    reached = result.get("reached")
    there = "" if reached is None else f", {result['sent'] - reached} lost on the way there"
    lost = result["sent"] - result["echoed"]
    lost = result["sent"] - result["echoed"]
    return f"{result['lost_percent']:.2f} % ({lost} of {result['sent']}{there})"


def measure(
    bed: Testbed,
    *,
    rates: tuple[int, ...] = (200, 500),
    seconds: float = 5.0,
    bursts: int = 200,
    stats_addr: str | None = None,
) -> list[Row]:
    """Run the UDP measures on a built testbed whose tun2sx runs via Dante.

    Starts its own iperf3 server and echo server in the server namespace
    (ports IPERF_PORT and ECHO_PORT) and stops them again.

    Args:
        bed: the testbed, tun2sx running with Dante (port 1081) as outbound.
        rates: offered rates, Mbit/s.
        seconds: length of each iperf3 run.
        bursts: bursts of 50 datagrams in each burst run.
        stats_addr: tun2sx's stats endpoint (HOST:PORT in the client
            namespace), for the drop counters; None leaves them out.

    Returns:
        The result rows.
    """
    assert bed.proc is not None, "tun2sx must be running"
    pid = bed.proc.pid
    iperf = bed.server.spawn(["iperf3", "-s", "-B", SERVER_ADDR, "-p", str(IPERF_PORT)])
    rows: list[Row] = []
    try:
        bed.server.wait_listening(IPERF_PORT)
        big = _fake_ip(bed, "big.test")
        for rate in rates:
            for label, reverse in (("up", False), ("down", True)):
                counted = stats(bed, stats_addr)
                kernel_before = [kernel_udp_drops(ns) for ns in (bed.client, bed.server)]
                cpu = cpu_seconds(pid)
                ours = iperf_udp(bed, big, rate, seconds, reverse)
                cpu = cpu_seconds(pid) - cpu
                client, server = (
                    kernel_udp_drops(ns) - b
                    for ns, b in zip((bed.client, bed.server), kernel_before, strict=True)
                )
                ours_drops = (
                    str(
                        sum(
                            v - counted.get(k, 0)
                            for k, v in stats(bed, stats_addr).items()
                            if "drop" in k
                        )
                    )
                    if stats_addr is not None
                    else "(not read)"
                )
                kernel = iperf_udp(bed, SERVER_ADDR, rate, seconds, reverse)
                rows.append(
                    Row(
                        f"UDP {label} at {rate} Mbit/s offered: delivered Mbit/s (loss)",
                        f"{ours.mbps:.1f} ({ours.lost_percent:.2f} %; dropped by tun2sx "
                        f"{ours_drops}, by full buffers in the client ns {client}, "
                        f"server ns {server})",
                        f"{kernel.mbps:.1f} ({kernel.lost_percent:.2f} %)",
                    )
                )
                per = 1e6 * cpu / ours.delivered if ours.delivered else float("inf")
                rows.append(
                    Row(
                        f"UDP {label} at {rate} Mbit/s: tun2sx CPU µs per datagram",
                        f"{per:.1f} ({cpu:.2f} s CPU, {ours.delivered} datagrams)",
                        "-",
                    )
                )
    finally:
        bed.lab.stop(iperf)
    with echo_server(bed):
        rows += _bursts(bed, bursts, stats_addr)
    return rows


def _bursts(bed: Testbed, bursts: int, stats_addr: str | None) -> list[Row]:
    rows: list[Row] = []
    echo_ip = _fake_ip(bed, "echo.test")
    before = stats(bed, stats_addr)
    socks = f"{SERVER_ADDR}:{DANTE_PORT}"
    for label, down in (("echoed", False), ("sent by the server", True)):
        kernel_before = [kernel_udp_drops(ns) for ns in (bed.client, bed.server)]
        ours_burst = burst(bed, echo_ip, bursts, down=down)
        client, server = (
            kernel_udp_drops(ns) - b
            for ns, b in zip((bed.client, bed.server), kernel_before, strict=True)
        )
        dante = burst(bed, SERVER_ADDR, bursts, socks=socks, down=down)
        plain = burst(bed, SERVER_ADDR, bursts, down=down)
        rows.append(
            Row(
                f"bursts of 50 x {DATAGRAM} B every 10 ms, {label}: loss",
                f"{_loss(ours_burst)}; kernel buffer drops: client ns {client}, "
                f"server ns (Dante, echo) {server}",
                f"Dante alone {_loss(dante)}; no proxy {_loss(plain)}",
            )
        )
    after = stats(bed, stats_addr)
    if after:
        drops = {k: v - before.get(k, 0) for k, v in after.items() if "drop" in k}
        rows.append(
            Row(
                "tun2sx drop counters during the bursts",
                ", ".join(f"{k}={v}" for k, v in sorted(drops.items()) if v) or "none",
                "-",
            )
        )
        totals = {k: v for k, v in after.items() if "drop" in k and v}
        rows.append(
            Row(
                "tun2sx drop counters, whole run",
                ", ".join(f"{k}={v}" for k, v in sorted(totals.items())) or "none",
                "-",
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table, with the machine and the load above."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"kernel {platform.release()}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"load {' '.join(load)}",
        "",
        "| measure | tun2sx (via Dante) | without tun2sx |",
        "|---|---|---|",
        *(f"| {r.measure} | {r.tun2sx} | {r.kernel} |" for r in rows),
    ]
    return "\n".join(lines)


def run(rates: tuple[int, ...], seconds: float, bursts: int, extra: list[str]) -> str:
    with Lab("t2sx-udp") as lab, tempfile.TemporaryDirectory() as tmp:
        bed = Testbed(lab, Path(tmp))
        bed.proxy_args = ["--socks", f"{SERVER_ADDR}:{DANTE_PORT}"]
        bed.verbosity = []
        bed.start("--stats-listen", STATS_ADDR, "--stats-interval", "0", *extra)
        try:
            rows = measure(bed, rates=rates, seconds=seconds, bursts=bursts, stats_addr=STATS_ADDR)
        finally:
            bed.stop()
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench udp")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rates", default="200,500", help="offered Mbit/s, comma-separated")
    parser.add_argument("--bursts", type=int, default=200)
    parser.add_argument(
        "--tun2sx-arg", action="append", default=[], help="extra tun2sx argument (repeatable)"
    )
    args = parser.parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"bench udp: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    rates = tuple(int(r) for r in args.rates.split(",") if r)
    print(run(rates, args.seconds, args.bursts, args.tun2sx_arg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
