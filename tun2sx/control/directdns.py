"""Which DNS servers the direct outbound asks, decided once at start.

The direct outbound resolves host names itself (outbounds/resolver.py),
because the system resolver is usually tun2sx's own fake-IP DNS. Its
servers are the configured ones (`--direct-dns` / `dns.direct`), or else
the nameservers /etc/resolv.conf lists at start, minus those that cannot
work: an address inside a fake-IP pool or on the TUN's own networks is
tun2sx itself (the quick start's `nameserver 198.18.0.2`) and would answer
with fake addresses. A loopback stub (systemd-resolved's 127.0.0.53) stays:
it does not go through the TUN, and if it forwards to tun2sx after all,
the resolver drops the fake answers and the flow fails with a line saying so.

A configured server inside those networks is a configuration error. When
no server is left and flows by name can go DIRECT, one warning at start
names the option; each such flow then fails with one line, never a silent
connection to a fake address.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

from outbounds.base import Destination
from outbounds.direct import DirectOutbound
from outbounds.net import SocketOptions
from outbounds.resolver import DirectResolver, resolv_conf_nameservers
from tun2sx.naming.router import Router

log = logging.getLogger("tun2sx")

__all__ = [
    "RESOLV_CONF",
    "build_direct_resolver",
    "excluded_networks",
    "inside",
    "sends_names_direct",
    "warn_without_direct_dns",
]

RESOLV_CONF = "/etc/resolv.conf"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def excluded_networks(
    fake_ip: bool, pools: Iterable[IPNetwork | None], tun_addresses: Iterable[str]
) -> list[IPNetwork]:
    """The networks no direct DNS server (and no direct answer) may be in.

    Args:
        fake_ip: whether fake-IP DNS is on (the pools count only then).
        pools: the fake-IP pools (None for a disabled one).
        tun_addresses: the TUN's addresses as CIDRs: their networks are
            routed into the TUN.
    """
    networks: list[IPNetwork] = []
    if fake_ip:
        networks += [pool for pool in pools if pool is not None]
    networks += [ipaddress.ip_interface(cidr).network for cidr in tun_addresses]
    return networks


def inside(server: Destination, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first of `networks` holding `server`'s address, or None."""
    if isinstance(server.host, str):
        return None
    for network in networks:
        if server.host in network:
            return network
    return None


def build_direct_resolver(
    configured: Sequence[Destination] | None,
    excluded: Sequence[IPNetwork],
    socket_options: SocketOptions,
    *,
    resolv_conf: str = RESOLV_CONF,
) -> DirectResolver:
    """The direct outbound's resolver, logging where its servers came from.

    Args:
        configured: the servers the user gave; None: from `resolv_conf`.
        excluded: networks that are tun2sx itself (`excluded_networks`).
        socket_options: how its sockets stay out of the TUN.
        resolv_conf: the file read when nothing is configured.
    """
    if configured is not None:
        servers = list(configured)
        source = "configured"
    else:
        try:
            with open(resolv_conf, encoding="utf-8", errors="replace") as file:
                listed = resolv_conf_nameservers(file.read())
        except OSError as exc:
            log.info("direct DNS: cannot read %s: %s", resolv_conf, exc.strerror or exc)
            listed = []
        servers = [server for server in listed if inside(server, excluded) is None]
        skipped = [str(server) for server in listed if inside(server, excluded) is not None]
        source = f"from {resolv_conf}"
        if skipped:
            source += f"; skipped {', '.join(skipped)}, which is tun2sx itself"
    if servers:
        log.info("direct DNS: %s (%s)", ", ".join(map(str, servers)), source)
    return DirectResolver(servers, socket_options, exclude=excluded)


def sends_names_direct(router: Router) -> bool:
    """Whether a flow known by host name can end up at a direct outbound.

    Every rule but IP-CIDR can match a flow through a fake IP (by name,
    port or network), and so can the default.
    """
    if isinstance(router.default, DirectOutbound):
        return True
    return any(
        rule.kind != "IP-CIDR" and isinstance(router.outbounds.get(rule.target), DirectOutbound)
        for rule in router.rules.rules
    )


def warn_without_direct_dns(resolver: DirectResolver, router: Router) -> bool:
    """Log one warning when flows by name can go DIRECT but no server is left.

    Returns:
        Whether it warned.
    """
    if resolver.servers or not sends_names_direct(router):
        return False
    log.warning(
        "tun2sx: the direct outbound has no DNS server that is not tun2sx itself; "
        "DIRECT flows to host names will fail until --direct-dns (dns.direct) names one"
    )
    return True
