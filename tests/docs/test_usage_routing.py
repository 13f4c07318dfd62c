"""docs/usage.md's routing recipe, run as written, in a private namespace pair.

The commands are read from the markdown (the `sh` blocks under "Routing
the machine into the TUN": setting up, and undoing it), so the test breaks
when the text drifts from what works. They run in order, each through
`sh -c` in the client namespace, as a user would type them;
`/etc/resolv.conf` there is the namespace's own (`ip netns exec` mounts
/etc/netns/NAME/resolv.conf over it). The one change: tun2sx is this
checkout's (`python -m tun2sx`), with its fake-IP table in a temporary file
instead of /var/lib.

    client ns                                server ns ("the LAN and beyond")
    10.0.0.2 ---------------- veth ------------- 10.0.0.1: microsocks :1080
    default via 10.0.0.1 (the real network)     HTTP :8080 on 10.0.0.1 and on
    tun0, table 100, the recipe's rules          192.0.2.1 (lo: "the internet")
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

from tests.support import require
from tun2sx.lab.netns import Lab, LabError, Namespace

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
USAGE = ROOT / "docs" / "usage.md"
SECTION = "## Routing the machine into the TUN"
NAME = "recipe.tun2sx.test"
INTERNET = "192.0.2.1"
PAGE = "through the recipe\n"


def recipe() -> tuple[list[str], list[str]]:
    """The command lines of the section's two `sh` blocks: set up, undo."""
    text = USAGE.read_text()
    assert SECTION in text, f"{USAGE.name} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, f"expected a set-up and an undo sh block under {SECTION!r}"
    setup, undo = ([line for line in b.splitlines() if line.strip()] for b in blocks)
    return setup, undo


class Bed:
    def __init__(self, lab: Lab, client: Namespace, tmp: Path) -> None:
        self.lab, self.client, self.tmp = lab, client, tmp
        self.runs = 0

    def start(self, line: str) -> subprocess.Popen[bytes]:
        """The recipe's tun2sx line, this checkout's tun2sx; returns once it serves."""
        argv = shlex.split(line, comments=True)
        assert argv[0] == "tun2sx", line
        argv = [sys.executable, "-m", "tun2sx", *argv[1:]]
        argv += ["--fake-ip-db", str(self.tmp / "fakeip.sqlite")]
        self.runs += 1
        log = self.tmp / f"tun2sx-{self.runs}.log"
        with log.open("wb") as out:
            proc = self.client.spawn(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        # Bounded poll of the log for the line serve() writes once it reads.
        deadline = time.monotonic() + 20
        while "tun2sx: serving" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tun2sx did not start ({proc.poll()}):\n{log.read_text()}")
            time.sleep(0.05)
        return proc

    def sh(self, line: str) -> None:
        result = self.client.run(["sh", "-c", line], check=False)
        assert result.returncode == 0, f"{line!r} failed: {result.stderr.strip()}"

    def curl(self, url: str) -> str:
        result = self.client.run(["curl", "-sS", "--max-time", "10", url], check=False)
        assert result.returncode == 0, f"curl {url}: {result.stderr.strip()}"
        return result.stdout

    def routing(self) -> str:
        """The rules and table 100, without the carrier state: the kernel
        marks a route `linkdown` a moment after the device loses its
        carrier (tun2sx closed it), which is not a change of routing."""
        rules = self.client.run(["ip", "rule", "show"]).stdout
        table = self.client.run(["ip", "route", "show", "table", "100"]).stdout
        return (rules + table).replace(" linkdown", "")


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    require("microsocks", "curl")
    with Lab("t2sx-docs") as lab:
        client = lab.namespace("client")
        server = lab.namespace("server")
        lab.link(client, ["10.0.0.2/24"], server, ["10.0.0.1/24"])
        client.run(["ip", "route", "add", "default", "via", "10.0.0.1"])
        server.run(["ip", "addr", "add", f"{INTERNET}/32", "dev", "lo"])
        server.write_etc("hosts", f"127.0.0.1 localhost\n10.0.0.1 {NAME}\n")
        client.write_etc("resolv.conf", "nameserver 10.0.0.1\n")  # the recipe replaces it
        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text(PAGE)
        http = [sys.executable, "-m", "http.server", "8080", "--directory", str(www)]
        server.spawn(http)
        server.spawn(["microsocks", "-i", "10.0.0.1", "-p", "1080"])
        server.wait_listening(8080)
        server.wait_listening(1080)
        try:
            yield Bed(lab, client, tmp_path)
        except LabError as exc:
            pytest.fail(str(exc))


def test_the_routing_recipe_works_as_typed_and_survives_a_restart(bed: Bed) -> None:
    lines, undo = recipe()
    *setup, start = lines
    rules_before = bed.client.run(["ip", "rule", "show"]).stdout
    for line in setup:
        bed.sh(line)
    proc = bed.start(start)
    # By name: fake-IP DNS at the resolver address, then the proxy.
    assert bed.curl(f"http://{NAME}:8080/") == PAGE
    # By address: the default route now leads into the TUN...
    assert "dev tun0" in bed.client.run(["ip", "route", "get", INTERNET]).stdout
    assert bed.curl(f"http://{INTERNET}:8080/") == PAGE
    # ...while the LAN and the proxy on it stay on the main table.
    assert "dev tun0" not in bed.client.run(["ip", "route", "get", "10.0.0.1"]).stdout

    routing = bed.routing()
    assert bed.lab.stop(proc) == 0
    assert bed.routing() == routing  # nothing vanished with the process
    # Stopped: what goes into the TUN is dropped, not sent around the proxy.
    into_tun = bed.client.run(
        ["curl", "-sS", "--max-time", "2", f"http://{INTERNET}:8080/"], check=False
    )
    assert into_tun.returncode != 0

    proc = bed.start(start)  # the same line again, no `ip` command in between
    assert bed.curl(f"http://{NAME}:8080/") == PAGE
    assert bed.curl(f"http://{INTERNET}:8080/") == PAGE

    # Undone as the docs say: the rules as they were, no device, and the
    # default route of the main table in charge again.
    assert bed.lab.stop(proc) == 0
    for line in undo:
        bed.sh(line)
    assert bed.client.run(["ip", "rule", "show"]).stdout == rules_before
    assert bed.client.run(["ip", "link", "show", "tun0"], check=False).returncode != 0
    assert "via 10.0.0.1" in bed.client.run(["ip", "route", "get", INTERNET]).stdout
