"""A lossy lab: random packet loss between the application and the TUN.

tun2sx's TCP runs between the application's kernel and the TUN, so that is
where loss must be injected to exercise its retransmission, SACK and
congestion control. This kernel has no netem; nftables' `numgen random`
drops a share of packets instead, in a router namespace:

    app ns      10.201.0.1 ── veth ── 10.201.0.2   router ns  (nft loss, both ways)
    router ns   10.202.0.1 ── veth ── 10.202.0.2   tun ns     (tun2sx on tun0)
    tun ns      10.200.0.1 ── veth ── 10.200.0.2   server ns  (Dante, iperf3, servers)

The tun ns forwards the app's traffic: fake IPs (198.18.0.0/15, including
the DNS address 198.18.0.2) and the default route go into tun0, so tun2sx's
stack answers the application directly. The kernel path for comparison is
the same app namespace talking to 10.200.0.2: routed by the tun ns straight
to the server, through the same lossy router, no TUN.

The router must see wire-sized packets, or one drop would take a whole
64 KB super-segment: segmentation offloads are turned off on every veth
that feeds it, and the links carry MTU 1500.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.e2e.testbed import (
    DANTE_PORT,
    FAR_SIDE_PORTS,
    SERVER_ADDR,
    Tun2sxProcess,
    iperf_gbps,
    run_client_tool,
    start_far_side,
)
from tun2sx.lab.netns import Lab, Namespace

APP_ADDR = "10.201.0.1"
IPERF_PORT = 5201


class LossyBed:
    """The four-namespace lossy lab; `set_loss` changes the drop rate."""

    def __init__(self, lab: Lab, tmp: Path, *, mtu: int | None = 1500) -> None:
        """Build the lab; tun2sx will run tun0 at `mtu` (None: its default)."""
        self.lab = lab
        self.tmp = tmp
        self.mtu = mtu
        self.app: Namespace = lab.namespace("app")
        self.router: Namespace = lab.namespace("rtr")
        self.tunns: Namespace = lab.namespace("tun")
        self.server: Namespace = lab.namespace("srv")
        app_dev, self.router_app_dev = lab.link(
            self.app, [f"{APP_ADDR}/24"], self.router, ["10.201.0.2/24"]
        )
        self.router_tun_dev, tun_dev = lab.link(
            self.router, ["10.202.0.1/24"], self.tunns, ["10.202.0.2/24"]
        )
        lab.link(self.tunns, ["10.200.0.1/24"], self.server, [f"{SERVER_ADDR}/24"])
        for ns, dev in (
            (self.app, app_dev),
            (self.router, self.router_app_dev),
            (self.router, self.router_tun_dev),
            (self.tunns, tun_dev),
        ):
            ns.run(["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"])
        for ns in (self.router, self.tunns):
            ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.app.run(["ip", "route", "add", "default", "via", "10.201.0.2"])
        self.router.run(["ip", "route", "add", "default", "via", "10.202.0.2"])
        self.tunns.run(["ip", "route", "add", "10.201.0.0/24", "via", "10.202.0.1"])
        self.server.run(["ip", "route", "add", "default", "via", "10.200.0.1"])
        self.router.run(["nft", "add", "table", "inet", "loss"])
        self._loss_per_mille = 0
        self.app.write_etc("resolv.conf", "nameserver 198.18.0.2\noptions timeout:2\n")
        start_far_side(self.server, tmp)
        self.server.spawn(["iperf3", "-s", "-B", SERVER_ADDR, "-p", str(IPERF_PORT)])
        for port in (*FAR_SIDE_PORTS, IPERF_PORT):
            self.server.wait_listening(port)
        self.log_path = tmp / "tun2sx.log"
        self.tun2sx = Tun2sxProcess(self.tunns, self.log_path)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The running tun2sx, or None."""
        return self.tun2sx.proc

    def set_loss(self, per_mille: int) -> None:
        """Drop `per_mille`/1000 of the packets crossing the router, each way."""
        dev = self.router_app_dev
        rules = "".join(
            f"add rule inet loss drops {way} {dev} numgen random mod 1000 < {per_mille}"
            " counter drop\n"
            for way in ("iifname", "oifname")
        )
        script = (
            "flush table inet loss\n"
            "add chain inet loss drops { type filter hook forward priority 0 ; policy accept ; }\n"
            + rules
        )
        self.router.run(["nft", "-f", "-"], input=script)
        self._loss_per_mille = per_mille

    def dropped(self) -> int:
        """Return how many packets the loss rules dropped so far (both ways)."""
        out = self.router.run(["nft", "-j", "list", "table", "inet", "loss"]).stdout
        total = 0
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total

    def start(self, *extra: str) -> None:
        """Start tun2sx (Dante outbound) in the tun namespace; route into tun0.

        The TUN's MTU is the links' 1500 unless the bed was built with
        another (or None: tun2sx's default 9000, larger than the
        application's path, whose MSS then sets where the kernel cuts
        tun2sx's 64 KB GSO segments).
        """
        args = [
            "--tun",
            "tun0",
            *(["--mtu", str(self.mtu)] if self.mtu is not None else []),
            "--tun-address",
            "198.18.0.1/15",
            "--fake-ip-db",
            ":memory:",
            "--dns-upstream",
            f"{SERVER_ADDR}:5353",
            "--socks",
            f"{SERVER_ADDR}:{DANTE_PORT}",
            *extra,
        ]
        self.tun2sx.start(args)
        self.tunns.run(["ip", "route", "replace", "default", "dev", "tun0"])

    def stop(self) -> int:
        return self.tun2sx.stop()

    def app_tool(self, *args: object, timeout: float = 120) -> dict[str, object]:
        """Run tests/e2e/client.py in the app namespace; its JSON result."""
        return run_client_tool(self.app, *args, timeout=timeout)

    def iperf(self, host: str, seconds: float, *, reverse: bool) -> float:
        """Single-stream iperf3 from the app namespace; received Gbit/s."""
        return iperf_gbps(self.app, host, IPERF_PORT, seconds, reverse=reverse)
