"""Reloading the configuration: what applies, what is refused, what waits for a restart."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.group import GroupSpec, ProxyGroup
from outbounds.resolver import DirectResolver, build_query
from tun2sx.control.app import Routing, Settings, serve
from tun2sx.control.cli import build_parser, reload_source, settings_from_args
from tun2sx.control.reload import Reloader, restart_needed
from tun2sx.dataplane.context import EngineConfig, FlowInfo
from tun2sx.dataplane.engine import Engine
from tun2sx.dataplane.tun import TunDevice
from tun2sx.naming.dns import DnsForward, DnsReply, FakeDns
from tun2sx.naming.fakeip import FakeIpStore
from tun2sx.naming.router import Router

BASE = """\
outbound = "proxy"
rules = ["DOMAIN-SUFFIX,blocked.test,REJECT"]
[outbounds.proxy]
url = "socks5://127.0.0.1:1080"
[outbounds.other]
url = "socks5://127.0.0.1:1081"
[tun]
name = "tun7"
mtu = 9000
[dns]
fake_ip_db = ":memory:"
upstream = "1.1.1.1:53"
[stats]
interval = 0
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _engine(router: Router, dns: FakeDns | None = None, flows: set[FlowInfo] | None = None) -> Any:
    """A stand-in for the running engine: what a reload replaces and reads."""
    return SimpleNamespace(
        router=router,
        dns=dns,
        config=EngineConfig(),
        flows=set() if flows is None else flows,
        device=SimpleNamespace(mtu=9000, offload=True),
    )


def _started(config: Path, *flags: str) -> tuple[Settings, Reloader, SimpleNamespace]:
    """Settings as the command line loads them, and a reloader on a stand-in engine
    holding what a running engine holds: router, DNS, settings, flows."""
    args = build_parser().parse_args(["--config", str(config), *flags])
    settings = settings_from_args(args)
    store = FakeIpStore(path=":memory:", v4_pool="198.18.0.0/15", v6_pool=None)
    from tun2sx.control.app import open_routing

    routing = open_routing(settings)
    engine = _engine(routing.router, dns=FakeDns(store))
    reloader = Reloader(engine, settings, reload_source(args, settings), routing)  # type: ignore[arg-type]
    return settings, reloader, engine


def _route(engine: SimpleNamespace, host: str) -> str:
    router: Router = engine.router
    return router.name_of(router.route(Destination(host, 443), "tcp"))


def test_a_changed_rule_and_default_apply_to_the_next_flow(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    assert (_route(engine, "x.blocked.test"), _route(engine, "a.test")) == ("REJECT", "proxy")
    _write(config, BASE.replace('"proxy"', '"other"', 1).replace("blocked", "nothing"))
    assert reloader.reload() is None
    assert (_route(engine, "x.blocked.test"), _route(engine, "a.test")) == ("other", "other")


def test_a_bad_file_is_refused_with_one_line_and_the_running_config_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    settings, reloader, engine = _started(config)
    router = engine.router
    _write(config, BASE.replace("REJECT", "prxy"))
    with caplog.at_level(logging.INFO, logger="tun2sx"):
        error = reloader.reload()
    assert error is not None and "\n" not in error
    assert error.startswith(f"{config}: rules[0]") and "prxy" in error
    assert engine.router is router and reloader.settings is settings
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.ERROR, None)]
    assert "reload refused, running configuration kept" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("this is not toml", "not valid TOML"),
        (BASE.replace("fake_ip_db", "# caf\xe9\nfake_ip_db"), "not UTF-8"),
        (BASE.replace("interval = 0", "interval = 0\nlisten = 5"), "stats.listen: expected"),
        (BASE.replace('url = "socks5://127.0.0.1:1081"', 'url = "gopher://x"'), "other.url"),
    ],
)
def test_every_kind_of_bad_file_is_refused(tmp_path: Path, text: str, key: str) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    router = engine.router
    config.write_bytes(text.encode("latin-1"))
    error = reloader.reload()
    assert error is not None and key in error
    assert engine.router is router


def test_a_password_in_a_refused_file_is_not_echoed(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, _ = _started(config)
    bad = 'url = "socks5://user:s3cret@127.0.0.1:99999"'
    _write(config, BASE.replace('url = "socks5://127.0.0.1:1081"', bad))
    error = reloader.reload()
    assert error is not None and "outbounds.other.url" in error
    assert "s3cret" not in error


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    router = engine.router
    config.unlink()
    error = reloader.reload()
    assert error is not None and error.startswith(f"{config}: ")
    assert engine.router is router


def test_settings_that_need_a_restart_keep_their_value_with_one_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    changed = (
        BASE.replace("mtu = 9000", "mtu = 1500")
        .replace("interval = 0", 'interval = 60\nlisten = "127.0.0.1:9090"')
        .replace(
            'fake_ip_db = ":memory:"', 'fake_ip_db = ":memory:"\nfake_ip_range = "10.99.0.0/16"'
        )
        .replace("blocked", "other")
    )
    _write(config, changed)
    with caplog.at_level(logging.WARNING, logger="tun2sx"):
        assert reloader.reload() is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    for key in ("tun.mtu", "stats.listen", "stats.interval", "dns.fake_ip_range"):
        assert sum(f"reload: {key}: " in line and "restart" in line for line in lines) == 1
    assert "from 9000 to 1500" in "".join(lines)
    running = reloader.settings
    assert (running.mtu, running.stats_listen, running.stats_interval) == (9000, None, 0)
    assert running.fake_ip_range == ipaddress.ip_network("198.18.0.0/15")
    # What can change did.
    assert _route(engine, "a.other.test") == "REJECT"
    # Read again unchanged: the lines are not repeated.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tun2sx"):
        assert reloader.reload() is None
    assert caplog.records == []


def test_a_restart_line_names_the_running_value_and_a_revert_needs_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, _ = _started(config)
    _write(config, BASE.replace("mtu = 9000", "mtu = 1500"))
    assert reloader.reload() is None
    _write(config, BASE.replace("mtu = 9000", "mtu = 1280"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tun2sx"):
        assert reloader.reload() is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith(
        "tun.mtu: changed from 1500 to 1280; takes a restart, running on with 9000"
    )
    # Back to what runs: nothing waits for a restart any more.
    _write(config, BASE)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tun2sx"):
        assert reloader.reload() is None
    assert caplog.records == []
    assert reloader.settings.mtu == 9000


def test_a_changed_secret_takes_a_restart_and_is_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(
        tmp_path / "c.toml", BASE.replace("interval = 0", 'interval = 0\nsecret = "OldToken1"')
    )
    _, reloader, _ = _started(config)
    _write(config, BASE.replace("interval = 0", 'interval = 0\nsecret = "NewToken2"'))
    with caplog.at_level(logging.WARNING, logger="tun2sx"):
        assert reloader.reload() is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert "stats.secret: changed; takes a restart" in line
    assert "Token" not in caplog.text
    assert reloader.settings.secret == "OldToken1"


def test_restart_needed_names_nothing_for_what_applies_at_once() -> None:
    old = Settings(tun="tun0")
    new = Settings(
        tun="tun0",
        rules=("MATCH,DIRECT",),
        outbound="DIRECT",
        connect_timeout=3,
        udp_timeout=5,
        dns_hijack=False,
        fake_ip_filter=("+.lan",),
        interface="eth1",
    )
    assert restart_needed(old, new) == []
    assert restart_needed(old, Settings(tun="tun1")) == [
        "tun.name: changed from tun0 to tun1; takes a restart, running on with tun0"
    ]


def test_flags_still_override_the_file_after_a_reload(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config, "--socks", "127.0.0.1:2080")
    _write(config, BASE.replace("blocked", "nothing"))
    assert reloader.reload() is None
    assert engine.router.default.name == "socks5 127.0.0.1:2080"
    assert reloader.settings.outbound == "socks5://127.0.0.1:2080"


def test_dns_settings_apply_to_the_next_query(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    query = build_query("printer.lan", 1, 7)
    assert isinstance(engine.dns.handle_query_untrusted(query), DnsReply)
    dns_table = (
        'upstream = "9.9.9.9:53"\nfake_ip_filter = ["+.lan"]\nhijack = false\n'
        'direct = ["192.0.2.53"]'
    )
    _write(config, BASE.replace('upstream = "1.1.1.1:53"', dns_table))
    assert reloader.reload() is None
    assert isinstance(engine.dns.handle_query_untrusted(query), DnsForward)
    assert engine.config.dns_upstream == Destination(ipaddress.ip_address("9.9.9.9"), 53)
    assert engine.config.dns_hijack is False
    # DIRECT flows resolve with the new servers.
    direct = engine.router.outbounds["DIRECT"]
    assert [str(server) for server in direct.resolver.servers] == ["192.0.2.53:53"]


def test_another_file_can_be_named(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    other = _write(tmp_path / "d.toml", BASE.replace('"proxy"', '"other"', 1))
    assert reloader.reload(str(other)) is None
    assert _route(engine, "a.test") == "other"


def test_without_a_config_file_a_reload_is_refused(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--tun", "tun7", "--socks", "127.0.0.1:1080"])
    settings = settings_from_args(args)
    from tun2sx.control.app import open_routing

    routing = open_routing(settings)
    engine = _engine(routing.router)
    reloader = Reloader(engine, settings, reload_source(args, settings), routing)  # type: ignore[arg-type]
    error = reloader.reload()
    assert error is not None and "without --config" in error
    assert engine.router is routing.router


class _Closing:
    """An outbound with resources: counts its closing."""

    name = "closing"

    def __init__(self) -> None:
        self.closed = 0

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        raise NotImplementedError

    async def open_udp(self) -> object:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closed += 1


async def test_replaced_outbounds_close_once_no_flow_can_use_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    args = build_parser().parse_args(["--config", str(config)])
    settings = settings_from_args(args)
    closing = _Closing()
    old = Routing(Router(closing, outbounds={"c": closing}), DirectResolver([]))  # type: ignore[dict-item]
    flow = FlowInfo("tcp", "10.0.0.2:1", Destination("a.test", 1), "c", 0.0)
    engine = _engine(old.router, flows={flow})
    reloader = Reloader(engine, settings, reload_source(args, settings), old)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(reloader.run)
        assert reloader.reload() is None
        assert engine.router is not old.router
        # Long after every time-out, the flow is still open on it.
        await trio.sleep(600)
        assert closing.closed == 0
        engine.flows.clear()
        await trio.sleep(10)
        assert closing.closed == 1
        nursery.cancel_scope.cancel()
    assert closing.closed == 1  # once, not again at the stop


def _device() -> tuple[TunDevice, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return TunDevice(ours.detach(), name="fake0", mtu=1500, offload=False), theirs


async def test_sighup_reloads_a_serving_instance(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    args = build_parser().parse_args(["--config", str(config)])
    settings = settings_from_args(args)
    device, theirs = _device()
    with theirs:
        async with trio.open_nursery() as nursery:
            engine: Engine = await nursery.start(
                lambda task_status: serve(
                    settings,
                    device=device,
                    source=reload_source(args, settings),
                    task_status=task_status,
                )
            )
            before = engine.router
            assert _route(engine, "a.blocked.test") == "REJECT"  # type: ignore[arg-type]
            _write(config, BASE.replace("blocked", "nothing"))
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(5):
                while engine.router is before:
                    await trio.sleep(0.01)
            assert _route(engine, "a.blocked.test") == "proxy"  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()


class _Group(ProxyGroup):
    """A proxy group whose health checks only say that they run."""

    def __init__(self) -> None:
        super().__init__(GroupSpec("group", "fallback", ("DIRECT",)), {"DIRECT": None})

    async def run_checks(self) -> None:
        running.append(self)
        try:
            await trio.sleep_forever()
        finally:
            running.remove(self)


running: list[_Group] = []


def _checked() -> Routing:
    group = _Group()
    return Routing(Router(group, outbounds={"g": group, "h": group}), DirectResolver([]))


async def test_a_reload_replaces_the_health_checks_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    args = build_parser().parse_args(["--config", str(config)])
    settings = settings_from_args(args)
    import tun2sx.control.reload as reload_module

    monkeypatch.setattr(reload_module, "open_routing", lambda settings, protect: _checked())
    first = _checked()
    (first_group,) = {id(o): o for o in first.router.outbounds.values()}.values()
    flow = FlowInfo("tcp", "10.0.0.2:1", Destination("a.test", 1), "g", 0.0)
    engine = _engine(first.router, flows={flow})
    reloader = Reloader(engine, settings, reload_source(args, settings), first)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(reloader.run)
        await trio.testing.wait_all_tasks_blocked()
        assert running == [first_group]  # once, though named twice
        assert reloader.reload() is None
        await trio.testing.wait_all_tasks_blocked()
        new_group = reloader.routing.router.outbounds["g"]
        # The open flow holds its outbound, not the old group's checks: the
        # new group checks the same proxies, once.
        assert running == [new_group]
        nursery.cancel_scope.cancel()
    assert running == []


async def test_two_reloads_at_once_leave_the_last_ones_checks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    args = build_parser().parse_args(["--config", str(config)])
    settings = settings_from_args(args)
    import tun2sx.control.reload as reload_module

    monkeypatch.setattr(reload_module, "open_routing", lambda settings, protect: _checked())
    reloader = Reloader(_engine(Router(None)), settings, reload_source(args, settings), _checked())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(reloader.run)
        # No checkpoint between them: the second comes before the first's
        # checks have started.
        assert reloader.reload() is None
        assert reloader.reload() is None
        await trio.testing.wait_all_tasks_blocked()
        assert running == [reloader.routing.router.outbounds["g"]]
        nursery.cancel_scope.cancel()
    assert running == []


def _select(*members: str) -> ProxyGroup:
    """A select group over REJECT-like members (never dialled here)."""
    return ProxyGroup(GroupSpec("g", "select", members), dict.fromkeys(members))


def test_a_select_group_keeps_its_choice_when_the_member_is_still_there() -> None:
    from tun2sx.control.reload import carry_selections

    old = _select("a", "b", "c")
    old.select("b")
    kept, gone, other = _select("a", "b"), _select("a", "c"), _select("a", "b")
    before = Router(None, outbounds={"g": old, "h": old})
    after = Router(None, outbounds={"g": kept, "h": gone, "i": other})
    carry_selections(before, after)
    assert (kept.now(), gone.now(), other.now()) == ("b", "a", "a")


def test_new_values_are_checked_beside_the_kept_ones(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    router = engine.router
    # Fine in a fresh start (the pool moves away), but the running pool stays.
    moved = 'fake_ip_range = "10.99.0.0/16"\ndirect = ["198.18.0.9"]\nupstream'
    _write(config, BASE.replace("upstream", moved, 1))
    error = reloader.reload()
    assert error is not None and error.startswith("dns.direct: 198.18.0.9:53 is in 198.18.0.0/15")
    assert engine.router is router


async def test_areload_reads_and_builds_while_the_engine_goes_on(tmp_path: Path) -> None:
    import threading

    from tun2sx.control.reload import ConfigSource

    config = _write(tmp_path / "c.toml", BASE)
    settings, _, engine = _started(config)
    args = build_parser().parse_args(["--config", str(config)])
    plain = reload_source(args, settings)
    may_read = threading.Event()

    def load(path: str | None) -> Settings:
        # Returns only once trio's thread has run on: a load on that thread
        # would never see the event set and the test would time out.
        assert may_read.wait(10)
        return plain.load(path)

    routing = Routing(engine.router, DirectResolver([]))
    reloader = Reloader(engine, settings, ConfigSource(load, settings), routing)  # type: ignore[arg-type]
    _write(config, BASE.replace("blocked", "nothing"))
    async with trio.open_nursery() as nursery:
        results: list[str | None] = []

        async def reload() -> None:
            results.append(await reloader.areload())

        nursery.start_soon(reload)
        nursery.start_soon(reload)  # a second one waits for the first
        await trio.testing.wait_all_tasks_blocked()
        assert results == [] and _route(engine, "x.blocked.test") == "REJECT"
        may_read.set()
    assert results == [None, None]
    assert _route(engine, "x.blocked.test") == "proxy"


async def test_areload_refuses_a_bad_file(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, engine = _started(config)
    router = engine.router
    _write(config, BASE.replace("REJECT", "prxy"))
    error = await reloader.areload()
    assert error is not None and "rules[0]" in error
    assert engine.router is router


GROUPED = (
    BASE.replace('outbound = "proxy"', 'outbound = "auto"')
    + """
[groups.auto]
type = "fallback"
members = ["proxy", "other"]
url = "http://192.0.2.1/"
"""
)


def test_a_group_keeps_what_its_checks_found_for_unchanged_members(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", GROUPED)
    _, reloader, engine = _started(config)
    old: ProxyGroup = engine.router.outbounds["auto"]
    old.connect_failed(
        "proxy", OutboundError(FailureReply.HOST_UNREACHABLE, "x", proxy_failed=True)
    )
    assert old.now() == "other"
    # A rule changes; the group and its proxies do not: new flows must not
    # go back to the proxy found down until the new group's first check.
    _write(config, GROUPED.replace("blocked.test", "blocked2.test"))
    assert reloader.reload() is None
    new: ProxyGroup = engine.router.outbounds["auto"]
    assert new is not old
    assert (new.alive("proxy"), new.now()) == (False, "other")
    assert new.delays("proxy") == old.delays("proxy")


def test_a_member_whose_proxy_changed_starts_afresh(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", GROUPED)
    _, reloader, engine = _started(config)
    old: ProxyGroup = engine.router.outbounds["auto"]
    old.connect_failed(
        "proxy", OutboundError(FailureReply.HOST_UNREACHABLE, "x", proxy_failed=True)
    )
    # The dead proxy's address was fixed: it is worth trying again at once.
    _write(config, GROUPED.replace("127.0.0.1:1080", "127.0.0.2:1080"))
    assert reloader.reload() is None
    new: ProxyGroup = engine.router.outbounds["auto"]
    assert (new.alive("proxy"), new.now()) == (True, "proxy")


def _reloaded_line(reloader: Reloader, caplog: pytest.LogCaptureFixture) -> str:
    """Reload and return the one "reloaded" line it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tun2sx"):
        assert reloader.reload() is None
    (line,) = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    return line


def _with_filter(names: range) -> str:
    """BASE with a fake-IP filter of `+.nI.test` for each I."""
    listed = ", ".join(f'"+.n{i}.test"' for i in names)
    return BASE.replace(
        'upstream = "1.1.1.1:53"', f'upstream = "1.1.1.1:53"\nfake_ip_filter = [{listed}]'
    )


def test_the_reload_line_names_what_changed_at_once_and_never_a_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, _ = _started(config)
    changed = (
        BASE.replace('name = "tun7"', 'name = "tun7"\nwrite_burst = "16K"')
        .replace('outbound = "proxy"', 'outbound = "proxy"\nudp_timeout = 30')
        .replace("socks5://127.0.0.1:1081", "socks5://user:hunter2@127.0.0.1:1081")
    )
    _write(config, changed)
    line = _reloaded_line(reloader, caplog)
    assert (
        "now udp_timeout 60.0 -> 30.0, tun.write_burst 49152 -> 16384, "
        "new or changed outbounds other;"
    ) in line
    assert "hunter2" not in line and "1081" not in line
    # Read again unchanged: nothing is said to have changed.
    line = _reloaded_line(reloader, caplog)
    assert " now " not in line


def test_a_long_changed_list_is_counted_on_the_reload_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, _ = _started(config)
    _write(config, _with_filter(range(50)))
    line = _reloaded_line(reloader, caplog)
    assert "now dns.fake_ip_filter [0 entries] -> [50 entries: 50 new, 0 gone];" in line
    # The same length, other names: what came and went is said.
    _write(config, _with_filter(range(3, 53)))
    line = _reloaded_line(reloader, caplog)
    assert "now dns.fake_ip_filter [50 entries] -> [50 entries: 3 new, 3 gone];" in line


def test_the_reload_line_names_removed_outbounds_and_writes_booleans_as_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _write(tmp_path / "c.toml", BASE)
    _, reloader, _ = _started(config)
    without_other = BASE.replace('[outbounds.other]\nurl = "socks5://127.0.0.1:1081"\n', "")
    with_direct = without_other.replace('REJECT"]', 'REJECT", "DOMAIN,d.test,DIRECT"]')
    _write(config, with_direct.replace("[dns]", "[dns]\nhijack = false"))
    line = _reloaded_line(reloader, caplog)
    # The outbounds the file names: DIRECT, which a rule names, is not one.
    assert "reloaded: 2 rules, 1 outbounds, default proxy; " in line
    assert "now dns.hijack true -> false, outbounds removed other;" in line
