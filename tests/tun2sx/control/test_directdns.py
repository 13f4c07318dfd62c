"""Where the direct outbound's DNS servers come from, and how mistakes are reported."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest

import tun2sx
from outbounds.base import Destination
from outbounds.direct import DirectOutbound
from outbounds.net import SocketOptions
from tun2sx.control.app import ConfigError, Settings, build_router
from tun2sx.control.cli import build_parser, settings_from_args
from tun2sx.control.config import settings_from_mapping
from tun2sx.control.directdns import (
    build_direct_resolver,
    excluded_networks,
    sends_names_direct,
    warn_without_direct_dns,
)


def server(text: str, port: int = 53) -> Destination:
    return Destination(ipaddress.ip_address(text), port)


def test_toml_list_and_string_forms() -> None:
    settings = settings_from_mapping(
        {"outbound": "DIRECT", "dns": {"direct": ["192.168.1.1", "[fd00::1]:5353"]}}
    )
    assert settings.direct_dns == (server("192.168.1.1"), server("fd00::1", 5353))
    settings = settings_from_mapping({"outbound": "DIRECT", "dns": {"direct": "10.0.0.1,1.1.1.1"}})
    assert settings.direct_dns == (server("10.0.0.1"), server("1.1.1.1"))
    assert settings_from_mapping({"outbound": "DIRECT"}).direct_dns is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["dns.google"], "dns.direct[0]: expected an IP address with an optional :PORT, got"),
        (["10.0.0.1", "10.0.0.2:99999"], "dns.direct[1]: port 99999 in '10.0.0.2:99999' is"),
        ([], "dns.direct: expected at least one server"),
        (53, "dns.direct: expected a list of strings, got an integer"),
        (["198.18.0.2"], "dns.direct: 198.18.0.2:53 is in 198.18.0.0/15, which is tun2sx"),
    ],
)
def test_toml_mistakes_are_one_line_naming_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"outbound": "DIRECT", "dns": {"direct": value}})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_a_server_on_the_tun_network_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"dns\.direct: 10\.9\.0\.53:53 is in 10\.9\.0\.0/24"):
        settings_from_mapping(
            {
                "outbound": "DIRECT",
                "tun": {"addresses": ["10.9.0.1/24"]},
                "dns": {"fake_ip": False, "direct": ["10.9.0.53"]},
            }
        )
    # Without fake IPs the pools are ordinary addresses.
    settings = settings_from_mapping(
        {"outbound": "DIRECT", "dns": {"fake_ip": False, "direct": ["198.18.0.2"]}}
    )
    assert settings.direct_dns == (server("198.18.0.2"),)


def test_flag_is_repeatable_and_takes_lists() -> None:
    flags = ["--direct-dns", "192.168.1.1,1.1.1.1", "--direct-dns", "[fd00::1]:54"]
    args = build_parser().parse_args(["--tun", "t0", "--socks", "127.0.0.1:1080", *flags])
    settings = settings_from_args(args)
    assert settings.direct_dns == (server("192.168.1.1"), server("1.1.1.1"), server("fd00::1", 54))


def test_flag_mistake_names_the_flag() -> None:
    args = build_parser().parse_args(
        ["--tun", "t0", "--socks", "127.0.0.1:1080", "--direct-dns", "router.lan"]
    )
    with pytest.raises(ConfigError, match=r"^--direct-dns: expected an IP address"):
        settings_from_args(args)


def test_default_is_resolv_conf_without_tun2sx_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 198.18.0.2\nnameserver 127.0.0.53\nnameserver 192.168.1.1\n")
    excluded = excluded_networks(
        True, [ipaddress.ip_network("198.18.0.0/15"), None], ["198.18.0.1/15"]
    )
    with caplog.at_level(logging.INFO, logger="tun2sx"):
        resolver = build_direct_resolver(None, excluded, SocketOptions(), resolv_conf=str(conf))
    assert resolver.servers == (server("127.0.0.53"), server("192.168.1.1"))
    assert "skipped 198.18.0.2:53, which is tun2sx itself" in caplog.text
    configured = build_direct_resolver(
        (server("10.0.0.1"),), excluded, SocketOptions(), resolv_conf=str(conf)
    )
    assert configured.servers == (server("10.0.0.1"),)


def test_missing_resolv_conf_leaves_no_server(tmp_path: Path) -> None:
    resolver = build_direct_resolver(
        None, [], SocketOptions(), resolv_conf=str(tmp_path / "missing")
    )
    assert resolver.servers == ()


def test_the_router_gets_one_resolver_for_every_direct_outbound(tmp_path: Path) -> None:
    resolver = build_direct_resolver((server("10.0.0.1"),), [], SocketOptions())
    settings = Settings(
        outbound="direct://",
        outbounds=(("lan", "direct://"),),
        rules=("DOMAIN-SUFFIX,lan,lan",),
    )
    router = build_router(settings, SocketOptions(), resolver)
    for outbound in (router.default, router.outbounds["lan"], router.outbounds["DIRECT"]):
        assert isinstance(outbound, DirectOutbound)
        assert outbound.resolver is resolver


@pytest.mark.parametrize(
    ("outbound", "rules", "warns"),
    [
        ("socks5://127.0.0.1:1080", ("DOMAIN-SUFFIX,lan,DIRECT",), True),
        ("socks5://127.0.0.1:1080", ("DST-PORT,22,DIRECT",), True),
        ("DIRECT", (), True),
        ("socks5://127.0.0.1:1080", ("IP-CIDR,192.168.0.0/16,DIRECT",), False),
        ("socks5://127.0.0.1:1080", (), False),
    ],
)
def test_one_warning_when_names_can_go_direct_without_a_server(
    outbound: str, rules: tuple[str, ...], warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    empty = build_direct_resolver((), [], SocketOptions())
    router = build_router(Settings(outbound=outbound, rules=rules), SocketOptions(), empty)
    assert sends_names_direct(router) is warns
    with caplog.at_level(logging.WARNING, logger="tun2sx"):
        assert warn_without_direct_dns(empty, router) is warns
    assert len(caplog.records) == (1 if warns else 0)
    if warns:
        assert "--direct-dns (dns.direct)" in caplog.text
    # With a server there is nothing to warn about.
    usable = build_direct_resolver((server("10.0.0.1"),), [], SocketOptions())
    assert warn_without_direct_dns(usable, router) is False


def test_embedders_give_servers_as_strings() -> None:
    settings = tun2sx.make_settings(3, {"direct_dns": ["192.168.1.1", "[fd00::1]:5353"]})
    assert settings.direct_dns == (server("192.168.1.1"), server("fd00::1", 5353))
    with pytest.raises(ConfigError, match=r"^direct_dns\[0\]: expected an IP address"):
        tun2sx.make_settings(3, {"direct_dns": ["dns.google"]})
