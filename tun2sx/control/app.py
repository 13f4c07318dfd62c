"""The application: from `Settings` to a running engine, and back down.

`Settings` is the whole configuration as one checked value; the command
line builds it from a config file and flags, the embedding API from its
arguments. `serve` opens (or adopts) the TUN, builds the fake-IP store, DNS,
router, stack and engine, sets up routes when asked, runs the engine and
the statistics until cancelled or signalled, and releases everything on
the way out.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from outbounds.base import Destination, Outbound
from outbounds.direct import DirectOutbound
from outbounds.group import (
    GroupError,
    GroupSpec,
    build_groups,
    reachable_groups,
    run_health_checks,
)
from outbounds.net import SocketOptions
from outbounds.resolver import DirectResolver
from outbounds.socks5 import Socks5Outbound
from outbounds.udpsock import DEFAULT_UDP_BUFFER
from outbounds.units import seconds_hint, seconds_out_of_range
from outbounds.url import parse_outbound_url
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from tun2sx.control.directdns import (
    build_direct_resolver,
    excluded_networks,
    inside,
    warn_without_direct_dns,
)
from tun2sx.control.heap import release_free_pages
from tun2sx.control.stats import (
    log_summaries,
    open_stats_listeners,
    parse_endpoint,
)
from tun2sx.dataplane.context import EngineConfig
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import DEFAULT_TXQUEUELEN, TunDevice, TunError, adopt_tun, open_tun
from tun2sx.naming.dns import FakeDns
from tun2sx.naming.fakeip import (
    FakeIpFilter,
    FakeIpStore,
    FakeIpStoreError,
    TableInUseError,
    pool_capacity,
)
from tun2sx.naming.journal import lock_table
from tun2sx.naming.router import (
    BUILTIN_TARGETS,
    DIRECT,
    REJECT,
    Router,
    RuleError,
    RuleSet,
    parse_rules,
)
from tun2sx.naming.sniff import (
    DEFAULT_HTTP_PORTS,
    DEFAULT_QUIC_PORTS,
    DEFAULT_SNIFF_TIMEOUT,
    DEFAULT_TLS_PORTS,
    SNIFF_MODES,
    PortRanges,
    SniffConfig,
    SniffMode,
    parse_ports,
)

if TYPE_CHECKING:
    from tun2sx.control.reload import ConfigSource, Reloader

log = logging.getLogger("tun2sx")

DEFAULT_MTU = 9000
GSO_SIZE = 64000
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_POOL4 = ipaddress.IPv4Network("198.18.0.0/15")
DEFAULT_POOL6 = ipaddress.IPv6Network("fc00::/18")
# The mark outbound sockets carry under auto_route when no fwmark is set:
# without one, the routes would send tun2sx's own traffic back into the TUN.
DEFAULT_AUTO_ROUTE_FWMARK = 0x2022
DEFAULT_STATS_INTERVAL = 300.0
# The kernel's limit on the queues of one TUN (MAX_TAP_QUEUES).
MAX_WORKERS = 256
# Bounds of the queue and buffer sizes: below, a burst of a few dozen
# datagrams already overflows; above, a typo pins gigabytes.
MAX_TXQUEUELEN = 1_000_000
# The bytes a flow writes to the TUN in one step while others are active
# (0: whole runs, as when it is alone); docs/architecture.md, "A bulk flow
# writes a burst per round". 48 KiB is the 32 packets of 1500 octets measured first, and one
# 64 KiB super-segment with offload.
DEFAULT_WRITE_BURST = 48 * 1024
MAX_WRITE_BURST = 64 * 1024 * 1024
# Below a packet of 1500 octets a burst is one packet anyway; a value this
# small is most likely a packet count (the option's first unit).
MIN_WRITE_BURST = 1500
MIN_UDP_BUFFER = 64 * 1024
MAX_UDP_BUFFER = 1 << 30
# Longer than this, a flow the sniffer cannot read would wait visibly.
MAX_SNIFF_TIMEOUT = 10.0
# Seconds (docs/config.md). connect_timeout bounds a whole outbound set-up
# (connect, handshake, the proxy's reply) while the application's SYN is
# held: below 0.1 s no proxy beyond the LAN answers in time, and the
# application's own connect() gives up after about two minutes. A UDP
# session forgotten within a second breaks every request and answer; one
# kept for a day is a leak.
CONNECT_TIMEOUT_RANGE = (0.1, 600.0)
UDP_TIMEOUT_RANGE = (1.0, 86400.0)
STATS_INTERVAL_RANGE = (1.0, 86400.0)  # or 0: no summary lines


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(name), str(url)) for name, url in items)


@attrs.frozen
class Settings:
    """Everything tun2sx needs to run (see docs/usage.md for each field).

    Attributes:
        tun: TUN device name to open (created if missing), or None.
        tun_fd: an already-open TUN fd to adopt, or None.
        mtu: MTU to set (None: DEFAULT_MTU for an opened device, 1500 for
            an adopted one).
        tun_addresses: CIDRs to add to an opened device.
        offload: virtio-net header with checksum/TSO offload.
        outbound: the default outbound (when no rule matches): a URL, the
            name of one of `outbounds`, DIRECT or REJECT.
        outbounds: named outbounds, (name, URL) pairs, for the rules.
        rules: Clash-style rule strings (see tun2sx.naming.router), first match wins.
        groups: proxy groups (outbounds.group.GroupSpec), named like outbounds.
        fwmark: SO_MARK for every outbound socket.
        interface: SO_BINDTODEVICE for every outbound socket.
        fake_ip: answer DNS with fake IPs.
        fake_ip_range / fake_ip_range6: the pools (v6 None: no AAAA).
        fake_ip_db: SQLite file of the fake-IP table (":memory:": none).
        fake_ip_filter: names resolved for real instead.
        dns_upstream: resolver for what is not answered with a fake IP.
        direct_dns: servers the direct outbound resolves host names with
            (None: the nameservers of /etc/resolv.conf that are not tun2sx).
        dns_hijack: answer every port-53 query ourselves.
        udp_timeout: UDP session idle timeout, seconds.
        connect_timeout: outbound connect timeout, seconds.
        stats_listen: HOST:PORT of the stats endpoint and controller API,
            or None (off); loopback unless `secret` is set.
        secret: the controller API's Bearer token (None: no token, and
            only loopback listen addresses and Host headers).
        stats_interval: seconds between summary log lines (0: none).
        auto_route: route the namespace's traffic into the TUN while
            serving (fwmark defaults to DEFAULT_AUTO_ROUTE_FWMARK).
        workers: processes serving a multi-queue TUN, one queue each
            (tun2sx.control.workers); 1 is a single process.
        tun_txqueuelen: the kernel's queue of packets for tun2sx to read,
            set when tun2sx opens the device (an adopted fd keeps its own).
        udp_buffer: send and receive buffer of each outbound UDP socket,
            bytes (0: the kernel's default).
        trust_local_checksums: skip checksum verification of packets whose
            source is one of `tun_addresses` (the local host's own); off by
            default (see docs/wire.md).
        sniff: read a flow's first bytes for its host name (TLS SNI, HTTP
            Host, QUIC SNI): "off", "route" (for the rules; only sniffs when
            a domain rule could use the name) or "override" (the outbound
            connects to the name too).
        sniff_timeout: the longest wait for a flow's first bytes, seconds.
        sniff_http_ports / sniff_tls_ports / sniff_quic_ports: the
            destination ports read as HTTP/1, TLS and QUIC, (low, high) pairs.
        sniff_fake_ip: sniff flows that came through a fake IP too.
    """

    tun: str | None = None
    tun_fd: int | None = None
    mtu: int | None = None
    tun_addresses: tuple[str, ...] = ()
    offload: bool = True
    outbound: str = "direct://"
    fwmark: int | None = None
    interface: str | None = None
    fake_ip: bool = True
    fake_ip_range: IPNetwork = DEFAULT_POOL4
    fake_ip_range6: IPNetwork | None = DEFAULT_POOL6
    fake_ip_db: str = "/var/lib/tun2sx/fakeip.sqlite"
    fake_ip_filter: tuple[str, ...] = ()
    dns_upstream: Destination = attrs.field(
        factory=lambda: Destination(ipaddress.IPv4Address("1.1.1.1"), 53)
    )
    dns_hijack: bool = True
    direct_dns: tuple[Destination, ...] | None = None
    udp_timeout: float = 60.0
    connect_timeout: float = 10.0
    outbounds: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    rules: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    groups: tuple[GroupSpec, ...] = attrs.field(default=(), converter=tuple)
    stats_listen: str | None = None
    stats_interval: float = DEFAULT_STATS_INTERVAL
    secret: str | None = attrs.field(default=None, repr=False)
    auto_route: bool = False
    workers: int = 1
    tun_txqueuelen: int = DEFAULT_TXQUEUELEN
    tun_write_burst: int = DEFAULT_WRITE_BURST
    udp_buffer: int = DEFAULT_UDP_BUFFER
    trust_local_checksums: bool = False
    sniff: SniffMode = "route"
    sniff_timeout: float = DEFAULT_SNIFF_TIMEOUT
    sniff_http_ports: PortRanges = attrs.field(default=DEFAULT_HTTP_PORTS, converter=parse_ports)
    sniff_tls_ports: PortRanges = attrs.field(default=DEFAULT_TLS_PORTS, converter=parse_ports)
    sniff_quic_ports: PortRanges = attrs.field(default=DEFAULT_QUIC_PORTS, converter=parse_ports)
    sniff_fake_ip: bool = False


def _trusted_sources(settings: Settings) -> frozenset[bytes]:
    """The TUN's own addresses, whose packets skip checksum verification.

    Only the local host sends from them (Linux drops a packet that arrives
    from elsewhere with a local source address), and nothing lies between
    it and the TUN that could damage a packet; forwarded traffic from a LAN
    keeps being verified (docs/wire.md).
    """
    if not settings.trust_local_checksums:
        return frozenset()
    return frozenset(ipaddress.ip_interface(cidr).ip.packed for cidr in settings.tun_addresses)


def effective_fwmark(settings: Settings) -> int | None:
    """The outbound sockets' mark: as set, or a default under auto_route."""
    if settings.fwmark is None and settings.auto_route:
        return DEFAULT_AUTO_ROUTE_FWMARK
    return settings.fwmark


def open_device(settings: Settings) -> TunDevice:
    """Open or adopt the TUN device the settings name."""
    if settings.tun_fd is not None:
        return adopt_tun(settings.tun_fd, mtu=settings.mtu)
    if not settings.tun:
        raise ConfigError("a TUN device is required: tun (name) or tun_fd")
    return open_tun(
        settings.tun,
        mtu=settings.mtu or DEFAULT_MTU,
        offload=settings.offload,
        addresses=settings.tun_addresses,
        txqueuelen=settings.tun_txqueuelen,
    )


def build_outbounds(
    settings: Settings, socket_options: SocketOptions, resolver: DirectResolver | None = None
) -> dict[str, Outbound]:
    """Every named outbound, plus DIRECT; direct ones resolve with `resolver`.

    Raises:
        ConfigError: a reserved or repeated name, or a bad URL.
    """
    named: dict[str, Outbound] = {
        DIRECT: DirectOutbound(socket_options=socket_options, resolver=resolver)
    }
    for name, url in settings.outbounds:
        if not name or "," in name or any(ch.isspace() for ch in name):
            raise ConfigError(f"outbounds: {name!r} is not a usable name (no commas or spaces)")
        if name.upper() in BUILTIN_TARGETS:
            raise ConfigError(f"outbounds.{name}: {name} is built in and cannot be redefined")
        if name in named:
            raise ConfigError(f"outbounds.{name}: defined twice")
        try:
            named[name] = parse_outbound_url(url, socket_options, resolver=resolver)
        except ValueError as exc:
            raise ConfigError(f"outbounds.{name}.url: {exc}") from exc
    return named


def build_router(
    settings: Settings, socket_options: SocketOptions, resolver: DirectResolver | None = None
) -> Router:
    """The router: named outbounds, DIRECT, proxy groups, the rules and the default.

    Raises:
        ConfigError: a bad outbound or rule; the message names it.
    """
    named = build_outbounds(settings, socket_options, resolver)
    try:
        named.update(build_groups(settings.groups, named))
    except GroupError as exc:
        raise ConfigError(str(exc)) from None
    try:
        rules = parse_rules(settings.rules, named.keys())
    except RuleError as exc:
        raise ConfigError(str(exc)) from None
    default: Outbound | None
    if settings.outbound == REJECT:
        default, default_name = None, None
    elif settings.outbound in named:
        default, default_name = named[settings.outbound], settings.outbound
    else:
        try:
            default = parse_outbound_url(settings.outbound, socket_options, resolver=resolver)
        except ValueError as exc:
            names = ", ".join(named)
            raise ConfigError(f"outbound: {exc}; or name one of: {names}, REJECT") from exc
        default_name = None
    return Router(default, RuleSet(rules), named, default_name=default_name)


def used_outbounds(router: Router) -> list[Outbound | None]:
    """What rules and the default can send flows to (the roots of the groups to check)."""
    return [router.default, *(router.outbounds.get(rule.target) for rule in router.rules.rules)]


@attrs.frozen
class Routing:
    """What picks and dials the outbound of a new flow: built at start and
    again, whole, on every reload (tun2sx.control.reload).

    Attributes:
        router: the rules, the named outbounds and the default.
        resolver: the direct outbound's DNS resolver.
    """

    router: Router
    resolver: DirectResolver

    def tasks(self) -> list[Callable[[], Awaitable[object]]]:
        """What runs while this routing is in use, in a cancel scope of its
        own that a reload cancels once no flow uses it: the health checks
        of the proxy groups that a rule or the default can reach."""
        groups = reachable_groups(used_outbounds(self.router))
        return [functools.partial(run_health_checks, groups)] if groups else []


def open_routing(settings: Settings, protect: Callable[[int], bool] | None = None) -> Routing:
    """The router and the direct resolver the settings describe.

    Raises:
        ConfigError: a bad outbound or rule; the message names it.
    """
    socket_options = SocketOptions(
        fwmark=effective_fwmark(settings),
        interface=settings.interface,
        protect=protect,
        connect_timeout=settings.connect_timeout,
        udp_buffer=settings.udp_buffer or None,
    )
    resolver = build_direct_resolver(settings.direct_dns, _excluded(settings), socket_options)
    router = build_router(settings, socket_options, resolver)
    if settings.fake_ip:
        warn_without_direct_dns(resolver, router)
    missing = missing_interface(settings)
    if missing is not None:
        log.warning("tun2sx: %s", missing)
    return Routing(router, resolver)


def missing_interface(settings: Settings) -> str | None:
    """A warning when `interface` names no device now, else None.

    Not an error: on a router the uplink (ppp0, wg0) may come up after
    tun2sx starts. But a typo would make every outbound connection fail
    with "No such device", so the start says so once.
    """
    if settings.interface is None:
        return None
    try:
        socket.if_nametoindex(settings.interface)
    except OSError:
        return (
            f"interface: no device {settings.interface!r} now; every outbound connection "
            "fails until it exists"
        )
    return None


def engine_config(settings: Settings, device: TunDevice, router: Router) -> EngineConfig:
    """The engine's knobs for `settings` on `device` (what it sniffs depends
    on `router`'s rules)."""
    return EngineConfig(
        connect_timeout=settings.connect_timeout,
        udp_idle_timeout=settings.udp_timeout,
        dns_hijack=settings.dns_hijack,
        dns_addresses=frozenset(ip.packed for ip in own_addresses(settings)),
        dns_upstream=settings.dns_upstream,
        splice_share=splice_share(device.mtu, offload=device.offload),
        write_burst=settings.tun_write_burst,
        sniff=sniff_config(settings, router),
    )


def _stats_endpoint(settings: Settings) -> tuple[str, int] | None:
    if not settings.stats_interval >= 0:
        raise ConfigError("stats_interval: must not be negative")
    low, high = STATS_INTERVAL_RANGE
    if settings.stats_interval != 0 and not low <= settings.stats_interval <= high:
        # 1e-300 would write summary lines as fast as the loop turns.
        raise ConfigError(
            f"stats_interval: 0 (no summary lines) or {low:g} to {high:g} seconds, "
            f"got {settings.stats_interval:g}" + seconds_hint(settings.stats_interval, low, high)
        )
    if settings.stats_listen is None:
        return None
    if settings.secret is not None and (
        not settings.secret or any(ch.isspace() for ch in settings.secret)
    ):
        raise ConfigError("secret: must be a non-empty string without spaces")
    try:
        return parse_endpoint(settings.stats_listen, any_address=bool(settings.secret))
    except ValueError as exc:
        raise ConfigError(f"stats_listen: {exc}") from exc


def check_settings(settings: Settings) -> None:
    """Check what `serve` would refuse, without opening anything.

    Raises:
        ConfigError: the message names the field.
    """
    build_router(settings, SocketOptions())
    _stats_endpoint(settings)
    for server in settings.direct_dns or ():
        network = inside(server, _excluded(settings))
        if network is not None:
            raise ConfigError(
                f"direct_dns: {server} is in {network}, which is tun2sx itself "
                "(a fake-IP pool or the TUN's network)"
            )
    if settings.fake_ip:
        _check_pools(settings)
    for field, (low, high) in (
        ("udp_timeout", UDP_TIMEOUT_RANGE),
        ("connect_timeout", CONNECT_TIMEOUT_RANGE),
    ):
        refusal = seconds_out_of_range(field, getattr(settings, field), low, high)
        if refusal is not None:
            raise ConfigError(refusal)
    if settings.mtu is not None and not 576 <= settings.mtu <= 65535:
        raise ConfigError(f"mtu: {settings.mtu} is not between 576 and 65535")
    check_queues(settings)
    check_sniff(settings)
    if not 1 <= settings.workers <= MAX_WORKERS:
        raise ConfigError(f"workers: {settings.workers} is not between 1 and {MAX_WORKERS}")
    if settings.workers > 1:
        if settings.tun_fd is not None:
            raise ConfigError("workers: an adopted TUN fd is one queue; workers need tun (a name)")
        if settings.fake_ip and settings.fake_ip_db == ":memory:":
            raise ConfigError("workers: share the fake-IP table, so fake_ip_db needs a file")


def write_burst_out_of_range(field: str, burst: int) -> str:
    """The line refusing a write burst out of range; a small number is
    most likely packets, and the line says what to write instead."""
    line = f"{field}: 0 (whole runs) or {MIN_WRITE_BURST} to {MAX_WRITE_BURST} bytes, got {burst}"
    # A byte size written with a unit ("1K") is at least 1024: not packets.
    if 0 < burst < 1024:
        kib = -(-burst * 1500 // 1024)  # rounded up: the hint is never refused
        line += f" (if that is packets of 1500 octets, write {kib}K)"
    return line


def check_queues(settings: Settings) -> None:
    """Check the queue and buffer sizes (the embedding API checks these too).

    Raises:
        ConfigError: the message names the field.
    """
    if isinstance(settings.tun_txqueuelen, bool) or not isinstance(settings.tun_txqueuelen, int):
        raise ConfigError(f"tun_txqueuelen: expected an integer, got {settings.tun_txqueuelen!r}")
    if not 1 <= settings.tun_txqueuelen <= MAX_TXQUEUELEN:
        raise ConfigError(
            f"tun_txqueuelen: {settings.tun_txqueuelen} is not between 1 and {MAX_TXQUEUELEN}"
        )
    burst = settings.tun_write_burst
    if isinstance(burst, bool) or not isinstance(burst, int):
        raise ConfigError(f"tun_write_burst: expected bytes, got {burst!r}")
    if burst != 0 and not MIN_WRITE_BURST <= burst <= MAX_WRITE_BURST:
        raise ConfigError(write_burst_out_of_range("tun_write_burst", burst))
    if isinstance(settings.udp_buffer, bool) or not isinstance(settings.udp_buffer, int):
        raise ConfigError(f"udp_buffer: expected bytes, got {settings.udp_buffer!r}")
    if settings.udp_buffer != 0 and not MIN_UDP_BUFFER <= settings.udp_buffer <= MAX_UDP_BUFFER:
        raise ConfigError(
            f"udp_buffer: {settings.udp_buffer} is not 0 (kernel default) or between "
            f"{MIN_UDP_BUFFER} and {MAX_UDP_BUFFER} bytes"
        )


def check_sniff(settings: Settings) -> None:
    """Check the sniffing settings.

    Raises:
        ConfigError: the message names the field.
    """
    if settings.sniff not in SNIFF_MODES:
        raise ConfigError(f"sniff: expected {', '.join(SNIFF_MODES)}, got {settings.sniff!r}")
    timeout = settings.sniff_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"sniff_timeout: expected seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_SNIFF_TIMEOUT:
        raise ConfigError(
            f"sniff_timeout: {timeout} is not above 0 and at most {MAX_SNIFF_TIMEOUT:g} s"
        )


def sniff_config(settings: Settings, router: Router) -> SniffConfig:
    """What the engine sniffs. In "route" mode a name changes nothing unless
    a domain rule can match it, so without one nothing is sniffed and every
    SYN stays held until the outbound answers (errors keep their ICMP)."""
    mode = settings.sniff
    if mode == "route" and not any(rule.kind.startswith("DOMAIN") for rule in router.rules.rules):
        mode = "off"
    return SniffConfig(
        mode=mode,
        timeout=settings.sniff_timeout,
        http_ports=settings.sniff_http_ports,
        tls_ports=settings.sniff_tls_ports,
        quic_ports=settings.sniff_quic_ports,
        fake_ip=settings.sniff_fake_ip,
    )


@contextlib.contextmanager
def routes(settings: Settings, device_name: str, fwmark: int | None) -> Iterator[None]:
    """The auto_route context when asked for; nothing otherwise."""
    if not settings.auto_route:
        yield
        return
    assert fwmark is not None  # effective_fwmark always gives one under auto_route
    # Imported here: only a run that changes routes needs it.
    from tun2sx.control.autoroute import auto_route

    log.info("tun2sx: routing traffic into %s (outbound sockets marked %#x)", device_name, fwmark)
    with auto_route(device_name, fwmark=fwmark):
        yield


def _excluded(settings: Settings) -> list[IPNetwork]:
    pools = (settings.fake_ip_range, settings.fake_ip_range6)
    return excluded_networks(settings.fake_ip, pools, settings.tun_addresses)


# The first addresses of each pool are kept for the gateway and the DNS
# server users point their resolver at (198.18.0.1, .2, ...).
RESERVED_PER_POOL = 3


def splice_share(mtu: int, *, offload: bool) -> int:
    """Bytes a flow reads at once while others are active (EngineConfig).

    Writing them on costs per packet: with offload 64 KiB is one
    super-segment, without it 64 KiB at MTU 1500 is 45 writes, about a
    millisecond that every other flow waits. So without offload the share
    is about a dozen packets (16 KiB at MTU 1500; 64 KiB from MTU ~5500).
    """
    if offload:
        return 64 * 1024
    return min(64 * 1024, max(16 * 1024, 12 * (mtu - 40)))


def own_addresses(settings: Settings) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """tun2sx's own addresses in the TUN: never fake IPs, always answering DNS.

    The first `RESERVED_PER_POOL` addresses of each pool are kept for the
    gateway and the DNS server users point their resolver at (198.18.0.1,
    .2, .3), and the `tun_addresses` are the device's.
    """
    v4, v6 = settings.fake_ip_range, settings.fake_ip_range6
    own = [
        net.network_address + i
        for net in (v4, v6)
        if net is not None
        for i in range(1, RESERVED_PER_POOL + 1)
    ]
    own += [ipaddress.ip_interface(cidr).ip for cidr in settings.tun_addresses]
    return tuple(own)


def _check_pools(settings: Settings) -> None:
    """Each pool must keep an address for fake IPs after the reserved ones."""
    reserved = own_addresses(settings)
    for field, pool in (
        ("fake_ip_range", settings.fake_ip_range),
        ("fake_ip_range6", settings.fake_ip_range6),
    ):
        if pool is None:
            continue
        if pool_capacity(pool, reserved) < 1:
            # Network address, three reserved, the last one: 5 of a /29's 8.
            smallest = pool.max_prefixlen - 3
            raise ConfigError(
                f"{field}: {pool} leaves no address for fake IPs (its network and last "
                f"address, the first {RESERVED_PER_POOL} and the TUN's addresses are never "
                f"handed out); use at least a /{smallest}"
            )


def _table_in_use(path: str) -> ConfigError:
    return ConfigError(
        f"fake_ip_db: {path} is in use by another tun2sx (it holds {path}.lock); "
        f"stop that one, or give each its own fake_ip_db (--fake-ip-db)"
    )


def lock_fake_ip_table(settings: Settings) -> int | None:
    """The workers' parent's shared lock on the fake-IP table's file.

    Taken before the TUN is opened, so that a table a single tun2sx keeps
    is refused in one line with nothing set up; the workers inherit it, and
    while the parent (or any worker) lives, no single process migrates the
    database away (tun2sx.naming.journal.lock_table).

    Returns:
        The descriptor to close at exit, or None (no table file, or a
        directory where the lock file cannot be made).

    Raises:
        ConfigError: another tun2sx keeps the table as a single process.
    """
    path = settings.fake_ip_db
    if not settings.fake_ip or path == ":memory:":
        return None
    # The state directory, made on first start as _fake_ip_store would;
    # where that fails, the store's own line says why.
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        return lock_table(path, shared=True)
    except TableInUseError:
        raise _table_in_use(path) from None


def _fake_ip_store(settings: Settings, shared: bool) -> tuple[FakeIpStore, FakeDns]:
    v4, v6 = settings.fake_ip_range, settings.fake_ip_range6
    path = settings.fake_ip_db
    try:
        if path != ":memory:":
            # A state directory, made on first start as a daemon's would be.
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        store = FakeIpStore(
            path=path,
            v4_pool=str(v4),
            v6_pool=None if v6 is None else str(v6),
            reserved=own_addresses(settings),
            shared=shared,
        )
    except TableInUseError:
        raise _table_in_use(path) from None
    except (OSError, FakeIpStoreError) as exc:
        hint = ""
        if os.geteuid() != 0:
            hint = (
                f" (not running as root: point fake_ip_db, --fake-ip-db, at a file "
                f"uid {os.geteuid()} may write, or use :memory:)"
            )
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"fake_ip_db: cannot open {path}: {reason}{hint}") from exc
    return store, FakeDns(store, FakeIpFilter(settings.fake_ip_filter))


async def serve(
    settings: Settings,
    *,
    device: TunDevice | None = None,
    protect: Callable[[int], bool] | None = None,
    handle_signals: bool = True,
    shared_fake_ip: bool = False,
    source: ConfigSource | None = None,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run tun2sx until cancelled (or SIGINT/SIGTERM when `handle_signals`).

    With `handle_signals`, SIGHUP reads the configuration again from
    `source` (tun2sx.control.reload).

    Args:
        settings: the configuration.
        device: a device to use instead of opening the one settings name.
        protect: called with every outbound socket's fd before it connects
            (Android's VpnService.protect), so it bypasses the TUN.
        handle_signals: stop on SIGINT/SIGTERM (only in the main thread).
        shared_fake_ip: other processes (workers) use the same fake-IP
            table at the same time.
        source: where `settings` came from, to read them again on SIGHUP.
        task_status: receives the running `Engine` once serving.

    Raises:
        ConfigError: a setting is wrong.
        TunError: the device cannot be opened, or went away while serving.
    """
    if not handle_signals:
        await _serve(settings, device, protect, shared_fake_ip, source, None, task_status)
        return
    # Open for the whole run, shutdown included: a second SIGINT/SIGTERM
    # (Ctrl-C reaches every worker, and the parent relays SIGTERM too) is
    # then absorbed instead of killing the process halfway through closing.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        await _serve(settings, device, protect, shared_fake_ip, source, signals, task_status)


async def _serve(
    settings: Settings,
    device: TunDevice | None,
    protect: Callable[[int], bool] | None,
    shared_fake_ip: bool,
    source: ConfigSource | None,
    signals: AsyncIterator[int] | None,
    task_status: trio.TaskStatus[Engine],
) -> None:
    if settings.workers != 1:
        # Several processes are the command line's business (tun2sx.control.workers);
        # an embedder runs one engine on one TUN.
        raise ConfigError(
            f"workers: {settings.workers} needs the tun2sx command; serve() runs one process"
        )
    fwmark = effective_fwmark(settings)
    routing = open_routing(settings, protect)
    router = routing.router
    stats_endpoint = _stats_endpoint(settings)
    store = dns = None
    engine: Engine | None = None
    try:
        if device is None:
            device = open_device(settings)
        # After the device: without the rights to open it, that is the
        # message to read, not a complaint about the table's file.
        if settings.fake_ip:
            store, dns = _fake_ip_store(settings, shared_fake_ip)
        # The MTU less the IP and TCP headers of each family.
        mss4, mss6 = max(536, device.mtu - 40), max(536, device.mtu - 60)
        stack = NetStack(
            NetStackConfig(
                # With offload the kernel cuts our 64 KB segments (GSO): one
                # Python iteration then moves 64 KB instead of one MTU.
                tcp=TcpConfig(
                    mss=mss4, mss_ipv6=mss6, gso_size=GSO_SIZE if device.offload else None
                ),
                partial_checksum=device.offload,
                trusted_sources=_trusted_sources(settings),
                mtu=device.mtu,
            )
        )
        engine = Engine(
            device,
            stack,
            router,
            fakeip=store,
            dns=dns,
            config=engine_config(settings, device, router),
        )
        log.info(
            "tun2sx: serving %s (mtu %d, offload %s) via %r, %d rules",
            device.name,
            device.mtu,
            "on" if device.offload else "off",
            router.default,
            len(router.rules.rules),
        )
        try:
            with routes(settings, device.name, fwmark):
                # Bound before the nursery, so a busy port is a plain
                # ConfigError rather than an exception group.
                listeners = []
                if stats_endpoint is not None:
                    try:
                        listeners = await open_stats_listeners(
                            *stats_endpoint, any_address=bool(settings.secret)
                        )
                    except OSError as exc:
                        raise ConfigError(f"stats_listen: {exc}") from exc
                # Imported here: it builds with this module's functions.
                from tun2sx.control.reload import Reloader

                reloader = Reloader(engine, settings, source, routing, protect)
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(engine.run)
                        await nursery.start(reloader.run)
                        if listeners:
                            # Here, not at the top: h11, wsproto and json
                            # load only for runs that serve the API.
                            from tun2sx.control.controller import (
                                Controller,
                                serve_controller,
                            )

                            controller = Controller(
                                engine,
                                secret=settings.secret,
                                reload=reloader.areload,
                                log_level=_clash_level(),
                            )
                            await nursery.start(serve_controller, controller, listeners)
                        if settings.stats_interval > 0:
                            nursery.start_soon(log_summaries, engine, settings.stats_interval)
                        if signals is not None:
                            nursery.start_soon(_on_signals, signals, nursery.cancel_scope, reloader)
                        task_status.started(engine)
                        release_free_pages()  # start-up's garbage (tun2sx.control.heap)
                except BaseExceptionGroup as group:
                    # The device going away ends the engine with a TunError
                    # wrapped in the nurseries' groups: hand it over bare,
                    # so the caller can report one line instead of a trace.
                    gone = _only_tun_error(group)
                    if gone is None:
                        raise
                    raise gone from gone.__cause__
        finally:
            log.info("tun2sx: stopped; %s", engine.statistics())
            # ?preconnect=1's ready connections, of the first routing and of
            # the one a reload put in place (replaced ones close on retiring).
            for used in (router, engine.router):
                for outbound in (used.default, *used.outbounds.values()):
                    if isinstance(outbound, Socks5Outbound):
                        outbound.close_spare()
    finally:
        if device is not None:
            try:
                if engine is not None:
                    engine.refuse_unread()
            finally:
                device.close()
        if store is not None:
            store.close()


def _clash_level() -> str:
    level = logging.getLogger("tun2sx").getEffectiveLevel()
    for name, number in (("debug", 10), ("info", 20), ("warning", 30), ("error", 40)):
        if level <= number:
            return name
    return "silent"


def _only_tun_error(group: BaseExceptionGroup[BaseException]) -> TunError | None:
    """The TunError in `group` when nothing else is in it, else None."""
    matched, rest = group.split(TunError)
    if matched is None or rest is not None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, TunError)
    return leaf


async def _on_signals(
    signals: AsyncIterator[int], scope: trio.CancelScope, reloader: Reloader
) -> None:
    """SIGHUP reloads the configuration; SIGINT or SIGTERM stops."""
    async for signum in signals:
        if signum == signal.SIGHUP:
            log.info("tun2sx: SIGHUP, reading the configuration again")
            await reloader.areload()
            continue
        log.info("tun2sx: %s, shutting down", signal.Signals(signum).name)
        scope.cancel()
        return
