"""Memory benchmark: tun2sx's resident set idle and with N connections held.

    ./dev bench rss [--connections 1000] [--fake-ip-db file|:memory:] [--extra ARG ...]

Builds the end-to-end testbed (tun2sx on tun0 in the client namespace, a
SOCKS5 outbound: Dante in the server namespace), waits until tun2sx serves,
reads /proc/PID/status (VmRSS, RssAnon, RssFile) once idle, once after one
DNS query and one short connection (the first flow imports and allocates
what every later one shares), then again with N connections held open to
the echo server (each has echoed one byte). One line per stage as a
Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed
from tun2sx.lab.netns import Lab, missing_capabilities

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of process `pid`, KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[key] = int(value.split()[0])
    return found


def _hold(bed: Testbed, count: int, pid: int) -> tuple[int, dict[str, int]]:
    """Open `count` echoed connections through tun2sx; its memory meanwhile."""
    proc = bed.client.spawn(
        [sys.executable, "-m", "tests.bench.netclient", "hold", "echo.test", "7001", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    assert proc.stdout is not None and proc.stdin is not None
    status = json.loads(proc.stdout.readline())
    held = memory_kib(pid)
    proc.stdin.close()
    proc.wait(60)
    bed.lab.stop(proc)  # unregister it: a finished helper is not a failure
    return int(status["echoed"]), held


def run(connections: int, fake_ip_db: str | None, extra: list[str]) -> str:
    rows: list[tuple[str, dict[str, int]]] = []
    with Lab("t2sx-rss") as lab, tempfile.TemporaryDirectory() as tmp:
        bed = Testbed(lab, Path(tmp))
        bed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
        bed.verbosity = []
        args = list(extra)
        if fake_ip_db is not None:
            args += ["--fake-ip-db", fake_ip_db]
        bed.start(*args)
        assert bed.proc is not None
        pid = bed.proc.pid
        time.sleep(1)  # let start-up settle: this is the idle reading
        rows.append(("idle", memory_kib(pid)))
        bed.client.run(["dig", "+short", "echo.test"])
        echoed, _ = _hold(bed, 1, pid)
        assert echoed == 1
        rows.append(("after one query and one connection", memory_kib(pid)))
        echoed, held = _hold(bed, connections, pid)
        rows.append((f"{echoed} connections held", held))
        rows.append(("after they closed", memory_kib(pid)))
        bed.stop()
    mib = [{k: v / 1024 for k, v in row.items()} for _, row in rows]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; tun2sx {' '.join(args) or '(defaults)'}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| stage | VmRSS MiB | RssAnon MiB | RssFile MiB |",
        "|---|---|---|---|",
        *(
            f"| {label} | {m['VmRSS']:.1f} | {m['RssAnon']:.1f} | {m['RssFile']:.1f} |"
            for (label, _), m in zip(rows, mib, strict=True)
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench rss")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument(
        "--fake-ip-db", help="the fake-IP table (default: a file in the lab's directory)"
    )
    parser.add_argument(
        "--extra", action="append", default=[], help="one more tun2sx argument (repeatable)"
    )
    args = parser.parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"bench rss: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    print(run(args.connections, args.fake_ip_db, args.extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
