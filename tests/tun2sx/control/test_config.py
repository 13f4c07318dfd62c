"""The TOML config and the CLI over it: every key lands, every mistake is one line."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path

import pytest

from outbounds.base import Destination
from outbounds.group import GroupSpec, ProxyGroup
from outbounds.net import SocketOptions
from tun2sx.control.app import DEFAULT_AUTO_ROUTE_FWMARK, ConfigError, Settings, build_router
from tun2sx.control.cli import build_parser, main, settings_from_args
from tun2sx.control.config import load_config, settings_from_mapping

DOCS = Path(__file__).parents[3] / "docs" / "config.md"


def documented_example() -> str:
    match = re.search(r"## Full example\n\n```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert match is not None
    return match.group(1)


def test_the_documented_example_sets_every_field(tmp_path: Path) -> None:
    path = tmp_path / "tun2sx.toml"
    path.write_text(documented_example())
    settings = load_config(path)
    assert settings == Settings(
        tun="tun0",
        mtu=9000,
        tun_addresses=("198.18.0.1/15",),
        offload=True,
        outbound="proxy",
        fwmark=0x2022,
        fake_ip=True,
        fake_ip_range=ipaddress.IPv4Network("198.18.0.0/15"),
        fake_ip_range6=ipaddress.IPv6Network("fc00::/18"),
        fake_ip_db="/var/lib/tun2sx/fakeip.sqlite",
        fake_ip_filter=("+.lan", "*.ntp.example.com"),
        dns_upstream=Destination(ipaddress.IPv4Address("1.1.1.1"), 53),
        dns_hijack=True,
        udp_timeout=60.0,
        connect_timeout=10.0,
        outbounds=(
            ("proxy", "socks5://127.0.0.1:1080"),
            ("backup", "socks5://user:secret@10.0.0.2:1080?pipeline=1&tfo=1"),
            ("office", "http://user:secret@proxy.example:3128"),
        ),
        rules=tuple(tomllib.loads(documented_example())["rules"]),
        groups=(
            GroupSpec("auto", "fallback", ("proxy", "backup", "DIRECT"), interval=300, timeout=5),
            GroupSpec("fastest", "url-test", ("proxy", "backup"), interval=60, tolerance=50),
            GroupSpec("spread", "load-balance", ("proxy", "backup"), url="tcp://1.1.1.1:443"),
            GroupSpec("pick", "select", ("auto", "proxy", "backup", "REJECT")),
        ),
        stats_listen="127.0.0.1:9090",
        stats_interval=300.0,
        secret="long-random-token",
        auto_route=False,
        workers=1,
        udp_buffer=8 << 20,
        tun_txqueuelen=20000,
        tun_write_burst=64 << 10,
        sniff="route",
        sniff_timeout=0.3,
        sniff_http_ports=((80, 80), (8080, 8880)),
        sniff_tls_ports=((443, 443), (8443, 8443)),
        sniff_quic_ports=((443, 443), (8443, 8443)),
        sniff_fake_ip=False,
    )
    router = build_router(settings, SocketOptions())
    route = router.name_of
    assert route(router.route(Destination("nas.lan", 445), "tcp")) == "DIRECT"
    assert route(router.route(Destination("www.example.org", 443), "tcp")) == "backup"
    assert route(router.route(Destination("x.tracker.net", 443), "tcp")) == "REJECT"
    assert route(router.route(Destination("example.com", 53), "udp")) == "backup"
    assert route(router.route(Destination("example.com", 443), "tcp")) == "auto"
    assert route(router.route(Destination("www.video.example", 443), "tcp")) == "fastest"
    assert route(router.route(Destination("cdn.example", 443), "tcp")) == "spread"
    pick = router.route(Destination("bank.example", 443), "tcp")
    assert isinstance(pick, ProxyGroup) and pick.now() == "auto"
    assert pick.target("auto") is router.outbounds["auto"]
    addr = Destination(ipaddress.IPv4Address("192.168.1.5"), 22)
    assert route(router.route(addr, "tcp")) == "DIRECT"


def test_omitted_keys_keep_their_defaults() -> None:
    settings = settings_from_mapping({"outbound": "socks5://127.0.0.1:1080"})
    assert settings == Settings(outbound="socks5://127.0.0.1:1080")
    assert settings_from_mapping({"dns": {"fake_ip_range6": "none"}, "outbound": "DIRECT"})
    assert settings_from_mapping({"dns": {"fake_ip_range6": False}, "outbound": "DIRECT"}) == (
        Settings(outbound="DIRECT", fake_ip_range6=None)
    )


def test_match_rule_makes_outbound_optional() -> None:
    settings = settings_from_mapping(
        {"rules": ["MATCH,p"], "outbounds": {"p": {"url": "socks5://h:1"}}}
    )
    assert settings.outbound == "REJECT"
    assert settings_from_mapping({}, require_outbound=False).outbound == "direct://"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ('outbund = "DIRECT"', "outbund: unknown key"),
        ('outbound = "DIRECT"\n[tun]\nnmae = "x"', "tun.nmae: unknown key"),
        ('outbound = "DIRECT"\n[dns]\nfake_ip = "yes"', "dns.fake_ip: expected true or false"),
        ('outbound = "DIRECT"\n[tun]\nmtu = true', "tun.mtu: expected an integer, got a boolean"),
        ('outbound = "DIRECT"\n[tun]\nmtu = 100', "tun.mtu: 100 is not between"),
        ('outbound = "DIRECT"\n[tun]\nname = "t"\nfd = 3', "tun: set name or fd"),
        ('outbound = "DIRECT"\n[tun]\naddresses = ["x/1"]', "tun.addresses[0]:"),
        ('outbound = "DIRECT"\n[tun]\naddresses = "1.2.3.4/8"', "tun.addresses: expected a list"),
        ('outbound = "DIRECT"\ntun = 3', "tun: expected a table"),
        ('outbound = "DIRECT"\nfwmark = 0', "fwmark: 0 is not a 32-bit mark"),
        ('outbound = "DIRECT"\nudp_timeout = -1', "udp_timeout: must not be negative"),
        ('outbound = "DIRECT"\nconnect_timeout = 0', "connect_timeout: 0.1 to 600 seconds, got 0"),
        ('outbound = "DIRECT"\nconnect_timeout = 1e-300', "connect_timeout: 0.1 to 600 seconds"),
        ('outbound = "DIRECT"\nconnect_timeout = 1e300', "connect_timeout: 0.1 to 600 seconds"),
        ('outbound = "DIRECT"\nudp_timeout = 1e-300', "udp_timeout: 1 to 86400 seconds"),
        ('outbound = "DIRECT"\nudp_timeout = 1e300', "udp_timeout: 1 to 86400 seconds"),
        # NaN passes every comparison, and trio refuses it as a time-out
        # (a ValueError in every flow); infinity would never time out.
        ('outbound = "DIRECT"\nconnect_timeout = nan', "connect_timeout: not a finite"),
        ('outbound = "DIRECT"\nudp_timeout = inf', "udp_timeout: not a finite"),
        ('outbound = "DIRECT"\n[stats]\ninterval = nan', "stats.interval: not a finite"),
        ('outbound = "DIRECT"\n[stats]\ninterval = 1e-300', "stats.interval: 0 (no summary"),
        ('outbound = "DIRECT"\n[stats]\ninterval = 1e300', "stats.interval: 0 (no summary"),
        ('outbound = "DIRECT"\n[dns]\nfake_ip_range = "fc00::/18"', "dns.fake_ip_range: fc00"),
        ('outbound = "DIRECT"\n[dns]\nfake_ip_range6 = "10.0.0.0/8"', "dns.fake_ip_range6:"),
        ('outbound = "DIRECT"\n[dns]\nupstream = "nope"', "dns.upstream: expected HOST:PORT"),
        ('outbound = "DIRECT"\n[dns]\nupstream = "h:x"', "dns.upstream:"),
        ('outbound = "DIRECT"\n[stats]\nlisten = "0.0.0.0:9090"', "stats.listen: 0.0.0.0 is not"),
        ('outbound = "DIRECT"\n[stats]\nlisten = "x:9090"', "stats.listen:"),
        ('outbound = "DIRECT"\n[stats]\nports = 1', "stats.ports: unknown key"),
        ('outbound = "DIRECT"\nrules = "MATCH,DIRECT"', "rules: expected a list"),
        ('outbound = "DIRECT"\nworkers = 0', "workers: must be at least 1"),
        ('outbound = "DIRECT"\nworkers = "many"', 'workers: expected a number or "auto"'),
        ('outbound = "DIRECT"\nworkers = 1000', "workers: 1000 is not between 1 and 256"),
        ('outbound = "DIRECT"\nworkers = 2\n[tun]\nfd = 3', "workers: an adopted TUN fd"),
        (
            'outbound = "DIRECT"\nworkers = 2\n[dns]\nfake_ip_db = ":memory:"',
            "workers: share the fake-IP table",
        ),
        ('outbound = "DIRECT"\nrules = [1]', "rules[0]: expected a string"),
        ('outbound = "DIRECT"\nudp_buffer = "lots"', 'udp_buffer: expected bytes ("4M"'),
        ('outbound = "DIRECT"\nudp_buffer = -1', "udp_buffer: must not be negative"),
        ('outbound = "DIRECT"\nudp_buffer = 100', "udp_buffer: 100 is not 0 (kernel default)"),
        ('outbound = "DIRECT"\nudp_buffer = "2G"', "udp_buffer: 2147483648 is not 0"),
        ('outbound = "DIRECT"\nudp_buffer = true', "udp_buffer: expected an integer"),
        ('outbound = "DIRECT"\n[tun]\ntxqueuelen = 0', "tun.txqueuelen: 0 is not between 1"),
        ('outbound = "DIRECT"\n[tun]\ntxqueuelen = "x"', "tun.txqueuelen: expected an integer"),
        ('outbound = "DIRECT"\n[tun]\nwrite_burst = -1', "tun.write_burst: must not be negative"),
        ('outbound = "DIRECT"\n[tun]\nwrite_burst = "1T"', 'tun.write_burst: expected bytes ("4M"'),
        ('outbound = "DIRECT"\n[tun]\nwrite_burst = "65M"', "tun.write_burst: 0 (whole runs) or"),
        (
            'outbound = "DIRECT"\nrules = ["MATCH,DIRECT", "DOMAIN,x,prxy"]',
            "rules[1] 'DOMAIN,x,prxy': unknown outbound 'prxy'",
        ),
        ("rules = []", "outbound: required"),
        ('outbound = "prxy"', "outbound: "),
        ("outbound = 1", "outbound: expected a string"),
        ('outbound = "DIRECT"\n[outbounds.p]\nuri = "x"', "outbounds.p.uri: unknown key"),
        ('outbound = "DIRECT"\n[outbounds.p]', "outbounds.p.url: required"),
        ('outbound = "DIRECT"\n[outbounds.p]\nurl = "ftp://x:1"', "outbounds.p.url:"),
        (
            'outbound = "DIRECT"\n[outbounds.p]\nurl = "http://x:1"\npipeline = true',
            "outbounds.p.pipeline: only for socks5://, socks5h:// outbounds, not http://",
        ),
        (
            'outbound = "DIRECT"\n[outbounds.p]\nurl = "socks5://x:1"\ntfo = "yes"',
            "outbounds.p.tfo: expected true or false",
        ),
        (
            'outbound = "DIRECT"\n[outbounds.p]\nurl = "ss://x:1"\ntfo = true',
            "outbounds.p.tfo: only for socks5://",
        ),
        ('outbound = "DIRECT"\n[outbounds.DIRECT]\nurl = "direct://"', "outbounds.DIRECT:"),
        ('outbound = "DIRECT"\n[outbounds."a b"]\nurl = "direct://"', "outbounds: 'a b'"),
        ('outbound = "DIRECT"\noutbounds = 1', "outbounds: expected a table"),
        (
            'outbound = "DIRECT"\n[dns]\nfake_ip_range = "198.18.0.0/30"',
            "dns.fake_ip_range: 198.18.0.0/30 leaves no address for fake IPs",
        ),
        (
            'outbound = "DIRECT"\n[dns]\nfake_ip_range6 = "fc00::/127"',
            "dns.fake_ip_range6: fc00::/127 leaves no address",
        ),
        (
            'outbound = "DIRECT"\n[dns]\ndirect = ["198.18.0.2"]',
            "dns.direct: 198.18.0.2:53 is in 198.18.0.0/15",
        ),
        (
            'outbound = "DIRECT"\n[outbounds.p]\nurl = "socks5://me:TopSecretPw@h"',
            "outbounds.p.url: SOCKS5 URL 'socks5://me:***@h': missing port",
        ),
    ],
)
def test_mistakes_are_one_line_naming_the_key(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(document + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {message}")
    assert "\n" not in text
    assert "TopSecretPw" not in text


GROUP = (
    '[outbounds.p]\nurl = "socks5://10.0.0.2:1080"\n'
    '[groups.g]\nmembers = ["p", "DIRECT"]\nurl = "http://www.gstatic.com/generate_204"\n'
)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        # What a Clash/mihomo proxy-group (interval in seconds, tolerance in
        # ms) or a sing-box urltest ("3m", "50ms") becomes, written in seconds.
        (
            'outbound = "g"\n' + GROUP + 'type = "url-test"\ninterval = 300\ntimeout = 5\n'
            "tolerance = 50",
            (300.0, 5.0, 50),
        ),
        ('outbound = "g"\n' + GROUP + 'type = "url-test"\ninterval = 600', (600.0, 5.0, 50)),
        (
            'outbound = "g"\n' + GROUP + 'type = "fallback"\ninterval = 180\ntimeout = 2.5',
            (180.0, 2.5, 50),
        ),
        (
            'outbound = "g"\n' + GROUP + 'type = "load-balance"\ninterval = 3600\ntimeout = 10',
            (3600.0, 10.0, 50),
        ),
        ('outbound = "g"\n' + GROUP + 'type = "url-test"\ntolerance = 150', (300.0, 5.0, 150)),
    ],
)
def test_group_times_other_tools_use_are_accepted(
    tmp_path: Path, document: str, expected: tuple[float, float, int]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(document + "\n")
    (group,) = load_config(path).groups
    assert (group.interval, group.timeout, group.tolerance) == expected


def test_common_time_outs_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'outbound = "DIRECT"\nconnect_timeout = 30\nudp_timeout = 300\n[stats]\ninterval = 60\n'
    )
    settings = load_config(path)
    assert (settings.connect_timeout, settings.udp_timeout, settings.stats_interval) == (
        30,
        300,
        60,
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        # Milliseconds where seconds are meant (Clash's health-check timeout
        # is in ms), seconds where milliseconds are, sing-box's strings.
        (
            'outbound = "g"\n' + GROUP + 'type = "fallback"\ntimeout = 5000',
            "groups.g.timeout: 0.1 to 60 seconds, got 5000 (if that is milliseconds, write 5)",
        ),
        (
            'outbound = "g"\n' + GROUP + 'type = "fallback"\ninterval = 300000',
            "groups.g.interval: 1 to 86400 seconds, got 300000 (if that is milliseconds, "
            "write 300)",
        ),
        (
            'outbound = "g"\n' + GROUP + 'type = "fallback"\ninterval = "3m"',
            'groups.g.interval: expected a number of seconds, got "3m" (write 180)',
        ),
        (
            'outbound = "g"\n' + GROUP + 'type = "url-test"\ntolerance = 0.05',
            "groups.g.tolerance: expected whole milliseconds, got 0.05 (if that is seconds, "
            "write 50)",
        ),
        (
            'outbound = "g"\n' + GROUP + 'type = "url-test"\ntolerance = "50ms"',
            'groups.g.tolerance: expected whole milliseconds, got "50ms" (write 50)',
        ),
        (
            'outbound = "DIRECT"\nconnect_timeout = 5000',
            "connect_timeout: 0.1 to 600 seconds, got 5000 (if that is milliseconds, write 5)",
        ),
        (
            'outbound = "DIRECT"\nconnect_timeout = "10s"',
            'connect_timeout: expected a number of seconds, got "10s" (write 10)',
        ),
        (
            'outbound = "DIRECT"\nudp_timeout = 300000',
            "udp_timeout: 1 to 86400 seconds, got 300000 (if that is milliseconds, write 300)",
        ),
        (
            'outbound = "DIRECT"\n[stats]\ninterval = 300000',
            "stats.interval: 0 (no summary lines) or 1 to 86400 seconds, got 300000 "
            "(if that is milliseconds, write 300)",
        ),
        # No guess where none fits the range.
        ('outbound = "DIRECT"\nudp_timeout = 0.5', "udp_timeout: 1 to 86400 seconds, got 0.5"),
    ],
)
def test_a_time_in_the_wrong_unit_says_what_to_write(
    tmp_path: Path, document: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(document + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def test_the_flags_name_the_unit_too() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["--tun", "t0", "--socks", "127.0.0.1:1080", "--connect-timeout", "5000"]
    )
    with pytest.raises(ConfigError) as info:
        settings_from_args(args)
    assert str(info.value) == (
        "--connect-timeout: 0.1 to 600 seconds, got 5000 (if that is milliseconds, write 5)"
    )


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "broken.toml"
    path.write_text("outbound = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_a_path_with_a_nul_byte_is_refused_in_one_line() -> None:
    # The controller's reload takes a path from a request body.
    with pytest.raises(ConfigError, match="embedded null byte") as info:
        load_config("conf\x00.toml")
    assert "\n" not in str(info.value)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    # A file saved in Latin-1, or a binary copied by mistake.
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'outbound = "DIRECT"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not valid TOML: not UTF-8 text")
    assert "line 2" in message and "\n" not in message


# -- the CLI over a file -------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tun2sx.toml"
    path.write_text(
        'outbound = "proxy"\nrules = ["DOMAIN-SUFFIX,lan,DIRECT"]\n'
        '[outbounds.proxy]\nurl = "socks5://127.0.0.1:1080"\n'
        '[tun]\nname = "tunf"\nmtu = 1500\n'
        '[dns]\nfake_ip_range6 = "none"\nupstream = "9.9.9.9:53"\n'
    )
    return path


def from_argv(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(list(argv)))


def test_flags_override_the_file(config_file: Path) -> None:
    base = from_argv("--config", str(config_file))
    assert (base.tun, base.mtu, base.outbound) == ("tunf", 1500, "proxy")
    assert base.fake_ip_range6 is None
    assert base.rules == ("DOMAIN-SUFFIX,lan,DIRECT",)
    over = from_argv(
        "--config",
        str(config_file),
        "--tun-fd",
        "7",
        "--socks",
        "10.0.0.1:1080",
        "--dns-upstream",
        "8.8.8.8:53",
        "--no-fake-ip",
        "--stats-listen",
        "[::1]:9091",
    )
    assert (over.tun, over.tun_fd, over.mtu) == (None, 7, 1500)
    assert over.outbound == "socks5://10.0.0.1:1080"
    assert str(over.dns_upstream) == "8.8.8.8:53"
    assert over.fake_ip is False
    assert over.stats_listen == "[::1]:9091"
    # What no flag touched stays as the file says.
    assert over.outbounds == (("proxy", "socks5://127.0.0.1:1080"),)
    assert over.fake_ip_range6 is None


def test_flags_alone_give_the_same_defaults_as_settings() -> None:
    assert from_argv("--tun", "t0", "--proxy", "direct://") == Settings(
        tun="t0", outbound="direct://"
    )


def test_auto_route_flag(config_file: Path) -> None:
    settings = from_argv("--config", str(config_file), "--auto-route")
    assert settings.auto_route is True
    assert settings.fwmark is None  # serve defaults it; see test_stats' serve test
    assert DEFAULT_AUTO_ROUTE_FWMARK == 0x2022


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--stats-listen", "192.0.2.1:9090"], "--stats-listen"),
        (["--stats-interval", "-1"], "--stats-interval"),
        (["--connect-timeout", "0"], "--connect-timeout"),
        (["--connect-timeout", "nan"], "--connect-timeout"),
        (["--udp-timeout", "inf"], "--udp-timeout"),
        (["--stats-interval", "nan"], "--stats-interval"),
        (["--proxy", "bogus"], "--proxy"),
        (["--workers", "0"], "--workers"),
        (["--workers", "two"], "--workers"),
        (["--udp-buffer", "many"], "--udp-buffer"),
        (["--udp-buffer", "1k"], "--udp-buffer"),
        (["--tun-txqueuelen", "0"], "--tun-txqueuelen"),
        (["--tun-txqueuelen", "2000000"], "--tun-txqueuelen"),
        (["--tun-write-burst", "-1"], "--tun-write-burst"),
        (["--tun-write-burst", "65M"], "--tun-write-burst"),
        (["--tun-write-burst", "lots"], "--tun-write-burst"),
    ],
)
def test_bad_new_flags_name_the_flag(
    config_file: Path, extra: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config_file), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"tun2sx: {field}: ")


def test_bad_file_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('rules = ["DOMAIN,x,prxy", "MATCH,DIRECT"]\n[tun]\nname = "t"\n')
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tun2sx: {path}: rules[0] 'DOMAIN,x,prxy': unknown outbound 'prxy'"


def test_file_without_a_device_needs_a_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('outbound = "DIRECT"\n')
    with pytest.raises(ConfigError, match="a TUN device is required"):
        from_argv("--config", str(path))
    assert from_argv("--config", str(path), "--tun", "t1").tun == "t1"


def test_workers_auto_is_one_per_usable_cpu(config_file: Path) -> None:
    assert from_argv("--config", str(config_file), "--workers", "auto").workers == len(
        os.sched_getaffinity(0)
    )
    assert from_argv("--config", str(config_file), "--workers", "3").workers == 3


def test_udp_buffer_and_txqueuelen_flags_override_the_file(config_file: Path) -> None:
    args = build_parser().parse_args(
        ["--config", str(config_file), "--udp-buffer", "16M", "--tun-txqueuelen", "4096"]
    )
    settings = settings_from_args(args)
    assert (settings.udp_buffer, settings.tun_txqueuelen) == (16 << 20, 4096)
    args = build_parser().parse_args(["--config", str(config_file), "--tun-write-burst", "0"])
    assert settings_from_args(args).tun_write_burst == 0  # whole runs
    args = build_parser().parse_args(["--config", str(config_file), "--tun-write-burst", "16K"])
    assert settings_from_args(args).tun_write_burst == 16 << 10
    args = build_parser().parse_args(["--config", str(config_file), "--udp-buffer", "0"])
    assert settings_from_args(args).udp_buffer == 0  # the kernel's default


def test_trusting_local_checksums_is_asked_for_by_flag_or_file(
    config_file: Path, tmp_path: Path
) -> None:
    assert from_argv("--config", str(config_file)).trust_local_checksums is False
    assert from_argv("--config", str(config_file), "--trust-local-checksums").trust_local_checksums
    trusting = tmp_path / "trusting.toml"
    trusting.write_text(
        config_file.read_text().replace("[tun]\n", "[tun]\ntrust_local_checksums = true\n")
    )
    assert from_argv("--config", str(trusting)).trust_local_checksums is True
    trusting.write_text(
        config_file.read_text().replace("[tun]\n", '[tun]\ntrust_local_checksums = "yes"\n')
    )
    with pytest.raises(ConfigError, match=r"tun\.trust_local_checksums"):
        from_argv("--config", str(trusting))


def _documented_keys() -> set[str]:
    """The first column of the Keys table in docs/config.md."""
    text = DOCS.read_text()
    table = text[text.index("## Keys\n") : text.index("\n## ", text.index("## Keys\n") + 1)]
    keys = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", table, re.M):
        keys.update(re.findall(r"`([^`]+)`", cell))
    return keys


def _known_keys(prefix: str, mapping: dict[str, object]) -> set[str]:
    """The keys the parser knows at one place, as its unknown-key error lists them."""
    with pytest.raises(ConfigError, match=r"unknown key \(known here: ") as info:
        settings_from_mapping(mapping)
    known = str(info.value).partition("known here: ")[2].rstrip(")")
    return {f"{prefix}{key}" for key in known.split(", ")}


def test_the_keys_table_lists_exactly_the_keys_the_parser_takes() -> None:
    tables = {"tun", "dns", "stats", "sniff", "outbounds", "groups"}
    parsed = _known_keys("", {"bogus": 1}) - tables
    for table in ("tun", "dns", "stats", "sniff"):
        parsed |= _known_keys(f"{table}.", {table: {"bogus": 1}})
    parsed |= _known_keys("outbounds.NAME.", {"outbounds": {"a": {"bogus": 1}}})
    parsed |= _known_keys("groups.NAME.", {"groups": {"g": {"bogus": 1}}})
    assert _documented_keys() == parsed


def test_a_write_burst_counted_in_packets_is_refused_with_what_to_write(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The option was a packet count first; 32 now would be one packet a round.
    assert main(["--config", str(config_file), "--tun-write-burst", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "tun2sx: --tun-write-burst: 0 (whole runs) or 1500 to 67108864 bytes, got 32"
        " (if that is packets of 1500 octets, write 47K)"
    )
    path = tmp_path / "burst.toml"
    path.write_text(config_file.read_text().replace("[tun]\n", "[tun]\nwrite_burst = 32\n"))
    with pytest.raises(ConfigError, match=r"got 32 \(if that is packets of 1500 octets"):
        from_argv("--config", str(path))
    assert (
        from_argv("--config", str(config_file), "--tun-write-burst", "1500").tun_write_burst == 1500
    )
    # The hint is itself accepted; a size with a unit gets no packet hint.
    assert main(["--config", str(config_file), "--tun-write-burst", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("got 1 (if that is packets of 1500 octets, write 2K)")
    assert (
        from_argv("--config", str(config_file), "--tun-write-burst", "2K").tun_write_burst == 2048
    )
    assert main(["--config", str(config_file), "--tun-write-burst", "1K"]) == 2
    assert capsys.readouterr().err.strip().endswith("bytes, got 1024")
