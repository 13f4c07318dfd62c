"""The end-to-end testbed: a client namespace served by a real tun2sx process.

`Testbed` builds:

    client ns: tun0 (198.18.0.1/15, fd00:7e::1/64) served by `tun2sx`,
               default routes -> tun0, resolv.conf -> 198.18.0.2
    server ns: 10.200.0.2 (veth), microsocks :1080, danted :1081 (UDP
               ASSOCIATE), tests/e2e/servers.py (echo/hash/source/DNS,
               whoami on every address), hosts file mapping test names to
               10.200.0.2 and the `WHOAMI_NAMES` to addresses of their own

The end-to-end tests and the benchmark share it; the lossy lab
(tests/e2e/lossy.py) shares its server side (`start_far_side`) and its
tun2sx process handling (`Tun2sxProcess`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from tun2sx.lab.netns import Lab, LabError, Namespace

ROOT = Path(__file__).resolve().parents[2]
SERVER_ADDR = "10.200.0.2"
NAMES = ("echo.test", "www.test", "big.test")
# Names with an address each (on the server's loopback), so the whoami
# server (port 7004) tells which name a connection reached.
WHOAMI_NAMES = {f"n{i}.test": f"10.200.1.{i}" for i in range(1, 6)}
WHOAMI_PORT = 7004
DANTE_PORT = 1081


DANTE_CONF = """\
logoutput: stderr
internal: {addr} port = 1081
external: {addr}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: bind connect udpassociate bindreply udpreply }}
"""


def start_far_side(server: Namespace, tmp: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """Set up the server namespace's common part and start its servers.

    Writes the hosts file (the test names), gives each of `WHOAMI_NAMES`
    its address, and starts tests/e2e/servers.py and Dante. Does not wait:
    the caller waits for these ports and its own servers' together.

    Returns:
        Dante's config file and process.
    """
    entries = [(SERVER_ADDR, name) for name in NAMES] + [
        (addr, name) for name, addr in WHOAMI_NAMES.items()
    ]
    server.write_etc("hosts", "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in entries))
    for addr in WHOAMI_NAMES.values():
        server.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
    server.spawn(
        [sys.executable, "-m", "tests.e2e.servers", "--bind", SERVER_ADDR, "--whoami"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    conf = tmp / "danted.conf"
    conf.write_text(DANTE_CONF.format(addr=SERVER_ADDR))
    return conf, server.spawn(["danted", "-f", str(conf)])


FAR_SIDE_PORTS = (7001, 7002, 7003, WHOAMI_PORT, DANTE_PORT)


def run_client_tool(ns: Namespace, *args: object, timeout: float) -> dict[str, object]:
    """Run tests/e2e/client.py in `ns`; its JSON result."""
    result = ns.run(
        [sys.executable, "-m", "tests.e2e.client", *map(str, args)],
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


# Options for every tun2sx that opens its own device (see Tun2sxProcess.start).
DEVICE_OPTIONS = shlex.split(os.environ.get("TUN2SX_E2E_DEVICE", ""))


def skip_if_device_options() -> None:
    """For a test of the default device: it means nothing on another one."""
    if DEVICE_OPTIONS:
        pytest.skip("TUN2SX_E2E_DEVICE changes the device whose defaults this test checks")


class Tun2sxProcess:
    """One `python -m tun2sx` in a namespace, appending to a log file."""

    def __init__(self, ns: Namespace, log_path: Path) -> None:
        self.ns = ns
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, args: Sequence[str], *, pass_fds: Sequence[int] = ()) -> None:
        """Start tun2sx with `args`; return once tun0 is up and it says it serves.

        When tun2sx opens the device itself (`--tun`), the words of
        $TUN2SX_E2E_DEVICE are added: `--no-offload --mtu 1500` runs the
        whole end-to-end suite on the kind of device Android hands over.
        """
        if "--tun" in args:
            args = [*args, *DEVICE_OPTIONS]
        self._log = self.log_path.open("ab")
        offset = self._log.tell()
        self.proc = self.ns.spawn(
            [sys.executable, "-m", "tun2sx", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            pass_fds=tuple(pass_fds),
            # Its own process group, as under a shell: a test can send it
            # (and its workers) the terminal's Ctrl-C with killpg.
            start_new_session=True,
        )
        self.ns.wait_link("tun0")
        self._wait_serving(offset)

    def _wait_serving(self, offset: int, timeout: float = 20) -> None:
        """Poll the log until this run says it serves (or fail after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                if b"serving" in f.read():
                    return
            self.ns.lab.check_processes()
            time.sleep(0.05)
        raise LabError(f"tun2sx did not report serving within {timeout} s")

    def stop(self) -> int:
        """End it (SIGTERM, then SIGKILL); its exit status."""
        assert self.proc is not None
        code = self.ns.lab.stop(self.proc)
        self.proc = None
        self._log.close()
        return code


class Bed(Protocol):
    @property
    def proc(self) -> subprocess.Popen[bytes] | None: ...

    def start(self, *extra: str) -> None: ...

    def stop(self) -> int: ...


BedT = TypeVar("BedT", bound=Bed)


def iperf_gbps(
    ns: Namespace, host: str, port: int, seconds: float, *, reverse: bool, omit: int = 0
) -> float:
    """One single-stream iperf3 run from `ns`; the received Gbit/s.

    Args:
        omit: seconds at the start left out of the result (slow start).

    Raises:
        LabError: iperf3 reported a failed run (its control connection, say).
    """
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"]
    if omit:
        argv += ["-O", str(omit)]
    if reverse:
        argv.append("-R")
    for attempt in range(5):
        result = json.loads(ns.run(argv, timeout=seconds + 60, check=False).stdout)
        # The server is still finishing the previous run (back to back, the
        # last of its data may still be draining through a proxy): it
        # refuses at once; ask again shortly.
        if "server is busy" not in str(result.get("error", "")):
            break
        time.sleep(0.5 * (attempt + 1))
    if "error" in result:
        raise LabError(f"iperf3 to {host} failed: {result['error']}")
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def children_of(pid: int) -> list[int]:
    """The PIDs of process `pid`'s children (none once it is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid`, KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LabError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def running_bed(prefix: str, make: Callable[[Lab, Path], BedT], *start_args: str) -> Iterator[BedT]:
    """A lab named `prefix`, the bed `make` builds in it, tun2sx started with
    `start_args` on top of the bed's own; all gone after."""
    with Lab(prefix) as lab, tempfile.TemporaryDirectory() as tmp:
        bed = make(lab, Path(tmp))
        bed.start(*start_args)
        try:
            yield bed
        finally:
            if bed.proc is not None:
                bed.stop()


class Testbed:
    """A running lab; `client_run` runs a command in the client namespace."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.client: Namespace = lab.namespace("client")
        self.server: Namespace = lab.namespace("server")
        lab.link(self.client, ["10.200.0.1/24"], self.server, [f"{SERVER_ADDR}/24"])
        self.client.write_etc("resolv.conf", "nameserver 198.18.0.2\noptions timeout:2\n")
        self.dante_conf, self.dante = start_far_side(self.server, tmp)
        self.www = tmp / "www"
        self.www.mkdir()
        (self.www / "index.html").write_text("<h1>tun2sx e2e</h1>\n")
        (self.www / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))
        self.server.spawn(
            [
                sys.executable,
                "-m",
                "http.server",
                "8080",
                "--bind",
                SERVER_ADDR,
                "--directory",
                str(self.www),
            ]
        )
        self.server.spawn(["microsocks", "-i", SERVER_ADDR, "-p", "1080"])
        for port in (*FAR_SIDE_PORTS, 8080, 1080):
            self.server.wait_listening(port)
        self.fakeip_db = tmp / "fakeip.sqlite"
        self.log_path = tmp / "tun2sx.log"
        self.tun2sx = Tun2sxProcess(self.client, self.log_path)
        self.proxy_args = ["--socks", f"{SERVER_ADDR}:1080"]
        # Flow-level (DEBUG) logging for tests; a benchmark drops it. The
        # INFO "serving" line is how start() knows tun2sx is ready.
        self.verbosity = ["-v"]

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The running tun2sx, or None."""
        return self.tun2sx.proc

    @proc.setter
    def proc(self, value: subprocess.Popen[bytes] | None) -> None:
        # A test that saw tun2sx exit on its own says so, and nothing stops it again.
        self.tun2sx.proc = value

    def start(self, *extra: str, tun_fd: int | None = None) -> None:
        """Start tun2sx in the client namespace and route everything to it.

        With `tun_fd`, tun2sx adopts that already-open TUN (which must be
        tun0 in the client namespace, addressed and up) instead of opening
        one: the Android VpnService way.
        """
        if tun_fd is None:
            device = [
                "--tun",
                "tun0",
                "--tun-address",
                "198.18.0.1/15",
                "--tun-address",
                "fd00:7e::1/64",
            ]
        else:
            device = ["--tun-fd", str(tun_fd)]
        args = [
            *device,
            "--fake-ip-db",
            str(self.fakeip_db),
            "--dns-upstream",
            f"{SERVER_ADDR}:5353",
            *self.verbosity,
            *self.proxy_args,
            *extra,
        ]
        self.tun2sx.start(args, pass_fds=() if tun_fd is None else (tun_fd,))
        self.client.run(["ip", "route", "replace", "default", "dev", "tun0"])
        self.client.run(["ip", "-6", "route", "replace", "default", "dev", "tun0"])

    def stop(self) -> int:
        return self.tun2sx.stop()

    def kill_dante(self) -> None:
        """SIGKILL Dante and its worker processes (by PID), as a crash would."""
        pids = [self.dante.pid]
        for pid in pids:  # grows while walking: children of children
            pids += children_of(pid)
        self.lab.processes = [(p, a) for p, a in self.lab.processes if p is not self.dante]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.dante.wait(10)
        deadline = time.monotonic() + 10
        while self.server.run(["ss", "-Hltn", "sport = :1081"]).stdout.strip():
            # Killed workers release the listening socket as they exit.
            if time.monotonic() > deadline:
                raise LabError("Dante's port 1081 still listens after SIGKILL")
            time.sleep(0.05)

    def start_dante(self) -> None:
        """Start Dante again (after `kill_dante`) and wait until it listens."""
        self.dante = self.server.spawn(["danted", "-f", str(self.dante_conf)])
        self.server.wait_listening(1081)
        self.lab.check_processes()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client_run(
        self, argv: list[str], *, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.client.run(argv, check=check, timeout=timeout, input=input)

    def client_tool(self, *args: object, timeout: float = 90) -> dict[str, object]:
        """Run tests/e2e/client.py in the client namespace; its JSON result."""
        return run_client_tool(self.client, *args, timeout=timeout)
