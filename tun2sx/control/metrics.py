"""`GET /metrics`: the engine's counters in the Prometheus text format.

Everything comes from the same `statistics()` the summary line and
`/stats` read, so the numbers agree: counters for flows started, bytes
each way, drops by reason (each `*drops*` counter becomes one `reason`),
DNS queries and answers; gauges for open flows and sessions, the fake-IP
table's size and the resident memory; and a histogram of how long
outbound connects took, per outbound (`ConnectTimes`).

Format: https://prometheus.io/docs/instrumenting/exposition_formats/
(text format 0.0.4): `# HELP` and `# TYPE` once per family, then its
samples; label values escape backslash, double quote and newline.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from tun2sx.dataplane.context import CONNECT_BUCKETS, ConnectTimes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric, help, statistics key) for the plain counters.
_COUNTERS = (
    ("tun2sx_tcp_flows_total", "TCP flows accepted", "tcp_flows_started"),
    ("tun2sx_udp_sessions_total", "UDP sessions started", "udp_sessions_started"),
    (
        "tun2sx_tcp_outbound_failures_total",
        "TCP flows whose outbound failed",
        "tcp_outbound_failed",
    ),
    ("tun2sx_flow_errors_total", "flows ended by an unexpected error", "tcp_flow_errors"),
    ("tun2sx_dns_queries_total", "DNS queries answered or forwarded", "dns_queries"),
    ("tun2sx_tun_rx_packets_total", "packets read from the TUN", "tun_rx_packets"),
    ("tun2sx_tun_tx_packets_total", "packets written to the TUN", "tun_tx_packets"),
)
_GAUGES = (
    ("tun2sx_tcp_flows_open", "TCP flows open now", "tcp_flows"),
    ("tun2sx_udp_sessions_open", "UDP sessions open now", "udp_sessions"),
    ("tun2sx_tcp_pending", "TCP SYNs held while their outbound connects", "tcp_pending"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(lines: list[str], name: str, kind: str, text: str) -> None:
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} {kind}")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def rss_bytes() -> int:
    """The process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def render(
    stats: Mapping[str, int],
    connect_times: ConnectTimes,
    *,
    dns_answers: Mapping[str, int] | None = None,
    fake_ip_mappings: Mapping[str, int] | None = None,
    rss: int | None = None,
) -> str:
    """The whole /metrics page.

    Args:
        stats: `Engine.statistics()`.
        connect_times: the engine's connect-time histogram.
        dns_answers: answers by kind (fake, empty, ptr, forwarded, ...).
        fake_ip_mappings: mappings by family ("4", "6").
        rss: resident memory in bytes (None: read it now).

    Returns:
        The text, one sample a line, ending with a newline.
    """
    lines: list[str] = []
    for name, text, key in _COUNTERS:
        _family(lines, name, "counter", text)
        lines.append(f"{name} {stats.get(key, 0)}")
    _family(lines, "tun2sx_bytes_total", "counter", "bytes relayed, by direction")
    lines.append(f'tun2sx_bytes_total{{direction="up"}} {stats.get("bytes_up", 0)}')
    lines.append(f'tun2sx_bytes_total{{direction="down"}} {stats.get("bytes_down", 0)}')
    _family(lines, "tun2sx_drops_total", "counter", "packets or datagrams dropped, by reason")
    for key in sorted(stats):
        if "drops" in key and key != "drops":
            lines.append(f'tun2sx_drops_total{{reason="{_escape(key)}"}} {stats[key]}')
    if dns_answers is not None:
        _family(lines, "tun2sx_dns_answers_total", "counter", "DNS answers, by kind")
        for kind, count in sorted(dns_answers.items()):
            lines.append(f'tun2sx_dns_answers_total{{kind="{_escape(kind)}"}} {count}')
    for name, text, key in _GAUGES:
        _family(lines, name, "gauge", text)
        lines.append(f"{name} {stats.get(key, 0)}")
    if fake_ip_mappings is not None:
        _family(lines, "tun2sx_fake_ip_mappings", "gauge", "fake-IP table entries, by family")
        for family, count in sorted(fake_ip_mappings.items()):
            lines.append(f'tun2sx_fake_ip_mappings{{family="ipv{family}"}} {count}')
    _family(lines, "tun2sx_resident_memory_bytes", "gauge", "resident set size of the process")
    lines.append(f"tun2sx_resident_memory_bytes {rss_bytes() if rss is None else rss}")
    lines.extend(_histogram(connect_times))
    return "\n".join(lines) + "\n"


def _histogram(connect_times: ConnectTimes) -> Iterable[str]:
    name = "tun2sx_outbound_connect_seconds"
    yield f"# HELP {name} time from dialling an outbound to its connection, per outbound"
    yield f"# TYPE {name} histogram"
    for outbound, (buckets, total) in sorted(connect_times.by_outbound.items()):
        label = f'outbound="{_escape(outbound)}"'
        cumulative = 0
        for bound, count in zip(CONNECT_BUCKETS, buckets, strict=False):
            cumulative += count
            yield f'{name}_bucket{{{label},le="{bound}"}} {cumulative}'
        cumulative += buckets[-1]
        yield f'{name}_bucket{{{label},le="+Inf"}} {cumulative}'
        yield f"{name}_sum{{{label}}} {_number(total[0])}"
        yield f"{name}_count{{{label}}} {cumulative}"


def merge_workers(pages: list[str]) -> str:
    """The workers' /metrics pages as one, each sample labelled `worker`.

    Each family's HELP and TYPE come once, followed by its samples from
    every worker in turn (the format wants a family's samples together).
    """
    families: dict[str, list[str]] = {}
    for index, text in enumerate(pages):
        current: list[str] | None = None
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                current = families.get(name)
                if current is None:
                    current = families[name] = [line]
                continue
            if line.startswith("# TYPE "):
                if current is not None and len(current) == 1:
                    current.append(line)
                continue
            if not line or line.startswith("#") or current is None:
                continue
            metric, _, value = line.rpartition(" ")
            if metric.endswith("}"):
                metric = f'{metric[:-1]},worker="{index}"}}'
            else:
                metric = f'{metric}{{worker="{index}"}}'
            current.append(f"{metric} {value}")
    return "".join(line + "\n" for lines in families.values() for line in lines)
