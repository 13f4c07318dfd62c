"""A throwaway network lab: private namespaces, veth links and processes.

The demo, the end-to-end tests and the benchmark all need the same thing:
a few network namespaces with unique names, veth pairs between them, and
programs started inside them; and all of it gone afterwards, even when
something failed. `Lab` tracks everything it creates and undoes it in
`close()` (processes are ended by PID, namespaces deleted, the per-namespace
files under /etc/netns removed). Nothing here touches the host's own
namespace: no route, rule or firewall rule is ever added there.

Per-namespace `hosts` and `resolv.conf` files use iproute2's convention:
`ip netns exec` bind-mounts /etc/netns/NAME/* over /etc for the programs it
starts, so a client can use the fake-IP DNS while a proxy in another
namespace resolves a test name to a test address.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

NETNS_ETC = Path("/etc/netns")


class LabError(RuntimeError):
    """A lab step failed (a command returned an error or timed out)."""


def missing_capabilities() -> list[str]:
    """What this machine lacks for namespace labs (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if shutil.which("ip") is None:
        missing.append("iproute2 (ip)")
    return missing


class Namespace:
    """One network namespace of a lab."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __str__(self) -> str:
        return self.name

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        return self.lab.run(self.exec_argv(argv), check=check, timeout=timeout, **kwargs)

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a long-running program inside the namespace."""
        return self.lab.spawn(self.exec_argv(argv), **kwargs)

    def write_etc(self, filename: str, content: str) -> None:
        """Write /etc/netns/NAME/filename (seen as /etc/filename inside)."""
        folder = NETNS_ETC / self.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_text(content)

    def wait_listening(self, port: int, *, udp: bool = False, timeout: float = 10) -> None:
        """Poll until something listens on `port` here, or raise LabError."""
        flag = "-Hlun" if udp else "-Hltn"
        self._wait_sockets([flag, f"sport = :{port}"], f"nothing listens on port {port}", timeout)

    def wait_established(self, port: int, *, timeout: float = 10) -> None:
        """Poll until a TCP connection to local `port` is established here."""
        self._wait_sockets(
            ["-Htn", "state", "established", f"sport = :{port}"],
            f"no connection to port {port}",
            timeout,
        )

    def _wait_sockets(self, ss_args: list[str], failure: str, timeout: float) -> None:
        """Poll `ss ss_args` here until it lists a socket, or raise LabError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(["ss", *ss_args], check=False).stdout.strip():
                return
            time.sleep(0.05)
        raise LabError(f"{failure} in {self.name} after {timeout} s")

    def wait_link(self, device: str, *, timeout: float = 10) -> None:
        """Poll until `device` exists here and is up, or raise LabError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run(["ip", "-o", "link", "show", device], check=False)
            if result.returncode == 0 and ",UP" in result.stdout:
                return
            self.lab.check_processes()
            time.sleep(0.05)
        raise LabError(f"{device} did not come up in {self.name} after {timeout} s")


class Lab:
    """Creates namespaces, links and processes, and removes them all.

    Use as a context manager; `close()` is idempotent.
    """

    def __init__(self, prefix: str = "t2sx") -> None:
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[Namespace] = []
        self.processes: list[tuple[subprocess.Popen[bytes], Sequence[str]]] = []
        self._links = 0

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{' '.join(argv)}: timed out after {timeout} s") from exc
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def namespace(self, role: str) -> Namespace:
        """Create a namespace named after the lab and `role`, loopback up."""
        ns = Namespace(self, f"{self.tag}-{role}")
        self.run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        self.run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    def link(
        self, a: Namespace, a_addrs: Sequence[str], b: Namespace, b_addrs: Sequence[str]
    ) -> tuple[str, str]:
        """Join two namespaces with a veth pair; returns the device names."""
        self._links += 1
        stem = f"v{secrets.token_hex(3)}{self._links}"
        dev_a, dev_b = f"{stem}a", f"{stem}b"
        self.run(
            [
                "ip",
                "link",
                "add",
                dev_a,
                "netns",
                a.name,
                "type",
                "veth",
                "peer",
                dev_b,
                "netns",
                b.name,
            ]
        )
        for ns, dev, addrs in ((a, dev_a, a_addrs), (b, dev_b, b_addrs)):
            for addr in addrs:
                self.run(["ip", "-n", ns.name, "addr", "add", addr, "dev", dev, "nodad"])
            self.run(["ip", "-n", ns.name, "link", "set", dev, "up"])
        return dev_a, dev_b

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr, **kwargs)
        self.processes.append((proc, argv))
        return proc

    def check_processes(self) -> None:
        """Raise LabError if a spawned process has already exited."""
        for proc, argv in self.processes:
            if proc.poll() is not None:
                raise LabError(f"{' '.join(argv)} exited early with status {proc.returncode}")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5) -> int:
        """End one process by PID: SIGTERM, then SIGKILL after `timeout`."""
        self.processes = [(p, argv) for p, argv in self.processes if p is not proc]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        """End every process, delete every namespace and its /etc files."""
        for proc, _argv in reversed(self.processes):
            self.stop(proc)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / ns.name, ignore_errors=True)
        self.namespaces.clear()


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: Namespace) -> Iterator[None]:
    """Move the calling thread into `ns` for the duration of the block.

    Sockets and TUN devices created inside belong to `ns`; the thread goes
    back to its own namespace afterwards, even on error. Threads started
    earlier (e.g. a thread pool) stay where they were, so resolve nothing
    by name inside.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with (
        open("/proc/thread-self/ns/net", "rb") as home,
        open(f"/run/netns/{ns.name}", "rb") as there,
    ):
        if libc.setns(there.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into {ns.name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                # Staying in a foreign namespace would poison everything after.
                os._exit(70)
