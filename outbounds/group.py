"""Proxy groups: one name for several outbounds, and which of them a new flow takes.

A group is an `Outbound` like the others, so rules, the default outbound and
other groups name it as they name a proxy. What it adds is the choice among
its members, by kind (as mihomo and sing-box users know them):

    select        the member chosen by hand (`select`), the first until then
    fallback      the first member that is up, in the configured order
    url-test      the member with the lowest measured delay; it changes only
                  when another is faster by more than `tolerance` ms
    load-balance  consistent hashing of the destination host (the name, else
                  the address) over the members that are up

Whether a member is up comes from health checks (`run_checks`): every
`interval` seconds each member opens the check target through itself, a TCP
connect (`tcp://host:port`) or an HTTP GET (`http://host/path`, or over TLS
`https://...`, the certificate unverified); any HTTP answer counts, as in
mihomo (a status proves the proxy reached the site).
A flow whose connect through a member fails because of the proxy itself
(`OutboundError.proxy_failed`: unreachable, silent, broken protocol, refused
credentials, not the proxy reporting that the destination refused) marks the
member down at once and has it checked again; a connect that timed out
only has it checked again. Flows in progress are never moved.

When every member is down, fallback and url-test take the first member
(mihomo does the same: trying something beats refusing everything), and
load-balance hashes over all members, so a site keeps its proxy.

Load-balance uses rendezvous (highest random weight) hashing: each member
scores `hash(member, host)` and the highest-scoring member that is up wins.
When a member goes down only the hosts it won move, each to its runner-up,
and they come back when it does.

The group records nothing about flows; `connect_tcp_traced` and
`open_udp_traced` return the chain of names a flow went through (the leaf
outbound first, the outermost group last, as Clash's `chains`).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import trio

from .base import Destination, FailureReply, Outbound, OutboundError, UdpSession, redact_url
from .units import seconds_out_of_range

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOLERANCE",
    "DEFAULT_URL",
    "GROUP_KINDS",
    "CheckTarget",
    "GroupError",
    "GroupSpec",
    "ProxyGroup",
    "build_groups",
    "connect_tcp_traced",
    "measure_delay",
    "open_udp_traced",
    "parse_check_url",
    "parse_status_untrusted",
    "reachable_groups",
    "run_health_checks",
]

log = logging.getLogger(__name__)

GROUP_KINDS = ("select", "fallback", "url-test", "load-balance")
DEFAULT_URL = "http://www.gstatic.com/generate_204"
DEFAULT_INTERVAL = 300.0
DEFAULT_TIMEOUT = 5.0
# sing-box's default; mihomo's is 0, which lets two members of equal speed
# take turns with every round of checks.
DEFAULT_TOLERANCE = 50
# What a group's numbers may be (docs/config.md). A round of checks more
# often than every second is a load on the proxies, not a faster failover,
# and one a day apart is no health check; mihomo and sing-box take any
# value, and 1e-300 s then spins a core. A check needs a connect and a
# round trip: under 0.1 s it fails on any proxy beyond the LAN, and a
# minute is a dead proxy already (the controller's delay test allows the
# same 60 s). A tolerance beyond a minute would never switch.
INTERVAL_RANGE = (1.0, 86400.0)  # seconds
TIMEOUT_RANGE = (0.1, 60.0)  # seconds
TOLERANCE_RANGE = (0, 60000)  # milliseconds
HISTORY = 10
_DIRECT = "DIRECT"
_REJECT = "REJECT"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The least time between two checks a flow's failure asks for.
_RECHECK_GAP = 1.0
# An HTTP status line fits in far less; more without one is not HTTP.
_MAX_HEAD = 4096


class GroupError(ValueError):
    """A group is misconfigured; the message starts with the key (groups.NAME...)."""


@attrs.frozen
class CheckTarget:
    """Where a health check goes, parsed from its URL.

    Attributes:
        scheme: "http" or "https" (a GET, any answer counts) or "tcp" (a
            connect).
        dest: the host and port to open through the member.
        path: the request path (http only).
    """

    scheme: str
    dest: Destination
    path: str = "/"

    def request(self) -> bytes:
        """The HTTP GET this check sends."""
        host = self.dest.host
        text = str(host) if isinstance(host, str) or host.version == 4 else f"[{host}]"
        if self.dest.port != _DEFAULT_PORTS.get(self.scheme):
            text = f"{text}:{self.dest.port}"
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {text}\r\nUser-Agent: tun2sx\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii")


def parse_check_url(url: str) -> CheckTarget:
    """Parse a health-check target: ``http[s]://host[:port]/path`` or ``tcp://host:port``.

    Raises:
        ValueError: another scheme, no host, or a bad port.
    """
    shown = repr(redact_url(url))
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https", "tcp"):
        raise ValueError(f"expected http[s]://host/path or tcp://host:port, got {shown}")
    hostport, slash, path = rest.partition("/")
    path = slash + path if slash else "/"
    if "@" in hostport:
        raise ValueError(f"{shown}: a check URL carries no user or password")
    if not path.isascii() or any(ch.isspace() for ch in path):
        raise ValueError(f"the path of {shown} must be ASCII without spaces")
    if hostport.startswith("["):
        host, bracket, tail = hostport[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"malformed IPv6 host in {shown}")
        port_text = tail[1:] if tail else ""
    else:
        host, _colon, port_text = hostport.partition(":")
    if not host or not host.isascii() or any(ch.isspace() for ch in host):
        raise ValueError(f"no usable host in {shown}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) <= 0xFFFF:
            raise ValueError(f"bad port in {shown}")
        port = int(port_text)
    elif scheme in _DEFAULT_PORTS:
        port = _DEFAULT_PORTS[scheme]
    else:
        raise ValueError(f"{shown} needs a port (tcp://host:port)")
    return CheckTarget(scheme, Destination.parse_host(host, port), path)


@attrs.frozen
class GroupSpec:
    """A group as configured.

    Attributes:
        name: how rules and other groups name it.
        kind: one of GROUP_KINDS.
        members: outbound names, group names, DIRECT or REJECT, in order.
        url: the health-check target (see `parse_check_url`).
        interval: seconds between rounds of checks.
        timeout: seconds a check may take before it counts as failed.
        tolerance: url-test only: ms another member must be faster by to
            take over.
    """

    name: str
    kind: str
    members: tuple[str, ...]
    url: str = DEFAULT_URL
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    tolerance: int = DEFAULT_TOLERANCE

    def check(self) -> None:
        """Check the values that need no other group to judge.

        Raises:
            GroupError: naming the key, e.g. ``groups.auto.interval: ...``.
        """
        key = f"groups.{self.name}"
        if self.kind not in GROUP_KINDS:
            raise GroupError(
                f"{key}.type: unknown group type {self.kind!r} (known: {', '.join(GROUP_KINDS)})"
            )
        if not self.members:
            raise GroupError(f"{key}.members: a group needs at least one member")
        seen: set[str] = set()
        for i, member in enumerate(self.members):
            if member in seen:
                raise GroupError(f"{key}.members[{i}]: {member!r} is listed twice")
            seen.add(member)
        try:
            parse_check_url(self.url)
        except ValueError as exc:
            raise GroupError(f"{key}.url: {exc}") from None
        for field, value, (low, high) in (
            ("interval", self.interval, INTERVAL_RANGE),
            ("timeout", self.timeout, TIMEOUT_RANGE),
        ):
            refusal = seconds_out_of_range(f"{key}.{field}", value, low, high)
            if refusal is not None:
                raise GroupError(refusal)
        low_ms, high_ms = TOLERANCE_RANGE
        if not low_ms <= self.tolerance <= high_ms:
            raise GroupError(f"{key}.tolerance: {low_ms} to {high_ms} ms, got {self.tolerance}")


def _score(member: str, key: str) -> int:
    # Imported here: hashlib loads OpenSSL's libcrypto (memory a run without
    # load-balance groups never needs; tests/tun2sx/control/test_deferred.py).
    import hashlib

    digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ProxyGroup:
    """An outbound that hands each new flow to one of its members.

    Args:
        spec: the configured group (already checked).
        members: each member's name and outbound; None for REJECT.
        wall_clock: the clock the history is stamped with (unix seconds).

    Attributes:
        name: the group's name.
        kind: "select", "fallback", "url-test" or "load-balance".
        members: the member names, in order.
    """

    def __init__(
        self,
        spec: GroupSpec,
        members: Mapping[str, Outbound | None],
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = spec.name
        self.kind = spec.kind
        self.members = tuple(spec.members)
        self.spec = spec
        self._targets = {name: members[name] for name in self.members}
        self._wall_clock = wall_clock
        self._alive = dict.fromkeys(self.members, True)
        self._history: dict[str, collections.deque[tuple[float, int]]] = {
            name: collections.deque(maxlen=HISTORY) for name in self.members
        }
        self._selected = self.members[0]
        self._fastest = self.members[0]
        self._last_used = self.members[0]
        self._suspects: set[str] = set()
        self._wake = trio.Event()

    def __repr__(self) -> str:
        return f"<ProxyGroup {self.name} {self.kind} [{', '.join(self.members)}]>"

    # -- the choice ----------------------------------------------------------

    def alive(self, member: str) -> bool:
        """Whether `member` is up (REJECT always is; a member not yet checked is).

        Raises:
            KeyError: not a member.
        """
        return self._alive[member]

    def delays(self, member: str) -> list[tuple[float, int]]:
        """The health-check history of `member`: (unix time, ms; 0 = failed), newest last.

        Raises:
            KeyError: not a member.
        """
        return list(self._history[member])

    def target(self, member: str) -> Outbound | None:
        """The outbound (or group) `member` names; None for REJECT."""
        return self._targets[member]

    def last_delay(self, member: str) -> int:
        """The delay the last check of `member` measured, 0 when it failed or none ran."""
        history = self._history[member]
        return history[-1][1] if history else 0

    def now(self) -> str:
        """The member new flows take now (load-balance: the one most recently used)."""
        if self.kind == "select":
            return self._selected
        if self.kind == "fallback":
            return self._first_alive()
        if self.kind == "url-test":
            return self._fastest
        return self._last_used

    def carry_health(self, previous: ProxyGroup, members: Iterable[str]) -> None:
        """Take what `previous` (this group as configured before a reload)
        found of `members`: up or down, and the delays measured.

        New flows then keep away from a proxy found down (and url-test
        keeps the fastest) instead of trusting every member again until
        this group's own first check. Members either group lacks are skipped.
        """
        for member in members:
            if member in self._alive and member in previous._alive:
                self._alive[member] = previous._alive[member]
                self._history[member] = collections.deque(previous._history[member], maxlen=HISTORY)
        self._retest()

    def select(self, member: str) -> None:
        """Make `member` the choice of a select group; flows in progress stay.

        Raises:
            ValueError: the group is not a select group, or has no such member.
        """
        if self.kind != "select":
            raise ValueError(f"group {self.name} is {self.kind}, not select")
        if member not in self._targets:
            raise ValueError(f"group {self.name} has no member {member!r}")
        if member != self._selected:
            log.info("group %s: %s selected (was %s)", self.name, member, self._selected)
        self._selected = member

    def choose(self, dest: Destination | None) -> str:
        """The member a new flow to `dest` takes (None: a UDP session's first peer unknown)."""
        if self.kind != "load-balance":
            return self.now()
        key = "" if dest is None else str(dest.host)
        candidates = [name for name in self.members if self._alive[name]] or self.members
        member = max(candidates, key=lambda name: _score(name, key))
        self._last_used = member
        return member

    def _first_alive(self) -> str:
        for name in self.members:
            if self._alive[name]:
                return name
        return self.members[0]

    def _retest(self) -> None:
        """url-test: move to the fastest member only when clearly faster."""
        if self.kind != "url-test":
            return
        measured = [
            name for name in self.members if self._alive[name] and self.last_delay(name) > 0
        ]
        if not measured:
            self._fastest = self._first_alive()
            return
        fastest = min(measured, key=self.last_delay)
        current = self._fastest
        if current not in measured or (
            self.last_delay(current) - self.last_delay(fastest) > self.spec.tolerance
        ):
            if fastest != current:
                log.info(
                    "group %s: %s (%d ms) replaces %s",
                    self.name,
                    fastest,
                    self.last_delay(fastest),
                    current,
                )
            self._fastest = fastest

    # -- health --------------------------------------------------------------

    def _set_alive(self, member: str, alive: bool, why: str, *, retest: bool = True) -> None:
        if self._alive[member] != alive:
            if alive:
                log.info("group %s: %s is up (%s)", self.name, member, why)
            else:
                log.warning("group %s: %s is down (%s)", self.name, member, why)
        self._alive[member] = alive
        if retest:
            self._retest()

    def _suspect(self, member: str) -> None:
        """Check `member` again soon (the loop in `run_checks` does)."""
        self._suspects.add(member)
        self._wake.set()

    def connect_failed(self, member: str, exc: OutboundError) -> None:
        """A flow's connect through `member` failed: the passive check.

        A failure of the proxy itself marks it down at once and has it
        checked again; a destination refusing says nothing about the proxy.
        """
        if exc.proxy_failed:
            self._set_alive(member, False, str(exc))
            self._suspect(member)

    async def check_member(self, member: str) -> int:
        """Check `member` once now and record the result; returns the delay (0: failed)."""
        delay = await self._measure(member)
        self._retest()
        return delay

    async def _measure(self, member: str) -> int:
        target = self._targets[member]
        if target is None:
            return 0
        try:
            delay = await measure_delay(target, self.spec.url, self.spec.timeout)
            why = f"{delay} ms"
        except OutboundError as exc:
            delay, why = 0, str(exc)
        except TimeoutError:
            delay, why = 0, f"no answer within {self.spec.timeout:g}s"
        except Exception:
            # A bug in an outbound: loud, but the checks (and every flow
            # that the group carries) go on, as a flow's bug ends only it.
            log.exception("group %s: checking %s failed unexpectedly", self.name, member)
            delay, why = 0, "the check failed unexpectedly"
        self._history[member].append((self._wall_clock(), delay))
        self._set_alive(member, delay > 0, why, retest=False)
        return delay

    async def check_all(self, members: Iterable[str] | None = None) -> None:
        """Check `members` (default: all but REJECT) at the same time, and record.

        url-test compares the delays once the round is over: a member whose
        answer is still on its way must not lose to one that answered first.
        """
        names = [
            name
            for name in (self.members if members is None else members)
            if self._targets[name] is not None
        ]
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._measure, name)
        self._retest()

    async def run_checks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Check every member each `interval`, and a suspect one at once; runs until cancelled."""
        task_status.started()
        interval = self.spec.interval
        next_round = trio.current_time()
        while True:
            if trio.current_time() >= next_round:
                self._suspects.clear()
                await self.check_all()
                next_round = trio.current_time() + interval
            with trio.move_on_at(next_round):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
                suspects, self._suspects = self._suspects, set()
                await self.check_all(sorted(suspects, key=self.members.index))
                # Failures that come meanwhile wait for one check together:
                # a burst of flows through a dead proxy is not a burst of checks.
                await trio.sleep_until(min(trio.current_time() + _RECHECK_GAP, next_round))

    # -- the Outbound protocol ---------------------------------------------------

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        """Open a TCP stream through the member `choose` picks. Raises `OutboundError`."""
        stream, _chain = await self.connect_tcp_chain(dest)
        return stream

    async def open_udp(self) -> UdpSession:
        """Open a datagram session through the member chosen now. Raises `OutboundError`."""
        session, _chain = await self.open_udp_chain(None)
        return session

    async def connect_tcp_chain(
        self, dest: Destination
    ) -> tuple[trio.abc.HalfCloseableStream, tuple[str, ...]]:
        """`connect_tcp`, and the names the flow went through (leaf first, this group last)."""
        member = self.choose(dest)
        target = self._targets[member]
        if target is None:
            raise OutboundError(FailureReply.RESET, f"group {self.name}: {_REJECT}")
        if isinstance(target, ProxyGroup):
            stream, chain = await target.connect_tcp_chain(dest)
            return stream, (*chain, self.name)
        finished = False
        try:
            stream = await target.connect_tcp(dest)
            finished = True
        except OutboundError as exc:
            finished = True
            self.connect_failed(member, exc)
            raise
        finally:
            if not finished:
                # Cancelled: the flow's connect timed out (or the engine is
                # stopping). Not proof the proxy is gone; worth a look.
                self._suspect(member)
        return stream, (member, self.name)

    async def open_udp_chain(self, dest: Destination | None) -> tuple[UdpSession, tuple[str, ...]]:
        """`open_udp` for a session whose first datagram goes to `dest`, and its chain."""
        member = self.choose(dest)
        target = self._targets[member]
        if target is None:
            raise OutboundError(FailureReply.ADMIN_PROHIBITED, f"group {self.name}: {_REJECT}")
        if isinstance(target, ProxyGroup):
            session, chain = await target.open_udp_chain(dest)
            return session, (*chain, self.name)
        try:
            session = await target.open_udp()
        except OutboundError as exc:
            self.connect_failed(member, exc)
            raise
        return session, (member, self.name)


async def connect_tcp_traced(
    outbound: Outbound, dest: Destination, name: str
) -> tuple[trio.abc.HalfCloseableStream, tuple[str, ...]]:
    """Connect through `outbound` (named `name`); returns the stream and the chain."""
    if isinstance(outbound, ProxyGroup):
        return await outbound.connect_tcp_chain(dest)
    return await outbound.connect_tcp(dest), (name,)


async def open_udp_traced(
    outbound: Outbound, dest: Destination, name: str
) -> tuple[UdpSession, tuple[str, ...]]:
    """Open a session through `outbound` (named `name`); returns it and the chain."""
    if isinstance(outbound, ProxyGroup):
        return await outbound.open_udp_chain(dest)
    return await outbound.open_udp(), (name,)


async def measure_delay(outbound: Outbound, url: str, timeout: float) -> int:
    """Milliseconds a health check through `outbound` takes (at least 1).

    An ``http://`` URL is fetched with a GET and timed to the status line
    (any status counts), an ``https://`` one the same over TLS (the
    certificate unverified); a ``tcp://host:port`` target is timed to the
    connection's being open through the outbound.

    Raises:
        ValueError: a URL `parse_check_url` refuses.
        OutboundError: the connection or the request failed.
        TimeoutError: no answer within `timeout` seconds.
    """
    target = parse_check_url(url)
    start = trio.current_time()
    with trio.move_on_after(timeout) as scope:
        stream = await outbound.connect_tcp(target.dest)
        try:
            if target.scheme == "https":
                await _http_status(_tls(stream, target), target)
            elif target.scheme == "http":
                await _http_status(stream, target)
        finally:
            await trio.aclose_forcefully(stream)
    if scope.cancelled_caught:
        raise TimeoutError(f"no answer from {target.dest} within {timeout:g}s")
    return max(1, round((trio.current_time() - start) * 1000))


def _tls(stream: trio.abc.HalfCloseableStream, target: CheckTarget) -> trio.SSLStream[Any]:
    """TLS over `stream` for an https check, the certificate unverified.

    A check measures whether and how fast the site answers through the
    member; it sends nothing secret, and a clock or CA store that is off
    must not make every member look dead.
    """
    # Imported here: ssl is about 2 MiB resident, for https checks only.
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    host = target.dest.host
    return trio.SSLStream(stream, context, server_hostname=host if isinstance(host, str) else None)


def parse_status_untrusted(head: bytes) -> int | None:
    """The status of an HTTP answer from its first bytes; None until the line is whole.

    Raises:
        ValueError: the bytes are not an HTTP/1 status line (or one is
            still missing after `_MAX_HEAD` bytes).
    """
    line, sep, _rest = head.partition(b"\r\n")
    if not sep:
        if len(head) > _MAX_HEAD:
            raise ValueError("no HTTP status line")
        return None
    parts = line.split(b" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith(b"HTTP/1.")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise ValueError("not an HTTP status line")
    return int(parts[1])


async def _http_status(stream: trio.abc.Stream, target: CheckTarget) -> int:
    """Send the check's GET and read up to the status line; returns the status."""
    head = b""
    try:
        await stream.send_all(target.request())
        while (status := parse_status_untrusted(head)) is None:
            data = await stream.receive_some(_MAX_HEAD)
            if not data:
                raise OutboundError(
                    FailureReply.RESET, f"{target.dest} closed without an HTTP answer"
                )
            head += data
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise OutboundError(FailureReply.RESET, f"check of {target.dest} broke: {exc}") from exc
    except ValueError as exc:
        raise OutboundError(FailureReply.RESET, f"{target.dest}: {exc}") from None
    return status


def build_groups(
    specs: Sequence[GroupSpec], outbounds: Mapping[str, Outbound]
) -> dict[str, ProxyGroup]:
    """Build the groups, each after the groups it contains.

    Args:
        specs: the configured groups.
        outbounds: the named outbounds (DIRECT included) members may name.

    Returns:
        Group name -> group, in configuration order.

    Raises:
        GroupError: a bad value, an unknown member, a name taken, or a
            cycle; one line naming the key.
    """
    by_name: dict[str, GroupSpec] = {}
    for spec in specs:
        if spec.name.upper() in (_DIRECT, _REJECT):
            raise GroupError(f"groups.{spec.name}: {spec.name} is built in and cannot be a group")
        if spec.name in outbounds:
            raise GroupError(f"groups.{spec.name}: an outbound has this name already")
        if spec.name in by_name:
            raise GroupError(f"groups.{spec.name}: defined twice")
        spec.check()
        for i, member in enumerate(spec.members):
            if (
                member != _REJECT
                and member not in outbounds
                and member not in {other.name for other in specs}
            ):
                raise GroupError(
                    f"groups.{spec.name}.members[{i}]: unknown outbound or group {member!r}"
                )
        by_name[spec.name] = spec
    built: dict[str, ProxyGroup] = {}

    def build(name: str, path: tuple[str, ...]) -> ProxyGroup:
        if name in built:
            return built[name]
        if name in path:
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise GroupError(f"groups.{name}: groups contain each other ({cycle})")
        spec = by_name[name]
        members: dict[str, Outbound | None] = {}
        for member in spec.members:
            if member == _REJECT:
                members[member] = None
            elif member in by_name:
                members[member] = build(member, (*path, name))
            else:
                members[member] = outbounds[member]
        group = built[name] = ProxyGroup(spec, members)
        return group

    for spec in specs:
        build(spec.name, ())
    return {spec.name: built[spec.name] for spec in specs}


async def run_health_checks(groups: Iterable[ProxyGroup]) -> None:
    """Run every group's `run_checks` until cancelled (one scope to stop them all).

    A configuration reload cancels this for the old groups and starts it
    for the new ones.
    """
    async with trio.open_nursery() as nursery:
        for group in groups:
            nursery.start_soon(group.run_checks)


def reachable_groups(roots: Iterable[Outbound | None]) -> list[ProxyGroup]:
    """The groups `roots` (rule targets, the default) use, directly or inside groups.

    Only these are health-checked: a group no rule can reach carries no flow.
    """
    found: dict[int, ProxyGroup] = {}
    stack = [root for root in roots if isinstance(root, ProxyGroup)]
    while stack:
        group = stack.pop()
        if id(group) in found:
            continue
        found[id(group)] = group
        stack.extend(
            target for target in map(group.target, group.members) if isinstance(target, ProxyGroup)
        )
    return list(found.values())
