"""Where one connection's time goes: a timeline of sequential connections.

    ./dev bench timeline [--seconds 3] [--proxy URL] [--skip 20] [--show 3]

Builds the end-to-end testbed (tests/e2e/testbed.py; Dante at
10.200.0.2:1081 by default), runs tun2sx under tests/bench/timeline_hooks.py
and one client in a loop (connect, one byte each way, close: the
`netclient cps ... 1` of the e2e bench), then prints, over the connections
of the run (the first `--skip` and the last few left out), the median time
of each waypoint after the SYN reached the flow code, and per connection
cycle (one SYN to the next) how long tun2sx slept in epoll, how often it
woke and how many packets it wrote to the TUN.

The hooks cost time of their own (a Python call and a list append per
event): compare timelines with each other, and rates with the e2e bench.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.e2e import ECHO_PORT, _tool
from tests.e2e.testbed import SERVER_ADDR, Testbed
from tun2sx.lab.netns import Lab, Namespace, missing_capabilities


class _HookedNamespace(Namespace):
    """The client namespace, starting tun2sx under the timeline hooks."""

    def __init__(self, inner: Namespace, out: Path) -> None:
        super().__init__(inner.lab, inner.name)
        self.out = out

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> Any:
        if list(argv[1:3]) == ["-m", "tun2sx"]:
            argv = [argv[0], "-m", "tests.bench.timeline_hooks", *argv[3:]]
            kwargs["env"] = dict(kwargs.get("env") or os.environ, TIMELINE_OUT=str(self.out))
        return super().spawn(argv, **kwargs)


def record(proxy: str, seconds: float, out: Path) -> dict[str, float]:
    """Run the loop through tun2sx with the hooks; the client's report."""
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab("t2sx-timeline"))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bed = Testbed(lab, tmp)
        bed.proxy_args = ["--proxy", proxy]
        bed.verbosity = []
        bed.tun2sx.ns = _HookedNamespace(bed.client, out)
        bed.start()
        try:
            return _tool(bed.client, "cps", "echo.test", ECHO_PORT, seconds, 1)
        finally:
            bed.stop()  # SIGTERM: the hooks write the record at exit


def summarize(data: dict[str, Any], skip: int, show: int) -> list[str]:
    """The report's lines from a record written by the hooks."""
    flows = data["flows"][skip:-5]
    if not flows:
        return ["too few connections recorded"]
    lines = []
    for events in flows[:show]:
        t0 = events[0][1]
        lines.append("  ".join(f"{name} {(t - t0) * 1e6:.0f}" for name, t in events))
    offsets: dict[str, list[float]] = defaultdict(list)
    for events in flows:
        t0 = events[0][1]
        seen: dict[str, int] = defaultdict(int)
        for name, t in events:
            seen[name] += 1
            offsets[f"{name} #{seen[name]}" if seen[name] > 1 else name].append((t - t0) * 1e6)
    lines += ["", f"median µs after the SYN over {len(flows)} connections:"]
    for name in sorted(offsets, key=lambda n: statistics.median(offsets[n])):
        values = offsets[name]
        lines.append(f"  {name:16} {statistics.median(values):7.0f}   (in {len(values)})")
    io = data["io"]
    times = [t for _, t in io]
    starts = [events[0][1] for events in data["flows"]]
    cycles, idle, wakes, writes = [], [], [], []
    for i in range(skip, len(starts) - 6):
        begin, end = starts[i], starts[i + 1]
        slept = 0.0
        went: float | None = None
        woke = wrote = 0
        for name, t in io[bisect.bisect_left(times, begin) : bisect.bisect_left(times, end)]:
            if name == "wait":
                went = t
            elif name == "woke" and went is not None:
                slept += t - went
                woke += 1
                went = None
            else:
                wrote += 1
        cycles.append((end - begin) * 1e6)
        idle.append(slept * 1e6)
        wakes.append(woke)
        writes.append(wrote)
    if cycles:
        cycle, asleep = statistics.median(cycles), statistics.median(idle)
        lines += [
            "",
            f"per cycle (SYN to next SYN), medians: {cycle:.0f} µs, of which tun2sx slept "
            f"{asleep:.0f} µs in epoll and ran {cycle - asleep:.0f} µs; "
            f"{statistics.median(wakes):.0f} wake-ups, {statistics.median(writes):.0f} TUN writes",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench timeline")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--proxy", default=f"socks5://{SERVER_ADDR}:1081", help="tun2sx's outbound")
    parser.add_argument("--skip", type=int, default=20, help="connections left out at the start")
    parser.add_argument("--show", type=int, default=3, help="connections printed in full")
    args = parser.parse_args(argv)
    missing = missing_capabilities()
    if missing:
        print(f"bench timeline: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timeline.json"
        report = record(args.proxy, args.seconds, out)
        data = json.loads(out.read_text())
    print(f"{args.proxy}: {report['cps']:.0f} connections/s with the hooks on")
    print("\n".join(summarize(data, args.skip, args.show)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
