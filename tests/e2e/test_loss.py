"""End to end under random packet loss between the application and the TUN.

tun2sx's own TCP runs between the application's kernel and tun0, so the
loss sits there (tests/e2e/lossy.py: an nftables router namespace, no
netem on this kernel). Multi-megabyte transfers by name must arrive with
exact bytes both ways under 0.5 % and 2 % loss in each direction, and the
loss rules must really have dropped packets meanwhile. Throughput is the
benchmark's business (`python -m tests.bench loss`), never asserted here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from tests.e2e.lossy import LossyBed
from tests.e2e.testbed import running_bed, skip_if_device_options
from tests.support import require

pytestmark = pytest.mark.e2e

SIZE = 8 * 1024 * 1024
NEEDS = ("danted", "nft", "ethtool", "iperf3")  # the lossy lab's programs


@pytest.fixture(scope="module")
def lossy() -> Iterator[LossyBed]:
    require(*NEEDS)
    with running_bed("t2sx-loss", LossyBed) as bed:
        yield bed


@pytest.mark.parametrize("per_mille", [5, 20])
def test_download_by_name_is_exact_under_loss(lossy: LossyBed, per_mille: int) -> None:
    lossy.set_loss(per_mille)
    result = lossy.app_tool("download", "big.test", 7003, SIZE)
    assert result == {"received": SIZE, "equal": True}
    # 8 MB is about 6000 packets of data each way: a rate this low still
    # drops some, so the transfer above really went through recovery.
    assert lossy.dropped() > 0


@pytest.mark.parametrize("per_mille", [5, 20])
def test_upload_by_name_is_exact_under_loss(lossy: LossyBed, per_mille: int) -> None:
    lossy.set_loss(per_mille)
    result = lossy.app_tool("upload", "big.test", 7002, SIZE)
    assert result == {"sent": SIZE, "equal": True}
    assert lossy.dropped() > 0


def test_an_application_behind_a_smaller_mtu_gets_exact_bytes_with_the_default_tun() -> None:
    """tun2sx's default TUN MTU (9000) is larger than the application's
    1500-byte path (a LAN behind a router): its GSO super-segments must be
    cut at the application's MSS, or they are dropped as too big."""
    require(*NEEDS)
    skip_if_device_options()
    with running_bed("t2sx-lan", functools.partial(LossyBed, mtu=None)) as bed:
        link = bed.tunns.run(["ip", "link", "show", "tun0"]).stdout
        assert " mtu 9000 " in link, link
        bed.set_loss(5)
        result = bed.app_tool("download", "big.test", 7003, SIZE)
        assert result == {"received": SIZE, "equal": True}
        assert bed.dropped() > 0


def test_echo_both_directions_at_once_under_loss(lossy: LossyBed) -> None:
    lossy.set_loss(20)
    size = 3 * 1024 * 1024
    result = lossy.app_tool("echo", "echo.test", 7001, size)
    assert result == {"sent": size, "received": size, "equal": True}
    assert lossy.dropped() > 0
