"""Reloading the configuration while serving, without dropping a flow.

SIGHUP (and the controller's reload) reads the config file again, with the
command line's flags over it as at start. What picks and dials the outbound
of a new flow, the `Routing` (rules, named outbounds and what the file
adds to them, the direct resolver), is built whole by `open_routing`, the
function that built it at start, and replaces the engine's router in one
assignment: a flow already routed keeps the outbound object it holds and
runs on undisturbed. The DNS settings (upstream, hijacking, the fake-IP
filter) and the timeouts apply from the next query and the next flow.

What the running process cannot change (the device, the fake-IP pools and
table, the stats endpoint, the workers, the routes and their mark) keeps
its running value, and one log line per key says it needs a restart. A file
that does not load is refused with its one-line error, and nothing changes.

A routing's tasks (`Routing.tasks`: a proxy group's health checks) run in
a cancel scope of their own, which a reload cancels at once: the new
routing's groups check the same proxies, and two sets of checks would probe
each proxy twice and log each change twice (once per configuration loaded
while a long flow stays open). A flow still connecting through an old
group picks from its last results. The replaced routing's outbounds that
hold resources (an object with `aclose`) are closed once no flow can still
use them: after the old connect and UDP set-up time-outs, by which every
flow the old router chose has connected or failed, and once every flow
open at that moment has ended. A select group keeps the member chosen in
it (by a dashboard, say) when the new file still has the group and the
member, and every group keeps what its checks found of the members whose
proxy did not change, so new flows keep away from one found down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs
import trio

from outbounds.group import ProxyGroup
from tun2sx.control.app import (
    ConfigError,
    Routing,
    Settings,
    check_settings,
    engine_config,
    open_routing,
)
from tun2sx.control.config import file_key_message
from tun2sx.naming.fakeip import FakeIpFilter
from tun2sx.naming.router import BUILTIN_TARGETS

if TYPE_CHECKING:
    from tun2sx.dataplane.engine import Engine
    from tun2sx.naming.router import Router

log = logging.getLogger("tun2sx")

# The settings a running process keeps until a restart: the device and
# what was set on it, the fake-IP pools and table (handed-out addresses
# live in it), the statistics' endpoint and period, the worker processes,
# and the routes with the mark that keeps tun2sx's own sockets out of them.
RESTART_FIELDS = (
    "tun",
    "tun_fd",
    "mtu",
    "tun_addresses",
    "offload",
    "tun_txqueuelen",
    "trust_local_checksums",
    "fake_ip",
    "fake_ip_range",
    "fake_ip_range6",
    "fake_ip_db",
    "stats_listen",
    "stats_interval",
    "workers",
    "auto_route",
    "fwmark",
    "secret",
)
# What the reload line counts rather than lists (the default outbound's URL
# may carry a password).
_COUNTED_FIELDS = frozenset({"outbound", "outbounds", "rules", "groups"})
# The longest list the reload line writes out; a longer one is counted.
_LISTED = 4
# Values a log line must never show.
_SECRET_FIELDS = frozenset({"secret"})
# How often a retiring routing checks whether its last flows have ended.
_RETIRE_POLL = 5.0
# How long closing the outbounds may take when tun2sx stops.
_CLOSE_TIMEOUT = 5.0


@attrs.frozen
class ConfigSource:
    """Where the running settings came from, to read them again.

    Attributes:
        load: reads the settings again: from the file given at start
            (None) or from another file, with the same flags over it.
            Raises ConfigError with one line naming the key.
        loaded: what `load` gave at start, before any change a worker
            process makes to it (its own stats port, no routes).
    """

    load: Callable[[str | None], Settings]
    loaded: Settings


def restart_needed(
    old: Settings, new: Settings, started: Settings | None = None, running: Settings | None = None
) -> list[str]:
    """One line per setting that cannot change while serving and that `new`
    changes from `old` (what was read last).

    Args:
        old: the settings read last.
        new: the settings read now.
        started: what was read at start (default `old`): a value back to
            it needs no restart.
        running: what runs (default `started`), the value the line names.
    """
    started = old if started is None else started
    running = started if running is None else running
    lines = []
    for field in RESTART_FIELDS:
        before, after = getattr(old, field), getattr(new, field)
        if before != after and after != getattr(started, field):
            if field in _SECRET_FIELDS:
                lines.append(
                    file_key_message(
                        f"{field}: changed; takes a restart, running on with the old one"
                    )
                )
                continue
            now = _shown(getattr(running, field))
            lines.append(
                file_key_message(
                    f"{field}: changed from {_shown(before)} to {_shown(after)}; "
                    f"takes a restart, running on with {now}"
                )
            )
    return lines


def applied_changes(old: Settings, new: Settings) -> list[str]:
    """The settings a reload applies at once and `new` changes from `old`,
    one `key old -> new` each, keyed as the file writes them.

    Outbounds, rules and groups are left out (the reload line counts them
    and names changed outbounds, never their URLs, which may carry a
    password), as are the settings that take a restart (`restart_needed`
    names those).
    """
    changes = []
    for field in attrs.fields(Settings):
        name = field.name
        if name in RESTART_FIELDS or name in _COUNTED_FIELDS:
            continue
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            key = file_key_message(f"{name}:").removesuffix(":")
            changes.append(f"{key} {_change(before, after)}")
    return changes


def _check_together(settings: Settings, path: str) -> None:
    """Check the new values beside the kept ones (a `dns.direct` server
    inside the running fake-IP pool, say).

    Raises:
        ConfigError: one line naming the key.
    """
    try:
        check_settings(settings)
    except ConfigError as exc:
        message = file_key_message(str(exc))
        raise ConfigError(f"{path}: {message}" if path else message) from None


def _change(before: object, after: object) -> str:
    """`before -> after` for the reload line: a long list (a fake-IP filter
    of a thousand names) counted, with what came and went; booleans as the
    file writes them."""
    if (
        isinstance(before, tuple)
        and isinstance(after, tuple)
        and max(len(before), len(after)) > _LISTED
    ):
        came, went = len(set(after) - set(before)), len(set(before) - set(after))
        return f"[{len(before)} entries] -> [{len(after)} entries: {came} new, {went} gone]"
    return f"{_brief(before)} -> {_brief(after)}"


def _brief(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _shown(value)


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return "unset" if value is None else str(value)


def carry_selections(old: Router, new: Router) -> None:
    """Select in each select group of `new` the member chosen in the group of
    the same name in `old`, when it still has that member."""
    for name, group in new.outbounds.items():
        before = old.outbounds.get(name)
        if not (isinstance(group, ProxyGroup) and isinstance(before, ProxyGroup)):
            continue
        if group.kind != "select" or before.kind != "select":
            continue
        chosen = before.now()
        if chosen in group.members:
            group.select(chosen)


def defined_outbounds(settings: Settings) -> dict[str, object]:
    """The outbounds and groups `settings` define, by name: a URL or a group's spec."""
    return {**dict(settings.outbounds), **{spec.name: spec for spec in settings.groups}}


def changed_outbounds(old: Settings, new: Settings) -> set[str]:
    """The names of outbounds and groups the new settings define otherwise
    (another URL, other members or checks) or newly."""
    before, after = defined_outbounds(old), defined_outbounds(new)
    return {name for name, value in after.items() if before.get(name) != value}


def carry_health(old: Router, new: Router, changed: Collection[str]) -> None:
    """Give each proxy group of `new` what the group of the same name in
    `old` found of its members, except those `changed` names (a proxy
    whose address was fixed is worth trying again at once). A group whose
    check URL changed starts afresh: its delays would not compare."""
    for name, group in new.outbounds.items():
        before = old.outbounds.get(name)
        if not isinstance(group, ProxyGroup) or not isinstance(before, ProxyGroup):
            continue
        if before is group or before.spec.url != group.spec.url:
            continue
        group.carry_health(before, [m for m in group.members if m not in changed])


_NO_SOURCE = "started without a config file; there is nothing to read again"


@attrs.frozen
class _Prepared:
    """A configuration read and built, not yet applied."""

    loaded: Settings
    settings: Settings
    routing: Routing
    kept: list[str]


@runtime_checkable
class _Closeable(Protocol):
    async def aclose(self) -> None: ...


async def close_routing(routing: Routing) -> None:
    """Close the outbounds (and resolver) of `routing` that hold resources."""
    router = routing.router
    seen: set[int] = set()
    for item in (*router.outbounds.values(), router.default, routing.resolver):
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _Closeable):
            try:
                await item.aclose()
            except Exception:
                # A bug in one outbound's closing must not take the
                # serving process down; it is logged loudly.
                log.exception("tun2sx: closing %r after a reload failed", item)


class Reloader:
    """Applies a configuration read again to a running engine.

    Args:
        engine: the running engine, whose router, DNS filter and settings
            are replaced.
        settings: what it runs with now.
        source: how to read the settings again (None: started from
            arguments, nothing to read).
        routing: what `open_routing` built at start.
        protect: as given to `serve`, for the new outbounds' sockets.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        source: ConfigSource | None,
        routing: Routing,
        protect: Callable[[int], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.routing = routing
        self._engine = engine
        self._source = source
        self._loaded = source.loaded if source is not None else settings
        self._protect = protect
        self._retiring: list[Routing] = []
        self._scopes: dict[int, trio.CancelScope] = {}  # id(routing) -> its tasks' scope
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()

    def reload(self, path: str | None = None) -> str | None:
        """Read the configuration again and apply it to new flows, at once.

        The engine waits meanwhile (a few hundred ms for ten thousand
        rules): a running instance reloads with `areload`.

        Args:
            path: a config file to read instead of the one given at start.

        Returns:
            None once applied, or the one-line reason it was refused (also
            logged); the running configuration then stays as it was.
        """
        if self._source is None:
            return self._refuse(_NO_SOURCE)
        try:
            prepared = self._prepare(path)
        except ConfigError as exc:
            return self._refuse(str(exc))
        self._commit(prepared, path)
        return None

    async def areload(self, path: str | None = None) -> str | None:
        """`reload`, reading and building in a worker thread while the engine
        goes on; only the switch to the new routing runs on trio's thread.
        Reloads asked for at the same time run one after the other."""
        async with self._lock:
            if self._source is None:
                return self._refuse(_NO_SOURCE)
            try:
                prepared = await trio.to_thread.run_sync(self._prepare, path)
            except ConfigError as exc:
                return self._refuse(str(exc))
            self._commit(prepared, path)
            return None

    def _prepare(self, path: str | None) -> _Prepared:
        """Read, check and build; touches nothing that runs (thread-safe).

        Raises:
            ConfigError: one line naming the key.
        """
        assert self._source is not None
        loaded = self._source.load(path)
        kept = restart_needed(self._loaded, loaded, self._source.loaded, self.settings)
        # The restart-only settings keep their running values (a worker's
        # own stats port, say), so the rest is built as it would run.
        settings = attrs.evolve(
            loaded, **{field: getattr(self.settings, field) for field in RESTART_FIELDS}
        )
        _check_together(settings, path or "")
        return _Prepared(loaded, settings, open_routing(settings, self._protect), kept)

    def _commit(self, prepared: _Prepared, path: str | None) -> None:
        routing = prepared.routing
        carry_selections(self.routing.router, routing.router)
        changed = changed_outbounds(self.settings, prepared.settings)
        carry_health(self.routing.router, routing.router, changed)
        for line in prepared.kept:
            log.warning("tun2sx: reload: %s", line)
        changes = applied_changes(self.settings, prepared.settings)
        gone = defined_outbounds(self.settings).keys() - defined_outbounds(prepared.settings).keys()
        if changed:
            changes.append("new or changed outbounds " + ", ".join(sorted(changed)))
        if gone:
            changes.append("outbounds removed " + ", ".join(sorted(gone)))
        self._apply(prepared.settings, routing)
        self._loaded = prepared.loaded
        router = routing.router
        log.info(
            "tun2sx: reloaded%s: %d rules, %d outbounds, default %s%s; open flows keep theirs",
            f" {path}" if path else "",
            len(router.rules.rules),
            # Those the file names; DIRECT is in the router once a rule names it.
            sum(name not in BUILTIN_TARGETS for name in router.outbounds),
            router.name_of(router.default),
            f"; now {', '.join(changes)}" if changes else "",
        )

    def _refuse(self, reason: str) -> str:
        log.error("tun2sx: reload refused, running configuration kept: %s", reason)
        return reason

    def _apply(self, settings: Settings, routing: Routing) -> None:
        engine = self._engine
        old, old_settings = self.routing, self.settings
        # New flows take the new router from here on; each flow already
        # routed holds its outbound object and never asks again.
        engine.router = routing.router
        engine.config = engine_config(settings, engine.device, routing.router)
        if engine.dns is not None:
            engine.dns.set_filter(FakeIpFilter(settings.fake_ip_filter))
        self.routing, self.settings = routing, settings
        self._retiring.append(old)
        scope = self._scopes.pop(id(old), None)
        if scope is not None:
            scope.cancel()
        if self._nursery is not None:
            self._nursery.start_soon(self._run_tasks, routing)
            # Until both time-outs have passed, a flow the old router chose
            # may still be connecting (TCP) or setting up (UDP).
            grace = max(old_settings.connect_timeout, old_settings.udp_timeout)
            self._nursery.start_soon(self._retire, old, grace)

    async def _retire(self, old: Routing, grace: float) -> None:
        await trio.sleep(grace)
        flows = self._engine.flows
        waiting = set(flows)
        while waiting:
            await trio.sleep(_RETIRE_POLL)
            waiting = {info for info in waiting if info in flows}
        self._retiring.remove(old)
        await self._close(old)

    async def _run_tasks(self, routing: Routing) -> None:
        tasks = routing.tasks()
        if not tasks or routing is not self.routing:
            # Replaced again before its checks started.
            return
        with trio.CancelScope() as scope:
            self._scopes[id(routing)] = scope
            async with trio.open_nursery() as nursery:
                for task in tasks:
                    nursery.start_soon(task)
        self._scopes.pop(id(routing), None)

    async def _close(self, routing: Routing) -> None:
        scope = self._scopes.pop(id(routing), None)
        if scope is not None:
            scope.cancel()
        await close_routing(routing)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the routings' tasks and retire replaced routings until
        cancelled; then close every outbound, the running ones included."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._run_tasks, self.routing)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                for routing in (*self._retiring, self.routing):
                    await self._close(routing)
                self._retiring.clear()
