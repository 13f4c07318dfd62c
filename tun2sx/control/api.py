"""The embedding API: tun2sx inside another program, on a TUN fd it was given.

A VPN app (Android's VpnService, a desktop tray app, a test) opens the TUN
itself and hands over only the file descriptor, plus a `protect(fd)`
callback that excludes tun2sx's own sockets from the VPN. This module turns
that into a running engine three ways:

* `run_async` for a trio program: runs until its caller cancels it;
* `run` for a plain program: blocks until stopped (SIGINT/SIGTERM when
  called in the main thread);
* `start`, which returns a `Tun2sx` handle running in a thread of its own,
  stoppable from any thread, with a thread-safe statistics snapshot.

Ownership of the fd passes to tun2sx in every flavour: it is closed when the
run ends, however it ends, so the platform sees the device released. The
fake-IP table lives in memory unless the config names a file, since an
embedder rarely has a writable /var/lib.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from outbounds.base import Destination
from tun2sx.control.app import ConfigError, Settings, check_settings, serve
from tun2sx.control.config import nameservers
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice, adopt_tun
from tun2sx.naming.sniff import parse_ports

__all__ = ["Protect", "Tun2sx", "make_settings", "run", "run_async", "start"]

Protect = Callable[[int], bool]
"""Called with each outbound socket's fd before it connects; True once excluded."""

_NETWORK_FIELDS = ("fake_ip_range", "fake_ip_range6")
_TUPLE_FIELDS = ("tun_addresses", "fake_ip_filter")
_NUMBER_FIELDS = {"udp_timeout", "connect_timeout", "stats_interval", "mtu"}
# Opening a device by name is the CLI's business; through this API the
# embedder always provides the fd, so these keys would only mislead.
_REFUSED_FIELDS = ("tun", "tun_fd")


def make_settings(tun_fd: int, config: Settings | Mapping[str, Any] | None = None) -> Settings:
    """Build the `Settings` for an embedded run on `tun_fd`.

    Args:
        tun_fd: the TUN file descriptor the platform opened.
        config: a `Settings`, or a mapping of `Settings` field names to
            values (networks and ``host:port`` endpoints may be strings),
            or None for the defaults.

    Returns:
        Settings with `tun_fd` set and, unless configured, an in-memory
        fake-IP table.

    Raises:
        ConfigError: an unknown field or a value of the wrong form.
    """
    if isinstance(config, Settings):
        settings = attrs.evolve(config, tun=None, tun_fd=tun_fd)
        check_settings(settings)
        return settings
    values: dict[str, Any] = {"fake_ip_db": ":memory:"}
    names = {field.name for field in attrs.fields(Settings)}
    for key, value in (config or {}).items():
        if key in _REFUSED_FIELDS:
            raise ConfigError(f"{key}: pass the device as tun_fd, not in the config")
        if key not in names:
            raise ConfigError(f"{key}: unknown setting")
        if key == "workers" and value != 1:
            raise ConfigError("workers: an embedded tun2sx is one process on one TUN fd")
        values[key] = _convert(key, value)
    for key in _NUMBER_FIELDS & values.keys():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int | float | None):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
    settings = Settings(tun_fd=tun_fd, **values)
    # The checks the command line runs: an embedder's typo must fail here,
    # with the field's name, not later in the engine.
    check_settings(settings)
    return settings


def _convert(key: str, value: Any) -> Any:
    if key == "direct_dns" and value is not None and not isinstance(value, tuple):
        # "ADDRESS[:PORT]" strings, as in the config file; errors name the item.
        return nameservers(key, value)
    try:
        if key in _NETWORK_FIELDS and isinstance(value, str):
            return ipaddress.ip_network(value)
        if key == "dns_upstream" and isinstance(value, str):
            host, _, port = value.rpartition(":")
            return Destination.parse_host(host.strip("[]"), int(port))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    if key in ("udp_buffer", "tun_write_burst") and isinstance(value, str):
        # Imported here: the embedding API needs no TOML otherwise.
        from tun2sx.control.config import parse_size

        return parse_size(key, value)
    if key in ("sniff_http_ports", "sniff_tls_ports", "sniff_quic_ports"):
        try:
            return parse_ports(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    if key == "groups" and isinstance(value, Mapping):
        # {"auto": {"type": "fallback", "members": [...]}}, as [groups] in the file.
        from tun2sx.control.groupconfig import read_groups

        return read_groups(value)
    if key in _TUPLE_FIELDS and isinstance(value, list | tuple):
        return tuple(value)
    return value


def _snapshot(engine: Engine, device: TunDevice) -> dict[str, int]:
    # The same counters as the /stats endpoint: the engine's, which take
    # the device's packets and bytes too.
    return engine.statistics()


async def _serve_fd(
    settings: Settings,
    protect: Protect | None,
    handle_signals: bool,
    task_status: trio.TaskStatus[tuple[Engine, TunDevice]],
) -> None:
    """`serve` on the adopted fd; the fd is closed on every way out."""
    assert settings.tun_fd is not None
    try:
        device = adopt_tun(settings.tun_fd, mtu=settings.mtu or 1500)
    except BaseException:
        os.close(settings.tun_fd)
        raise
    try:
        async with trio.open_nursery() as nursery:
            engine = await nursery.start(
                functools.partial(
                    serve, settings, device=device, protect=protect, handle_signals=handle_signals
                )
            )
            task_status.started((engine, device))
    finally:
        device.close()


async def run_async(
    *,
    tun_fd: int,
    config: Settings | Mapping[str, Any] | None = None,
    protect: Protect | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the TUN `tun_fd` until cancelled (the trio flavour).

    Args:
        tun_fd: an open TUN fd; tun2sx owns it from now on and closes it.
        config: see `make_settings`.
        protect: called with every outbound socket's fd before it connects,
            on the trio thread; must return True once the socket is excluded
            from the VPN (a False refuses that connection).
        handle_signals: also stop on SIGINT/SIGTERM (main thread only).
        task_status: receives the running `Engine`.

    Raises:
        ConfigError: the config is wrong.
        TunError: the fd is not a usable TUN device.
    """
    try:
        settings = make_settings(tun_fd, config)
    except BaseException:
        os.close(tun_fd)
        raise
    try:
        async with trio.open_nursery() as nursery:
            engine, _device = await nursery.start(_serve_fd, settings, protect, handle_signals)
            task_status.started(engine)
    except BaseExceptionGroup as group:
        raise _sole_error(group) from None


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a group wraps, so callers can catch `TunError` & co.

    Our nurseries each hold a single serving task, so a group from them
    normally carries exactly one error; anything else stays a group.
    """
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, Exception) else group


def run(
    *,
    tun_fd: int,
    config: Settings | Mapping[str, Any] | None = None,
    protect: Protect | None = None,
    handle_signals: bool | None = None,
) -> dict[str, int]:
    """Serve the TUN `tun_fd`, blocking until stopped (the sync flavour).

    To stop it from another thread, create a `Tun2sx` instead, call its
    `run()` here and its `stop()` there.

    Args:
        tun_fd: an open TUN fd; tun2sx owns it from now on and closes it.
        config: see `make_settings`.
        protect: see `run_async`.
        handle_signals: stop on SIGINT/SIGTERM; by default only when called
            from the main thread, the only one that may install handlers.

    Returns:
        The final statistics (see `Tun2sx.stats`).
    """
    handle = Tun2sx(tun_fd=tun_fd, config=config, protect=protect, handle_signals=handle_signals)
    handle.run()
    return handle.stats()


def start(
    *,
    tun_fd: int,
    config: Settings | Mapping[str, Any] | None = None,
    protect: Protect | None = None,
) -> Tun2sx:
    """Start serving `tun_fd` in a new thread; returns once it is serving.

    Raises:
        ConfigError, TunError: what kept it from starting.
    """
    handle = Tun2sx(tun_fd=tun_fd, config=config, protect=protect)
    handle.start()
    return handle


class Tun2sx:
    """One embedded tun2sx instance, controllable from any thread.

    Either `start()` it in a thread of its own or call `run()` in a thread
    you own; then `stop()`, `stats()` and `wait()` work from anywhere.
    An instance runs once.

    Args:
        tun_fd: an open TUN fd; ownership passes to the instance.
        config: see `make_settings`.
        protect: see `run_async`.
        handle_signals: stop on SIGINT/SIGTERM; None means "when run in the
            main thread" (`start()` never installs handlers).
    """

    def __init__(
        self,
        *,
        tun_fd: int,
        config: Settings | Mapping[str, Any] | None = None,
        protect: Protect | None = None,
        handle_signals: bool | None = None,
    ) -> None:
        self._tun_fd = tun_fd
        self._config = config
        self._protect = protect
        self._handle_signals = handle_signals
        # The lock orders stop() against the run publishing its token and
        # scope, so a stop() that arrives during startup is never lost.
        self._lock = threading.Lock()
        self._claimed = False
        self._stop_requested = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._trio_thread: int | None = None
        self._live: tuple[Engine, TunDevice] | None = None
        self._final: dict[str, int] = {}
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a new daemon thread; return once serving.

        Raises:
            ConfigError, TunError: what kept it from starting (the thread
                has ended by then and the fd is closed).
        """
        self._claim()
        self._thread = threading.Thread(target=self._run_quietly, name="tun2sx", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def run(self) -> None:
        """Serve in the calling thread until `stop()` (or a signal).

        Raises:
            ConfigError, TunError: the run could not start.
        """
        self._claim()
        self._run_quietly()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Ask the run to end; safe from any thread, idempotent, non-blocking."""
        with self._lock:
            self._stop_requested = True
            token, scope = self._token, self._scope
        if token is None or scope is None:
            return  # not started yet, or already over: the run sees the flag
        # A run that just finished needs no cancelling.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(scope.cancel)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has ended; False if `timeout` passed first."""
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        """True from serving until the run has ended."""
        return self._ready.is_set() and not self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        """What ended the run abnormally, if anything did."""
        return self._error

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters; safe from any thread.

        Holds the engine's counters (see `Engine.statistics`) plus
        ``tun_rx/tx_packets``, ``tun_rx/tx_bytes``, ``flows`` (open TCP flows
        and UDP sessions) and ``drops`` (every counter named ``*drops*``).
        After the run ended, the last snapshot; before it started, empty.
        """
        with self._lock:
            token, live = self._token, self._live
        if token is None or live is None:
            return dict(self._final)
        if threading.get_ident() == self._trio_thread:
            return _snapshot(*live)  # e.g. from inside protect(): already there
        try:
            # Taken on the trio thread, so no flow is halfway through an update.
            return trio.from_thread.run_sync(_snapshot, *live, trio_token=token)
        except trio.RunFinishedError:
            self._done.wait()
            return dict(self._final)

    def __enter__(self) -> Tun2sx:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.wait()

    def _claim(self) -> None:
        # In the caller's thread, so a second start() raises there instead
        # of inside a thread nobody waits on.
        with self._lock:
            if self._claimed:
                raise RuntimeError("a Tun2sx instance runs only once")
            self._claimed = True

    def _run_quietly(self) -> None:
        handle_signals = self._handle_signals
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        self._trio_thread = threading.get_ident()
        try:
            trio.run(self._main, handle_signals)
        except BaseException as exc:
            # Kept for whoever waits (start(), run(), error); a thread has no
            # one else to tell.
            self._error = _sole_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        finally:
            with self._lock:
                self._token = self._scope = None
                self._live = None
            self._ready.set()
            self._done.set()

    async def _main(self, handle_signals: bool) -> None:
        live: tuple[Engine, TunDevice] | None = None
        try:
            async with trio.open_nursery() as nursery:
                with self._lock:
                    self._token = trio.lowlevel.current_trio_token()
                    self._scope = nursery.cancel_scope
                    if self._stop_requested:
                        nursery.cancel_scope.cancel()
                try:
                    settings = make_settings(self._tun_fd, self._config)
                except BaseException:
                    os.close(self._tun_fd)
                    raise
                live = await nursery.start(_serve_fd, settings, self._protect, handle_signals)
                with self._lock:
                    self._live = live
                self._ready.set()
        finally:
            # Taken once every flow has wound down, so the counts are final.
            if live is not None:
                self._final = _snapshot(*live)
