"""The `tun2sx` command line: parse flags, build the pieces, serve.

    tun2sx --tun tun0 --socks 127.0.0.1:1080
    tun2sx --tun-fd 3 --proxy socks5://user:pass@10.0.0.1:1080
    tun2sx --config /etc/tun2sx.toml --auto-route
    tun2sx check-config /etc/tun2sx/config.toml
    tun2sx service-unit > /etc/systemd/system/tun2sx.service
    tun2sx demo

Flags are the quick path; a TOML file (`--config`, see tun2sx.control.config) holds
named outbounds and rules. A flag given on the command line overrides the
file's value, so flags default to None here and only the ones given are
applied. A bad value ends the program with one line naming the flag or key;
nothing starts half-configured. SIGHUP reads the file again, with the same
flags over it (tun2sx.control.reload).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import math
import os
import resource
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from outbounds.base import Destination
from outbounds.url import parse_outbound_url
from tun2sx.control.app import (
    DEFAULT_AUTO_ROUTE_FWMARK,
    DEFAULT_MTU,
    DEFAULT_STATS_INTERVAL,
    MAX_TXQUEUELEN,
    MAX_UDP_BUFFER,
    MAX_WRITE_BURST,
    MIN_UDP_BUFFER,
    MIN_WRITE_BURST,
    ConfigError,
    Settings,
    check_settings,
    lock_fake_ip_table,
    missing_interface,
    serve,
    write_burst_out_of_range,
)
from tun2sx.control.autoroute import AutoRouteError
from tun2sx.control.config import load_config, nameservers, parse_size, parse_workers
from tun2sx.control.reload import ConfigSource
from tun2sx.control.stats import parse_endpoint as parse_listen
from tun2sx.dataplane.tun import TunDevice, TunError

log = logging.getLogger("tun2sx")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tun2sx",
        description=(
            "Proxy everything routed into a TUN device through SOCKS5, SOCKS4, HTTP CONNECT, "
            "Shadowsocks or direct outbounds, chosen per flow by rules."
        ),
        epilog=(
            "other commands: 'tun2sx check-config FILE [FLAGS]' checks a configuration "
            "without starting; 'tun2sx service-unit' prints the systemd unit; "
            "'tun2sx demo' runs the whole path in a private namespace lab. "
            "SIGHUP reloads the --config file."
        ),
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML config file (docs/config.md); flags override it"
    )
    tun = p.add_mutually_exclusive_group()
    tun.add_argument("--tun", metavar="NAME", help="TUN device to open (created if missing)")
    tun.add_argument("--tun-fd", metavar="N", type=int, help="adopt an already-open TUN fd")
    p.add_argument("--mtu", type=int, help=f"set the TUN MTU (default {DEFAULT_MTU} on --tun)")
    p.add_argument(
        "--tun-address",
        metavar="CIDR",
        action="append",
        help="add an address to the TUN (repeatable), e.g. 198.18.0.1/15",
    )
    p.add_argument("--no-offload", action="store_true", help="no virtio-net header / TSO offload")
    p.add_argument(
        "--trust-local-checksums",
        action="store_true",
        help="skip checksum checks of packets from the TUN's own addresses (local applications)",
    )
    p.add_argument(
        "--tun-txqueuelen",
        metavar="N",
        type=int,
        help="the kernel's queue of packets for tun2sx, set on --tun (default 10000)",
    )
    p.add_argument(
        "--tun-write-burst",
        metavar="BYTES",
        help="bytes a flow writes to the TUN per step while other flows are active "
        '("48K" default; 0: whole runs, more throughput, slower round trips beside a download)',
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--socks", metavar="HOST:PORT", help="SOCKS5 proxy without authentication")
    out.add_argument(
        "--proxy",
        metavar="URL",
        help="outbound URL: socks5://[user:pass@]host:port, http://..., socks4[a]://..., ss://..., direct://",
    )
    p.add_argument("--fwmark", type=lambda s: int(s, 0), help="SO_MARK for outbound sockets")
    p.add_argument("--interface", help="bind outbound sockets to this interface")
    p.add_argument(
        "--auto-route",
        action="store_true",
        help="route this host's traffic into the TUN while running "
        f"(outbound sockets get --fwmark, default {DEFAULT_AUTO_ROUTE_FWMARK:#x})",
    )
    p.add_argument("--fake-ip-range", help="IPv4 fake-IP pool (default 198.18.0.0/15)")
    p.add_argument(
        "--fake-ip-range6", help="IPv6 fake-IP pool (default fc00::/18), or 'none' for no AAAA"
    )
    p.add_argument(
        "--fake-ip-db",
        help="the file the fake-IP table persists in (default "
        "/var/lib/tun2sx/fakeip.sqlite; ':memory:' to not persist)",
    )
    p.add_argument(
        "--fake-ip-filter",
        action="append",
        metavar="PATTERN",
        help="names resolved for real instead (+.lan, *.example.com, exact); repeatable",
    )
    p.add_argument("--no-fake-ip", action="store_true", help="no fake-IP DNS at all")
    p.add_argument(
        "--dns-upstream",
        metavar="HOST:PORT",
        help="resolver for queries not answered with a fake IP, reached through the "
        "outbound (default 1.1.1.1:53)",
    )
    p.add_argument("--no-dns-hijack", action="store_true", help="do not answer port 53 ourselves")
    p.add_argument(
        "--direct-dns",
        metavar="ADDR[:PORT],...",
        action="append",
        help="DNS servers the DIRECT outbound resolves host names with, asked directly "
        "(default: the nameservers of /etc/resolv.conf that are not tun2sx itself); repeatable",
    )
    p.add_argument("--udp-timeout", type=float, help="UDP session idle timeout (s, default 60)")
    p.add_argument("--connect-timeout", type=float, help="outbound connect timeout (s, default 10)")
    p.add_argument(
        "--udp-buffer",
        metavar="BYTES",
        help='send and receive buffer of each outbound UDP socket ("4M" default; 0: kernel\'s)',
    )
    p.add_argument(
        "--stats-listen",
        "--controller",
        dest="stats_listen",
        metavar="HOST:PORT",
        help="serve the stats, the controller API (Clash-compatible), /metrics and /ui "
        "on this address (off by default; loopback unless --secret is set)",
    )
    p.add_argument(
        "--secret",
        metavar="TOKEN",
        help="the controller API's Bearer token (dashboards ask for it)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        metavar="S",
        help=f"seconds between summary log lines (default {DEFAULT_STATS_INTERVAL:g}; 0: none)",
    )
    p.add_argument(
        "--sniff",
        choices=("off", "route", "override"),
        help="read TLS SNI, HTTP Host and QUIC SNI of flows to real addresses: for the "
        "rules (route, the default, when a domain rule exists) or also as the proxy's "
        "destination (override)",
    )
    p.add_argument(
        "--sniff-timeout",
        type=float,
        metavar="S",
        help="longest wait for a flow's first bytes when sniffing (s, default 0.3)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        help='processes serving a multi-queue TUN, one core each ("auto": one per CPU; default 1)',
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
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


def outbound_url(args: argparse.Namespace) -> str | None:
    """The default outbound's URL from --socks or --proxy (None: neither given)."""
    if args.socks:
        dest = parse_endpoint(args.socks, "--socks")
        host = f"[{dest.host}]" if ":" in str(dest.host) else str(dest.host)
        return f"socks5://{host}:{dest.port}"
    if args.proxy:
        return str(args.proxy)
    return None


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings fields the given flags set, each checked; ConfigError names the flag."""
    values: dict[str, Any] = {}
    url = outbound_url(args)
    if url is not None:
        field = "--socks" if args.socks else "--proxy"
        try:
            parse_outbound_url(url)
        except ValueError as exc:
            raise ConfigError(f"{field}: {exc}") from exc
        values["outbound"] = url
    # The two ways of naming the device exclude each other across file and flags.
    if args.tun is not None:
        values.update(tun=args.tun, tun_fd=None)
    if args.tun_fd is not None:
        values.update(tun=None, tun_fd=args.tun_fd)
    if args.mtu is not None:
        if not 576 <= args.mtu <= 65535:
            raise ConfigError(f"--mtu: {args.mtu} is not between 576 and 65535")
        values["mtu"] = args.mtu
    if args.tun_address is not None:
        for cidr in args.tun_address:
            try:
                ipaddress.ip_interface(cidr)
            except ValueError as exc:
                raise ConfigError(f"--tun-address: {exc}") from exc
        values["tun_addresses"] = tuple(args.tun_address)
    if args.dns_upstream is not None:
        values["dns_upstream"] = parse_endpoint(args.dns_upstream, "--dns-upstream")
    if args.direct_dns is not None:
        values["direct_dns"] = nameservers("--direct-dns", ",".join(args.direct_dns))
    if args.fake_ip_range is not None:
        values["fake_ip_range"] = _network(args.fake_ip_range, "--fake-ip-range", 4)
    if args.fake_ip_range6 is not None:
        values["fake_ip_range6"] = (
            None
            if args.fake_ip_range6 == "none"
            else _network(args.fake_ip_range6, "--fake-ip-range6", 6)
        )
    for flag, field in (("--udp-timeout", "udp_timeout"), ("--connect-timeout", "connect_timeout")):
        value = getattr(args, field)
        if value is not None:
            if not value > 0:
                raise ConfigError(f"{flag}: must be positive")
            if not math.isfinite(value):
                raise ConfigError(f"{flag}: not a finite number of seconds")
            values[field] = value
    if args.stats_interval is not None:
        if not args.stats_interval >= 0:
            raise ConfigError("--stats-interval: must not be negative")
        if not math.isfinite(args.stats_interval):
            raise ConfigError("--stats-interval: not a finite number of seconds")
        values["stats_interval"] = args.stats_interval
    if args.stats_listen is not None:
        try:
            parse_listen(args.stats_listen, any_address=True)
        except ValueError as exc:
            raise ConfigError(f"--stats-listen: {exc}") from exc
        values["stats_listen"] = args.stats_listen
    if args.secret is not None:
        values["secret"] = args.secret
    for field in ("fwmark", "interface", "fake_ip_db"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if args.fake_ip_filter is not None:
        values["fake_ip_filter"] = tuple(args.fake_ip_filter)
    if args.workers is not None:
        values["workers"] = parse_workers("--workers", args.workers)
    if args.sniff is not None:
        values["sniff"] = args.sniff
    if args.sniff_timeout is not None:
        values["sniff_timeout"] = args.sniff_timeout
    if args.tun_txqueuelen is not None:
        if not 1 <= args.tun_txqueuelen <= MAX_TXQUEUELEN:
            raise ConfigError(
                f"--tun-txqueuelen: {args.tun_txqueuelen} is not between 1 and {MAX_TXQUEUELEN}"
            )
        values["tun_txqueuelen"] = args.tun_txqueuelen
    if args.tun_write_burst is not None:
        burst = parse_size("--tun-write-burst", args.tun_write_burst)
        if burst != 0 and not MIN_WRITE_BURST <= burst <= MAX_WRITE_BURST:
            raise ConfigError(write_burst_out_of_range("--tun-write-burst", burst))
        values["tun_write_burst"] = burst
    if args.udp_buffer is not None:
        size = parse_size("--udp-buffer", args.udp_buffer)
        if size != 0 and not MIN_UDP_BUFFER <= size <= MAX_UDP_BUFFER:
            raise ConfigError(
                f"--udp-buffer: {size} is not 0 (kernel default) or between "
                f"{MIN_UDP_BUFFER} and {MAX_UDP_BUFFER} bytes"
            )
        values["udp_buffer"] = size
    # Switches only ever turn a feature off (or auto-route on), so only a
    # given switch overrides the file.
    for flag, field, value in (
        (args.no_offload, "offload", False),
        (args.no_fake_ip, "fake_ip", False),
        (args.no_dns_hijack, "dns_hijack", False),
        (args.auto_route, "auto_route", True),
        (args.trust_local_checksums, "trust_local_checksums", True),
    ):
        if flag:
            values[field] = value
    return values


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The config file (if any) with the given flags over it, all checked.

    Raises:
        ConfigError: one line naming the flag, or the file and its key.
    """
    values = _flag_values(args)
    if args.config is not None:
        base = load_config(args.config, require_outbound="outbound" not in values)
    else:
        if "outbound" not in values:
            raise ConfigError(
                "an outbound is required: --socks HOST:PORT, --proxy URL or --config FILE"
            )
        base = Settings()
    settings = attrs.evolve(base, **values)
    if settings.tun_fd is None and not settings.tun:
        raise ConfigError("a TUN device is required: --tun NAME or --tun-fd N (or [tun] name)")
    # Flags are checked above one by one; this catches what only the
    # combination decides (a rule naming an outbound, the default's name).
    try:
        check_settings(settings)
    except ConfigError as exc:
        field, sep, rest = str(exc).partition(":")
        flag = {"outbound": "--socks/--proxy", "tun_addresses": "--tun-address"}.get(
            field, f"--{field.replace('_', '-')}"
        )
        if sep and field in values:  # the flag set it: name the flag
            raise ConfigError(f"{flag}{sep}{rest}") from exc.__cause__
        raise
    return settings


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


def version() -> str:
    """The installed distribution's version."""
    # Imported here: only --version needs the package metadata.
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tun2sx")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def checksum_kind() -> str:
    """Which Internet checksum runs: "C" (the accelerator built at install)
    or "Python" (no compiler then, or TUN2SX_PURE_PYTHON_CHECKSUM=1); the
    first thing to look at when tun2sx is slower than docs/performance.md."""
    from stack.wire.checksum import ACCELERATED

    return "C" if ACCELERATED else "Python"


def check_config(argv: Sequence[str]) -> int:
    """`tun2sx check-config FILE [FLAGS]`: what starting with them would say.

    Prints "ok" and returns 0, or prints the one-line error and returns 2,
    the status a start with that file would end with. Nothing is opened.
    """
    if not argv or argv[0].startswith("-"):
        print("usage: tun2sx check-config FILE [FLAGS]", file=sys.stderr)
        return 2
    args = build_parser().parse_args(["--config", argv[0], *argv[1:]])
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 2
    missing = missing_interface(settings)
    if missing is not None:
        print(f"tun2sx: warning: {missing}", file=sys.stderr)
    print("ok")
    return 0


def service_unit() -> str:
    """The systemd unit shipped with the package, run by this installation's
    `tun2sx` when that is what is running."""
    # Imported here: only this subcommand reads package data.
    from importlib.resources import files

    unit = files("tun2sx.control").joinpath("tun2sx.service").read_text(encoding="utf-8")
    program = os.path.abspath(sys.argv[0])
    if os.path.basename(program) == "tun2sx" and os.access(program, os.X_OK):
        unit = unit.replace("/usr/local/bin/tun2sx", program)
    return unit


def reload_source(args: argparse.Namespace, settings: Settings) -> ConfigSource:
    """How a reload reads the settings again: the --config file (or the
    file it is given), with the same flags over it as at start."""

    def load(path: str | None) -> Settings:
        path = path or args.config
        if path is None:
            raise ConfigError("started without --config; there is no file to read again")
        return settings_from_args(argparse.Namespace(**{**vars(args), "config": path}))

    return ConfigSource(load, settings)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from tun2sx.lab.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])
    if argv[:1] == ["service-unit"]:
        print(service_unit(), end="")
        return 0
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"tun2sx {version()} (checksum: {checksum_kind()})")
        return 0
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 2
    source = reload_source(args, settings)
    if settings.workers > 1:
        from tun2sx.control.workers import run_workers

        worker = functools.partial(serve_worker, source=source)
        return _reporting_errors(
            lambda: _with_table_lock(settings, lambda: run_workers(settings, worker))
        )
    return _reporting_errors(lambda: trio.run(functools.partial(serve, settings, source=source)))


def serve_worker(
    settings: Settings,
    device: TunDevice,
    shared_fake_ip: bool,
    source: ConfigSource | None = None,
) -> int:
    """One worker process of `--workers N`: serve one queue to the end."""
    return _reporting_errors(
        lambda: trio.run(
            functools.partial(
                serve, settings, device=device, shared_fake_ip=shared_fake_ip, source=source
            )
        )
    )


def _with_table_lock(settings: Settings, run: Callable[[], int]) -> int:
    """Run the workers holding the fake-IP table's shared lock throughout."""
    lock = lock_fake_ip_table(settings)
    try:
        return run()
    finally:
        if lock is not None:
            os.close(lock)


def _reporting_errors(run: Callable[[], int | None]) -> int:
    """Run, turning the errors a user can act on into one line and a status."""
    try:
        return run() or 0
    except ConfigError as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 2
    except (TunError, AutoRouteError) as exc:
        print(f"tun2sx: {exc}", file=sys.stderr)
        return 1
