"""The application: from `Settings` to a running engine, and back down.

`Settings` is the whole configuration as one checked value; the command
line builds it from flags (and, later, a config file), the embedding API
from its arguments. `serve` opens (or adopts) the TUN, builds the fake-IP
store, DNS, router, stack and engine, runs until cancelled or signalled,
and releases everything on the way out.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from collections.abc import Callable

import attrs
import trio

from outbounds.base import Destination
from outbounds.net import SocketOptions
from outbounds.url import parse_outbound_url
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from tun2sx.dns import FakeDns
from tun2sx.engine import Engine, EngineConfig
from tun2sx.fakeip import FakeIpFilter, FakeIpStore
from tun2sx.router import Router
from tun2sx.tun import TunDevice, adopt_tun, open_tun

log = logging.getLogger("tun2sx")

DEFAULT_MTU = 9000
GSO_SIZE = 64000
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_POOL4 = ipaddress.IPv4Network("198.18.0.0/15")
DEFAULT_POOL6 = ipaddress.IPv6Network("fc00::/18")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


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
        outbound: the default outbound's URL.
        fwmark: SO_MARK for every outbound socket.
        interface: SO_BINDTODEVICE for every outbound socket.
        fake_ip: answer DNS with fake IPs.
        fake_ip_range / fake_ip_range6: the pools (v6 None: no AAAA).
        fake_ip_db: SQLite file of the fake-IP table (":memory:": none).
        fake_ip_filter: names resolved for real instead.
        dns_upstream: resolver for what is not answered with a fake IP.
        dns_hijack: answer every port-53 query ourselves.
        udp_timeout: UDP session idle timeout, seconds.
        connect_timeout: outbound connect timeout, seconds.
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
    udp_timeout: float = 60.0
    connect_timeout: float = 10.0


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
    )


def build_router(settings: Settings, socket_options: SocketOptions) -> Router:
    """The router: the default outbound (rules come from the config)."""
    try:
        outbound = parse_outbound_url(settings.outbound, socket_options)
    except ValueError as exc:
        raise ConfigError(f"outbound: {exc}") from exc
    return Router(outbound)


def _fake_ip_store(settings: Settings) -> tuple[FakeIpStore, FakeDns]:
    v4, v6 = settings.fake_ip_range, settings.fake_ip_range6
    # The first addresses of each pool are kept for the gateway and the
    # DNS server users point their resolver at (198.18.0.1, .2, ...).
    reserved: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        net.network_address + i for net in (v4, v6) if net is not None for i in range(1, 4)
    ]
    reserved += [ipaddress.ip_interface(cidr).ip for cidr in settings.tun_addresses]
    store = FakeIpStore(
        path=settings.fake_ip_db,
        v4_pool=str(v4),
        v6_pool=None if v6 is None else str(v6),
        reserved=tuple(reserved),
    )
    return store, FakeDns(store, FakeIpFilter(settings.fake_ip_filter))


async def serve(
    settings: Settings,
    *,
    device: TunDevice | None = None,
    protect: Callable[[int], bool] | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run tun2sx until cancelled (or SIGINT/SIGTERM when `handle_signals`).

    Args:
        settings: the configuration.
        device: a device to use instead of opening the one settings name.
        protect: called with every outbound socket's fd before it connects
            (Android's VpnService.protect), so it bypasses the TUN.
        handle_signals: stop on SIGINT/SIGTERM (only in the main thread).
        task_status: receives the running `Engine` once serving.

    Raises:
        ConfigError: a setting is wrong.
        TunError: the device cannot be opened.
    """
    socket_options = SocketOptions(
        fwmark=settings.fwmark,
        interface=settings.interface,
        protect=protect,
        connect_timeout=settings.connect_timeout,
    )
    router = build_router(settings, socket_options)
    store = dns = None
    if settings.fake_ip:
        store, dns = _fake_ip_store(settings)
    try:
        if device is None:
            device = open_device(settings)
        mss = max(536, device.mtu - 60)
        stack = NetStack(
            NetStackConfig(
                # With offload the kernel cuts our 64 KB segments (GSO): one
                # Python iteration then moves 64 KB instead of one MTU.
                tcp=TcpConfig(mss=mss, gso_size=GSO_SIZE if device.offload else None),
                partial_checksum=device.offload,
            )
        )
        engine = Engine(
            device,
            stack,
            router,
            fakeip=store,
            dns=dns,
            config=EngineConfig(
                connect_timeout=settings.connect_timeout,
                udp_idle_timeout=settings.udp_timeout,
                dns_hijack=settings.dns_hijack,
                dns_upstream=settings.dns_upstream,
            ),
        )
        log.info(
            "tun2sx: serving %s (mtu %d, offload %s) via %r",
            device.name,
            device.mtu,
            "on" if device.offload else "off",
            router.default,
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                if handle_signals:
                    nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                task_status.started(engine)
        finally:
            log.info("tun2sx: stopped; %s", engine.statistics())
    finally:
        if device is not None:
            device.close()
        if store is not None:
            store.close()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("tun2sx: %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
