"""Micro-benchmark of the wire layer: µs per parse, checksum and build.

    python -m tests.bench wire [--repeat 7] [--variants]

Prints a Markdown table (best of `--repeat` runs, and the median, per op) for
docs/performance.md. `--variants` also times the checksum strategies that
were considered, so the choice in stack/wire/checksum.py can be re-checked on
another machine or interpreter.
"""

from __future__ import annotations

import argparse
import array
import datetime
import functools
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable

from stack.wire.checksum import ACCELERATED, ones_complement_sum, python_ones_complement_sum
from stack.wire.packet import build_tcp_packet, build_udp_packet, parse_packet_untrusted
from stack.wire.tcp import ACK, PSH, TcpHeader, TcpOptions

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
TS_DATA = TcpHeader(40000, 80, 1, 1, ACK | PSH, 502, options=TcpOptions(timestamp=(7, 9)))


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Return (best, median) µs per call, auto-sizing the loop to ~0.2 s."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    runs = [t / number * 1e6 for t in timer.repeat(repeat=repeat, number=number)]
    return min(runs), statistics.median(runs)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sum_big(data: bytes) -> int:
    v = int.from_bytes(data + b"\0" * (len(data) & 1), "big")
    return v % 0xFFFF or (0xFFFF if v else 0)


def _sum_little_unfolded(data: bytes) -> int:
    v = int.from_bytes(data, "little")
    r = ((v % 0xFFFF) << 8) % 0xFFFF
    return r or (0xFFFF if v else 0)


def _sum_array(data: bytes) -> int:
    words = array.array("H", data[: len(data) & ~1])
    total = sum(words) + (data[-1] if len(data) & 1 else 0)
    total = total % 0xFFFF or (0xFFFF if total else 0)
    return ((total << 8) | (total >> 8)) & 0xFFFF


def _sum_words_loop(data: bytes) -> int:
    total = 0
    for i in range(0, len(data) - 1, 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def cases(variants: bool) -> list[tuple[str, Callable[[], object]]]:
    """The operations to time, named as in docs/performance.md."""
    tcp4 = memoryview(build_tcp_packet(A4, B4, TS_DATA, bytes(1448)))
    tcp6 = memoryview(build_tcp_packet(A6, B6, TS_DATA, bytes(1428)))
    udp4 = memoryview(build_udp_packet(A4, B4, 53, 5353, bytes(100)))
    assert len(tcp4) == 1500 and len(tcp6) == 1500
    b1460, b64000, b20 = os.urandom(1460), os.urandom(64000), os.urandom(20)
    b8428 = os.urandom(8428)
    payload = bytes(1448)
    out: list[tuple[str, Callable[[], object]]] = [
        ("parse IPv4+TCP(TS) 1500 B, checksum verified", lambda: parse_packet_untrusted(tcp4)),
        (
            "parse IPv4+TCP(TS) 1500 B, no checksum",
            lambda: parse_packet_untrusted(tcp4, verify_checksum=False),
        ),
        ("parse IPv6+TCP(TS) 1500 B, checksum verified", lambda: parse_packet_untrusted(tcp6)),
        (
            "parse IPv6+TCP(TS) 1500 B, no checksum",
            lambda: parse_packet_untrusted(tcp6, verify_checksum=False),
        ),
        ("parse IPv4+UDP 128 B, checksum verified", lambda: parse_packet_untrusted(udp4)),
        ("checksum 20 B", lambda: ones_complement_sum(b20)),
        ("checksum 1460 B", lambda: ones_complement_sum(b1460)),
        ("checksum 8428 B", lambda: ones_complement_sum(b8428)),
        ("checksum 64000 B", lambda: ones_complement_sum(b64000)),
        ("build IPv4+TCP(TS) ACK, no data", lambda: build_tcp_packet(A4, B4, TS_DATA)),
        ("build IPv4+TCP(TS) 1448 B data", lambda: build_tcp_packet(A4, B4, TS_DATA, payload)),
        (
            "build IPv4+TCP(TS) 1448 B, partial checksum",
            lambda: build_tcp_packet(A4, B4, TS_DATA, payload, partial_checksum=True),
        ),
    ]
    if variants:
        for size, data in (("20", b20), ("1460", b1460), ("8428", b8428), ("64000", b64000)):
            out.append(
                (
                    f"variant: the Python fallback, {size} B",
                    functools.partial(python_ones_complement_sum, data),
                )
            )
        for size, data in (("1460", b1460), ("64000", b64000)):
            for label, fn in (
                ("from_bytes big % 0xFFFF", _sum_big),
                ("from_bytes little % 0xFFFF", _sum_little_unfolded),
                ("sum(array('H'))", _sum_array),
            ):
                out.append((f"variant: {label}, {size} B", functools.partial(fn, data)))
        out.append(("variant: 16-bit word loop, 1460 B", lambda: _sum_words_loop(b1460)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench wire")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per operation")
    parser.add_argument("--variants", action="store_true", help="also time checksum variants")
    args = parser.parse_args(argv)
    print(
        f"{_cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, {datetime.date.today().isoformat()}, "
        f"checksum: {'C' if ACCELERATED else 'Python'}"
    )
    print()
    print("| operation | best µs | median µs |")
    print("|---|---:|---:|")
    for name, fn in cases(args.variants):
        best, median = _time(fn, args.repeat)
        print(f"| {name} | {best:.2f} | {median:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
