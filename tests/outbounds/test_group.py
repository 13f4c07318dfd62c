"""Proxy groups: which member new flows take, health checks, passive checks.

The members are `FakeProxy`s whose state a test sets (up with a delay,
unreachable, silent, or refusing the destination); time is trio's
autojump clock, so a member that answers after `trio.sleep(0.08)` measures
80 ms exactly.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from outbounds.base import Destination, FailureReply, Outbound, OutboundError, UdpSession
from outbounds.group import (
    GroupError,
    GroupSpec,
    ProxyGroup,
    build_groups,
    connect_tcp_traced,
    measure_delay,
    open_udp_traced,
    parse_check_url,
    parse_status_untrusted,
    reachable_groups,
    run_health_checks,
)
from tests.support.tls import self_signed

WEB = Destination("www.example.com", 443)
HTTP_CHECK = "http://check.example/generate_204"


class CannedStream(trio.abc.HalfCloseableStream):
    """A connection whose far end answers any request with `answer`, then EOF."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sent = b""
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        answer, self.answer = self.answer, b""
        return answer

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class FakeSession:
    """A UDP session that is never used beyond being opened."""


class FakeProxy:
    """A member whose behaviour the test sets.

    Attributes:
        state: "up" (connects after `delay` s), "down" (the proxy is
            unreachable), "silent" (connects never finish), "refusing"
            (the proxy answers that the destination refused).
        connects: destinations of the connects begun, checks included.
    """

    def __init__(self, name: str, delay: float = 0.01) -> None:
        self.name = name
        self.delay = delay
        self.state = "up"
        self.answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
        self.connects: list[Destination] = []
        self.streams: list[CannedStream] = []

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        self.connects.append(dest)
        if self.state == "down":
            raise OutboundError(
                FailureReply.RESET, f"{self.name} unreachable: refused", proxy_failed=True
            )
        if self.state == "silent":
            await trio.sleep_forever()
        if self.state == "refusing":
            raise OutboundError(FailureReply.RESET, f"{self.name} could not reach {dest}")
        await trio.sleep(self.delay)
        stream = CannedStream(self.answer)
        self.streams.append(stream)
        return stream

    async def open_udp(self) -> UdpSession:
        if self.state == "down":
            raise OutboundError(FailureReply.RESET, f"{self.name} unreachable", proxy_failed=True)
        await trio.lowlevel.checkpoint()
        return FakeSession()  # type: ignore[return-value]


def group(
    kind: str, *members: str, tolerance: int = 50, interval: float = 10.0, **proxies: FakeProxy
) -> ProxyGroup:
    outbounds: dict[str, Outbound] = dict(proxies)
    for name in members:
        outbounds.setdefault(name, FakeProxy(name))
    spec = GroupSpec(
        "g", kind, members, url=HTTP_CHECK, interval=interval, timeout=2.0, tolerance=tolerance
    )
    return build_groups([spec], outbounds)["g"]


def proxy(g: ProxyGroup, member: str) -> FakeProxy:
    target = g.target(member)
    assert isinstance(target, FakeProxy)
    return target


# -- check targets ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path"),
    [
        ("http://www.gstatic.com/generate_204", "http", "www.gstatic.com", 80, "/generate_204"),
        ("http://10.0.0.1:8080", "http", ipaddress.ip_address("10.0.0.1"), 8080, "/"),
        ("HTTP://[::1]:81/x?y=1", "http", ipaddress.ip_address("::1"), 81, "/x?y=1"),
        ("tcp://1.1.1.1:53", "tcp", ipaddress.ip_address("1.1.1.1"), 53, "/"),
        ("https://www.gstatic.com/generate_204", "https", "www.gstatic.com", 443, "/generate_204"),
    ],
)
def test_check_urls(url: str, scheme: str, host: object, port: int, path: str) -> None:
    target = parse_check_url(url)
    assert (target.scheme, target.dest.host, target.dest.port, target.path) == (
        scheme,
        host,
        port,
        path,
    )


@pytest.mark.parametrize(
    "url",
    [
        "ftp://www.gstatic.com/generate_204",
        "www.gstatic.com",
        "tcp://host",
        "http://:80/",
        "http://host:0/",
        "http://host:99999/",
        "http://host:x/",
        "http://[::1/",
        "http://host/a b",
    ],
)
def test_bad_check_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_check_url(url)


def test_the_request_names_the_host() -> None:
    assert (
        parse_check_url("http://a.example:8080/p")
        .request()
        .startswith(b"GET /p HTTP/1.1\r\nHost: a.example:8080\r\n")
    )
    assert b"Host: [::1]\r\n" in parse_check_url("http://[::1]/").request()
    assert b"Host: a.example\r\n" in parse_check_url("https://a.example:443/").request()
    assert b"Host: a.example:80\r\n" in parse_check_url("https://a.example:80/").request()


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        (b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\nbody", 503),
        (b"HTTP/1.1 200\r\n", 200),
    ],
)
def test_status_lines_whole_byte_by_byte_and_with_more(answer: bytes, status: int) -> None:
    assert parse_status_untrusted(answer) == status
    assert parse_status_untrusted(answer + b"trailing junk\r\n") == status
    line_end = answer.index(b"\r\n") + 2
    for cut in range(line_end):
        assert parse_status_untrusted(answer[:cut]) is None
    assert parse_status_untrusted(answer[:line_end]) == status


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1\r\n",
        b"HTTP/1.1 20x OK\r\n",
        b"HTTP/2 200\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"\r\n",
        b"x" * 5000,
    ],
)
def test_what_is_not_a_status_line(answer: bytes) -> None:
    with pytest.raises(ValueError):
        parse_status_untrusted(answer)


@given(st.binary(max_size=300), st.text(max_size=60))
def test_any_answer_or_url_is_a_value_or_a_value_error(answer: bytes, url: str) -> None:
    # Only ValueError: whatever a site or a proxy answers, a check fails cleanly.
    with contextlib.suppress(ValueError):
        assert parse_status_untrusted(answer) in (None, *range(1000))
    try:
        target = parse_check_url(url)
    except ValueError:
        return
    assert target.scheme in ("http", "https", "tcp")
    assert target.request().startswith(b"GET /")


# -- building --------------------------------------------------------------------


def test_groups_contain_groups_and_builtins() -> None:
    a = FakeProxy("a")
    specs = [
        GroupSpec("outer", "fallback", ("inner", "DIRECT")),
        GroupSpec("inner", "select", ("a", "REJECT")),
    ]
    direct = FakeProxy("DIRECT")
    groups = build_groups(specs, {"a": a, "DIRECT": direct})
    assert list(groups) == ["outer", "inner"]
    assert groups["outer"].target("inner") is groups["inner"]
    assert groups["outer"].target("DIRECT") is direct
    assert groups["inner"].target("REJECT") is None
    assert reachable_groups([groups["outer"], None, a]) == [groups["outer"], groups["inner"]]
    assert reachable_groups([a]) == []


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (
            [GroupSpec("g", "fallback", ("a", "nope"))],
            "groups.g.members[1]: unknown outbound or group 'nope'",
        ),
        (
            [
                GroupSpec("x", "select", ("y",)),
                GroupSpec("y", "select", ("z", "a")),
                GroupSpec("z", "fallback", ("x",)),
            ],
            "groups.x: groups contain each other (x -> y -> z -> x)",
        ),
        ([GroupSpec("g", "select", ("g",))], "groups.g: groups contain each other (g -> g)"),
        ([GroupSpec("a", "select", ("DIRECT",))], "groups.a: an outbound has this name already"),
        ([GroupSpec("direct", "select", ("a",))], "groups.direct: direct is built in"),
        (
            [GroupSpec("g", "select", ("a",)), GroupSpec("g", "select", ("a",))],
            "groups.g: defined twice",
        ),
        ([GroupSpec("g", "random", ("a",))], "groups.g.type: unknown group type 'random'"),
        ([GroupSpec("g", "select", ())], "groups.g.members: a group needs at least one"),
        ([GroupSpec("g", "select", ("a", "a"))], "groups.g.members[1]: 'a' is listed twice"),
        ([GroupSpec("g", "select", ("a",), url="ftp://x/")], "groups.g.url: expected http"),
        (
            [GroupSpec("g", "select", ("a",), interval=0)],
            "groups.g.interval: 1 to 86400 seconds, got 0",
        ),
        (
            [GroupSpec("g", "select", ("a",), timeout=-1)],
            "groups.g.timeout: 0.1 to 60 seconds, got -1",
        ),
        (
            [GroupSpec("g", "url-test", ("a",), tolerance=-5)],
            "groups.g.tolerance: 0 to 60000 ms, got -5",
        ),
    ],
)
def test_bad_groups_are_one_line_naming_the_key(specs: list[GroupSpec], message: str) -> None:
    with pytest.raises(GroupError) as info:
        build_groups(specs, {"a": FakeProxy("a"), "DIRECT": FakeProxy("DIRECT")})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


# -- select ----------------------------------------------------------------------


async def test_select_takes_the_first_until_another_is_selected() -> None:
    g = group("select", "a", "b")
    assert (g.kind, g.members, g.now()) == ("select", ("a", "b"), "a")
    _stream, chain = await connect_tcp_traced(g, WEB, "g")
    assert chain == ("a", "g") and proxy(g, "a").connects == [WEB]
    g.select("b")
    assert g.now() == "b"
    _stream, chain = await connect_tcp_traced(g, WEB, "g")
    assert chain == ("b", "g") and proxy(g, "b").connects == [WEB]
    with pytest.raises(ValueError, match="no member 'c'"):
        g.select("c")
    assert g.now() == "b"


async def test_select_keeps_its_choice_when_the_member_is_down() -> None:
    g = group("select", "a", "b")
    proxy(g, "a").state = "down"
    with pytest.raises(OutboundError):
        await g.connect_tcp(WEB)
    assert not g.alive("a")
    assert g.now() == "a"  # a person chose it; only a person changes it


@pytest.mark.parametrize("kind", ["fallback", "url-test", "load-balance"])
def test_only_a_select_group_can_be_switched(kind: str) -> None:
    g = group(kind, "a", "b")
    with pytest.raises(ValueError, match="not select"):
        g.select("b")


# -- fallback and the checks -------------------------------------------------------------


async def test_fallback_moves_on_within_one_interval_and_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g = group("fallback", "a", "b", "c", interval=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(g.run_checks)
        await trio.sleep(1)
        assert [len(g.delays(m)) for m in g.members] == [1, 1, 1]
        assert [g.alive(m) for m in g.members] == [True, True, True]
        assert g.now() == "a"
        start = trio.current_time()
        proxy(g, "a").state = "down"
        proxy(g, "b").state = "silent"
        while g.now() == "a":
            await trio.sleep(0.001)
        # The next round finds a down, and b's check times out (2 s) after it.
        assert trio.current_time() - start <= 10.0
        assert g.now() in ("b", "c")
        await trio.sleep(3)
        assert g.now() == "c" and not g.alive("b")
        _stream, chain = await g.connect_tcp_chain(WEB)
        assert chain == ("c", "g")
        proxy(g, "a").state = "up"
        await trio.sleep(10.0)
        assert g.now() == "a"
        nursery.cancel_scope.cancel()
    history = g.delays("b")
    assert [delay for _, delay in history] == [10, 0]  # (10 ms, then timed out)


async def test_a_member_that_fails_a_flow_is_down_at_once_and_checked_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g = group("fallback", "a", "b", interval=300.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(g.run_checks)
        await trio.sleep(1)
        assert len(g.delays("a")) == 1
        proxy(g, "a").state = "down"
        start = trio.current_time()
        with pytest.raises(OutboundError) as info:
            await g.connect_tcp(WEB)
        assert info.value.proxy_failed
        assert not g.alive("a") and g.now() == "b"  # before any check
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == start
        assert [delay for _, delay in g.delays("a")] == [10, 0]  # re-checked, still down
        proxy(g, "a").state = "up"
        await trio.sleep(300)
        assert g.now() == "a"
        nursery.cancel_scope.cancel()


async def test_a_destination_refusing_says_nothing_about_the_proxy() -> None:
    g = group("fallback", "a", "b")
    proxy(g, "a").state = "refusing"
    with pytest.raises(OutboundError):
        await g.connect_tcp(WEB)
    assert g.alive("a") and g.now() == "a"


async def test_a_connect_that_times_out_has_the_member_checked_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g = group("fallback", "a", "b", interval=300.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(g.run_checks)
        await trio.testing.wait_all_tasks_blocked()
        proxy(g, "a").state = "silent"
        with trio.move_on_after(5):
            await g.connect_tcp(WEB)
        assert g.alive("a")  # a slow connect alone proves nothing
        await trio.sleep(2.5)  # the check's own time-out
        assert not g.alive("a") and g.now() == "b"
        assert trio.current_time() < 10
        nursery.cancel_scope.cancel()


async def test_with_every_member_down_fallback_takes_the_first() -> None:
    g = group("fallback", "a", "b")
    for member in g.members:
        proxy(g, member).state = "down"
    await g.check_all()
    assert not g.alive("a") and not g.alive("b")
    assert g.now() == "a"


async def test_the_history_keeps_the_last_ten_newest_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g = group("fallback", "a")
    for i in range(12):
        proxy(g, "a").state = "down" if i % 3 == 2 else "up"
        await g.check_all()
        await trio.sleep(1)
    history = g.delays("a")
    assert len(history) == 10
    assert [delay for _, delay in history] == [0, 10, 10, 0, 10, 10, 0, 10, 10, 0]
    times = [at for at, _ in history]
    assert times == sorted(times) and times[-1] > 1_000_000_000  # unix time


# -- url-test --------------------------------------------------------------------


async def test_url_test_switches_only_beyond_the_tolerance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = FakeProxy("a", delay=0.120), FakeProxy("b", delay=0.080)
    g = group("url-test", "a", "b", tolerance=50, a=a, b=b)
    assert g.now() == "a"  # nothing measured yet
    await g.check_all()
    assert (g.last_delay("a"), g.last_delay("b")) == (120, 80)
    assert g.now() == "a"  # 40 ms faster is within the tolerance
    a.delay = 0.140
    await g.check_all()
    assert g.now() == "b"  # 60 ms faster
    a.delay = 0.070
    await g.check_all()
    assert g.now() == "b"  # 10 ms faster does not switch back
    b.state = "down"
    await g.check_all()
    assert g.now() == "a"
    _stream, chain = await g.connect_tcp_chain(WEB)
    assert chain == ("a", "g")


async def test_a_group_built_again_carries_what_the_checks_found(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, c = FakeProxy("a", delay=0.120), FakeProxy("b", delay=0.040), FakeProxy("c")
    before = group("url-test", "a", "b", "c", a=a, b=b, c=c)
    c.state = "down"
    await before.check_all()
    assert before.now() == "b"
    after = group("url-test", "a", "b", "c", a=a, b=b, c=c)
    assert after.now() == "a"  # a new group trusts every member
    after.carry_health(before, ["a", "b"])
    assert after.now() == "b"
    assert after.delays("b") == before.delays("b")
    assert (after.alive("c"), after.delays("c")) == (True, [])  # not carried


async def test_url_test_with_every_member_down_takes_the_first() -> None:
    g = group("url-test", "a", "b")
    for member in g.members:
        proxy(g, member).state = "down"
    await g.check_all()
    assert g.now() == "a"


# -- load-balance ------------------------------------------------------------------


async def test_load_balance_keeps_a_site_on_one_member_and_moves_only_a_dead_ones_share() -> None:
    g = group("load-balance", "a", "b", "c")
    assert g.now() == "a"
    hosts = [Destination(f"site{i}.example", 443) for i in range(300)]
    before = {dest.host: g.choose(dest) for dest in hosts}
    assert {g.choose(dest) for dest in hosts[:1] * 5} == {before[hosts[0].host]}
    shares = {member: list(before.values()).count(member) for member in g.members}
    assert all(60 < share < 140 for share in shares.values()), shares
    proxy(g, "b").state = "down"
    await g.check_all()
    after = {dest.host: g.choose(dest) for dest in hosts}
    moved = {host for host in before if before[host] != after[host]}
    assert moved == {host for host in before if before[host] == "b"}
    assert "b" not in after.values()
    proxy(g, "b").state = "up"
    await g.check_all()
    assert {dest.host: g.choose(dest) for dest in hosts} == before
    # An address is hashed like a name; now() is the member used last.
    dest = Destination(ipaddress.ip_address("192.0.2.1"), 80)
    _stream, chain = await g.connect_tcp_chain(dest)
    assert chain == (g.now(), "g") and g.now() == g.choose(dest)


async def test_load_balance_with_every_member_down_keeps_the_hash() -> None:
    g = group("load-balance", "a", "b", "c")
    hosts = [Destination(f"site{i}.example", 443) for i in range(30)]
    before = [g.choose(dest) for dest in hosts]
    for member in g.members:
        proxy(g, member).state = "down"
    await g.check_all()
    assert [g.choose(dest) for dest in hosts] == before


# -- nesting, DIRECT, REJECT, UDP --------------------------------------------------------


async def test_a_chain_names_the_leaf_first_and_the_outermost_group_last() -> None:
    a, direct = FakeProxy("a"), FakeProxy("DIRECT")
    specs = [
        GroupSpec("outer", "fallback", ("inner", "DIRECT")),
        GroupSpec("inner", "select", ("a", "REJECT")),
    ]
    groups = build_groups(specs, {"a": a, "DIRECT": direct})
    outer, inner = groups["outer"], groups["inner"]
    _stream, chain = await connect_tcp_traced(outer, WEB, "outer")
    assert chain == ("a", "inner", "outer")
    _session, chain = await open_udp_traced(outer, WEB, "outer")
    assert chain == ("a", "inner", "outer")
    inner.select("REJECT")
    with pytest.raises(OutboundError) as info:
        await outer.connect_tcp(WEB)
    assert info.value.reply is FailureReply.RESET
    with pytest.raises(OutboundError) as info:
        await outer.open_udp()
    assert info.value.reply is FailureReply.ADMIN_PROHIBITED
    # A check of a group is a check through whatever it would choose.
    inner.select("a")
    a.state = "down"
    await outer.check_all()
    assert not outer.alive("inner") and outer.now() == "DIRECT"
    _stream, chain = await connect_tcp_traced(outer, WEB, "outer")
    assert chain == ("DIRECT", "outer")
    # Not a group: one name.
    _stream, chain = await connect_tcp_traced(direct, WEB, "DIRECT")
    assert chain == ("DIRECT",)


async def test_a_udp_session_that_fails_marks_the_member_down() -> None:
    g = group("fallback", "a", "b")
    proxy(g, "a").state = "down"
    with pytest.raises(OutboundError):
        await g.open_udp()
    assert g.now() == "b"
    session, chain = await g.open_udp_chain(WEB)
    assert isinstance(session, FakeSession) and chain == ("b", "g")


# -- measuring ---------------------------------------------------------------------


async def test_measure_delay_by_http(autojump_clock: trio.testing.MockClock) -> None:
    member = FakeProxy("a", delay=0.0426)
    assert await measure_delay(member, "http://check.example/generate_204", 1.0) == 43
    assert member.connects == [Destination("check.example", 80)]
    (stream,) = member.streams
    assert stream.sent.startswith(b"GET /generate_204 HTTP/1.1\r\nHost: check.example\r\n")
    assert stream.closed
    member.answer = b"HTTP/1.0 503 Service Unavailable\r\n\r\n"
    assert await measure_delay(member, "http://check.example/", 1.0) == 43  # any answer


async def test_measure_delay_by_tcp(autojump_clock: trio.testing.MockClock) -> None:
    member = FakeProxy("a", delay=0.0)
    assert await measure_delay(member, "tcp://192.0.2.1:53", 1.0) == 1  # never 0 (= failed)
    assert member.connects == [Destination(ipaddress.ip_address("192.0.2.1"), 53)]
    assert member.streams[0].sent == b""


@pytest.mark.parametrize("answer", [b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1\r\n", b"x" * 5000])
async def test_measure_delay_refuses_what_is_not_http(
    answer: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    member = FakeProxy("a")
    member.answer = answer
    with pytest.raises(OutboundError):
        await measure_delay(member, HTTP_CHECK, 1.0)
    assert member.streams[0].closed


async def test_measure_delay_times_out(autojump_clock: trio.testing.MockClock) -> None:
    member = FakeProxy("a")
    member.state = "silent"
    with pytest.raises(TimeoutError):
        await measure_delay(member, HTTP_CHECK, 1.5)
    assert trio.current_time() == pytest.approx(1.5)
    member.state = "down"
    with pytest.raises(OutboundError):
        await measure_delay(member, HTTP_CHECK, 1.5)


async def test_a_burst_of_failed_flows_is_not_a_burst_of_checks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    g = group("fallback", "a", "b", interval=300.0)
    a = proxy(g, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(g.run_checks)
        await trio.sleep(1)
        a.state = "down"
        for _ in range(3):
            # Every member down: each flow tries the first and fails.
            proxy(g, "b").state = "down"
            for _ in range(20):
                with pytest.raises(OutboundError):
                    await g.connect_tcp(WEB)
            await trio.sleep(0.2)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    # 60 failed flows in 0.6 s: the first round, then at most one re-check a second.
    assert 2 <= len(g.delays("a")) <= 3


async def test_a_bug_in_a_member_fails_its_check_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = group("fallback", "a", "b")

    async def broken(dest: Destination) -> trio.abc.HalfCloseableStream:
        raise RuntimeError("a bug")

    proxy(g, "a").connect_tcp = broken  # type: ignore[method-assign]
    await g.check_all()
    assert not g.alive("a") and g.alive("b") and g.now() == "b"
    assert "checking a failed unexpectedly" in caplog.text


class ToLocalPort:
    """A member that takes every connection to one loopback port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connects: list[Destination] = []

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        self.connects.append(dest)
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


async def test_measure_delay_by_https(tmp_path: Path, nursery: trio.Nursery) -> None:
    requests: list[bytes] = []

    async def server(stream: trio.SSLStream[trio.SocketStream]) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some()
        requests.append(head)
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        await trio.aclose_forcefully(stream)

    (listener,) = await nursery.start(
        functools.partial(
            trio.serve_ssl_over_tcp, server, 0, self_signed(tmp_path), host="127.0.0.1"
        )
    )
    member = ToLocalPort(listener.transport_listener.socket.getsockname()[1])
    delay = await measure_delay(member, "https://check.example/generate_204", 5.0)
    assert delay >= 1
    assert member.connects == [Destination("check.example", 443)]
    assert requests[0].startswith(b"GET /generate_204 HTTP/1.1\r\nHost: check.example\r\n")

    # Not TLS on the other end: a failed check, not a crash.
    async def plain(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        await trio.aclose_forcefully(stream)

    (plain_listener,) = await nursery.start(
        functools.partial(trio.serve_tcp, plain, 0, host="127.0.0.1")
    )
    member = ToLocalPort(plain_listener.socket.getsockname()[1])
    with pytest.raises(OutboundError):
        await measure_delay(member, "https://check.example/", 5.0)


async def test_health_checks_of_several_groups_stop_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = group("fallback", "a"), group("url-test", "a", "b")
    with trio.move_on_after(25):
        await run_health_checks([first, second])
    # Rounds at 0, 10 and 20 s, each group on its own.
    assert len(first.delays("a")) == 3 and len(second.delays("b")) == 3
