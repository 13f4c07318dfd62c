"""The JSON a Clash/mihomo dashboard reads, built from a running engine.

The controller (tun2sx.control.controller) routes requests here; this
module only shapes data, with no sockets, so each answer is testable
from a fake engine. Field names and shapes follow what the dashboards
read (metacubexd, yacd, zashboard): ports in connection metadata are
strings, times RFC 3339, groups carry `all` and `now`, every proxy a
`history` of `{time, delay}`.

Modes: `rule` routes by the rules; `global` sends every new flow to the
member selected in the GLOBAL pseudo-group (a selector over every
outbound and group); `direct` sends every new flow to DIRECT. Flows in
progress keep their outbound.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from outbounds.base import Outbound
from tun2sx.dataplane.context import ConnectTimes, FlowInfo
from tun2sx.naming.router import DIRECT, REJECT, Router

if TYPE_CHECKING:
    from tun2sx.naming.dns import FakeDns
    from tun2sx.naming.fakeip import FakeIpStore

VERSION = "0.1.0"
MODES = ("rule", "global", "direct")
GLOBAL = "GLOBAL"
# Clash's log levels, most verbose first, and the logging level of each.
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "silent": logging.CRITICAL + 10,
}
# Clash's names of the rule types (the `type` of GET /rules).
RULE_TYPES = {
    "DOMAIN": "Domain",
    "DOMAIN-SUFFIX": "DomainSuffix",
    "DOMAIN-KEYWORD": "DomainKeyword",
    "IP-CIDR": "IPCIDR",
    "IP-CIDR6": "IPCIDR6",
    "DST-PORT": "DstPort",
    "NETWORK": "Network",
    "MATCH": "Match",
}
GROUP_TYPES = {
    "select": "Selector",
    "fallback": "Fallback",
    "url-test": "URLTest",
    "load-balance": "LoadBalance",
}
# Clash's type names of plain outbounds, by the first word of their name.
OUTBOUND_TYPES = {
    "socks5": "Socks5",
    "shadowsocks": "Shadowsocks",
    "http": "Http",
    "direct": "Direct",
}


class ApiError(Exception):
    """A request the API refuses: the status and Clash's `{"message": ...}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class Group(Protocol):
    """What the API uses of a proxy group (outbounds.group.ProxyGroup)."""

    name: str
    kind: str
    members: tuple[str, ...]

    def now(self) -> str: ...

    def select(self, member: str) -> None: ...

    def delays(self, member: str) -> list[tuple[float, int]]: ...

    def alive(self, member: str) -> bool: ...


class Controlled(Protocol):
    """What the API needs of the engine (a fake in tests)."""

    router: Router
    connect_times: ConnectTimes
    override: str | None
    dns: FakeDns | None  # None when fake-IP DNS is off
    fakeip: FakeIpStore | None

    @property
    def flows(self) -> Collection[FlowInfo]: ...

    def statistics(self) -> dict[str, int]: ...


def rfc3339(unix: float) -> str:
    """A Unix time as RFC 3339 in UTC with milliseconds."""
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ApiState:
    """The controller's own state: mode, the GLOBAL choice, the log level.

    Args:
        engine: the running engine.
        log_level: Clash's name of the level the program started with.
    """

    def __init__(self, engine: Controlled, log_level: str = "info") -> None:
        self.engine = engine
        self.mode = "rule"
        self.log_level = log_level if log_level in LOG_LEVELS else "info"
        router = engine.router
        default = router.name_of(router.default)
        self.global_choice = default if default in self.names() else DIRECT
        # What does not change in a flow's row, by flow number: built once.
        self._rows: dict[int, dict[str, Any]] = {}

    def names(self) -> list[str]:
        """Every outbound and group name a GLOBAL selection may take."""
        names = list(self.engine.router.outbounds)
        if REJECT not in names:
            names.append(REJECT)
        return names

    def outbound(self, name: str) -> Outbound | None:
        """The object named `name` (None for REJECT)."""
        if name == REJECT:
            return None
        return self.engine.router.outbounds[name]

    # -- /configs ---------------------------------------------------------------

    def configs(self) -> dict[str, Any]:
        """GET /configs: what tun2sx has of Clash's settings."""
        return {
            "port": 0,
            "socks-port": 0,
            "redir-port": 0,
            "tproxy-port": 0,
            "mixed-port": 0,
            "allow-lan": False,
            "bind-address": "*",
            "mode": self.mode,
            "log-level": self.log_level,
            "ipv6": True,
            "tun": {"enable": True, "stack": "tun2sx"},
        }

    def patch_configs(self, body: Any) -> None:
        """PATCH /configs: `mode` and `log-level` take effect at once.

        Raises:
            ApiError: a body that is not an object or a bad value.
        """
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        mode = body.get("mode")
        level = body.get("log-level")
        if mode is not None and (not isinstance(mode, str) or mode.lower() not in MODES):
            raise ApiError(400, f"mode: expected one of {', '.join(MODES)}")
        if level is not None and (not isinstance(level, str) or level.lower() not in LOG_LEVELS):
            raise ApiError(400, f"log-level: expected one of {', '.join(LOG_LEVELS)}")
        if mode is not None:
            self.set_mode(mode.lower())
        if level is not None:
            self.log_level = level.lower()
            logging.getLogger("tun2sx").setLevel(LOG_LEVELS[self.log_level])

    def set_mode(self, mode: str) -> None:
        """Route new flows by the rules, to the GLOBAL choice, or DIRECT."""
        self.mode = mode
        engine = self.engine
        if mode == "rule":
            engine.override = None
        elif mode == "direct":
            engine.override = DIRECT
        else:
            engine.override = self.global_choice

    # -- /proxies ---------------------------------------------------------------

    def proxy(self, name: str) -> dict[str, Any]:
        """GET /proxies/{name}.

        Raises:
            ApiError: 404 for an unknown name.
        """
        if name == GLOBAL:
            return {
                "name": GLOBAL,
                "type": "Selector",
                "all": self.names(),
                "now": self.global_choice,
                "history": [],
                "alive": True,
                "udp": True,
            }
        if name == REJECT:
            return _plain(REJECT, "Reject", [], True)
        outbound = self.engine.router.outbounds.get(name)
        if outbound is None:
            raise ApiError(404, f"no proxy named {name!r}")
        history, alive = self._health(name)
        if isinstance(outbound, Group):
            return {
                "name": name,
                "type": GROUP_TYPES.get(outbound.kind, outbound.kind),
                "all": list(outbound.members),
                "now": outbound.now(),
                "history": history,
                "alive": alive,
                "udp": True,
            }
        kind = OUTBOUND_TYPES.get(outbound.name.partition(" ")[0].lower(), "Compatible")
        return _plain(name, kind, history, alive)

    def proxies(self) -> dict[str, Any]:
        """GET /proxies: every outbound, group, REJECT and GLOBAL."""
        return {"proxies": {name: self.proxy(name) for name in [*self.names(), GLOBAL]}}

    def _health(self, name: str) -> tuple[list[dict[str, Any]], bool]:
        """The health checks of the groups that hold `name` (the list with
        the newest check), and whether none of them holds it down."""
        best: list[tuple[float, int]] = []
        alive = True
        for outbound in self.engine.router.outbounds.values():
            if isinstance(outbound, Group) and name in outbound.members:
                alive = alive and outbound.alive(name)
                delays = outbound.delays(name)
                if delays and (not best or delays[-1][0] > best[-1][0]):
                    best = delays
        return [{"time": rfc3339(t), "delay": delay} for t, delay in best], alive

    def select(self, group: str, body: Any) -> None:
        """PUT /proxies/{group} with {"name": member}.

        Raises:
            ApiError: 404 unknown group, 400 not a selector or unknown member.
        """
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise ApiError(400, 'body must be {"name": MEMBER}')
        member = body["name"]
        if group == GLOBAL:
            if member not in self.names():
                raise ApiError(400, f"GLOBAL has no member {member!r}")
            self.global_choice = member
            if self.mode == "global":
                self.set_mode("global")
            return
        outbound = self.engine.router.outbounds.get(group)
        if outbound is None:
            raise ApiError(404, f"no proxy named {group!r}")
        if not isinstance(outbound, Group):
            raise ApiError(400, f"{group} is not a group")
        try:
            outbound.select(member)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    # -- /rules and /connections ------------------------------------------------

    def rules(self) -> dict[str, Any]:
        """GET /rules: the rules in order, then the default as MATCH."""
        router = self.engine.router
        rows = [
            {
                "type": RULE_TYPES.get(rule.kind, rule.kind),
                "payload": rule.value,
                "proxy": rule.target,
                "size": -1,
            }
            for rule in router.rules.rules
        ]
        if not router.rules.rules or router.rules.rules[-1].kind != "MATCH":
            # The default decides what no rule does: shown as the MATCH it is.
            default = router.name_of(router.default)
            rows.append({"type": "Match", "payload": "", "proxy": default, "size": -1})
        return {"rules": rows}

    def connections(self) -> dict[str, Any]:
        """GET /connections: totals and every live flow, oldest first."""
        stats = self.engine.statistics()
        flows = sorted(self.engine.flows, key=lambda info: info.started)
        rows, known = [], self._rows
        fresh: dict[int, dict[str, Any]] = {}
        for info in flows:
            row = known.get(info.number)
            if row is None:
                row = connection_json(info)
            fresh[info.number] = row
            rows.append({**row, "upload": info.bytes_up, "download": info.bytes_down})
        self._rows = fresh
        return {
            "downloadTotal": stats.get("bytes_down", 0),
            "uploadTotal": stats.get("bytes_up", 0),
            "connections": rows,
            "memory": 0,
        }

    def close_connection(self, flow_id: str) -> None:
        """DELETE /connections/{id}.

        Raises:
            ApiError: 404 no such live flow.
        """
        for info in list(self.engine.flows):
            if info.id == flow_id:
                info.close()
                return
        raise ApiError(404, f"no connection {flow_id}")

    def close_all(self) -> int:
        """DELETE /connections: close every flow; how many were asked to."""
        return sum(info.close() for info in list(self.engine.flows))


def _plain(name: str, kind: str, history: list[dict[str, Any]], alive: bool) -> dict[str, Any]:
    return {"name": name, "type": kind, "history": history, "alive": alive, "udp": True}


def connection_json(info: FlowInfo) -> dict[str, Any]:
    """One flow as Clash's connection object.

    The rule's type in the config's spelling ("DOMAIN-SUFFIX") is shown as
    Clash shows it ("DomainSuffix"). `host` is the name a fake IP stood
    for, else the sniffed one; `hostSource` (not Clash's) says where the
    name that routed the flow came from: fake-ip, sniffed, dns or none.
    """
    source, _, source_port = info.app.rpartition(":")
    host = info.destination.host
    fake_ip_name = host if isinstance(host, str) else ""
    sniffed = info.sniffed or ""
    rule = info.rule
    return {
        "id": info.id,
        "metadata": {
            "network": info.network,
            "type": "Tun",
            "sourceIP": source.strip("[]"),
            "sourcePort": source_port,
            "destinationIP": "" if fake_ip_name else str(host),
            "destinationPort": str(info.destination.port),
            "host": fake_ip_name or sniffed,
            "sniffHost": sniffed,
            "hostSource": info.host_source,
            "dnsMode": "fake-ip" if fake_ip_name else "normal",
            "processPath": "",
            "process": "",
            "inboundName": "tun",
            "remoteDestination": "",
            "specialProxy": "",
        },
        "upload": info.bytes_up,
        "download": info.bytes_down,
        "start": rfc3339(info.wall_started),
        "chains": list(info.chain),
        "rule": RULE_TYPES.get(rule, rule),
        "rulePayload": info.rule_payload,
    }


def group_delays(outbounds: Mapping[str, object], group: str) -> Group:
    """The group named `group`.

    Raises:
        ApiError: 404 when there is none of that name.
    """
    outbound = outbounds.get(group)
    if not isinstance(outbound, Group):
        raise ApiError(404, f"no group named {group!r}")
    return outbound
