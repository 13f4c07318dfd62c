"""End-to-end fixtures: the namespace testbed with tun2sx running in it.

Outside CI these tests skip when root, /dev/net/tun or a server binary is
missing; with CI=true a missing capability fails the run instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.testbed import SERVER_ADDR, Testbed, running_bed
from tests.support import require


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    require("microsocks", "danted", "curl", "dig", "ping")
    with running_bed("t2sx-e2e", Testbed) as bed:
        yield bed


@pytest.fixture(scope="module")
def dante(testbed: Testbed) -> Iterator[Testbed]:
    """The module's testbed with tun2sx restarted on Dante (port 1081).

    Dante, not microsocks: it carries UDP ASSOCIATE, and a relay with
    blocking writes (microsocks) deadlocks on a full-duplex echo stream.
    """
    testbed.stop()
    testbed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
    testbed.start()
    yield testbed
