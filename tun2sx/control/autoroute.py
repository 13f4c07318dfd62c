"""`--auto-route`: send the namespace's traffic into the TUN, and take it back.

Routing everything into the TUN is easy; not routing tun2sx's own outbound
sockets there too is the point. The policy-routing recipe (as wg-quick does
it) keeps the main table untouched and adds, per address family:

    ip route add default dev TUN table T
    ip rule add table main suppress_prefixlength 0 priority P-1
    ip rule add not fwmark M table T priority P

The first rule consults the main table but ignores its default route, so
local and LAN routes keep winning; whatever is left (the internet) meets the
second rule, which sends every packet not carrying tun2sx's mark into table
T and so into the TUN. The outbound sockets carry the mark (`SO_MARK`), skip
table T and leave through the main table's default route.

`AutoRoute` records each step it completed and undoes exactly those, newest
first, on exit, even when the block raised; something already gone (the
device deleted, a rule removed by hand) is not an error. It changes the
namespace it runs in: call it only where that is intended (the CLI on the
host, tests inside their own namespace).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger("tun2sx")

__all__ = ["DEFAULT_PRIORITY", "DEFAULT_TABLE", "AutoRoute", "AutoRouteError", "auto_route"]

DEFAULT_TABLE = 2022
DEFAULT_PRIORITY = 9000

# iproute2's messages for "there is nothing to delete": the route or rule is
# gone (ESRCH / ENOENT) or so is the device it named.
_ALREADY_GONE = ("No such process", "No such file or directory", "Cannot find device")
# Bounds the clean-up loop: each killed run can have left one copy of a rule.
_MAX_LEFTOVER_COPIES = 64


class AutoRouteError(RuntimeError):
    """An `ip` command failed; the message names the command and its error."""


class _Step:
    """One change: the command making it and the command reverting it."""

    __slots__ = ("add", "delete")

    def __init__(self, family: str, *selector: str, kind: str) -> None:
        self.add = ["ip", family, kind, "add", *selector]
        self.delete = ["ip", family, kind, "del", *selector]


class AutoRoute:
    """The routes and rules of `auto_route`, as a context manager.

    Attributes:
        steps: (add, delete) command pairs in the order they are applied.
        applied: how many of `steps` are currently in effect.
    """

    def __init__(
        self,
        device: str,
        *,
        fwmark: int,
        table: int = DEFAULT_TABLE,
        priority: int = DEFAULT_PRIORITY,
        ipv6: bool = True,
    ) -> None:
        if not 0 < fwmark < 2**32:
            raise ValueError(f"fwmark must be in 1..2**32-1, got {fwmark}")
        if not 0 < table < 2**32 or table in (253, 254, 255):
            raise ValueError(f"table must be a free routing table id, got {table}")
        if not 1 < priority < 32766:
            raise ValueError(f"priority must be in 2..32765, got {priority}")
        self.device = device
        families = ("-4", "-6") if ipv6 else ("-4",)
        mark, tab = hex(fwmark), str(table)
        steps: list[_Step] = []
        for family in families:
            # Order matters while applying: the diverting rule comes last, so
            # there is never a moment when LAN traffic is sent into the TUN.
            steps.append(_Step(family, "default", "dev", device, "table", tab, kind="route"))
            steps.append(
                _Step(
                    family,
                    "table",
                    "main",
                    "suppress_prefixlength",
                    "0",
                    "priority",
                    str(priority - 1),
                    kind="rule",
                )
            )
            steps.append(
                _Step(
                    family,
                    "not",
                    "fwmark",
                    mark,
                    "table",
                    tab,
                    "priority",
                    str(priority),
                    kind="rule",
                )
            )
        self._steps = steps
        self._table = tab
        self._priority = priority
        self.applied = 0

    @property
    def steps(self) -> list[tuple[list[str], list[str]]]:
        return [(list(step.add), list(step.delete)) for step in self._steps]

    def apply(self) -> None:
        """Make every change; on a failure, undo the ones made and raise.

        Raises:
            AutoRouteError: a command failed (named in the message).
        """
        if self.applied:
            raise RuntimeError("auto-route is already applied")
        self._remove_leftovers()
        for step in self._steps:
            try:
                _ip(step.add)
            except AutoRouteError:
                self.undo()
                raise
            self.applied += 1
        for dev in strict_reverse_path_filters():
            log.warning(
                "auto-route: reverse-path filtering is strict on %s (rp_filter=1): replies to"
                " tun2sx's own sockets arrive there while the route back to their source is"
                " the TUN, so the kernel drops them; make it loose: sysctl -w"
                " net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2",
                dev,
                dev,
            )

    def _remove_leftovers(self) -> None:
        """Take away what an earlier run killed before its `undo` left behind.

        After `kill -9` the rules stay (the TUN, and with it the table's
        route, usually goes), and adding them again fails with "File
        exists". The rules at our two priorities that point at our table
        (any mark) or are the main-table exception, and the table's default
        route into our own device, can only be a run of tun2sx with these
        settings. A default route in the table into another device that
        exists is someone else's, maybe a second tun2sx still running: then
        nothing is touched, and adding fails naming the command.
        """
        families = sorted({step.add[1] for step in self._steps})
        for family in families:
            for line in _output(
                ["ip", family, "-o", "route", "show", "table", self._table]
            ).splitlines():
                words = line.split()
                if words[:1] == ["default"] and "dev" in words[:-1]:
                    dev = words[words.index("dev") + 1]
                    if dev != self.device and _output(["ip", "-o", "link", "show", "dev", dev]):
                        return
        removed = []
        for family in families:
            leftovers = [
                [
                    "ip",
                    family,
                    "rule",
                    "del",
                    "priority",
                    str(self._priority),
                    "table",
                    self._table,
                ],
                [
                    "ip",
                    family,
                    "rule",
                    "del",
                    "priority",
                    str(self._priority - 1),
                    "table",
                    "main",
                    "suppress_prefixlength",
                    "0",
                ],
                ["ip", family, "route", "del", "default", "dev", self.device, "table", self._table],
            ]
            for command in leftovers:
                # A rule can be there more than once (several runs killed).
                for _ in range(_MAX_LEFTOVER_COPIES):
                    if not _ip(command, tolerate=(*_ALREADY_GONE, "FIB table does not exist")):
                        break
                    removed.append(" ".join(command))
        if removed:
            log.warning(
                "auto-route: removed what an earlier run of tun2sx left behind (killed before it"
                " could clean up): %s",
                "; ".join(removed),
            )

    def undo(self) -> None:
        """Revert the applied changes, newest first; idempotent.

        Every change is attempted even after one fails, so one stuck rule
        does not leave the rest behind.

        Raises:
            AutoRouteError: a change could not be reverted for a reason other
                than being gone already (all such failures are named).
        """
        failures = []
        while self.applied:
            self.applied -= 1
            try:
                _ip(self._steps[self.applied].delete, tolerate=_ALREADY_GONE)
            except AutoRouteError as exc:
                failures.append(str(exc))
        if failures:
            raise AutoRouteError("; ".join(failures))

    def __enter__(self) -> None:
        self.apply()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.undo()


def auto_route(
    device: str,
    *,
    fwmark: int,
    table: int = DEFAULT_TABLE,
    priority: int = DEFAULT_PRIORITY,
    ipv6: bool = True,
) -> AutoRoute:
    """Route this namespace's traffic into `device`, except packets marked `fwmark`.

    Use as ``with auto_route("tun0", fwmark=0x2022): ...``; everything is
    undone when the block ends.

    Args:
        device: the TUN device (must exist and be up for IPv6 routes).
        fwmark: the mark tun2sx's outbound sockets carry (`--fwmark`).
        table: routing table for the TUN default route; must be unused.
        priority: priority of the diverting rule; the LAN-exception rule
            takes `priority - 1`.
        ipv6: do the same for IPv6.

    Returns:
        A context manager that applies the changes on entry.

    Raises:
        ValueError: fwmark, table or priority out of range.
    """
    return AutoRoute(device, fwmark=fwmark, table=table, priority=priority, ipv6=ipv6)


def strict_reverse_path_filters(conf: Path = Path("/proc/sys/net/ipv4/conf")) -> list[str]:
    """The devices with an IPv4 default route whose reverse-path filter is strict.

    The kernel applies the larger of `all` and the device's own setting; 1
    (strict) drops a packet whose source is routed back through another
    device, as the replies to tun2sx's marked sockets are under auto-route.
    Devices are read from the main table (`ip -4 route show default`).
    """
    try:
        routes = subprocess.run(
            ["ip", "-4", "-o", "route", "show", "default"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        every = int((conf / "all" / "rp_filter").read_text())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    strict = []
    for line in routes.splitlines():
        words = line.split()
        if "dev" not in words[:-1]:
            continue
        dev = words[words.index("dev") + 1]
        try:
            own = int((conf / dev / "rp_filter").read_text())
        except (OSError, ValueError):
            continue
        if max(every, own) == 1 and dev not in strict:
            strict.append(dev)
    return strict


def _ip(argv: Sequence[str], *, tolerate: Sequence[str] = ()) -> bool:
    """Run `ip`; True when it did something, False when `tolerate` matched its error."""
    command = " ".join(argv)
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AutoRouteError(f"{command}: {exc}") from exc
    if result.returncode == 0:
        return True
    message = result.stderr.strip() or f"exit status {result.returncode}"
    if any(text in message for text in tolerate):
        return False
    raise AutoRouteError(f"{command}: {message}")


def _output(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AutoRouteError(f"{' '.join(argv)}: {exc}") from exc
    return result.stdout if result.returncode == 0 else ""
