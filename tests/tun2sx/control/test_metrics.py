"""/metrics: the Prometheus text, read back with prometheus_client's parser."""

from __future__ import annotations

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.controller import FakeEngine, request, start_controller
from tun2sx.control.controller import Controller
from tun2sx.control.metrics import merge_workers, render
from tun2sx.dataplane.context import ConnectTimes


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_gauges_and_the_histogram_parse() -> None:
    times = ConnectTimes()
    for seconds in (0.0004, 0.003, 0.003, 0.2, 30.0):
        times.observe("socks", seconds)
    times.observe('we"ird\\name', 0.02)
    stats = {
        "tcp_flows_started": 7,
        "udp_sessions_started": 2,
        "bytes_up": 100,
        "bytes_down": 5000,
        "tcp_flows": 3,
        "udp_sessions": 1,
        "udp_receive_drops": 4,
        "tun_queue_drops": 1,
        "drops": 5,
        "dns_queries": 9,
    }
    text = render(
        stats,
        times,
        dns_answers={"fake": 6, "forwarded": 3},
        fake_ip_mappings={"4": 6, "6": 0},
        rss=12345678,
    )
    got = samples(text)
    assert got[("tun2sx_tcp_flows_total", ())] == 7
    assert got[("tun2sx_bytes_total", (("direction", "down"),))] == 5000
    assert got[("tun2sx_drops_total", (("reason", "udp_receive_drops"),))] == 4
    assert got[("tun2sx_drops_total", (("reason", "tun_queue_drops"),))] == 1
    # The total of the drops is not a reason of its own.
    assert ("tun2sx_drops_total", (("reason", "drops"),)) not in got
    assert got[("tun2sx_dns_answers_total", (("kind", "fake"),))] == 6
    assert got[("tun2sx_tcp_flows_open", ())] == 3
    assert got[("tun2sx_udp_sessions_open", ())] == 1
    assert got[("tun2sx_fake_ip_mappings", (("family", "ipv4"),))] == 6
    assert got[("tun2sx_resident_memory_bytes", ())] == 12345678
    socks = (("outbound", "socks"),)
    bucket = "tun2sx_outbound_connect_seconds_bucket"
    assert got[(bucket, (("le", "0.001"), *socks))] == 1
    assert got[(bucket, (("le", "0.005"), *socks))] == 3
    assert got[(bucket, (("le", "0.25"), *socks))] == 4
    assert got[(bucket, (("le", "10.0"), *socks))] == 4
    assert got[(bucket, (("le", "+Inf"), *socks))] == 5
    assert got[("tun2sx_outbound_connect_seconds_count", socks)] == 5
    assert abs(got[("tun2sx_outbound_connect_seconds_sum", socks)] - 30.2064) < 1e-9
    weird = (("outbound", 'we"ird\\name'),)
    assert got[("tun2sx_outbound_connect_seconds_count", weird)] == 1


def test_workers_pages_merge_with_a_worker_label() -> None:
    pages = []
    for flows in (3, 4):
        times = ConnectTimes()
        times.observe("p", 0.01)
        pages.append(render({"tcp_flows": flows}, times, rss=1))
    merged = merge_workers(pages)
    families = list(text_string_to_metric_families(merged))
    assert len({f.name for f in families}) == len(families)
    got = samples(merged)
    assert got[("tun2sx_tcp_flows_open", (("worker", "0"),))] == 3
    assert got[("tun2sx_tcp_flows_open", (("worker", "1"),))] == 4
    key = ("tun2sx_outbound_connect_seconds_count", (("outbound", "p"), ("worker", "1")))
    assert got[key] == 1


async def test_metrics_endpoint(nursery: trio.Nursery) -> None:
    engine = FakeEngine()
    engine.counters["tcp_flows_started"] = 11
    engine.connect_times.observe("proxy", 0.05)
    port = await start_controller(nursery, Controller(engine))  # type: ignore[arg-type]
    answer = await request(port, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(answer.body.decode())
    assert got[("tun2sx_tcp_flows_total", ())] == 11
    assert got[("tun2sx_outbound_connect_seconds_count", (("outbound", "proxy"),))] == 1
    assert got[("tun2sx_resident_memory_bytes", ())] > 1_000_000
