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
import sys
from collections.abc import Sequence

import trio

from outbounds.base import Destination
from outbounds.url import parse_outbound_url
from tun2sx.app import DEFAULT_MTU, ConfigError, Settings, serve
from tun2sx.tun import TunError

log = logging.getLogger("tun2sx")


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


def outbound_url(args: argparse.Namespace) -> str:
    """The default outbound's URL from --socks or --proxy."""
    if args.socks:
        dest = parse_endpoint(args.socks, "--socks")
        host = f"[{dest.host}]" if ":" in str(dest.host) else str(dest.host)
        return f"socks5://{host}:{dest.port}"
    if args.proxy:
        return str(args.proxy)
    raise ConfigError("an outbound is required: --socks HOST:PORT or --proxy URL")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Check every flag and build the settings; ConfigError names the flag."""
    url = outbound_url(args)
    field = "--socks" if args.socks else "--proxy"
    try:
        parse_outbound_url(url)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    upstream = parse_endpoint(args.dns_upstream, "--dns-upstream")
    v4 = _network(args.fake_ip_range, "--fake-ip-range", 4)
    v6 = (
        None
        if args.fake_ip_range6 == "none"
        else _network(args.fake_ip_range6, "--fake-ip-range6", 6)
    )
    for cidr in args.tun_address:
        try:
            ipaddress.ip_interface(cidr)
        except ValueError as exc:
            raise ConfigError(f"--tun-address: {exc}") from exc
    if args.udp_timeout <= 0:
        raise ConfigError("--udp-timeout: must be positive")
    if args.connect_timeout <= 0:
        raise ConfigError("--connect-timeout: must be positive")
    if args.mtu is not None and not 576 <= args.mtu <= 65535:
        raise ConfigError(f"--mtu: {args.mtu} is not between 576 and 65535")
    if args.tun_fd is None and not args.tun:
        raise ConfigError("a TUN device is required: --tun NAME or --tun-fd N")
    return Settings(
        tun=args.tun,
        tun_fd=args.tun_fd,
        mtu=args.mtu,
        tun_addresses=tuple(args.tun_address),
        offload=not args.no_offload,
        outbound=url,
        fwmark=args.fwmark,
        interface=args.interface,
        fake_ip=not args.no_fake_ip,
        fake_ip_range=v4,
        fake_ip_range6=v6,
        fake_ip_db=args.fake_ip_db,
        fake_ip_filter=tuple(args.fake_ip_filter),
        dns_upstream=upstream,
        dns_hijack=not args.no_dns_hijack,
        udp_timeout=args.udp_timeout,
        connect_timeout=args.connect_timeout,
    )


def _network(value: str, field: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc
    if net.version != version:
        raise ConfigError(f"{field}: {value} is not an IPv{version} network")
    return net


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
        settings = settings_from_args(args)
        trio.run(serve, settings)
    except ConfigError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 2
    except TunError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 1
    return 0
