"""Dispatch `python -m tests.bench <name> [args...]` to a benchmark module.

Each benchmark is a module in this package with `main(argv) -> int`,
imported only when asked for, so a micro-benchmark does not pay for (or need
the dependencies of) the end-to-end one.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "wire": "tests.bench.wire",  # parse and checksum micro-benchmark
    "e2e": "tests.bench.e2e",  # real kernel clients through tun2sx
    "load": "tests.bench.load",  # 10,000 flows held and exchanging, DNS burst
    "loss": "tests.bench.loss",  # single-stream throughput under random loss
    "tcp": "tests.bench.tcp",  # in-process TCP: µs per segment and per connection
    "udp": "tests.bench.udp",  # datagram rates and bursts, through Dante and beside it
    "rss": "tests.bench.rss",  # resident memory idle and with N connections held
    "timeline": "tests.bench.timeline",  # where a sequential connection's time goes
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in BENCHMARKS:
        print(f"usage: python -m tests.bench {{{'|'.join(BENCHMARKS)}}} [args...]", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[args[0]])
    result: int = module.main(args[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
