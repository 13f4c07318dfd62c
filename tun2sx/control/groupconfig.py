"""The `[groups.NAME]` tables of the config file, read into `GroupSpec`s.

    [groups.auto]
    type = "url-test"                 # select, fallback, url-test, load-balance
    members = ["a", "b", "DIRECT"]    # outbounds, groups, DIRECT, REJECT
    url = "http://www.gstatic.com/generate_204"   # https://, or "tcp://host:port"
    interval = 300                    # seconds between checks
    timeout = 5                       # seconds a check may take
    tolerance = 50                    # url-test: ms faster before switching

Each wrong value is one line naming its key; what needs the other groups
and outbounds to judge (unknown members, cycles) is checked when the router
is built (outbounds.group.build_groups).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from outbounds.group import (
    DEFAULT_INTERVAL,
    DEFAULT_TIMEOUT,
    DEFAULT_TOLERANCE,
    DEFAULT_URL,
    GROUP_KINDS,
    INTERVAL_RANGE,
    TIMEOUT_RANGE,
    TOLERANCE_RANGE,
    GroupError,
    GroupSpec,
)
from outbounds.units import milliseconds_hint, seconds_hint
from tun2sx.control.app import ConfigError

_KEYS = ("type", "members", "url", "interval", "timeout", "tolerance")


def _kind_of(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _seconds(key: str, value: object, limits: tuple[float, float]) -> float:
    # The range (NaN and infinity too) is GroupSpec.check's, for the
    # embedding API's groups as well.
    if isinstance(value, bool) or not isinstance(value, int | float):
        shown = f'"{value}"' if isinstance(value, str) else _kind_of(value)
        raise ConfigError(
            f"{key}: expected a number of seconds, got {shown}" + seconds_hint(value, *limits)
        )
    return float(value)


def read_group(name: str, table: object) -> GroupSpec:
    """One `[groups.NAME]` table.

    Raises:
        ConfigError: one line naming the key.
    """
    key = f"groups.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table, got {_kind_of(table)}")
    if not name or "," in name or any(ch.isspace() for ch in name):
        raise ConfigError(f"groups: {name!r} is not a usable name (no commas or spaces)")
    for item in table:
        if item not in _KEYS:
            raise ConfigError(f"{key}.{item}: unknown key (known here: {', '.join(_KEYS)})")
    kind = table.get("type")
    if kind is None:
        raise ConfigError(f"{key}.type: required, one of {', '.join(GROUP_KINDS)}")
    if kind not in GROUP_KINDS:
        shown = repr(kind) if isinstance(kind, str) else _kind_of(kind)
        raise ConfigError(f"{key}.type: expected one of {', '.join(GROUP_KINDS)}, got {shown}")
    members = table.get("members")
    if members is None:
        raise ConfigError(f'{key}.members: required, e.g. ["proxy-a", "proxy-b", "DIRECT"]')
    if not isinstance(members, list):
        raise ConfigError(f"{key}.members: expected a list of names, got {_kind_of(members)}")
    for i, member in enumerate(members):
        if not isinstance(member, str):
            raise ConfigError(f"{key}.members[{i}]: expected a name, got {_kind_of(member)}")
    url = table.get("url", DEFAULT_URL)
    if not isinstance(url, str):
        raise ConfigError(f"{key}.url: expected a string, got {_kind_of(url)}")
    tolerance = table.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int):
        shown = (
            f'"{tolerance}"'
            if isinstance(tolerance, str)
            else f"{tolerance:g}"
            if isinstance(tolerance, float)
            else _kind_of(tolerance)
        )
        raise ConfigError(
            f"{key}.tolerance: expected whole milliseconds, got {shown}"
            + milliseconds_hint(tolerance, *TOLERANCE_RANGE)
        )
    spec = GroupSpec(
        name=name,
        kind=kind,
        members=tuple(members),
        url=url,
        interval=_seconds(
            f"{key}.interval", table.get("interval", DEFAULT_INTERVAL), INTERVAL_RANGE
        ),
        timeout=_seconds(f"{key}.timeout", table.get("timeout", DEFAULT_TIMEOUT), TIMEOUT_RANGE),
        tolerance=tolerance,
    )
    try:
        spec.check()
    except GroupError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def read_groups(value: object) -> tuple[GroupSpec, ...]:
    """The `[groups]` table: every group, in the file's order.

    Raises:
        ConfigError: one line naming the key.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"groups: expected a table, got {_kind_of(value)}")
    tables: Mapping[str, Any] = value
    return tuple(read_group(name, table) for name, table in tables.items())
