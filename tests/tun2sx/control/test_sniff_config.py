"""Sniffing settings: the [sniff] table, the flags, the embedding API, and
what the engine is told to sniff."""

from __future__ import annotations

import pytest

import tun2sx
from outbounds.net import SocketOptions
from tun2sx.control.app import ConfigError, Settings, build_router, sniff_config
from tun2sx.control.cli import build_parser, settings_from_args
from tun2sx.control.config import settings_from_mapping
from tun2sx.naming.sniff import Protocol, SniffConfig

DOMAIN_RULES = ["DOMAIN-SUFFIX,example.com,DIRECT", "MATCH,DIRECT"]


def engine_sniff(settings: Settings) -> SniffConfig:
    return sniff_config(settings, build_router(settings, SocketOptions()))


def test_the_table_sets_every_key() -> None:
    settings = settings_from_mapping(
        {
            "outbound": "DIRECT",
            "sniff": {
                "mode": "override",
                "timeout": 0.5,
                "http_ports": [80, "8000-8100"],
                "tls_ports": "443, 10443",
                "quic_ports": [],
                "fake_ip": True,
            },
        }
    )
    assert (settings.sniff, settings.sniff_timeout, settings.sniff_fake_ip) == (
        "override",
        0.5,
        True,
    )
    assert settings.sniff_http_ports == ((80, 80), (8000, 8100))
    assert settings.sniff_tls_ports == ((443, 443), (10443, 10443))
    config = engine_sniff(settings)
    assert config.stream_protocols(8050, fake_ip=True) == (Protocol.HTTP,)
    assert config.stream_protocols(10443, fake_ip=False) == (Protocol.TLS,)
    assert not config.sniffs_quic(443, fake_ip=False)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"mode": "sniff"}, "sniff.mode: expected off, route, override, got 'sniff'"),
        ({"mode": True}, "sniff.mode: expected a string"),
        ({"timeout": 0}, "sniff.timeout: 0.0 is not above 0 and at most 10 s"),
        ({"timeout": 60}, "sniff.timeout: 60.0 is not above 0"),
        ({"timeout": "fast"}, "sniff.timeout: expected a number of seconds"),
        ({"http_ports": [80, "90-85"]}, "sniff.http_ports: '90-85' is not a port range"),
        ({"tls_ports": ["https"]}, "sniff.tls_ports: 'https' is not a port or LOW-HIGH"),
        ({"quic_ports": 443}, "sniff.quic_ports: expected a list of ports"),
        ({"fake_ip": "yes"}, "sniff.fake_ip: expected true or false"),
        ({"ports": [1]}, "sniff.ports: unknown key"),
    ],
)
def test_bad_values_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"outbound": "DIRECT", "sniff": table})
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_flags() -> None:
    parser = build_parser()
    args = ["--tun", "t0", "--proxy", "direct://", "--sniff", "override", "--sniff-timeout", "1"]
    settings = settings_from_args(parser.parse_args(args))
    assert (settings.sniff, settings.sniff_timeout) == ("override", 1.0)
    bad = parser.parse_args(["--tun", "t0", "--proxy", "direct://", "--sniff-timeout", "-1"])
    with pytest.raises(ConfigError, match=r"^--sniff-timeout: -1.0 is not above 0"):
        settings_from_args(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sniff", "always"])


def test_embedding_api_takes_port_lists() -> None:
    settings = tun2sx.make_settings(3, {"sniff_quic_ports": [443, "8443-8444"]})
    assert settings.sniff_quic_ports == ((443, 443), (8443, 8444))
    with pytest.raises(ConfigError, match=r"^sniff_quic_ports: 'x' is not a port"):
        tun2sx.make_settings(3, {"sniff_quic_ports": ["x"]})


def test_route_mode_sniffs_only_when_a_domain_rule_can_use_the_name() -> None:
    # The default is route; without domain rules a name would change nothing.
    assert engine_sniff(Settings(outbound="DIRECT")).mode == "off"
    ip_rules = Settings(outbound="DIRECT", rules=("IP-CIDR,10.0.0.0/8,REJECT",))
    assert engine_sniff(ip_rules).mode == "off"
    config = engine_sniff(Settings(outbound="DIRECT", rules=tuple(DOMAIN_RULES)))
    assert config.mode == "route"
    assert config.stream_protocols(443, fake_ip=False) == (Protocol.TLS,)
    assert config.stream_protocols(8080, fake_ip=False) == (Protocol.HTTP,)
    assert config.stream_protocols(22, fake_ip=False) == ()
    assert config.stream_protocols(443, fake_ip=True) == ()  # fake_ip = false
    assert config.sniffs_quic(8443, fake_ip=False)
    # Override always sniffs: the name is what the outbound connects to.
    assert engine_sniff(Settings(outbound="DIRECT", sniff="override")).mode == "override"
    assert (
        engine_sniff(Settings(outbound="DIRECT", sniff="off", rules=tuple(DOMAIN_RULES))).mode
        == "off"
    )
