"""The TOML config file: from a file to a checked `Settings`.

The file holds what flags cannot say comfortably: several named outbounds
and a rule list. Every `Settings` field has a place in it (docs/config.md
has the schema and a full example):

    outbound = "proxy"                 # default: a name, DIRECT, REJECT or a URL
    rules = ["DOMAIN-SUFFIX,lan,DIRECT", "MATCH,proxy"]
    [outbounds.proxy]
    url = "socks5://127.0.0.1:1080"
    [groups.auto]                      # proxy groups (tun2sx.control.groupconfig)
    type = "fallback"
    members = ["proxy", "DIRECT"]
    [tun] / [dns] / [stats] / [sniff]  # device, fake-IP DNS, statistics, sniffing

A file is read whole and checked whole before anything starts: an unknown
key is an error (a typo must not silently leave a default in place), and
every error is one line naming the key, e.g.
``rules[3] 'DOMAIN,x,prxy': unknown outbound 'prxy'``.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from outbounds.base import Destination
from outbounds.resolver import parse_nameserver
from outbounds.units import seconds_hint
from tun2sx.control.app import (
    CONNECT_TIMEOUT_RANGE,
    MAX_SNIFF_TIMEOUT,
    STATS_INTERVAL_RANGE,
    UDP_TIMEOUT_RANGE,
    ConfigError,
    Settings,
    check_settings,
)
from tun2sx.control.groupconfig import read_groups
from tun2sx.naming.sniff import parse_ports

# key in its table -> Settings field; None marks a sub-table handled apart.
_TOP: dict[str, str | None] = {
    "outbound": "outbound",
    "fwmark": "fwmark",
    "interface": "interface",
    "connect_timeout": "connect_timeout",
    "udp_timeout": "udp_timeout",
    "udp_buffer": "udp_buffer",
    "auto_route": "auto_route",
    "workers": "workers",
    "rules": "rules",
    "outbounds": None,
    "groups": None,
    "tun": None,
    "dns": None,
    "stats": None,
    "sniff": None,
}
_TUN = {"name": "tun", "fd": "tun_fd", "mtu": "mtu", "addresses": "tun_addresses"}
_TUN |= {
    "offload": "offload",
    "txqueuelen": "tun_txqueuelen",
    "write_burst": "tun_write_burst",
    "trust_local_checksums": "trust_local_checksums",
}
_DNS = {
    "fake_ip": "fake_ip",
    "fake_ip_range": "fake_ip_range",
    "fake_ip_range6": "fake_ip_range6",
    "fake_ip_db": "fake_ip_db",
    "fake_ip_filter": "fake_ip_filter",
    "upstream": "dns_upstream",
    "hijack": "dns_hijack",
    "direct": "direct_dns",
}
_STATS = {"listen": "stats_listen", "interval": "stats_interval", "secret": "secret"}
_SNIFF = {
    "mode": "sniff",
    "timeout": "sniff_timeout",
    "http_ports": "sniff_http_ports",
    "tls_ports": "sniff_tls_ports",
    "quic_ports": "sniff_quic_ports",
    "fake_ip": "sniff_fake_ip",
}
# Settings field -> the key that sets it in the file.
_FILE_KEYS = {
    field: f"{prefix}{key}"
    for prefix, table in (
        ("", _TOP),
        ("tun.", _TUN),
        ("dns.", _DNS),
        ("stats.", _STATS),
        ("sniff.", _SNIFF),
    )
    for key, field in table.items()
    if field is not None
}


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_type_name(value)}")
    return value


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_type_name(value)}")
    return value


def _integer(key: str, value: object) -> int:
    # TOML booleans are Python ints; `mtu = true` must not become 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {_type_name(value)}")
    return value


# The ranges check_settings enforces, for the hint on a duration string ("10s").
_SECONDS_RANGES = {
    "udp_timeout": UDP_TIMEOUT_RANGE,
    "connect_timeout": CONNECT_TIMEOUT_RANGE,
    "stats.interval": STATS_INTERVAL_RANGE,
    "sniff.timeout": (0.001, MAX_SNIFF_TIMEOUT),
}


def _hint(key: str, value: object) -> str:
    limits = _SECONDS_RANGES.get(key)
    return "" if limits is None else seconds_hint(value, *limits)


def _seconds(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        shown = f'"{value}"' if isinstance(value, str) else _type_name(value)
        raise ConfigError(f"{key}: expected a number of seconds, got {shown}{_hint(key, value)}")
    if not math.isfinite(value):
        # NaN passes every comparison below, and trio refuses it as a time-out.
        raise ConfigError(f"{key}: not a finite number of seconds")
    if value < 0:
        raise ConfigError(f"{key}: must not be negative")
    return float(value)


def _strings(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of strings, got {_type_name(value)}")
    return tuple(_string(f"{key}[{i}]", item) for i, item in enumerate(value))


def parse_workers(key: str, value: object) -> int:
    """A worker count: a positive integer, or "auto" for one per usable CPU."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f'{key}: expected a number or "auto", got {value!r}') from None
    count = _integer(key, value)
    if count < 1:
        raise ConfigError(f"{key}: must be at least 1")
    return count


_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(key: str, value: object) -> int:
    """A byte count: an integer, or a string with a K, M or G suffix ("4M")."""
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("ib").removesuffix("b")
        scale = _SIZE_SUFFIXES.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        try:
            value = int(digits) * scale
        except ValueError:
            raise ConfigError(f'{key}: expected bytes ("4M", 4194304), got {value!r}') from None
    size = _integer(key, value)
    if size < 0:
        raise ConfigError(f"{key}: must not be negative")
    return size


def _fwmark(key: str, value: object) -> int:
    mark = _integer(key, value)
    if not 0 < mark < 1 << 32:
        raise ConfigError(f"{key}: {mark} is not a 32-bit mark (1..0xffffffff)")
    return mark


def _network(version: int) -> Callable[[str, object], object]:
    def convert(key: str, value: object) -> object:
        if version == 6 and (value is False or value == "none"):
            return None
        text = _string(key, value)
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if net.version != version:
            raise ConfigError(f"{key}: {text} is not an IPv{version} network")
        return net

    return convert


def _addresses(key: str, value: object) -> tuple[str, ...]:
    cidrs = _strings(key, value)
    for i, cidr in enumerate(cidrs):
        try:
            ipaddress.ip_interface(cidr)
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]: {exc}") from None
    return cidrs


def _endpoint(key: str, value: object) -> Destination:
    text = _string(key, value)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    try:
        return Destination.parse_host(host.strip("[]"), int(port))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def nameservers(key: str, value: object) -> tuple[Destination, ...]:
    """DNS servers: a list of `ADDRESS[:PORT]`, or one string of them, comma-separated."""
    items = [(key, value)] if isinstance(value, str) else None
    if items is None:
        items = [(f"{key}[{i}]", item) for i, item in enumerate(_strings(key, value))]
    servers = []
    for name, item in items:
        assert isinstance(item, str)
        for text in item.split(","):
            try:
                servers.append(parse_nameserver(text))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    if not servers:
        raise ConfigError(f"{key}: expected at least one server, e.g. 192.168.1.1")
    return tuple(servers)


def _ports(key: str, value: object) -> object:
    try:
        return parse_ports(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


_CONVERT: dict[str, Callable[[str, object], object]] = {
    "tun": _string,
    "tun_fd": _integer,
    "mtu": _integer,
    "tun_addresses": _addresses,
    "offload": _boolean,
    "trust_local_checksums": _boolean,
    "outbound": _string,
    "fwmark": _fwmark,
    "interface": _string,
    "fake_ip": _boolean,
    "fake_ip_range": _network(4),
    "fake_ip_range6": _network(6),
    "fake_ip_db": _string,
    "fake_ip_filter": _strings,
    "dns_upstream": _endpoint,
    "dns_hijack": _boolean,
    "direct_dns": nameservers,
    "udp_timeout": _seconds,
    "connect_timeout": _seconds,
    "rules": _strings,
    "stats_listen": _string,
    "stats_interval": _seconds,
    "secret": _string,
    "auto_route": _boolean,
    "workers": parse_workers,
    "tun_txqueuelen": _integer,
    "tun_write_burst": parse_size,
    "udp_buffer": parse_size,
    "sniff": _string,
    "sniff_timeout": _seconds,
    "sniff_http_ports": _ports,
    "sniff_tls_ports": _ports,
    "sniff_quic_ports": _ports,
    "sniff_fake_ip": _boolean,
}


def _table(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {_type_name(value)}")
    return value


def _read_table(
    table: Mapping[str, Any], fields: Mapping[str, str | None], prefix: str, out: dict[str, Any]
) -> None:
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{name}: unknown key (known here: {known})")
        field = fields[key]
        if field is not None:
            out[field] = _CONVERT[field](name, value)


# Per-outbound switches, each the same as `?key=1` in the URL, and the
# schemes that take it.
_OUTBOUND_FLAGS = {
    "pipeline": ("socks5", "socks5h"),
    "tfo": ("socks5", "socks5h", "socks4", "socks4a", "http"),
    "preconnect": ("socks5", "socks5h"),
}


def _outbound_url(name: str, table: Mapping[str, Any]) -> str:
    """The outbound's URL with its table's switches written into its query."""
    url = _string(f"outbounds.{name}.url", table["url"])
    scheme = url.partition("://")[0].lower()
    for flag, schemes in _OUTBOUND_FLAGS.items():
        key = f"outbounds.{name}.{flag}"
        if flag in table and _boolean(key, table[flag]):
            if scheme not in schemes:
                known = ", ".join(f"{s}://" for s in schemes)
                raise ConfigError(f"{key}: only for {known} outbounds, not {scheme}://")
            url += ("&" if "?" in url else "?") + f"{flag}=1"
    return url


def _read_outbounds(value: object) -> tuple[tuple[str, str], ...]:
    outbounds = []
    for name, spec in _table("outbounds", value).items():
        table = _table(f"outbounds.{name}", spec)
        for key in table:
            if key != "url" and key not in _OUTBOUND_FLAGS:
                known = ", ".join(["url", *_OUTBOUND_FLAGS])
                raise ConfigError(f"outbounds.{name}.{key}: unknown key (known here: {known})")
        if "url" not in table:
            raise ConfigError(f"outbounds.{name}.url: required, e.g. socks5://host:port")
        outbounds.append((name, _outbound_url(name, table)))
    return tuple(outbounds)


def settings_from_mapping(
    data: Mapping[str, Any], *, base: Settings | None = None, require_outbound: bool = True
) -> Settings:
    """Build and check `Settings` from a parsed TOML document.

    Args:
        data: the document, as `tomllib` returns it.
        base: values for the keys the document does not set (defaults).
        require_outbound: the document must name the default outbound,
            unless its rules end in a MATCH rule. False when the caller
            sets it (``--socks`` / ``--proxy``).

    Returns:
        The settings, checked as `serve` would check them.

    Raises:
        ConfigError: one line naming the key.
    """
    values: dict[str, Any] = {}
    _read_table(data, _TOP, "", values)
    for section, fields in (("tun", _TUN), ("dns", _DNS), ("stats", _STATS), ("sniff", _SNIFF)):
        if section in data:
            _read_table(_table(section, data[section]), dict(fields), f"{section}.", values)
    if "outbounds" in data:
        values["outbounds"] = _read_outbounds(data["outbounds"])
    if "groups" in data:
        values["groups"] = read_groups(data["groups"])
    if "outbound" not in values and require_outbound:
        rules = values.get("rules", ())
        assert isinstance(rules, tuple)
        if not any(rule.strip().upper().startswith("MATCH,") for rule in rules):
            raise ConfigError(
                "outbound: required (a name from [outbounds], DIRECT, REJECT or a URL), "
                "unless a MATCH rule ends the rules"
            )
        # Never used: the MATCH rule decides every flow no other rule took.
        values["outbound"] = "REJECT"
    settings = attrs.evolve(base or Settings(), **values)
    if settings.tun is not None and settings.tun_fd is not None:
        raise ConfigError("tun: set name or fd, not both")
    try:
        check_settings(settings)
    except ConfigError as exc:
        raise ConfigError(file_key_message(str(exc))) from exc.__cause__
    return settings


def file_key_message(message: str) -> str:
    """`message` with a leading Settings field name written as the file's key.

    `check_settings` names fields (`stats_listen`); a user of the file reads
    and writes keys (`stats.listen`).
    """
    field, sep, rest = message.partition(":")
    key = _FILE_KEYS.get(field)
    return f"{key}{sep}{rest}" if sep and key else message


def load_config(
    path: str | Path, *, base: Settings | None = None, require_outbound: bool = True
) -> Settings:
    """Read a TOML config file into checked `Settings`.

    Args:
        path: the file.
        base: values for what the file does not set.
        require_outbound: see `settings_from_mapping`.

    Raises:
        ConfigError: unreadable file, bad TOML, or a bad value; one line
            starting with the file's name.
    """
    # Imported here: a run from flags alone never reads TOML (tomllib and
    # the datetime it brings are about 0.5 MiB resident).
    import tomllib

    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(f"{path!r}: {exc}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (line {line})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return settings_from_mapping(data, base=base, require_outbound=require_outbound)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
