"""Statistics for the operator: a periodic summary log line, and the address
the controller listens on.

The summary line (every `stats_interval` seconds) answers "is it working,
how busy is it, is it dropping" from the log alone. The details are the
controller's (tun2sx.control.controller): `/stats` with the engine's
counters, the Clash-compatible API, `/metrics` and `/ui`, on the stats
address. That address is loopback unless a secret is set, because the
connection list names every host the machine talks to; a web page could
still reach a loopback port through DNS rebinding, so without a secret a
request whose `Host` header names anything but a loopback address is
refused too (`is_loopback_host`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Collection
from typing import Protocol

import trio

from tun2sx.dataplane.context import FlowInfo

log = logging.getLogger("tun2sx.stats")

_LOOPBACK_NAMES = ("localhost",)


class StatsSource(Protocol):
    """What the stats need from the engine (a fake in tests)."""

    @property
    def flows(self) -> Collection[FlowInfo]: ...

    def statistics(self) -> dict[str, int]: ...


def parse_loopback_endpoint(value: str) -> tuple[str, int]:
    """`host:port` where host is a loopback address (or `localhost`).

    Same as `parse_endpoint(value, any_address=False)`.
    """
    return parse_endpoint(value, any_address=False)


def parse_endpoint(value: str, *, any_address: bool) -> tuple[str, int]:
    """`host:port` where host is an address literal (or `localhost`).

    Args:
        value: e.g. ``127.0.0.1:9090`` or ``[::1]:9090``.
        any_address: allow addresses other than loopback (the controller
            does when a secret is set).

    Returns:
        (host, port), host as an address literal without brackets.

    Raises:
        ValueError: not HOST:PORT, a bad port, or not loopback.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in {value!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0..65535")
    if host.lower() in _LOOPBACK_NAMES:
        return "127.0.0.1", port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address or localhost") from None
    if not address.is_loopback and not any_address:
        raise ValueError(
            f"{host} is not a loopback address; without a secret the stats listen on loopback only"
        )
    return str(address), port


def is_loopback_host(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:  # name:port; a bare v6 address has more colons
        host = host.partition(":")[0]
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the summary line ---------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def summary_line(stats: dict[str, int], previous: dict[str, int]) -> str:
    """One log line from two snapshots of `Engine.statistics()`.

    Args:
        stats: the counters now.
        previous: the counters at the last line ({} for the first).

    Returns:
        e.g. ``tcp 3 open (+12), udp 1 open (+2), up 1.0 KiB (+10 B),
        down 4.0 MiB (+2.0 MiB), drops 3 (+2: udp_receive_drops +2)``.
    """

    def delta(key: str) -> int:
        return stats.get(key, 0) - previous.get(key, 0)

    # Each place that drops has its counter; "drops" is their total.
    drops = sum(v for k, v in stats.items() if "drop" in k and k != "drops")
    drops_before = sum(v for k, v in previous.items() if "drop" in k and k != "drops")
    # Which counters moved, so the line says where packets were lost.
    moved = ", ".join(
        f"{k} +{delta(k)}" for k in sorted(stats) if "drop" in k and k != "drops" and delta(k) > 0
    )
    return (
        f"tcp {stats.get('tcp_flows', 0)} open (+{delta('tcp_flows_started')}), "
        f"udp {stats.get('udp_sessions', 0)} open (+{delta('udp_sessions_started')}), "
        f"up {_size(stats.get('bytes_up', 0))} (+{_size(delta('bytes_up'))}), "
        f"down {_size(stats.get('bytes_down', 0))} (+{_size(delta('bytes_down'))}), "
        f"drops {drops} (+{drops - drops_before}{': ' + moved if moved else ''})"
    )


async def log_summaries(source: StatsSource, interval: float) -> None:
    """Log `summary_line` every `interval` seconds, until cancelled.

    Args:
        source: the engine.
        interval: seconds between lines; must be positive.
    """
    previous: dict[str, int] = {}
    while True:
        await trio.sleep(interval)
        stats = source.statistics()
        log.info("stats: %s", summary_line(stats, previous))
        previous = stats


# -- the listening address ----------------------------------------------------


async def open_stats_listeners(
    host: str, port: int, *, any_address: bool = False
) -> list[trio.SocketListener]:
    """Listen for the endpoint on a loopback address (any with `any_address`).

    Args:
        host: a loopback address (checked again here, for embedders).
        port: the TCP port (0: any free one; ask the listener which).
        any_address: allow a non-loopback `host` (a secret is set).

    Raises:
        ValueError: `host` is not loopback.
        OSError: the port cannot be bound.
    """
    host, port = parse_endpoint(f"[{host}]:{port}", any_address=any_address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    for listener in listeners:
        log.info("controller on http://%s (/ui, /stats, /metrics)", _sockname(listener))
    return listeners


def _sockname(listener: trio.SocketListener) -> str:
    addr = listener.socket.getsockname()
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
