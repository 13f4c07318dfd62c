"""Two tun2sx on one `--fake-ip-db`: the second is refused in one line.

A single process keeps its table in memory and rewrites the file by
renaming a new one over it, and workers keep it in SQLite; a second single
process, or one of the other kind, would lose mappings or migrate the file
away under the first. It must exit 2 before touching the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.testbed import ROOT, SERVER_ADDR, Testbed, running_bed
from tests.support import require
from tun2sx.naming import journal


@pytest.fixture
def bed() -> Iterator[Testbed]:
    require("microsocks", "danted", "curl", "dig")
    with running_bed("t2sx-lock", Testbed) as testbed:
        yield testbed


def _second(bed: Testbed, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start another tun2sx on the bed's table, on a TUN of its own."""
    argv = [sys.executable, "-m", "tun2sx", "--tun", "tun1", "--fake-ip-db", str(bed.fakeip_db)]
    return bed.client.run(
        [*argv, "--socks", f"{SERVER_ADDR}:1080", *extra],
        check=False,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def _refused(bed: Testbed, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"tun2sx: fake_ip_db: {bed.fakeip_db} is in use by another tun2sx "
        f"(it holds {bed.fakeip_db}.lock); stop that one, or give each its own "
        f"fake_ip_db (--fake-ip-db)"
    ]
    # Nothing of the second one is left behind.
    assert "tun1" not in bed.client.run(["ip", "-o", "link"]).stdout


def test_a_second_tun2sx_on_one_table_exits_2_and_leaves_it(bed: Testbed) -> None:
    bed.client_run(["dig", "+short", "+time=5", "web.test"])
    before = bed.fakeip_db.read_bytes()
    assert before.startswith(journal.MAGIC)
    _refused(bed, _second(bed))
    _refused(bed, _second(bed, "--workers", "2"))
    assert bed.fakeip_db.read_bytes() == before
    # The first one still serves, and still writes the file.
    bed.client_run(["dig", "+short", "+time=5", "other.test"])
    assert len(bed.fakeip_db.read_bytes()) > len(before)


def test_a_single_tun2sx_beside_workers_exits_2_and_leaves_their_database(
    bed: Testbed,
) -> None:
    bed.stop()
    bed.start("--workers", "2")
    before = bed.fakeip_db.read_bytes()
    assert before.startswith(journal.SQLITE_MAGIC)
    _refused(bed, _second(bed))
    assert bed.fakeip_db.read_bytes().startswith(journal.SQLITE_MAGIC)
    assert bed.stop() == 0
    # Gone with the workers: the next single process takes the table over.
    bed.start()
    assert bed.fakeip_db.read_bytes().startswith(journal.MAGIC)
