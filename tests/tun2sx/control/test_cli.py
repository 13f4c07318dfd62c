"""The command line: bad values give one line naming the flag, exit 2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require_binary
from tun2sx.control.cli import build_parser, main, parse_endpoint, settings_from_args
from tun2sx.naming.fakeip import FakeIpStore

ROOT = Path(__file__).resolve().parents[3]


def test_endpoint_parsing() -> None:
    assert str(parse_endpoint("127.0.0.1:1080", "--socks")) == "127.0.0.1:1080"
    assert str(parse_endpoint("[::1]:53", "--dns-upstream")) == "[::1]:53"
    assert str(parse_endpoint("proxy.lan:1080", "--socks")) == "proxy.lan:1080"


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--tun", "tunx", "--socks", "127.0.0.1"], "--socks"),
        (["--tun", "tunx", "--socks", "127.0.0.1:99999"], "--socks"),
        (["--tun", "tunx", "--proxy", "ftp://x:1"], "--proxy"),
        (["--tun", "tunx", "--proxy", "http://x"], "--proxy"),  # no port
        (["--tun", "tunx", "--proxy", "socks5://h"], "--proxy"),
        (["--tun", "tunx"], "outbound"),
        (["--socks", "1.2.3.4:5"], "--tun"),
        (["--tun", "tunx", "--socks", "1.2.3.4:5", "--mtu", "100"], "--mtu"),
        (["--tun", "tunx", "--socks", "1.2.3.4:5", "--tun-address", "x/1"], "--tun-address"),
        (
            ["--tun", "tunx", "--socks", "1.2.3.4:5", "--fake-ip-range", "300.0.0.0/8"],
            "--fake-ip-range",
        ),
        (
            ["--tun", "tunx", "--socks", "1.2.3.4:5", "--fake-ip-range", "fc00::/18"],
            "--fake-ip-range",
        ),
        (
            ["--tun", "tunx", "--socks", "1.2.3.4:5", "--fake-ip-range6", "10.0.0.0/8"],
            "--fake-ip-range6",
        ),
        (["--tun", "tunx", "--socks", "1.2.3.4:5", "--dns-upstream", "nope"], "--dns-upstream"),
        (["--tun", "tunx", "--socks", "1.2.3.4:5", "--udp-timeout", "0"], "--udp-timeout"),
        (
            ["--tun", "tunx", "--socks", "1.2.3.4:5", "--fake-ip-range", "198.18.0.0/31"],
            "--fake-ip-range: 198.18.0.0/31 leaves no address for fake IPs",
        ),
        (
            ["--tun", "tunx", "--socks", "1.2.3.4:5", "--fake-ip-range", "198.18.0.0/30"],
            "--fake-ip-range: 198.18.0.0/30 leaves no address for fake IPs",
        ),
        (
            ["--tun", "tunx", "--socks", "1.2.3.4:5", "--fake-ip-range6", "fc00::/127"],
            "--fake-ip-range6: fc00::/127 leaves no address for fake IPs",
        ),
        (
            ["--tun", "tunx", "--proxy", "socks5://user:TopSecretPw@host"],
            "--proxy: SOCKS5 URL 'socks5://user:***@host': missing port",
        ),
        (
            ["--tun", "tunx", "--proxy", "ss://YWVzLTEyOC1nY206VG9wU2VjcmV0UHc@host"],
            "--proxy: Shadowsocks URL 'ss://***@host': missing port",
        ),
        (
            ["--tun", "tunx", "--proxy", "ss://aes-128-gcm:TopSecretPw@host:1?x=1"],
            "--proxy: Shadowsocks URL 'ss://aes-128-gcm:***@host:1?x=1': unexpected query",
        ),
        (["--tun", "tunx", "--proxy", "ftp://u:TopSecretPw@h:1"], "'ftp://u:***@h:1'"),
    ],
)
def test_bad_values_name_the_flag(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("tun2sx: ")
    assert field in err
    assert "TopSecretPw" not in err


def test_settings_from_flags() -> None:
    parser = build_parser()
    settings = settings_from_args(
        parser.parse_args(["--tun", "t0", "--socks", "127.0.0.1:1080", "--fake-ip-range6", "none"])
    )
    assert settings.outbound == "socks5://127.0.0.1:1080"
    assert settings.fake_ip_range6 is None
    v6 = settings_from_args(parser.parse_args(["--tun", "t0", "--socks", "[::1]:1080"]))
    assert v6.outbound == "socks5://[::1]:1080"
    direct = settings_from_args(parser.parse_args(["--tun", "t0", "--proxy", "direct://"]))
    assert direct.outbound == "direct://"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_a_start_without_root_is_one_line_naming_the_device(tmp_path: Path) -> None:
    """Not root, default fake-IP table: the first thing that fails is the
    device, and that is one line, not a SQLite traceback about the table."""
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-m",
            "tun2sx",
            "--tun",
            "t2sxnoroot0",
            "--socks",
            "127.0.0.1:1080",
            "--direct-dns",
            "192.0.2.53",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tun2sx: cannot open TUN device 't2sxnoroot0': "), last


GOOD = """\
outbound = "proxy"
[outbounds.proxy]
url = "socks5://user:s3cret@127.0.0.1:1080"
[tun]
name = "tun7"
"""


def test_check_config_says_ok_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    assert main(["check-config", str(config)]) == 0
    assert capsys.readouterr() == ("ok\n", "")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_check_config_neither_takes_nor_minds_the_tables_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    table = tmp_path / "state" / "fakeip"
    flags = ["--fake-ip-db", str(table), "--workers", workers]
    # A table nobody uses: checking makes no file, lock file included.
    assert main(["check-config", str(config), *flags]) == 0
    assert not (tmp_path / "state").exists()
    # A table a running tun2sx holds: the check says what a start would
    # say once that one has stopped, and leaves the file alone.
    table.parent.mkdir()
    running = FakeIpStore(str(table))
    running.allocate("a.example", socket.AF_INET)
    before = table.read_bytes()
    assert main(["check-config", str(config), *flags]) == 0
    assert capsys.readouterr().out.splitlines() == ["ok", "ok"]
    assert table.read_bytes() == before
    running.close()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD.replace("1080", "99999"), "outbounds.proxy.url: "),
        (GOOD.replace('name = "tun7"', ""), "a TUN device is required"),
        (GOOD + "mtu = 12\n", "tun.mtu: "),
        ("outbound = [", "not valid TOML"),
    ],
)
def test_check_config_gives_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    assert main(["check-config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and key in err
    assert "s3cret" not in err


def test_check_config_warns_of_an_interface_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('interface = "nosuch0"\n' + GOOD)
    assert main(["check-config", str(config)]) == 0  # it may come up later
    out, err = capsys.readouterr()
    assert out == "ok\n"
    assert err == (
        "tun2sx: warning: interface: no device 'nosuch0' now; "
        "every outbound connection fails until it exists\n"
    )
    config.write_text('interface = "lo"\n' + GOOD)
    assert main(["check-config", str(config)]) == 0
    assert capsys.readouterr() == ("ok\n", "")


def test_check_config_takes_flags_as_a_start_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD.replace('name = "tun7"', ""))
    assert main(["check-config", str(config), "--tun", "tun8"]) == 0
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "ok\n"
    assert "missing.toml: No such file or directory" in err and "usage: " in err


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    from stack.wire.checksum import ACCELERATED

    kind = "C" if ACCELERATED else "Python"
    assert capsys.readouterr().out == f"tun2sx {version('tun2sx')} (checksum: {kind})\n"


def test_the_service_unit_runs_with_two_capabilities_and_reloads_with_sighup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["service-unit"]) == 0
    unit = capsys.readouterr().out
    lines = set(unit.splitlines())
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" in lines
    assert "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW" in lines
    assert {"NoNewPrivileges=yes", "StateDirectory=tun2sx", "Restart=on-failure"} <= lines
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines
    # A reload sent while tun2sx is still starting (before it handles
    # SIGHUP) ends it by that signal, which systemd takes for a clean exit:
    # the unit must start it again, on the file the reload meant.
    assert "RestartForceExitStatus=SIGHUP" in lines
    start = next(line for line in lines if line.startswith("ExecStart="))
    assert start.endswith(" --config /etc/tun2sx/config.toml")


def test_the_service_unit_names_the_tun2sx_that_printed_it(tmp_path: Path) -> None:
    program = Path(sys.executable).parent / "tun2sx"
    if not program.exists():
        pytest.skip("no tun2sx script beside this Python (not installed into it)")
    result = subprocess.run(
        [str(program), "service-unit"], capture_output=True, text=True, check=True
    )
    assert f"ExecStart={program} --config /etc/tun2sx/config.toml" in result.stdout
    verify = require_binary("systemd-analyze")
    unit = tmp_path / "tun2sx.service"
    unit.write_text(result.stdout)
    checked = subprocess.run([verify, "verify", str(unit)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
