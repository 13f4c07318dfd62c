"""Bad input: a storm of malformed packets while a large exact transfer runs.

tests/e2e/storm.py, inside the client namespace, echoes 16 MiB through
tun2sx and, between every 128 KiB it writes, injects a burst of crafted
packets into tun0 through a raw socket: junk after an IPv4 header, cut-off
TCP headers, segments of the live flow in its window with bad checksums,
unparseable options or SYN+FIN, fragments, old and far-out-of-window
garbage, and inexact RSTs and SYNs. The transfer must come back byte for
byte, tun2sx must still be running and serving new flows, its final
statistics must count the drops, and its log must hold no ERROR line and
no traceback (malformed input is counted, not reported as a failure).
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, running_bed
from tests.support import require
from tun2sx.lab.netns import Lab

SIZE = 16 * 1024 * 1024
BURST = 40


def _dante_bed(lab: Lab, tmp: Path) -> Testbed:
    bed = Testbed(lab, tmp)
    # Dante, not microsocks: microsocks copies with blocking writes, so
    # a bulk echo in both directions at once deadlocks inside it.
    bed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
    return bed


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    require("danted", "microsocks")
    with running_bed("t2sx-storm", _dante_bed) as bed:
        yield bed


def _tun_tx_dropped(bed: Testbed) -> int:
    out = bed.client_run(["cat", "/sys/class/net/tun0/statistics/tx_dropped"]).stdout
    return int(out)


def test_storm_does_not_corrupt_live_transfer(bed: Testbed) -> None:
    dropped_before = _tun_tx_dropped(bed)
    result = bed.client.run(
        [sys.executable, "-m", "tests.e2e.storm", "echo.test", "7001", str(SIZE), str(BURST)],
        timeout=240,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    report = json.loads(result.stdout)
    assert report["received"] == SIZE
    assert report["equal"] is True
    injected = report["injected"]
    assert sum(injected.values()) >= 100 * BURST
    # tun2sx is alive and still serves new flows after the storm.
    assert bed.proc is not None and bed.proc.poll() is None
    after = bed.client_tool("echo", "echo.test", 7001, 100_000)
    assert after == {"sent": 100_000, "received": 100_000, "equal": True}
    # What the kernel dropped on a full TUN queue never reached tun2sx.
    lost = _tun_tx_dropped(bed) - dropped_before
    bed.stop()
    line = next(ln for ln in reversed(bed.log().splitlines()) if "stopped; " in ln)
    stats = ast.literal_eval(line.split("stopped; ", 1)[1])
    assert stats["rx_malformed"] >= report["malformed"] - lost > 0
    assert stats["rx_fragments"] >= injected["fragment"] - lost > 0
    assert stats.get("tcp_flow_errors", 0) == 0
    # Malformed input is counted, never logged as an error with a traceback.
    log = bed.log()
    assert "Traceback" not in log
    assert [ln for ln in log.splitlines() if " ERROR " in ln] == []
