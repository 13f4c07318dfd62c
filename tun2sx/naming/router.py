"""Routing: which outbound carries a flow, by destination and network.

Rules are Clash-style strings, tried in order, first match wins:

    DOMAIN,www.example.com,proxy        the exact name
    DOMAIN-SUFFIX,example.com,proxy     the name or any name under it
    DOMAIN-KEYWORD,google,proxy         any name containing the word
    IP-CIDR,10.0.0.0/8,DIRECT           an address destination in the network
    IP-CIDR6,fc00::/7,REJECT            (IP-CIDR takes v6 too)
    DST-PORT,53,REJECT                  a port, or a range 6881-6889
    NETWORK,udp,proxy                   tcp or udp
    MATCH,proxy                         everything

The target is a named outbound or proxy group, DIRECT or REJECT; REJECT makes `route`
return None and the flow is refused (RST for TCP, ICMP administratively
prohibited for UDP). Names are never resolved here: a destination that
came through a fake IP carries its host name, and IP-CIDR rules do not
match it (`no-resolve` is accepted for Clash compatibility and changes
nothing).

Rule lists of thousands of domains are common, so matching is not a scan:
rules are compiled into indexes (a dict of exact names, a dict of
suffixes walked label by label, one dict per CIDR prefix length, a dict of
ports) that each yield the position of the first rule that matches; the
smallest position across the indexes is the first matching rule. Only
keywords and port ranges, which are few, are scanned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import attrs

from outbounds.base import Destination, Outbound

Network = Literal["tcp", "udp"]

DIRECT = "DIRECT"
REJECT = "REJECT"
BUILTIN_TARGETS = (DIRECT, REJECT)

_KINDS = (
    "DOMAIN",
    "DOMAIN-SUFFIX",
    "DOMAIN-KEYWORD",
    "IP-CIDR",
    "IP-CIDR6",
    "DST-PORT",
    "NETWORK",
    "MATCH",
)
_OPTIONS = frozenset({"no-resolve"})
_NO_MATCH = 1 << 62


class RuleError(ValueError):
    """A rule string is malformed or names an unknown outbound."""


@attrs.frozen
class Rule:
    """One parsed rule.

    Attributes:
        kind: DOMAIN, DOMAIN-SUFFIX, ..., MATCH (IP-CIDR6 is kept as IP-CIDR).
        value: the normalised value ("" for MATCH): a lower-case name, a
            network in text form, a port or "lo-hi", "tcp"/"udp".
        target: an outbound name, DIRECT or REJECT.
        options: extra words after the target (only no-resolve exists).
    """

    kind: str
    value: str
    target: str
    options: tuple[str, ...] = ()

    def __str__(self) -> str:
        parts = [self.kind] + ([self.value] if self.kind != "MATCH" else []) + [self.target]
        return ",".join(parts + list(self.options))


def _normalise_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def parse_rule(text: str, targets: Collection[str]) -> Rule:
    """Parse one rule string.

    Args:
        text: e.g. ``DOMAIN-SUFFIX,example.com,proxy``.
        targets: the outbound names a rule may name (DIRECT and REJECT are
            always allowed).

    Returns:
        The rule, with its value normalised.

    Raises:
        RuleError: the message says what is wrong, without the rule's position.
    """
    parts = [part.strip() for part in text.split(",")]
    kind = parts[0].upper()
    if kind not in _KINDS:
        raise RuleError(f"unknown rule type {parts[0]!r} (known: {', '.join(_KINDS)})")
    options: tuple[str, ...] = ()
    if kind == "MATCH":
        if len(parts) != 2:
            raise RuleError("expected MATCH,TARGET")
        value, target = "", parts[1]
    else:
        if len(parts) < 3:
            raise RuleError(f"expected {kind},VALUE,TARGET")
        value, target, options = parts[1], parts[2], tuple(parts[3:])
    for option in options:
        if option not in _OPTIONS:
            raise RuleError(f"unknown rule option {option!r}")
    if target not in targets and target not in BUILTIN_TARGETS:
        raise RuleError(f"unknown outbound {target!r}")
    if not value and kind != "MATCH":
        raise RuleError(f"{kind} needs a value")
    if kind in ("DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD"):
        value = _normalise_name(value)
        if not value:
            raise RuleError(f"{kind} needs a name")
    elif kind in ("IP-CIDR", "IP-CIDR6"):
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise RuleError(f"{kind}: {exc}") from exc
        if kind == "IP-CIDR6" and net.version != 6:
            raise RuleError(f"IP-CIDR6: {value} is not an IPv6 network")
        kind, value = "IP-CIDR", str(net)
    elif kind == "DST-PORT":
        lo, hi = _parse_port_range(value)
        value = str(lo) if lo == hi else f"{lo}-{hi}"
    elif kind == "NETWORK":
        value = value.lower()
        if value not in ("tcp", "udp"):
            raise RuleError(f"NETWORK: expected tcp or udp, got {value!r}")
    return Rule(kind, value, target, options)


def _parse_port_range(text: str) -> tuple[int, int]:
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise RuleError(f"DST-PORT: expected a port or LOW-HIGH, got {text!r}") from None
    if not (0 <= lo <= hi <= 0xFFFF):
        raise RuleError(f"DST-PORT: {text!r} is not a port range within 0-65535")
    return lo, hi


def parse_rules(texts: Sequence[str], targets: Collection[str]) -> tuple[Rule, ...]:
    """Parse a rule list; the error names the rule by position and text.

    Raises:
        RuleError: e.g. ``rules[3] 'DOMAIN,x,prxy': unknown outbound 'prxy'``.
    """
    rules = []
    for i, text in enumerate(texts):
        try:
            rules.append(parse_rule(text, targets))
        except RuleError as exc:
            raise RuleError(f"rules[{i}] {text!r}: {exc}") from None
    return tuple(rules)


def _keep_first(index: dict[object, int], key: object, position: int) -> None:
    # Positions are added in order, so the first one stored is the smallest.
    index.setdefault(key, position)


class RuleSet:
    """Rules compiled into indexes; `first_match` gives the first rule's position.

    Args:
        rules: parsed rules, in priority order.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._domains: dict[object, int] = {}
        self._suffixes: dict[object, int] = {}
        self._keywords: list[tuple[int, str]] = []
        # prefix length -> {network address as int: position}, per family.
        self._cidrs: dict[int, dict[int, dict[object, int]]] = {4: {}, 6: {}}
        self._ports: dict[object, int] = {}
        self._port_ranges: list[tuple[int, int, int]] = []
        self._networks: dict[object, int] = {}
        self._match = _NO_MATCH
        for position, rule in enumerate(self.rules):
            self._add(position, rule)
        self._prefixes = {
            version: sorted(by_len, reverse=True) for version, by_len in self._cidrs.items()
        }

    def _add(self, position: int, rule: Rule) -> None:
        kind, value = rule.kind, rule.value
        if kind == "DOMAIN":
            _keep_first(self._domains, value, position)
        elif kind == "DOMAIN-SUFFIX":
            _keep_first(self._suffixes, value, position)
        elif kind == "DOMAIN-KEYWORD":
            self._keywords.append((position, value))
        elif kind == "IP-CIDR":
            net = ipaddress.ip_network(value)
            by_len = self._cidrs[net.version].setdefault(net.prefixlen, {})
            _keep_first(by_len, int(net.network_address), position)
        elif kind == "DST-PORT":
            lo, hi = _parse_port_range(value)
            if lo == hi:
                _keep_first(self._ports, lo, position)
            else:
                self._port_ranges.append((position, lo, hi))
        elif kind == "NETWORK":
            _keep_first(self._networks, value, position)
        elif self._match == _NO_MATCH:
            self._match = position

    def first_match(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> int | None:
        """The position of the first rule matching, or None.

        `name` is the host name an address destination was answered for
        (tun2sx.naming.realnames): domain rules then match it, IP rules the address.
        """
        best = min(
            self._match,
            self._networks.get(network, _NO_MATCH),
            self._ports.get(dest.port, _NO_MATCH),
        )
        for position, lo, hi in self._port_ranges:
            if position >= best:
                break
            if lo <= dest.port <= hi:
                best = position
                break
        host = dest.host
        if isinstance(host, str):
            best = self._match_name(_normalise_name(host), best)
        else:
            if name is not None:
                best = self._match_name(_normalise_name(name), best)
            bits = 32 if host.version == 4 else 128
            number = int(host)
            by_len = self._cidrs[host.version]
            for prefixlen in self._prefixes[host.version]:
                masked = number >> (bits - prefixlen) << (bits - prefixlen)
                best = min(best, by_len[prefixlen].get(masked, _NO_MATCH))
        return None if best == _NO_MATCH else best

    def _match_name(self, name: str, best: int) -> int:
        best = min(best, self._domains.get(name, _NO_MATCH))
        if self._suffixes:
            # Walk "a.b.example.com", "b.example.com", "example.com", "com".
            suffix = name
            while True:
                best = min(best, self._suffixes.get(suffix, _NO_MATCH))
                dot = suffix.find(".")
                if dot < 0:
                    break
                suffix = suffix[dot + 1 :]
        for position, keyword in self._keywords:
            if position >= best:
                break
            if keyword in name:
                best = position
                break
        return best


def rule_label(rule: Rule | None) -> tuple[str, str]:
    """How a flow's deciding rule is shown: its type and its value.

    A MATCH rule and the default outbound (no rule) both show as Clash
    shows them, ``("Match", "")``; other rules by their type as written in
    the config (``DOMAIN-SUFFIX``, ``IP-CIDR``) and their normalised value.
    """
    if rule is None or rule.kind == "MATCH":
        return "Match", ""
    return rule.kind, rule.value


class Router:
    """Picks an outbound for a destination.

    Args:
        default: the outbound used when no rule matches (None: reject).
        rules: compiled rules; their targets must be in `outbounds` or be
            DIRECT / REJECT.
        outbounds: the named outbounds and proxy groups rules may use;
            DIRECT, when a rule names it, must be here too (`build_router`
            puts it there). A controller lists them from `Router.outbounds`.
        default_name: how `name_of` labels the default outbound (None: by
            its protocol name, e.g. "socks5").
    """

    def __init__(
        self,
        default: Outbound | None,
        rules: RuleSet | None = None,
        outbounds: Mapping[str, Outbound] | None = None,
        *,
        default_name: str | None = None,
    ) -> None:
        self.default = default
        self.rules = rules or RuleSet(())
        self.outbounds = dict(outbounds or {})
        self._targets: tuple[Outbound | None, ...] = tuple(
            None if rule.target == REJECT else self.outbounds[rule.target]
            for rule in self.rules.rules
        )
        self._names = {id(outbound): name for name, outbound in self.outbounds.items()}
        if default is not None and default_name is not None:
            self._names.setdefault(id(default), default_name)

    def route(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> Outbound | None:
        """The outbound for `dest`, or None when a REJECT rule (or a None
        default) refuses it; `name` as in `RuleSet.first_match`."""
        position = self.rules.first_match(dest, network, name)
        if position is None:
            return self.default
        return self._targets[position]

    def decide(
        self, dest: Destination, network: Network, name: str | None = None
    ) -> tuple[Outbound | None, Rule | None]:
        """`route`, and the rule that decided (None: the default outbound)."""
        position = self.rules.first_match(dest, network, name)
        if position is None:
            return self.default, None
        return self._targets[position], self.rules.rules[position]

    def rule_for(self, dest: Destination, network: Network, name: str | None = None) -> Rule | None:
        """The rule that decides `dest`, or None when the default does."""
        position = self.rules.first_match(dest, network, name)
        return None if position is None else self.rules.rules[position]

    def name_of(self, outbound: Outbound | None) -> str:
        """The configured name of an outbound this router returned."""
        if outbound is None:
            return REJECT
        return self._names.get(id(outbound), outbound.name)
