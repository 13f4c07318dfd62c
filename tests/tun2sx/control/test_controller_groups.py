"""The controller API over the real proxy groups (outbounds.group), not a fake."""

from __future__ import annotations

from typing import Any

import trio

from outbounds.base import Destination, FailureReply, OutboundError
from outbounds.direct import DirectOutbound
from outbounds.group import GroupSpec, ProxyGroup, build_groups
from tests.support.controller import FakeEngine, request, start_controller
from tun2sx.control.controller import Controller
from tun2sx.naming.router import Router, RuleSet, parse_rules


class Proxy:
    """A named outbound that is never dialled here."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def connect_tcp(self, dest: Destination) -> Any:
        raise OutboundError(FailureReply.RESET, f"{self.name} is not dialled", proxy_failed=True)

    async def open_udp(self) -> Any:
        raise NotImplementedError


def groups_engine() -> tuple[FakeEngine, dict[str, ProxyGroup]]:
    outbounds: dict[str, Any] = {"DIRECT": DirectOutbound(), "a": Proxy("a"), "b": Proxy("b")}
    groups = build_groups(
        [
            GroupSpec("pick", "select", ("a", "b", "DIRECT")),
            GroupSpec("auto", "fallback", ("a", "b")),
        ],
        outbounds,
    )
    named = {**outbounds, **groups}
    engine = FakeEngine()
    engine.router = Router(
        groups["pick"],
        RuleSet(parse_rules(("DOMAIN-SUFFIX,example.com,auto",), named)),
        named,
        default_name="pick",
    )
    return engine, groups


async def test_select_group_switched_through_the_api_moves_new_flows(
    nursery: trio.Nursery,
) -> None:
    engine, groups = groups_engine()
    port = await start_controller(nursery, Controller(engine))  # type: ignore[arg-type]
    proxies = (await request(port, "GET", "/proxies")).json()["proxies"]
    assert proxies["pick"]["type"] == "Selector"
    assert proxies["pick"]["all"] == ["a", "b", "DIRECT"]
    assert proxies["pick"]["now"] == "a"
    assert proxies["auto"]["type"] == "Fallback"
    put = await request(port, "PUT", "/proxies/pick", body={"name": "b"})
    assert put.status == 204
    assert (await request(port, "GET", "/proxies/pick")).json()["now"] == "b"
    # What a new flow through the group now takes.
    assert groups["pick"].choose(Destination("www.example.org", 443)) == "b"
    refused = await request(port, "PUT", "/proxies/pick", body={"name": "c"})
    assert refused.status == 400
    assert groups["pick"].now() == "b"


async def test_fallback_shows_a_dead_member_and_refuses_selection(nursery: trio.Nursery) -> None:
    engine, groups = groups_engine()
    port = await start_controller(nursery, Controller(engine))  # type: ignore[arg-type]
    assert (await request(port, "PUT", "/proxies/auto", body={"name": "b"})).status == 400
    auto = groups["auto"]
    auto.connect_failed("a", OutboundError(FailureReply.RESET, "a dropped", proxy_failed=True))
    assert (await request(port, "GET", "/proxies/auto")).json()["now"] == "b"
    assert (await request(port, "GET", "/proxies/a")).json()["alive"] is False
    assert (await request(port, "GET", "/proxies/b")).json()["alive"] is True
