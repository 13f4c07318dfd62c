"""What the browser tests share: Chromium's flags and launcher inside the
client namespace, and a TCP connection held open there (client.py wait)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.testbed import ROOT, Testbed
from tests.support import require_binary

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Waiter:
    """A TCP connection held open in the client namespace (client.py wait)."""

    def __init__(self, bed: Testbed, host: str, port: int) -> None:
        self.bed = bed
        self.proc = bed.client.spawn(
            [sys.executable, "-m", "tests.e2e.client", "wait", host, str(port), "60"],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=str(ROOT),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the client ended before its connection was up"
        self.ready = json.loads(line)
        assert self.ready["ready"] == "ping"

    def ended(self) -> str:
        assert self.proc.stdout is not None
        self.proc.wait(70)
        self.bed.lab.stop(self.proc)
        return str(json.loads(self.proc.stdout.readline())["ended"])


def chromium_in(bed: Testbed, tmp: Path) -> str:
    """A launcher that starts Debian's Chromium inside the client namespace,
    where the controller listens on loopback."""
    chromium = require_binary("chromium")
    wrapper = tmp / "chromium-in-ns"
    wrapper.write_text(
        f'#!/bin/sh\nexec ip netns exec {bed.client.name} {chromium} "$@"\n',
    )
    wrapper.chmod(0o755)
    return str(wrapper)
