"""Load, small enough for CI: 1,000 flows held then all exchanging, a DNS burst.

The full-size run (10,000 flows, 10,000 queries) is `./dev bench load`;
this module runs the same steps (tests/bench/load.py) with smaller numbers
and asserts what must hold at any size: every connection opens and echoes
its bytes exactly, every close is clean, tun2sx's flow table is empty once
the applications closed, every query is answered with an address, and no
SYN was refused for lack of room.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bench.load import dns_burst, final_stats, raise_nofile, start_bed, tcp_load
from tests.e2e.testbed import Testbed
from tests.support import require
from tun2sx.lab.netns import Lab

CONNECTIONS = 1000
SIZE = 8192
QUERIES = 2000


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[Testbed, dict[str, Any]]]:
    """One testbed, one load run; the tests below read its results."""
    require("danted", "curl")
    raise_nofile()
    with Lab("t2sx-load") as lab, tempfile.TemporaryDirectory() as tmp:
        bed = start_bed(lab, Path(tmp))
        try:
            yield bed, tcp_load(bed, CONNECTIONS, SIZE)
        finally:
            if bed.proc is not None:
                bed.stop()


def test_every_connection_held_and_echoed_exactly(loaded: tuple[Testbed, dict[str, Any]]) -> None:
    _bed, result = loaded
    assert result["held"]["open"] == CONNECTIONS
    assert result["stats_held"]["tcp_connections"] == CONNECTIONS
    assert result["exchanged"]["echoed"] == CONNECTIONS
    assert result["stats_exchanged"]["bytes_up"] >= CONNECTIONS * SIZE
    assert result["closed"]["clean"] == CONNECTIONS
    assert result["stats_held"].get("syn_refused_max_connections", 0) == 0


def test_stack_connections_back_to_zero(loaded: tuple[Testbed, dict[str, Any]]) -> None:
    _bed, result = loaded
    assert result["after_close"]["tcp_connections"] == 0


def test_flow_table_back_to_zero(loaded: tuple[Testbed, dict[str, Any]]) -> None:
    _bed, result = loaded
    assert result["after_close"]["tcp_flows"] == 0


def test_dns_burst_all_answered(loaded: tuple[Testbed, dict[str, Any]]) -> None:
    bed, _result = loaded
    report = dns_burst(bed, QUERIES, tag="ci")
    assert report["answered"] == QUERIES
    assert report["with_address"] == QUERIES


def test_final_stats_line_shows_empty_table(loaded: tuple[Testbed, dict[str, Any]]) -> None:
    bed, _result = loaded
    stats = final_stats(bed)
    assert stats["tcp_connections"] == 0
    assert stats["tcp_flows_started"] >= CONNECTIONS
