"""A configuration loads only the libraries it uses (docs/architecture.md).

Each case runs in a fresh interpreter: it builds the settings from command
line flags as `tun2sx` does, serves them on a socket pair standing in for
the TUN, asks one plain A query through it, and reports which of the heavy
optional libraries were imported by then. Shadowsocks' crypto alone is
about 9 MiB of the resident set; dnslib, SQLite and tomllib about 0.5 to
1 MiB each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# `_ssl` and `_hashlib` are OpenSSL (libssl, libcrypto), which trio's TLS and
# DTLS code would load at start, `_bz2` and `_lzma` what shutil would
# (tun2sx.control.deferred).
HEAVY = (
    *("cryptography", "blake3", "dnslib", "sqlite3", "tomllib", "json"),
    *("_ssl", "_hashlib", "_bz2", "_lzma"),
    # idna's code and tables, which trio's sockets import (tun2sx.control.deferred).
    "idna.core",
    # Proxy protocols the configuration does not name.
    *("outbounds.http", "outbounds.socks4"),
    # QUIC sniffing, which a configuration without domain rules never does.
    "tun2sx.naming.quic",
)

SCRIPT = f"""
import functools, socket, sys
from stack.wire.packet import build_udp_packet, parse_packet_untrusted
from tun2sx.control import app
import trio
from tun2sx.control.cli import build_parser, settings_from_args
from tun2sx.dataplane.tun import TunDevice

HEAVY = {HEAVY!r}
settings = settings_from_args(build_parser().parse_args(sys.argv[1:]))
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
device = TunDevice(ours.detach(), name="fake0", mtu=1500, offload=False)
# One question for a.example, type A, class IN.
QUERY = bytes.fromhex("1234010000010000000000000161076578616d706c650000010001")

async def main():
    async with trio.open_nursery() as nursery:
        serve = functools.partial(app.serve, settings, device=device, handle_signals=False)
        await nursery.start(serve)
        with trio.socket.from_stdlib_socket(theirs) as app_side:
            await app_side.send(
                build_udp_packet(bytes([10, 0, 0, 5]), bytes([198, 18, 0, 2]), 40000, 53, QUERY)
            )
            with trio.fail_after(10):
                reply = parse_packet_untrusted(memoryview(await app_side.recv(65536)))
        loaded = sorted(name for name in HEAVY if name in sys.modules)
        nursery.cancel_scope.cancel()
    import json  # only now: it is one of the modules looked for

    print(json.dumps({{"loaded": loaded, "answer": bytes(reply.payload[-4:]).hex()}}))

trio.run(main)
"""


def _loaded(*flags: str) -> list[str]:
    """The heavy modules loaded once tun2sx serves `flags` and answered a query."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--tun-fd", "99", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["answer"] == "c6120004"  # 198.18.0.4, the first fake address: it served
    return list(report["loaded"])


def test_a_socks5_configuration_with_an_in_memory_table_loads_none_of_them() -> None:
    flags = ["--socks", "127.0.0.1:1080", "--fake-ip-db", ":memory:"]
    assert _loaded(*flags) == []


def test_a_fake_ip_file_loads_none_of_them(tmp_path: Path) -> None:
    # The default configuration: a persistent table, kept in a journal.
    assert _loaded("--socks", "127.0.0.1:1080", "--fake-ip-db", str(tmp_path / "f.db")) == []


@pytest.mark.parametrize(
    "url",
    [
        "ss://aes-128-gcm:pass@127.0.0.1:8388",
        "ss://2022-blake3-aes-128-gcm:AAAAAAAAAAAAAAAAAAAAAA%3D%3D@127.0.0.1:8388",
    ],
)
def test_a_shadowsocks_configuration_loads_its_crypto(url: str) -> None:
    assert _loaded("--proxy", url, "--fake-ip-db", ":memory:") == [
        "_hashlib",
        "blake3",
        "cryptography",
    ]


def test_a_config_file_loads_tomllib(tmp_path: Path) -> None:
    config = tmp_path / "tun2sx.toml"
    config.write_text('outbound = "socks5://127.0.0.1:1080"\n[dns]\nfake_ip_db = ":memory:"\n')
    assert _loaded("--config", str(config)) == ["tomllib"]
