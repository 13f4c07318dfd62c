"""`--workers N`: several processes on one multi-queue TUN, end to end.

The kernel hashes each flow to a queue, so a name resolved by one worker is
often connected through another: these tests fail if the workers do not
share the fake-IP table, if a worker is never used, or if a dead worker
leaves tun2sx half-serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.testbed import (
    NAMES,
    ROOT,
    SERVER_ADDR,
    Testbed,
    children_of,
    running_bed,
    skip_if_device_options,
)
from tests.support import require
from tun2sx.lab.netns import Lab

WORKERS = 2
STATS_PORT = 9190
# More names than the testbed's own: each one resolved and connected once.
EXTRA = tuple(f"w{i}.test" for i in range(32))


def _workers_bed(lab: Lab, tmp: Path) -> Testbed:
    bed = Testbed(lab, tmp)
    hosts = "127.0.0.1 localhost\n" + "".join(f"{SERVER_ADDR} {name}\n" for name in NAMES + EXTRA)
    bed.server.write_etc("hosts", hosts)
    bed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
    return bed


@pytest.fixture
def bed() -> Iterator[Testbed]:
    require("danted", "curl", "dig")
    args = ("--workers", str(WORKERS), "--stats-listen", f"127.0.0.1:{STATS_PORT}")
    with running_bed("t2sx-workers", _workers_bed, *args) as testbed:
        yield testbed


def _get(bed: Testbed, port: int, path: str) -> Any:
    return json.loads(bed.client_run(["curl", "-sf", f"http://127.0.0.1:{port}{path}"]).stdout)


def _stats(bed: Testbed, worker: int) -> dict[str, int]:
    """Worker `worker`'s own counters (its endpoint follows the totals')."""
    return _get(bed, STATS_PORT + 1 + worker, "/stats")  # type: ignore[no-any-return]


def test_names_resolved_by_one_worker_connect_through_any(bed: Testbed) -> None:
    """Every name resolves and fetches: half the time the connection lands
    on the other worker, which must find the name in the shared table."""
    for name in EXTRA:
        page = bed.client_run(
            ["curl", "-sf", "--max-time", "10", f"http://{name}:8080/index.html"]
        ).stdout
        assert page == "<h1>tun2sx e2e</h1>\n", name
    per_worker = [_stats(bed, i) for i in range(WORKERS)]
    started = [s["tcp_flows_started"] for s in per_worker]
    # 32 flows hashed over two queues: both workers carried some.
    assert all(n > 0 for n in started), started
    assert sum(started) >= len(EXTRA)
    assert all(s.get("tcp_unknown_fake_ip", 0) == 0 for s in per_worker)
    # The configured endpoint answers with the totals of both.
    totals = _get(bed, STATS_PORT, "/stats")
    assert totals["tcp_flows_started"] == sum(started)
    assert totals["bytes_down"] == sum(s["bytes_down"] for s in per_worker) > 0


def test_the_totals_list_every_workers_live_flows(bed: Testbed) -> None:
    """Flows held open on both workers show up in one /connections list."""
    holder = bed.client.spawn(
        [sys.executable, "-m", "tests.bench.netclient", "hold", "echo.test", "7001", "16"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert json.loads(holder.stdout.readline())["echoed"] == 16
        rows = _get(bed, STATS_PORT, "/connections")["connections"]
        tcp = [
            row
            for row in rows
            if row["metadata"]["network"] == "tcp" and row["metadata"]["destinationPort"] == "7001"
        ]
        # 16 flows hashed over two queues: both workers hold some.
        assert len(tcp) == 16
        assert {row["worker"] for row in tcp} == {0, 1}
        # Ids name flows across workers too (each worker's are its own).
        assert len({row["id"] for row in tcp}) == 16
        prefixes = {row["worker"]: row["id"][:-12] for row in tcp}
        assert prefixes[0] != prefixes[1]
        starts = [row["start"] for row in rows]
        assert starts == sorted(starts)
        # Closing is a worker's business: the totals' address says where.
        closing = bed.client_run(
            ["curl", "-s", "-X", "DELETE", f"http://127.0.0.1:{STATS_PORT}/connections"]
        ).stdout
        assert "workers" in json.loads(closing)["message"]
    finally:
        holder.stdin.close()
        holder.wait(30)
        bed.lab.stop(holder)


def test_the_device_is_multi_queue_with_the_usual_default_mtu(bed: Testbed) -> None:
    skip_if_device_options()
    link = bed.client_run(["ip", "-d", "link", "show", "tun0"]).stdout
    assert "multi_queue" in link, link
    assert " mtu 9000 " in link, link  # as with one process (--mtu not given)


def test_udp_and_dns_work_on_every_worker(bed: Testbed) -> None:
    """DNS queries from many source ports spread over the workers; every
    one is answered, and the same name gets the same fake IP from both."""
    answers = set()
    for _ in range(16):
        out = bed.client_run(["dig", "+short", "+tries=1", "echo.test", "A"]).stdout.split()
        assert len(out) == 1
        answers.add(out[0])
    assert len(answers) == 1, answers
    result = bed.client_tool("udp", "echo.test", 7001, 20)
    assert result["echoed"] == 20


def test_a_dead_worker_stops_tun2sx_with_an_error(bed: Testbed) -> None:
    assert bed.proc is not None
    workers = children_of(bed.proc.pid)
    assert len(workers) == WORKERS
    os.kill(workers[0], signal.SIGKILL)
    code = bed.proc.wait(20)
    bed.proc = None
    assert code != 0
    log = bed.log()
    assert "ended with status -9; stopping the others" in log
    # The other worker went too, and with it the last queue: the device is gone.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{workers[1]}").exists():
        assert time.monotonic() < deadline, "the surviving worker did not stop"
        time.sleep(0.05)
    links = bed.client_run(["ip", "-o", "link", "show"]).stdout
    assert "tun0" not in links


def test_sigterm_stops_every_worker_cleanly(bed: Testbed) -> None:
    assert bed.proc is not None
    workers = children_of(bed.proc.pid)
    assert bed.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()
    assert bed.log().count("tun2sx: stopped") == WORKERS


def test_ctrl_c_to_the_process_group_stops_cleanly(bed: Testbed) -> None:
    """The terminal's SIGINT reaches the parent and every worker at once."""
    assert bed.proc is not None
    workers = children_of(bed.proc.pid)
    os.killpg(bed.proc.pid, signal.SIGINT)
    assert bed.proc.wait(20) == 0
    bed.stop()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()
    log = bed.log()
    assert "stopping the others" not in log
    # Each worker got SIGINT and then the parent's SIGTERM: the second one is
    # absorbed, so every worker finishes its shutdown and says so.
    assert log.count("tun2sx: stopped") == WORKERS
