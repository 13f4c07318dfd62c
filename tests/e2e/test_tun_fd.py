"""tun2sx on a TUN it did not open (`--tun-fd`), without offloads.

Like Android's VpnService, the test opens the TUN itself (no virtio-net
header, MTU 1500), configures it, and hands only the file descriptor to
tun2sx. Without offload every checksum is computed in Python and every
segment is MTU-sized, so this also covers the no-offload data path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from tests.e2e.testbed import SERVER_ADDR, Testbed
from tun2sx.dataplane.tun import open_tun
from tun2sx.lab.netns import inside

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def adopted(testbed: Testbed) -> Iterator[Testbed]:
    testbed.stop()
    with inside(testbed.client):
        device = open_tun(
            "tun0", mtu=1500, offload=False, addresses=("198.18.0.1/15", "fd00:7e::1/64")
        )
    fd = os.dup(device.fileno())
    device.close()  # our dup keeps the (non-persistent) device alive
    try:
        testbed.proxy_args = ["--socks", f"{SERVER_ADDR}:1081"]
        testbed.start(tun_fd=fd)
    finally:
        os.close(fd)  # tun2sx has its own copy now
    yield testbed


def test_adopted_fd_is_served(adopted: Testbed) -> None:
    serving = [line for line in adopted.log().splitlines() if "serving" in line]
    assert "serving tun0 (mtu 1500, offload off)" in serving[-1]


def test_download_and_upload_exact_without_offload(adopted: Testbed) -> None:
    size = 4 * 1024 * 1024
    assert adopted.client_tool("download", "big.test", 7003, size) == {
        "received": size,
        "equal": True,
    }
    assert adopted.client_tool("upload", "echo.test", 7002, size) == {
        "sent": size,
        "equal": True,
    }


def test_curl_and_udp_without_offload(adopted: Testbed) -> None:
    result = adopted.client.run(
        ["sh", "-c", "curl -sS --max-time 60 http://big.test:8080/big.bin | sha256sum"]
    )
    expected = hashlib.sha256((adopted.www / "big.bin").read_bytes()).hexdigest()
    assert result.stdout.split()[0] == expected
    assert adopted.client_tool("udp", "echo.test", 7001, 10)["echoed"] == 10
