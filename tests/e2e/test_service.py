"""The systemd unit's command, run with the unit's capabilities and nothing else.

systemd cannot run here (it is not PID 1), so this runs what it would: the
`ExecStart` line of the unit `tun2sx service-unit` prints, under `setpriv`
with the unit's `CapabilityBoundingSet` as bounding, inheritable and
ambient set and no new privileges, as root's uid like the unit. The
configuration is docs/install.md's (auto_route on), pointed at the
testbed's Dante, in the testbed's client namespace; a page fetched by name
must come through. Without CAP_NET_ADMIN the same command must end with
one line, which shows the capability is needed and the check can fail.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.testbed import DANTE_PORT, SERVER_ADDR, Testbed, running_bed
from tests.support import require, require_binary
from tun2sx.lab.netns import LabError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "docs" / "install.md"
PROGRAM = Path(sys.executable).parent / "tun2sx"
# CAP_NET_ADMIN is capability 12, CAP_NET_RAW 13 (linux/capability.h).
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


def _unit() -> str:
    return subprocess.run(
        [str(PROGRAM), "service-unit"], capture_output=True, text=True, check=True
    ).stdout


def _setting(unit: str, key: str) -> str:
    (value,) = re.findall(rf"^{key}=(.*)$", unit, re.MULTILINE)
    return value


def _setpriv(caps: list[str]) -> list[str]:
    names = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return [
        "setpriv",
        f"--bounding-set={names}",
        f"--inh-caps={names}",
        f"--ambient-caps={names}",
        "--no-new-privs",
        "--",
    ]


class _Bed(Testbed):
    """The testbed without a tun2sx of its own: the test starts the unit's."""

    def start(self, *extra: str, tun_fd: int | None = None) -> None:
        pass


@pytest.fixture
def bed() -> Iterator[_Bed]:
    require("danted", "curl", "setpriv")
    if not PROGRAM.exists():
        pytest.skip("no tun2sx script beside this Python (not installed into it)")
    with running_bed("t2sx-svc", _Bed) as testbed:
        yield testbed


def _command(bed: Testbed, caps: list[str]) -> list[str]:
    """The unit's ExecStart under `caps`, reading the docs' configuration."""
    blocks = re.findall(r"```toml\n(.*?)```", INSTALL.read_text(), re.DOTALL)
    config = bed.tmp / "config.toml"
    url = re.search(r'url = "(socks5://[^"]+)"', blocks[0])
    assert url is not None
    config.write_text(blocks[0].replace(url.group(1), f"socks5://{SERVER_ADDR}:{DANTE_PORT}"))
    config.chmod(0o600)
    start = shlex.split(_setting(_unit(), "ExecStart"))
    assert start[0] == str(PROGRAM)
    start = [str(config) if word == "/etc/tun2sx/config.toml" else word for word in start]
    # The unit's StateDirectory is /var/lib/tun2sx: the test's own instead.
    return [*_setpriv(caps), *start, "--fake-ip-db", str(bed.tmp / "fakeip.sqlite")]


def _wait_log(log: Path, words: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if words in text:
            return text
        if proc.poll() is not None:
            raise LabError(f"tun2sx exited with {proc.returncode}: {text}")
        time.sleep(0.05)
    raise LabError(f"no {words!r} in the log within {timeout} s")


def _cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    (value,) = re.findall(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return int(value, 16)


def test_the_units_command_with_its_capabilities_carries_traffic(bed: _Bed) -> None:
    require_binary("setpriv")
    caps = _setting(_unit(), "CapabilityBoundingSet").split()
    assert sorted(caps) == sorted(CAP_BITS)
    assert _setting(_unit(), "AmbientCapabilities").split() == caps
    log = bed.tmp / "service.log"
    with log.open("wb") as out:
        proc = bed.client.spawn(_command(bed, caps), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_log(log, "serving", proc)
        assert _cap_eff(proc.pid) == sum(1 << CAP_BITS[c] for c in caps)
        page = bed.client_run(["curl", "-sf", "--max-time", "20", "http://www.test:8080/"])
        assert page.stdout == "<h1>tun2sx e2e</h1>\n"
        rules = bed.client_run(["ip", "rule", "show"]).stdout
        assert "lookup 2022" in rules
        # `systemctl reload` is the unit's ExecReload: SIGHUP.
        assert _setting(_unit(), "ExecReload") == "/bin/kill -HUP $MAINPID"
        subprocess.run(["/bin/kill", "-HUP", str(proc.pid)], check=True)
        _wait_log(log, "reloaded", proc)
    finally:
        code = bed.lab.stop(proc)
    assert code == 0, log.read_text()
    assert "lookup 2022" not in bed.client_run(["ip", "rule", "show"]).stdout
    assert "Traceback" not in log.read_text()


def test_without_cap_net_admin_it_ends_with_one_line(bed: _Bed) -> None:
    require_binary("setpriv")
    result = bed.client_run(_command(bed, ["CAP_NET_RAW"]), check=False, timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("tun2sx: ") and "tun0" in lines[-1], lines
    assert "Traceback" not in result.stderr
