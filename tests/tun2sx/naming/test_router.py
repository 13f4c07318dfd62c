"""Rules: parsing with one-line errors, matching, and first-match order.

The compiled `RuleSet` is checked against a plain linear reference (the
definition of first match) on random rule lists and destinations.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from outbounds.base import Destination, UdpSession
from tun2sx.naming.router import Router, RuleError, RuleSet, parse_rule, parse_rules

TARGETS = ("proxy", "other")


class NamedOutbound:
    def __init__(self, name: str) -> None:
        self.name = name

    async def connect_tcp(self, dest: Destination) -> trio.abc.HalfCloseableStream:
        raise NotImplementedError

    async def open_udp(self) -> UdpSession:
        raise NotImplementedError


def dest(host: str, port: int = 443) -> Destination:
    return Destination.parse_host(host, port)


def make_router(*rules: str, default: str | None = "default") -> Router:
    outbounds = {name: NamedOutbound(name) for name in (*TARGETS, "DIRECT")}
    return Router(
        None if default is None else NamedOutbound(default),
        RuleSet(parse_rules(rules, TARGETS)),
        outbounds,
    )


def routed(router: Router, host: str, port: int = 443, network: str = "tcp") -> str:
    outbound = router.route(dest(host, port), network)  # type: ignore[arg-type]
    return router.name_of(outbound)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("DOMAIN,x.com,prxy", "unknown outbound 'prxy'"),
        ("DOMAIN-SUFFX,x.com,proxy", "unknown rule type 'DOMAIN-SUFFX'"),
        ("DOMAIN,x.com", "expected DOMAIN,VALUE,TARGET"),
        ("DOMAIN,,proxy", "DOMAIN needs a value"),
        ("DOMAIN,.,proxy", "DOMAIN needs a name"),
        ("IP-CIDR,10.0.0.0/33,DIRECT", "IP-CIDR"),
        ("IP-CIDR6,10.0.0.0/8,DIRECT", "not an IPv6 network"),
        ("IP-CIDR,10.0.0.0/8,DIRECT,resolve", "unknown rule option 'resolve'"),
        ("DST-PORT,http,REJECT", "expected a port or LOW-HIGH"),
        ("DST-PORT,70000,REJECT", "not a port range"),
        ("DST-PORT,90-80,REJECT", "not a port range"),
        ("NETWORK,icmp,proxy", "expected tcp or udp"),
        ("MATCH", "expected MATCH,TARGET"),
        ("MATCH,proxy,extra", "expected MATCH,TARGET"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text, TARGETS)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rule_list_errors_name_position_and_text() -> None:
    with pytest.raises(RuleError, match=r"^rules\[1\] 'DOMAIN,x,prxy': unknown outbound 'prxy'$"):
        parse_rules(["MATCH,proxy", "DOMAIN,x,prxy"], TARGETS)


def test_values_are_normalised() -> None:
    assert str(parse_rule(" domain-suffix , Example.COM. , proxy ", TARGETS)) == (
        "DOMAIN-SUFFIX,example.com,proxy"
    )
    assert str(parse_rule("IP-CIDR,10.1.2.3/8,DIRECT,no-resolve", TARGETS)) == (
        "IP-CIDR,10.0.0.0/8,DIRECT,no-resolve"
    )
    assert parse_rule("IP-CIDR6,fc00::1/7,REJECT", TARGETS).kind == "IP-CIDR"
    assert parse_rule("DST-PORT,80-80,REJECT", TARGETS).value == "80"
    assert str(parse_rule("MATCH,other", TARGETS)) == "MATCH,other"


def test_domain_rules() -> None:
    router = make_router(
        "DOMAIN,exact.example.com,proxy",
        "DOMAIN-SUFFIX,example.org,other",
        "DOMAIN-KEYWORD,tracker,REJECT",
    )
    assert routed(router, "exact.example.com") == "proxy"
    assert routed(router, "EXACT.example.com.") == "proxy"
    assert routed(router, "sub.exact.example.com") == "default"
    assert routed(router, "example.org") == "other"
    assert routed(router, "a.b.example.org") == "other"
    assert routed(router, "badexample.org") == "default"
    assert routed(router, "ads.tracker-cdn.net") == "REJECT"
    assert router.route(dest("ads.tracker-cdn.net"), "tcp") is None


def test_ip_rules_never_match_names() -> None:
    router = make_router("IP-CIDR,10.0.0.0/8,proxy,no-resolve", "IP-CIDR,2001:db8::/32,other")
    assert routed(router, "10.1.2.3") == "proxy"
    assert routed(router, "11.1.2.3") == "default"
    assert routed(router, "2001:db8::5") == "other"
    assert routed(router, "2001:db9::5") == "default"
    # A name is never resolved to test it against an IP rule.
    assert routed(router, "localhost") == "default"
    assert routed(router, "10.in-addr.example") == "default"


def test_port_network_and_match() -> None:
    router = make_router(
        "DST-PORT,53,REJECT", "DST-PORT,6881-6889,other", "NETWORK,udp,proxy", "MATCH,DIRECT"
    )
    assert routed(router, "1.1.1.1", 53, "udp") == "REJECT"
    assert routed(router, "example.com", 6885) == "other"
    assert routed(router, "example.com", 6890) == "DIRECT"
    assert routed(router, "example.com", 6890, "udp") == "proxy"
    assert routed(router, "example.com", 443) == "DIRECT"


def test_first_match_wins_across_kinds() -> None:
    router = make_router(
        "DOMAIN-SUFFIX,example.com,other",
        "DOMAIN,www.example.com,proxy",
        "DST-PORT,443,REJECT",
    )
    # The exact rule comes later than the suffix rule: the suffix wins.
    assert routed(router, "www.example.com") == "other"
    assert routed(router, "www.example.net") == "REJECT"
    # The same rule twice keeps its first position.
    router = make_router("DST-PORT,443,proxy", "DOMAIN,a.test,other", "DST-PORT,443,REJECT")
    assert routed(router, "a.test") == "proxy"


def test_no_rules_and_reject_default() -> None:
    assert routed(make_router(), "example.com") == "default"
    rejecting = make_router("DOMAIN,ok.test,proxy", default=None)
    assert rejecting.route(dest("other.test"), "tcp") is None
    assert routed(rejecting, "ok.test") == "proxy"
    rule = rejecting.rule_for(dest("ok.test"), "tcp")
    assert rule is not None and rule.target == "proxy"
    assert rejecting.rule_for(dest("other.test"), "tcp") is None


# -- compiled indexes against the definition of first match -----------------

LABELS = st.sampled_from(["a", "b", "example", "com", "org", "cdn"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
# Addresses share their top bits often, so random prefixes both match and miss.
V4 = st.builds(
    lambda top, mid, low: ipaddress.IPv4Address(top << 24 | mid << 22 | low),
    st.sampled_from([10, 11]),
    st.integers(0, 3),
    st.integers(0, 2**22 - 1),
)
V6 = st.builds(
    lambda top, mid, low: ipaddress.IPv6Address(top << 112 | mid << 110 | low),
    st.sampled_from([0x2001, 0x2002]),
    st.integers(0, 3),
    st.integers(0, 2**110 - 1),
)


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    target = draw(st.sampled_from([*TARGETS, "DIRECT", "REJECT"]))
    # Kinds that match broadly come rarely, or they would shadow the rest.
    kind = draw(
        st.sampled_from(["DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "IP-CIDR", "IP-CIDR"] * 3)
    )
    kind = draw(st.sampled_from([kind] * 6 + ["DST-PORT", "NETWORK", "MATCH"]))
    if kind == "MATCH":
        return f"MATCH,{target}"
    if kind == "NETWORK":
        return f"NETWORK,{draw(st.sampled_from(['tcp', 'udp']))},{target}"
    if kind == "DST-PORT":
        lo = draw(st.integers(0, 1000))
        hi = draw(st.integers(lo, lo + 20))
        return f"DST-PORT,{lo}-{hi},{target}"
    if kind == "IP-CIDR":
        addr = draw(st.one_of(V4, V6))
        prefix = draw(st.integers(0, 10 if addr.version == 4 else 18))
        return f"IP-CIDR,{addr}/{prefix},{target}"
    value = draw(st.sampled_from(["ex", "cd"])) if kind == "DOMAIN-KEYWORD" else draw(NAMES)
    return f"{kind},{value},{target}"


def reference_first_match(rules: RuleSet, d: Destination, network: str) -> int | None:
    host = d.host
    for position, rule in enumerate(rules.rules):
        kind, value = rule.kind, rule.value
        if kind == "MATCH":
            hit = True
        elif kind == "NETWORK":
            hit = value == network
        elif kind == "DST-PORT":
            lo, _, hi = value.partition("-")
            hit = int(lo) <= d.port <= int(hi or lo)
        elif kind == "IP-CIDR":
            hit = not isinstance(host, str) and host in ipaddress.ip_network(value)
        elif not isinstance(host, str):
            hit = False
        elif kind == "DOMAIN":
            hit = host == value
        elif kind == "DOMAIN-SUFFIX":
            hit = host == value or host.endswith("." + value)
        else:
            hit = value in host
        if hit:
            return position
    return None


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(rule_texts(), max_size=12),
    host=st.one_of(NAMES, V4.map(str), V6.map(str)),
    port=st.integers(0, 1000),
    network=st.sampled_from(["tcp", "udp"]),
)
def test_indexes_agree_with_a_linear_scan(
    texts: list[str], host: str, port: int, network: str
) -> None:
    rules = RuleSet(parse_rules(texts, TARGETS))
    d = dest(host, port)
    assert rules.first_match(d, network) == reference_first_match(rules, d, network)  # type: ignore[arg-type]
