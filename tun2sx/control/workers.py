"""Worker processes: one per queue of a multi-queue TUN, to use more cores.

Python runs one thread of bytecode at a time, so one tun2sx process tops
out at one core. With `workers = N` the TUN is opened with N queues
(IFF_MULTI_QUEUE) and N processes each serve one queue with their own
stack, flows and trio run. The kernel picks the queue of every packet it
sends into the TUN by a symmetric hash of the flow, so each TCP connection
and each UDP 4-tuple lives in exactly one worker; nothing about a flow is
shared. What is shared is the fake-IP table: a DNS answer handed out by one
worker must map back to the name in whichever worker the connection lands,
so every worker opens the SQLite table in shared mode (tun2sx.naming.fakeip).

The parent opens the queues, sets addresses and routes, forks the workers
and then only supervises: it holds no queue itself (a queue nobody reads
would swallow the flows hashed to it). SIGINT/SIGTERM are passed on; if a
worker dies on its own, the others are stopped and tun2sx exits with an
error, rather than serve on with part of its flows gone. SIGHUP is passed
on too: each worker reads the configuration again itself
(tun2sx.control.reload), so the rules change for every queue.

Statistics: each worker counts its own flows. With a stats endpoint
configured, the parent serves it (in a thread of its own, with its own trio
run) and answers reads with the workers' totals, asking each worker's own
controller on the following ports (worker i on port + 1 + i); what
changes state is refused there and served by each worker's own port
(tun2sx.control.totals).

What differs from one process: a UDP application endpoint talking to
several destinations may be served by several workers, each with its own
outbound session (full-cone mapping holds per worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

import attrs
import trio

from tun2sx.control.app import DEFAULT_MTU, Settings, effective_fwmark, routes
from tun2sx.control.stats import parse_endpoint
from tun2sx.dataplane.tun import TunDevice, TunError, open_tun_queues

log = logging.getLogger("tun2sx")

ServeOne = Callable[[Settings, TunDevice, bool], int]
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Blocked while forking: a child must not run the parent's handlers.
_PASSED_ON = {*_STOP_SIGNALS, signal.SIGHUP}


def worker_settings(settings: Settings, index: int, stats: _Totals | None) -> Settings:
    """What worker `index` runs with: no routes of its own (the parent set
    them), the same outbound mark, its own stats port."""
    stats_listen = None
    if stats is not None:
        host, port = stats.workers[index]
        stats_listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return attrs.evolve(
        settings,
        auto_route=False,
        fwmark=effective_fwmark(settings),
        stats_listen=stats_listen,
        workers=1,
    )


class _Totals:
    """The parent's stats endpoint: the workers' totals.

    Bound before the workers start (a port in use fails tun2sx at once, not
    a worker later); served from a thread once they run.
    """

    def __init__(self, listen: str, count: int, secret: str | None = None) -> None:
        host, port = parse_endpoint(listen, any_address=bool(secret))
        self.secret = secret
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise TunError(f"stats_listen: cannot listen on {listen}: {exc}") from exc
        port = self.socket.getsockname()[1]
        if port + count > 0xFFFF:
            self.socket.close()
            raise TunError(f"stats_listen: port {port} leaves no room for {count} worker ports")
        self.workers = [(host, port + 1 + index) for index in range(count)]
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        log.info("stats endpoint (totals of the workers) on http://%s:%d/stats", host, port)

    def start(self) -> None:
        """Serve from a thread: the main thread waits for the workers."""
        self._thread = threading.Thread(target=trio.run, args=(self._serve,), daemon=True)
        self._thread.start()
        self._started.wait()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            self._started.set()
            # Here, not at the top: h11 and wsproto load only when serving.
            from tun2sx.control.totals import serve_totals

            await serve_totals([self.socket], self.workers, self.secret)

    def stop(self) -> None:
        """Stop serving and close the socket (also before `start`)."""
        if self._thread is None:
            self.socket.close()
            return
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout=5)


def run_workers(settings: Settings, serve_one: ServeOne) -> int:
    """Open the TUN with one queue per worker, fork the workers, supervise.

    Args:
        settings: checked settings with `tun` set and `workers` > 1.
        serve_one: runs one worker to the end in the child process; gets
            the worker's settings, its queue and whether the fake-IP table
            is shared; returns the exit status.

    Returns:
        0 when every worker ended cleanly on a signal, else the first
        failing worker's status (or 1 if one was killed).

    Raises:
        TunError: the queues cannot be opened.
        AutoRouteError: the routes cannot be set.
    """
    assert settings.tun is not None
    count = settings.workers
    queues = open_tun_queues(
        settings.tun,
        count,
        mtu=settings.mtu or DEFAULT_MTU,
        offload=settings.offload,
        addresses=settings.tun_addresses,
    )
    name = queues[0].name
    log.info("tun2sx: %s opened with %d queues, starting %d workers", name, count, count)
    stopping = False
    children: dict[int, int] = {}  # pid -> worker index

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signal.SIGTERM)

    def reload(signum: int, _frame: object) -> None:
        for pid in children:
            _signal(pid, signal.SIGHUP)

    totals: _Totals | None = None
    try:
        if settings.stats_listen is not None:
            totals = _Totals(settings.stats_listen, count, settings.secret)
        with routes(settings, name, effective_fwmark(settings)):
            old = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
            try:
                parent = os.getpid()
                fork_error: OSError | None = None
                for index in range(count):
                    sys.stdout.flush()
                    sys.stderr.flush()
                    # Signals wait until the child has its own handlers:
                    # the parent's would have it signal its siblings.
                    signal.pthread_sigmask(signal.SIG_BLOCK, _PASSED_ON)
                    try:
                        # Checked with signals blocked: a stop that came
                        # before this point has run its handler by now.
                        if stopping:
                            break
                        pid = os.fork()
                        if pid == 0:  # pragma: no cover - the child's coverage is not collected
                            code = 1
                            try:
                                code = _child(settings, index, queues, serve_one, parent, totals)
                            finally:
                                # Never return into the parent's code (its
                                # cleanup would remove the routes).
                                os._exit(code)
                        children[pid] = index
                    except OSError as exc:
                        fork_error = exc
                        break
                    finally:
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PASSED_ON)
                if fork_error is not None:
                    stop(signal.SIGTERM, None)  # no half-started set
                    _supervise(children, lambda: True, stop)
                    raise TunError(f"cannot start worker {len(children)}: {fork_error}")
                # The children hold the queues now.
                for queue in queues:
                    queue.close()
                if totals is not None:
                    totals.start()
                return _supervise(children, lambda: stopping, stop)
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)
    finally:
        if totals is not None:
            totals.stop()
        for queue in queues:
            queue.close()


def _child(
    settings: Settings,
    index: int,
    queues: list[TunDevice],
    serve_one: ServeOne,
    parent: int,
    totals: _Totals | None,
) -> int:
    """The worker process: keep its own queue, close the others, serve."""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    # Until serve() listens for it, a reload has nothing to apply to; by
    # default it would kill the worker, and with it the whole set.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PASSED_ON)
    # A worker must not outlive the parent (killed with SIGKILL, say): it
    # would keep its queue, and the device, alive with nobody supervising.
    _die_with_parent()
    if os.getppid() != parent:
        return 1
    for other, queue in enumerate(queues):
        if other != index:
            queue.close()
    if totals is not None:
        totals.socket.close()  # the parent's to serve
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s")
        )
    try:
        return serve_one(worker_settings(settings, index, totals), queues[index], True)
    except BaseException:
        log.exception("worker %d failed", index)
        return 1
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()


def _supervise(
    children: dict[int, int], stopping: Callable[[], bool], stop: Callable[[int, object], None]
) -> int:
    """Wait for every child; stop all when one ends on its own."""
    status = 0
    while children:
        pid, wait_status = os.waitpid(-1, 0)
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping():
            log.error(
                "tun2sx: worker %d (pid %d) ended with status %d; stopping the others",
                index,
                pid,
                code,
            )
            stop(signal.SIGTERM, None)
            status = status or (code if code > 0 else 1)
        elif code not in (0, -signal.SIGTERM, -signal.SIGINT):
            # A worker may end on the terminal's SIGINT (Ctrl-C reaches the
            # whole process group) before its own handlers are in place.
            status = status or (code if code > 0 else 1)
    return status


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): the kernel signals us when the parent exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signum)
