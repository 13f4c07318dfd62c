"""The `tun2sx` command line: parse flags, build the pieces, serve.

    tun2sx --tun tun0 --socks 127.0.0.1:1080
    tun2sx --tun-fd 3 --proxy socks5://user:pass@10.0.0.1:1080
    tun2sx demo

A bad flag value ends the program with one line naming the flag; nothing
starts half-configured.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import resource
import signal
import sys
from collections.abc import Sequence

import trio

from outbounds.base import Destination, Outbound
from outbounds.direct import DirectOutbound
from outbounds.net import SocketOptions
from outbounds.socks5 import Socks5Outbound, parse_socks5_url
from stack.netstack import NetStack, NetStackConfig
from stack.tcp import TcpConfig
from tun2sx.engine import Engine, EngineConfig
from tun2sx.router import Router
from tun2sx.tun import TunDevice, TunError, adopt_tun, open_tun

log = logging.getLogger("tun2sx")

DEFAULT_MTU = 9000
GSO_SIZE = 64000


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tun2sx",
        description="Proxy everything routed into a TUN device through SOCKS5 or direct.",
    )
    tun = p.add_mutually_exclusive_group()
    tun.add_argument("--tun", metavar="NAME", help="TUN device to open (created if missing)")
    tun.add_argument("--tun-fd", metavar="N", type=int, help="adopt an already-open TUN fd")
    p.add_argument("--mtu", type=int, help=f"set the TUN MTU (default {DEFAULT_MTU} on --tun)")
    p.add_argument(
        "--tun-address",
        metavar="CIDR",
        action="append",
        default=[],
        help="add an address to the TUN (repeatable), e.g. 198.18.0.1/15",
    )
    p.add_argument("--no-offload", action="store_true", help="no virtio-net header / TSO offload")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--socks", metavar="HOST:PORT", help="SOCKS5 proxy without authentication")
    out.add_argument(
        "--proxy", metavar="URL", help="outbound URL: socks5://[user:pass@]host:port or direct://"
    )
    p.add_argument("--fwmark", type=lambda s: int(s, 0), help="SO_MARK for outbound sockets")
    p.add_argument("--interface", help="bind outbound sockets to this interface")
    p.add_argument("--fake-ip-range", default="198.18.0.0/15", help="IPv4 fake-IP pool")
    p.add_argument(
        "--fake-ip-range6", default="fc00::/18", help="IPv6 fake-IP pool, or 'none' for no AAAA"
    )
    p.add_argument(
        "--fake-ip-db",
        default="/var/lib/tun2sx/fakeip.sqlite",
        help="where the fake-IP table persists (':memory:' to not persist)",
    )
    p.add_argument(
        "--fake-ip-filter",
        action="append",
        default=[],
        metavar="PATTERN",
        help="names resolved for real instead (+.lan, *.example.com, exact); repeatable",
    )
    p.add_argument("--no-fake-ip", action="store_true", help="no fake-IP DNS at all")
    p.add_argument(
        "--dns-upstream",
        default="1.1.1.1:53",
        metavar="HOST:PORT",
        help="resolver for queries not answered with a fake IP (reached through the outbound)",
    )
    p.add_argument("--no-dns-hijack", action="store_true", help="do not answer port 53 ourselves")
    p.add_argument("--udp-timeout", type=float, default=60.0, help="UDP session idle timeout (s)")
    p.add_argument(
        "--connect-timeout", type=float, default=10.0, help="outbound connect timeout (s)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def parse_endpoint(value: str, field: str) -> Destination:
    """`host:port` or `[v6]:port` to a Destination; ConfigError names `field`."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{field}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port = int(port_text)
        return Destination.parse_host(host, port)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc


def build_outbound(args: argparse.Namespace) -> Outbound:
    opts = SocketOptions(fwmark=args.fwmark, interface=args.interface)
    if args.socks:
        dest = parse_endpoint(args.socks, "--socks")
        return Socks5Outbound(str(dest.host), dest.port, socket_options=opts)
    if args.proxy:
        url = args.proxy
        if url.startswith("direct://") or url == "direct":
            return DirectOutbound(socket_options=opts)
        if url.startswith(("socks5://", "socks5h://")):
            try:
                return parse_socks5_url(url, opts)
            except ValueError as exc:
                raise ConfigError(f"--proxy: {exc}") from exc
        raise ConfigError(f"--proxy: unsupported scheme in {url!r} (socks5://, direct://)")
    raise ConfigError("an outbound is required: --socks HOST:PORT or --proxy URL")


def _network(value: str, field: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    if net.version != version:
        raise ConfigError(f"{field}: {value} is not an IPv{version} network")
    return net


def open_device(args: argparse.Namespace) -> TunDevice:
    if args.tun_fd is not None:
        return adopt_tun(args.tun_fd, mtu=args.mtu or 1500)
    if not args.tun:
        raise ConfigError("a TUN device is required: --tun NAME or --tun-fd N")
    return open_tun(
        args.tun,
        mtu=args.mtu or DEFAULT_MTU,
        offload=not args.no_offload,
        addresses=tuple(args.tun_address),
    )


async def serve(args: argparse.Namespace) -> None:
    """Build everything from parsed flags and serve until SIGINT/SIGTERM."""
    from tun2sx.dns import FakeDns
    from tun2sx.fakeip import FakeIpFilter, FakeIpStore

    outbound = build_outbound(args)
    upstream = parse_endpoint(args.dns_upstream, "--dns-upstream")
    v4 = _network(args.fake_ip_range, "--fake-ip-range", 4)
    v6 = (
        None
        if args.fake_ip_range6 == "none"
        else _network(args.fake_ip_range6, "--fake-ip-range6", 6)
    )
    if args.udp_timeout <= 0:
        raise ConfigError("--udp-timeout: must be positive")
    if args.connect_timeout <= 0:
        raise ConfigError("--connect-timeout: must be positive")
    store = dns = None
    if not args.no_fake_ip:
        # The first addresses of each pool are kept for the gateway and the
        # DNS server users point their resolver at (198.18.0.1, .2, ...).
        reserved: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
            net.network_address + i for net in (v4, v6) if net is not None for i in range(1, 4)
        ]
        reserved += [ipaddress.ip_interface(cidr).ip for cidr in args.tun_address]
        store = FakeIpStore(
            path=args.fake_ip_db,
            v4_pool=str(v4),
            v6_pool=None if v6 is None else str(v6),
            reserved=tuple(reserved),
        )
        dns = FakeDns(store, FakeIpFilter(args.fake_ip_filter))
    device = open_device(args)
    mss = max(536, device.mtu - 60)
    stack = NetStack(NetStackConfig(tcp=TcpConfig(mss=mss), partial_checksum=device.offload))
    engine = Engine(
        device,
        stack,
        Router(outbound),
        fakeip=store,
        dns=dns,
        config=EngineConfig(
            connect_timeout=args.connect_timeout,
            udp_idle_timeout=args.udp_timeout,
            dns_hijack=not args.no_dns_hijack,
            dns_upstream=upstream,
        ),
    )
    log.info(
        "tun2sx: serving %s (mtu %d, offload %s) via %r",
        device.name,
        device.mtu,
        "on" if device.offload else "off",
        outbound,
    )
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)

                async def wait_signal() -> None:
                    async for signum in signals:
                        log.info("tun2sx: %s, shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(wait_signal)
    finally:
        device.close()
        if store is not None:
            store.close()
        log.info("tun2sx: stopped; %s", engine.statistics())


def raise_fd_limit() -> None:
    """Every proxied flow holds an outbound socket: lift the soft fd limit
    to the hard one, so the default 1024 does not cap the flow count."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from tun2sx.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    try:
        trio.run(serve, args)
    except ConfigError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 2
    except TunError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 1
    return 0
