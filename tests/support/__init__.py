"""What tests share: the capability checks and real third-party servers.

Test modules never import one another: what more than one of them needs
lives in this package (`app`: the application side of an engine test,
`outbounds`: outbound doubles), so a test file can be read, moved or
deleted on its own (tests/test_layout.py checks it).

Tests start microsocks, Dante and friends as subprocesses. Three rules keep
that honest and tidy: a missing binary skips the test on a developer machine
but fails it in CI (where it must be installed, so a skip would hide a broken
setup); readiness is a bounded poll of connect, never a blind sleep; and every
process is started in its own session and killed by its PID's process group
in a `finally`, so no server outlives its test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

import pytest
import trio

from tun2sx.lab.netns import missing_capabilities

__all__ = [
    "ServerProcess",
    "free_port",
    "in_ci",
    "require",
    "require_binary",
    "require_tcp_inq",
    "run_server",
    "transfer_through",
    "wait_for_port",
]

READY_TIMEOUT = 10.0


def in_ci() -> bool:
    """True when running in CI (env `CI=true`), where nothing may be skipped."""
    return os.environ.get("CI", "").lower() == "true"


def require_binary(name: str) -> str:
    """Return the path of `name`, or skip (developer machine) / fail (CI)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        message = f"{name} is not installed (Debian: see DEBS in ./dev)"
        if in_ci():
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


def require_tcp_inq() -> None:
    """Skip (or, under CI, fail) unless this kernel takes TCP_INQ (Linux
    4.18): without it a receive cannot tell that it drained the socket."""
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INQ", 36), 1)
        except OSError as exc:
            reason = f"the kernel refuses TCP_INQ ({exc.strerror})"
            if in_ci():
                pytest.fail(f"CI=true and {reason}")
            pytest.skip(reason)


def require(*binaries: str) -> None:
    """Skip (or, under CI, fail) unless this machine can run the namespace lab.

    Args:
        binaries: programs the test runs besides the lab's own (`ip`).
    """
    missing = missing_capabilities() + [b for b in binaries if shutil.which(b) is None]
    if missing:
        reason = f"end-to-end test needs {', '.join(missing)}"
        if in_ci():
            pytest.fail(reason + " (CI=true: not skipping)")
        pytest.skip(reason)


def free_port(family: socket.AddressFamily = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """Ask the kernel for a currently free loopback port."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _stderr_file() -> Iterator[tempfile._TemporaryFileWrapper[bytes]]:
    with tempfile.NamedTemporaryFile(prefix="tun2sx-server-", suffix=".log") as f:
        yield f


class ServerProcess:
    """A running server subprocess and where it logs.

    Attributes:
        proc: The `Popen` object.
        host: Address the server listens on.
        port: Port the server listens on.
    """

    __slots__ = ("_log", "host", "port", "proc")

    def __init__(self, proc: subprocess.Popen[bytes], host: str, port: int, log: str) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self._log = log

    def log(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        with open(self._log, "rb") as f:
            return f.read().decode(errors="replace")


def wait_for_port(
    host: str, port: int, timeout: float = READY_TIMEOUT, server: ServerProcess | None = None
) -> None:
    """Poll until a TCP connect to `host:port` succeeds (bounded).

    Raises:
        pytest.fail: The server exited first, or `timeout` passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}: {server.log()[-2000:]}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)  # Poll interval, not a wait for an event we could observe.
    extra = f": {server.log()[-2000:]}" if server is not None else ""
    pytest.fail(f"nothing listening on {host}:{port} after {timeout}s{extra}")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if pytest itself is killed, so no server is orphaned."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    # The server runs in its own session, so its PID is its process group id:
    # this reaches forked workers (Dante) without touching anything else.
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def run_server(
    argv: Sequence[str], host: str, port: int, timeout: float = READY_TIMEOUT
) -> Iterator[ServerProcess]:
    """Start `argv`, wait until `host:port` accepts, and kill it afterwards.

    Args:
        argv: Command line; argv[0] should come from `require_binary`.
        host: Listening address to poll.
        port: Listening port to poll.
        timeout: Readiness bound in seconds.

    Yields:
        The running `ServerProcess`.
    """
    with _stderr_file() as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        server = ServerProcess(proc, host, port, log.name)
        try:
            wait_for_port(host, port, timeout, server)
            yield server
        finally:
            _kill(proc)


async def transfer_through(
    stream: trio.abc.HalfCloseableStream,
    payload: bytes,
    *,
    half_close: bool = True,
    chunk: int = 1 << 16,
) -> bytes:
    """Send `payload` to an echoing peer while reading back what it returns.

    Sending and receiving run concurrently so the peer never blocks on a full
    socket buffer.

    Args:
        stream: A stream whose peer echoes.
        payload: Bytes to send.
        half_close: Send EOF after the payload and read until the peer's EOF.
            Without it, read exactly `len(payload)` bytes (for proxies such as
            microsocks that close both directions on the first EOF).
        chunk: Size of each `send_all`.

    Returns:
        Everything received.
    """
    received = bytearray()

    async def sender() -> None:
        view = memoryview(payload)
        for start in range(0, len(view), chunk):
            await stream.send_all(view[start : start + chunk])
        if half_close:
            await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while half_close or len(received) < len(payload):
            data = await stream.receive_some(1 << 16)
            if not data:
                break
            received += data
    return bytes(received)
