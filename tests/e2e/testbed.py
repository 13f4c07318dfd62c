"""The end-to-end testbed: a client namespace served by a real tun2sx process.

`Testbed` builds:

    client ns: tun0 (198.18.0.1/15, fd00:7e::1/64) served by `tun2sx`,
               default routes -> tun0, resolv.conf -> 198.18.0.2
    server ns: 10.200.0.2 (veth), microsocks :1080, danted :1081 (UDP
               ASSOCIATE), tests/e2e/servers.py (echo/hash/source/DNS),
               hosts file mapping test names to 10.200.0.2

The end-to-end tests and the benchmark share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tun2sx.lab import Lab, LabError, Namespace

ROOT = Path(__file__).resolve().parents[2]
SERVER_ADDR = "10.200.0.2"
NAMES = ("echo.test", "www.test", "big.test")


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


class Testbed:
    """A running lab; `client_run` runs a command in the client namespace."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.client: Namespace = lab.namespace("client")
        self.server: Namespace = lab.namespace("server")
        lab.link(self.client, ["10.200.0.1/24"], self.server, [f"{SERVER_ADDR}/24"])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{SERVER_ADDR} {n}\n" for n in NAMES)
        self.server.write_etc("hosts", hosts)
        self.client.write_etc("resolv.conf", "nameserver 198.18.0.2\noptions timeout:2\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.server.spawn(
            [sys.executable, "-m", "tests.e2e.servers", "--bind", SERVER_ADDR], env=env
        )
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
        self.dante_conf = tmp / "danted.conf"
        self.dante_conf.write_text(DANTE_CONF.format(addr=SERVER_ADDR))
        self.dante = self.server.spawn(["danted", "-f", str(self.dante_conf)])
        for port in (7001, 7002, 7003, 8080, 1080, 1081):
            self.server.wait_listening(port)
        self.fakeip_db = tmp / "fakeip.sqlite"
        self.log_path = tmp / "tun2sx.log"
        self.proxy_args = ["--socks", f"{SERVER_ADDR}:1080"]
        # Flow-level (DEBUG) logging for tests; a benchmark drops it. The
        # INFO "serving" line is how start() knows tun2sx is ready.
        self.verbosity = ["-v"]
        self.proc: subprocess.Popen[bytes] | None = None

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
            sys.executable,
            "-m",
            "tun2sx",
            *device,
            "--fake-ip-db",
            str(self.fakeip_db),
            "--dns-upstream",
            f"{SERVER_ADDR}:5353",
            *self.verbosity,
            *self.proxy_args,
            *extra,
        ]
        self._log = self.log_path.open("ab")
        log_start = self._log.tell()
        self.proc = self.client.spawn(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            pass_fds=() if tun_fd is None else (tun_fd,),
        )
        self.client.wait_link("tun0")
        self._wait_serving(log_start)
        self.client.run(["ip", "route", "replace", "default", "dev", "tun0"])
        self.client.run(["ip", "-6", "route", "replace", "default", "dev", "tun0"])

    def _wait_serving(self, offset: int, timeout: float = 20) -> None:
        """Poll the log until this run says it serves (or fail after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                if b"serving" in f.read():
                    return
            self.lab.check_processes()
            time.sleep(0.05)
        raise LabError(f"tun2sx did not report serving within {timeout} s")

    def stop(self) -> int:
        assert self.proc is not None
        code = self.lab.stop(self.proc)
        self.proc = None
        self._log.close()
        return code

    def kill_dante(self) -> None:
        """SIGKILL Dante and its worker processes (by PID), as a crash would."""
        pids = [self.dante.pid]
        for pid in pids:  # grows while walking: children of children
            children = Path(f"/proc/{pid}/task/{pid}/children")
            if children.exists():
                pids += [int(c) for c in children.read_text().split()]
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
        result = self.client.run(
            [sys.executable, "-m", "tests.e2e.client", *map(str, args)],
            timeout=timeout,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=str(ROOT),
        )
        return json.loads(result.stdout)  # type: ignore[no-any-return]
