"""End-to-end benchmark: real kernel clients through tun2sx, beside the kernel.

    ./dev bench e2e [--seconds 5] [--connections 1000] [--no-offload] [--workers 2]

Builds the end-to-end testbed (client namespace with tun2sx on tun0, server
namespace with Dante and the test servers), then measures, each beside the
kernel path (the same client talking to the same server straight over the
veth, no proxy) in the same run:

- single-stream throughput up and down (iperf3, through Dante);
- connections per second (connect, one byte each way, close) from a Python
  client with 8 threads, and HTTP requests per second with a new connection
  each from `ab` to nginx (both C, so the load generator does not take the
  CPU tun2sx needs);
- round-trip latency p50/p99 of 64-byte messages on one connection;
- tun2sx's RSS with N connections held open;
- connections per second again with `--workers 2` (one process per queue).

Dante, not microsocks, carries the traffic: microsocks caps near 0.4 Gbit/s.
Numbers go to stdout as a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, iperf_gbps, rss_kib
from tun2sx.lab.netns import Lab, missing_capabilities


def _iperf(bed: Testbed, host: str, seconds: float, reverse: bool) -> float:
    return iperf_gbps(bed.client, host, 5201, seconds, reverse=reverse, omit=1)


NGINX_PORT = 8090
NGINX_CONF = """\
daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid; error_log stderr;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{ listen {addr}:{port}; keepalive_timeout 0; location / {{ return 200 "x"; }} }}
}}
"""


def _start_nginx(bed: Testbed, tmp: Path) -> None:
    """A C HTTP server answering one byte and closing: the peer of `_ab`."""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, addr=SERVER_ADDR, port=NGINX_PORT))
    bed.server.spawn(["nginx", "-c", str(conf)])
    bed.server.wait_listening(NGINX_PORT)


def _ab(bed: Testbed, host: str, requests: int, concurrency: int) -> tuple[float, int]:
    """Requests/s of `ab` (a new connection per request) and the failures.

    ab and nginx are C: the rate measures the path between them, not a
    Python load generator sharing the two cores with tun2sx.
    """
    out = bed.client.run(
        ["ab", "-q", "-n", str(requests), "-c", str(concurrency), f"http://{host}:{NGINX_PORT}/"],
        timeout=300,
    ).stdout
    rate = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    return rate, failed


def _tool(bed: Testbed, *args: object, timeout: float = 120) -> dict[str, float]:
    result = bed.client.run(
        [sys.executable, "-m", "tests.bench.netclient", *map(str, args)],
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _hold(bed: Testbed, host: str, count: int, pid: int) -> tuple[int, int]:
    proc = bed.client.spawn(
        [sys.executable, "-m", "tests.bench.netclient", "hold", host, "7001", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    status = json.loads(line)
    rss = rss_kib(pid)
    proc.stdin.close()
    proc.wait(60)
    bed.lab.stop(proc)  # unregister it: a finished helper is not a failure
    return status["echoed"], rss


def run(seconds: float, connections: int, offload: bool, workers: int = 2) -> str:
    rows: list[tuple[str, str, str]] = []
    with Lab("t2sx-bench") as lab, tempfile.TemporaryDirectory() as tmp:
        bed = Testbed(lab, Path(tmp))
        bed.server.spawn(["iperf3", "-s", "-B", SERVER_ADDR, "-p", "5201"])
        bed.server.wait_listening(5201)
        bed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
        bed.verbosity = []
        _start_nginx(bed, Path(tmp))
        bed.start(*([] if offload else ["--no-offload"]))
        assert bed.proc is not None
        pid = bed.proc.pid
        idle_rss = rss_kib(pid)
        name = "big.test"
        for label, reverse in (("upload Gbit/s", False), ("download Gbit/s", True)):
            ours = _iperf(bed, name, seconds, reverse)
            kernel = _iperf(bed, SERVER_ADDR, seconds, reverse)
            rows.append((label, f"{ours:.2f}", f"{kernel:.2f}"))
        ours_cps = _tool(bed, "cps", "echo.test", 7001, seconds, 8)
        kernel_cps = _tool(bed, "cps", SERVER_ADDR, 7001, seconds, 8)
        rows.append(
            (
                "connections/s (8 threads)",
                f"{ours_cps['cps']:.0f} ({ours_cps['failures']:.0f} failed)",
                f"{kernel_cps['cps']:.0f}",
            )
        )
        # ab connects to an address: resolve the name through the fake-IP DNS once.
        fake = bed.client.run(["dig", "+short", "www.test"]).stdout.strip()
        ours_ab, failed = _ab(bed, fake, 8000, 8)
        kernel_ab, _ = _ab(bed, SERVER_ADDR, 8000, 8)
        rows.append(
            (
                "connections/s (ab -c 8 to nginx, one request each)",
                f"{ours_ab:.0f} ({failed} failed)",
                f"{kernel_ab:.0f}",
            )
        )
        ours_lat = _tool(bed, "latency", "echo.test", 7001, 2000)
        kernel_lat = _tool(bed, "latency", SERVER_ADDR, 7001, 2000)
        rows.append(("latency p50 ms", f"{ours_lat['p50_ms']:.3f}", f"{kernel_lat['p50_ms']:.3f}"))
        rows.append(("latency p99 ms", f"{ours_lat['p99_ms']:.3f}", f"{kernel_lat['p99_ms']:.3f}"))
        echoed, rss = _hold(bed, "echo.test", connections, pid)
        rows.append((f"RSS MiB, {echoed} open connections", f"{rss / 1024:.1f}", "-"))
        rows.append(("RSS MiB, idle", f"{idle_rss / 1024:.1f}", "-"))
        bed.stop()
        if workers > 1:
            # The same connection test with one process per queue.
            bed.start("--workers", str(workers), *([] if offload else ["--no-offload"]))
            many, failed = _ab(bed, fake, 8000, 8)
            rows.append(
                (
                    f"connections/s (ab -c 8 to nginx), --workers {workers}",
                    f"{many:.0f} ({failed} failed)",
                    f"{kernel_ab:.0f}",
                )
            )
            bed.stop()
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"kernel {platform.release()}; offload {'on' if offload else 'off'}; "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| measure | tun2sx (via Dante) | kernel path (direct veth) |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench e2e")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--no-offload", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure connections/s with N workers (1: skip)"
    )
    args = parser.parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"bench e2e: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    print(run(args.seconds, args.connections, not args.no_offload, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
