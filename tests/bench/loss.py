"""Loss benchmark: single-stream throughput under random loss, beside the kernel.

    ./dev bench loss [--seconds 4]        # python -m tests.bench loss

Builds the lossy lab (tests/e2e/lossy.py): an application namespace behind
an nftables router that drops a random share of packets each way, then
tun2sx on tun0 (Dante outbound), then the server namespace with iperf3. At
0 %, 0.5 % and 2 % loss both ways it measures single-stream iperf3
throughput down (tun2sx is the sender towards the application) and up
(the application's kernel sends, tun2sx receives), through tun2sx by name
and on the kernel path (same application, same lossy router, routed
straight to the server), and prints a Markdown table with the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.lossy import LossyBed
from tests.e2e.testbed import SERVER_ADDR
from tun2sx.lab.netns import Lab, LabError, missing_capabilities

RATES = (0, 5, 20)  # per mille, each way


def run(seconds: float) -> str:
    rows: list[str] = []
    with Lab("t2sx-bloss") as lab, tempfile.TemporaryDirectory() as tmp:
        bed = LossyBed(lab, Path(tmp))
        bed.start()
        for per_mille in RATES:
            bed.set_loss(per_mille)
            for label, reverse in (("down", True), ("up", False)):
                try:
                    ours = bed.iperf("big.test", seconds, reverse=reverse)
                    kernel = bed.iperf(SERVER_ADDR, seconds, reverse=reverse)
                except LabError as exc:
                    # One failed run is reported, not the end of the benchmark.
                    rows.append(f"| {per_mille / 10:.1f} % | {label} | failed: {exc} | | |")
                    continue
                ratio = ours / kernel if kernel else 0.0
                rows.append(
                    f"| {per_mille / 10:.1f} % | {label} | {ours:.3f} | {kernel:.3f} "
                    f"| {ratio * 100:.1f} % |"
                )
            rows.append(f"| {per_mille / 10:.1f} % | packets dropped | {bed.dropped()} | | |")
        bed.stop()
    head = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"kernel {platform.release()}; {seconds:g} s per run; {time.strftime('%Y-%m-%d')}",
        "",
        "| loss each way | direction | tun2sx Gbit/s | kernel path Gbit/s | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    return "\n".join(head + rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench loss")
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"bench loss: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    print(run(args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
