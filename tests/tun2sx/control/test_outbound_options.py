"""Per-outbound switches in the config file: `pipeline` and `tfo`."""

from __future__ import annotations

from pathlib import Path

from outbounds.http import HttpOutbound
from outbounds.net import SocketOptions
from outbounds.socks4 import Socks4Outbound
from outbounds.socks5 import Socks5Outbound
from tun2sx.control.app import build_outbounds
from tun2sx.control.config import load_config


def test_table_switches_reach_the_outbounds(tmp_path: Path) -> None:
    path = tmp_path / "tun2sx.toml"
    path.write_text(
        'outbound = "dante"\n'
        '[outbounds.dante]\nurl = "socks5://10.0.0.1:1080"\npipeline = true\ntfo = true\n'
        '[outbounds.plain]\nurl = "socks5://u:p@10.0.0.1:1080"\npipeline = false\n'
        '[outbounds.web]\nurl = "http://10.0.0.1:8888"\ntfo = true\n'
        '[outbounds.old]\nurl = "socks4a://10.0.0.1:1080?tfo=1"\n'
    )
    named = build_outbounds(load_config(path), SocketOptions())
    dante, plain, web, old = (named[n] for n in ("dante", "plain", "web", "old"))
    assert isinstance(dante, Socks5Outbound) and dante.pipeline and dante.fast_open
    assert isinstance(plain, Socks5Outbound)
    assert not plain.pipeline and not plain.fast_open
    assert isinstance(web, HttpOutbound) and web.fast_open
    # The URL's own query still counts.
    assert isinstance(old, Socks4Outbound) and old.fast_open


def test_the_documented_outbound_tables_build(tmp_path: Path) -> None:
    docs = (Path(__file__).parents[3] / "docs" / "config.md").read_text()
    section = docs[docs.index("## Outbounds") : docs.index("## Rules")]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "tun2sx.toml"
    path.write_text('outbound = "dante"\n' + block)
    named = build_outbounds(load_config(path), SocketOptions())
    dante, office, old = named["dante"], named["office"], named["old"]
    assert isinstance(dante, Socks5Outbound) and dante.pipeline and dante.fast_open
    assert isinstance(office, HttpOutbound) and not office.fast_open
    assert isinstance(old, Socks4Outbound) and old.name == "socks4a 10.0.0.3:1080"
