"""Routing: which outbound carries a flow, by destination and network.

For now a router has one default outbound and an optional ordered rule
list; a rule that names no outbound (REJECT) makes `route` return None, and
the flow is refused (RST for TCP, ICMP administratively prohibited for UDP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from outbounds.base import Destination, Outbound

Network = Literal["tcp", "udp"]
Rule = Callable[[Destination, Network], "tuple[bool, Outbound | None]"]


class Router:
    """Picks an outbound for a destination.

    Args:
        default: the outbound used when no rule matches (None: reject).
        rules: callables tried in order; each returns (matched, outbound).
    """

    def __init__(self, default: Outbound | None, rules: Sequence[Rule] = ()) -> None:
        self.default = default
        self.rules = tuple(rules)

    def route(self, dest: Destination, network: Network) -> Outbound | None:
        for rule in self.rules:
            matched, outbound = rule(dest, network)
            if matched:
                return outbound
        return self.default
