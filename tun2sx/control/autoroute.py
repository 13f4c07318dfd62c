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


def _ip(argv: Sequence[str], *, tolerate: Sequence[str] = ()) -> None:
    command = " ".join(argv)
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AutoRouteError(f"{command}: {exc}") from exc
    if result.returncode == 0:
        return
    message = result.stderr.strip() or f"exit status {result.returncode}"
    if any(text in message for text in tolerate):
        return
    raise AutoRouteError(f"{command}: {message}")
