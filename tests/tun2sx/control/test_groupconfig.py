"""`[groups.NAME]` in the config file: what lands, and every mistake in one line."""

from __future__ import annotations

import tomllib

import pytest

from outbounds.base import Destination
from outbounds.group import ProxyGroup, reachable_groups
from outbounds.net import SocketOptions
from tun2sx.control.api import make_settings
from tun2sx.control.app import ConfigError, build_router, used_outbounds
from tun2sx.control.config import settings_from_mapping

OUTBOUNDS = """
[outbounds.a]
url = "socks5://127.0.0.1:1080"
[outbounds.b]
url = "socks5://127.0.0.1:1081"
"""


def load(document: str) -> object:
    data = tomllib.loads(document)
    data["outbounds"] = tomllib.loads(OUTBOUNDS)["outbounds"]
    return settings_from_mapping(data)


def test_rules_and_the_default_name_groups_and_only_those_are_checked() -> None:
    settings = settings_from_mapping(
        tomllib.loads(
            'outbound = "auto"\nrules = ["DOMAIN-SUFFIX,video.example,fast"]\n'
            + OUTBOUNDS
            + """
[groups.auto]
type = "fallback"
members = ["fast", "b", "DIRECT"]
[groups.fast]
type = "url-test"
members = ["a", "b"]
url = "tcp://192.0.2.1:443"
interval = 30
timeout = 2.5
tolerance = 0
[groups.unused]
type = "select"
members = ["a", "REJECT"]
"""
        )
    )
    router = build_router(settings, SocketOptions())
    auto, fast, unused = (router.outbounds[name] for name in ("auto", "fast", "unused"))
    assert isinstance(auto, ProxyGroup) and isinstance(fast, ProxyGroup)
    assert isinstance(unused, ProxyGroup)
    assert router.route(Destination("x.example", 443), "tcp") is auto
    assert router.route(Destination("www.video.example", 443), "tcp") is fast
    assert (fast.kind, fast.members, fast.spec.interval, fast.spec.timeout) == (
        "url-test",
        ("a", "b"),
        30.0,
        2.5,
    )
    assert fast.spec.tolerance == 0 and auto.spec.interval == 300.0
    assert auto.target("fast") is fast and auto.target("DIRECT") is router.outbounds["DIRECT"]
    assert set(map(id, reachable_groups(used_outbounds(router)))) == {id(auto), id(fast)}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("groups = 1", "groups: expected a table"),
        ("[groups]\ng = 1", "groups.g: expected a table"),
        ('[groups.g]\nmembers = ["a"]', "groups.g.type: required"),
        ('[groups.g]\ntype = "random"\nmembers = ["a"]', "groups.g.type: expected one of"),
        ('[groups.g]\ntype = 3\nmembers = ["a"]', "groups.g.type: expected one of"),
        ('[groups.g]\ntype = "select"', "groups.g.members: required"),
        ('[groups.g]\ntype = "select"\nmembers = "a"', "groups.g.members: expected a list"),
        ('[groups.g]\ntype = "select"\nmembers = []', "groups.g.members: a group needs"),
        ('[groups.g]\ntype = "select"\nmembers = ["a", 2]', "groups.g.members[1]: expected"),
        ('[groups.g]\ntype = "select"\nmembers = ["a", "c"]', "groups.g.members[1]: unknown"),
        ('[groups.g]\ntype = "select"\nmembers = ["a"]\nproxies = []', "groups.g.proxies: unknown"),
        ('[groups.g]\ntype = "select"\nmembers = ["a"]\nurl = 1', "groups.g.url: expected a str"),
        (
            '[groups.g]\ntype = "select"\nmembers = ["a"]\nurl = "ftp://x/"',
            "groups.g.url: expected http[s]://host/path or tcp://host:port",
        ),
        (
            '[groups.g]\ntype = "select"\nmembers = ["a"]\nurl = "http://me:Secret@x/"',
            "groups.g.url: 'http://me:***@x/': a check URL carries no user or password",
        ),
        *(
            (f'[groups.g]\ntype = "select"\nmembers = ["a"]\ninterval = {value}', message)
            for value in ("0", "-1", "1e-300", "0.5", "inf", "nan", "1e300", "86401")
            for message in ["groups.g.interval: 1 to 86400 seconds, got "]
        ),
        *(
            (f'[groups.g]\ntype = "select"\nmembers = ["a"]\ntimeout = {value}', message)
            for value in ("0", "-1", "1e-300", "0.05", "inf", "nan", "1e300", "61")
            for message in ["groups.g.timeout: 0.1 to 60 seconds, got "]
        ),
        *(
            (f'[groups.g]\ntype = "select"\nmembers = ["a"]\ntolerance = {value}', message)
            for value in ("-1", "60001", "9223372036854775807")
            for message in ["groups.g.tolerance: 0 to 60000 ms, got "]
        ),
        ('[groups.g]\ntype = "select"\nmembers = ["a"]\ninterval = "5m"', "groups.g.interval: ex"),
        ('[groups.g]\ntype = "select"\nmembers = ["a"]\ntimeout = true', "groups.g.timeout: exp"),
        ('[groups.g]\ntype = "select"\nmembers = ["a"]\ntolerance = 1.5', "groups.g.tolerance:"),
        ('[groups.a]\ntype = "select"\nmembers = ["b"]', "groups.a: an outbound has this name"),
        ('[groups.REJECT]\ntype = "select"\nmembers = ["b"]', "groups.REJECT: REJECT is built in"),
        ('[groups."x y"]\ntype = "select"\nmembers = ["b"]', "groups: 'x y' is not a usable"),
        (
            '[groups.x]\ntype = "select"\nmembers = ["y"]\n[groups.y]\ntype = "fallback"\n'
            'members = ["a", "x"]',
            "groups.x: groups contain each other (x -> y -> x)",
        ),
        (
            'rules = ["DOMAIN,x,nogroup"]\n[groups.g]\ntype = "select"\nmembers = ["a"]',
            "rules[0] 'DOMAIN,x,nogroup': unknown outbound 'nogroup'",
        ),
    ],
)
def test_mistakes_are_one_line_naming_the_key(document: str, message: str) -> None:
    document = 'outbound = "DIRECT"\n' + document
    with pytest.raises(ConfigError) as info:
        load(document)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text and "Secret" not in text


def test_the_embedding_api_takes_groups_as_the_file_has_them() -> None:
    settings = make_settings(
        3,
        {
            "outbound": "auto",
            "outbounds": {"a": "socks5://127.0.0.1:1080"},
            "groups": {"auto": {"type": "fallback", "members": ["a", "DIRECT"], "interval": 60}},
        },
    )
    (spec,) = settings.groups
    assert (spec.name, spec.kind, spec.members, spec.interval) == (
        "auto",
        "fallback",
        ("a", "DIRECT"),
        60.0,
    )
    with pytest.raises(ConfigError, match=r"^groups.auto.members\[1\]: unknown outbound"):
        make_settings(3, {"groups": {"auto": {"type": "select", "members": ["DIRECT", "b"]}}})
