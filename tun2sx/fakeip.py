"""The fake-IP table: which made-up address stands for which host name.

Fake-IP mode answers every DNS query with an address from a reserved pool and
later turns the address the application connects to back into the name, so
the proxy, not this host, resolves it. The table is the whole trick, and the
failure users know best is losing it: an OS or browser that cached a fake IP
keeps using it after a restart, and if the table is gone those connections
hang. So the table lives in SQLite and a restart keeps every mapping: the same
name gets the same address again, and addresses handed out before the restart
still map back to their names.

Reads are served from memory (dicts plus an LRU order); SQLite is only the
journal. A new mapping is committed at once (WAL with `synchronous=NORMAL`:
no fsync per query, durable against a crash of the process, at worst the last
few transactions are lost on power failure). Recency updates from lookups are
batched, because they only steer which mapping is recycled first.

When a pool is full the least recently used mapping is recycled. The network
address, the last (broadcast-like) address and any reserved address (the TUN
gateway) are never handed out.

`FakeIpFilter` decides which names must not get a fake address at all (LAN
names, captive portals, NTP), with Clash's pattern syntax.
"""

from __future__ import annotations

import collections
import ipaddress
import re
import socket
import sqlite3
from collections.abc import Iterable

import attrs

__all__ = ["FakeIpFilter", "FakeIpStatistics", "FakeIpStore", "normalize_name"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_V4_POOL = "198.18.0.0/15"
DEFAULT_V6_POOL = "fc00::/18"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mapping (
    ip BLOB PRIMARY KEY,      -- packed address: 4 or 16 bytes
    name TEXT NOT NULL,       -- lower case, no trailing dot
    used INTEGER NOT NULL     -- logical clock of the last use, for LRU
) WITHOUT ROWID;
"""


def normalize_name(name: str) -> str:
    """Lower-case (ASCII only, as DNS does) and strip one trailing dot."""
    # bytes.lower() touches only A-Z; str.lower() would fold non-ASCII too.
    lowered = name.encode("utf-8", "surrogateescape").lower().decode("utf-8", "surrogateescape")
    return lowered[:-1] if lowered.endswith(".") else lowered


@attrs.define(slots=True)
class FakeIpStatistics:
    """Counters and sizes; `statistics()` returns a copy."""

    v4_mappings: int = 0
    v6_mappings: int = 0
    v4_capacity: int = 0
    v6_capacity: int = 0
    allocations: int = 0
    recycled: int = 0
    lookups: int = 0
    lookup_misses: int = 0


class _Pool:
    """One address pool: offsets from the network address, with LRU order."""

    __slots__ = ("by_name", "capacity", "excluded", "last", "lru", "network", "next_offset")

    def __init__(
        self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, reserved: set[IPAddress]
    ) -> None:
        if network.num_addresses < 4:
            raise ValueError(f"fake-IP pool {network} is too small (need at least a /30 or /126)")
        self.network = network
        self.last = network.num_addresses - 2  # the all-ones address is never used
        base = int(network.network_address)
        self.excluded = {
            int(ip) - base for ip in reserved if ip.version == network.version and ip in network
        }
        self.capacity = self.last - len(self.excluded)
        self.next_offset = 1  # offset 0 is the network address
        self.lru: collections.OrderedDict[int, str] = collections.OrderedDict()
        self.by_name: dict[str, int] = {}

    def usable(self, offset: int) -> bool:
        return 1 <= offset <= self.last and offset not in self.excluded

    def address(self, offset: int) -> IPAddress:
        return self.network.network_address + offset

    def offset(self, ip: IPAddress) -> int | None:
        if ip.version != self.network.version or ip not in self.network:
            return None
        return int(ip) - int(self.network.network_address)

    def take_fresh(self) -> int | None:
        """Next never-used offset, or None when the pool has been walked once."""
        # Bounded by the pool size; only reserved or already-used offsets
        # (left behind by a pool change) are skipped.
        while self.next_offset <= self.last:
            offset = self.next_offset
            self.next_offset += 1
            if offset not in self.excluded and offset not in self.lru:
                return offset
        return None


class FakeIpStore:
    """Name <-> fake address mappings, persisted in SQLite.

    Args:
        path: SQLite file, or ":memory:" (the default, for tests).
        v4_pool: CIDR for A answers.
        v6_pool: CIDR for AAAA answers, or None to disable fake AAAA.
        reserved: Addresses never handed out, e.g. the TUN gateway address.
        touch_batch: Recency updates buffered before they are written.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_db",
        "_pending_touch",
        "_stats",
        "_touch_batch",
        "v4",
        "v6",
    )

    def __init__(
        self,
        path: str = ":memory:",
        *,
        v4_pool: str = DEFAULT_V4_POOL,
        v6_pool: str | None = DEFAULT_V6_POOL,
        reserved: Iterable[str | IPAddress] = (),
        touch_batch: int = 1024,
    ) -> None:
        reserved_set = {ipaddress.ip_address(ip) for ip in reserved}
        v4_net = ipaddress.ip_network(v4_pool)
        if not isinstance(v4_net, ipaddress.IPv4Network):
            raise ValueError(f"v4_pool {v4_pool!r} is not an IPv4 network")
        self.v4 = _Pool(v4_net, reserved_set)
        self.v6: _Pool | None = None
        if v6_pool is not None:
            v6_net = ipaddress.ip_network(v6_pool)
            if not isinstance(v6_net, ipaddress.IPv6Network):
                raise ValueError(f"v6_pool {v6_pool!r} is not an IPv6 network")
            self.v6 = _Pool(v6_net, reserved_set)
        self._touch_batch = touch_batch
        self._pending_touch: dict[bytes, int] = {}
        self._stats = FakeIpStatistics(
            v4_capacity=self.v4.capacity, v6_capacity=self.v6.capacity if self.v6 else 0
        )
        self._clock = 0
        self._closed = False
        # The runtime calls us from one trio thread only; the check would only
        # get in the way of closing from a test's fixture thread.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._load()

    # --- public API -----------------------------------------------------------

    @property
    def v6_enabled(self) -> bool:
        return self.v6 is not None

    def contains(self, ip: IPAddress) -> bool:
        """Whether `ip` lies inside a fake pool (mapped or not)."""
        pool = self.v4 if ip.version == 4 else self.v6
        return pool is not None and pool.offset(ip) is not None

    def lookup_ip(self, ip: IPAddress) -> str | None:
        """The name `ip` was handed out for, refreshing its recency; None if unknown."""
        self._stats.lookups += 1
        pool = self.v4 if ip.version == 4 else self.v6
        offset = pool.offset(ip) if pool is not None else None
        name = pool.lru.get(offset) if pool is not None and offset is not None else None
        if pool is None or offset is None or name is None:
            self._stats.lookup_misses += 1
            return None
        self._touch(pool, offset)
        return name

    def lookup_name(self, name: str, family: socket.AddressFamily) -> IPAddress | None:
        """The address already mapped to `name` in `family`'s pool, without allocating."""
        pool = self._pool(family)
        offset = pool.by_name.get(normalize_name(name))
        return None if offset is None else pool.address(offset)

    def allocate(self, name: str, family: socket.AddressFamily) -> IPAddress:
        """Return `name`'s fake address in `family`'s pool, creating it if needed.

        Args:
            name: A host name, any case, with or without the trailing dot.
            family: `socket.AF_INET` (A) or `socket.AF_INET6` (AAAA).

        Returns:
            The fake address.

        Raises:
            ValueError: `family` has no pool (the IPv6 pool is disabled).
        """
        pool = self._pool(family)
        key = normalize_name(name)
        offset = pool.by_name.get(key)
        if offset is not None:
            self._touch(pool, offset)
            return pool.address(offset)
        offset = pool.take_fresh()
        if offset is None:
            offset, old_name = pool.lru.popitem(last=False)
            del pool.by_name[old_name]
            self._stats.recycled += 1
        else:
            self._count(pool, +1)
        self._clock += 1
        pool.lru[offset] = key
        pool.by_name[key] = offset
        self._stats.allocations += 1
        ip = pool.address(offset)
        self._pending_touch.pop(ip.packed, None)
        # Pending recency updates ride along in the same transaction.
        with self._db:
            self._flush_touches()
            self._db.execute(
                "INSERT OR REPLACE INTO mapping (ip, name, used) VALUES (?, ?, ?)",
                (ip.packed, key, self._clock),
            )
        return ip

    def statistics(self) -> FakeIpStatistics:
        """A snapshot of sizes and counters."""
        return attrs.evolve(self._stats)

    def close(self) -> None:
        """Write pending recency updates and close the database; idempotent."""
        if self._closed:
            return
        with self._db:
            self._flush_touches()
        self._db.close()
        self._closed = True

    # --- internals --------------------------------------------------------------

    def _pool(self, family: socket.AddressFamily) -> _Pool:
        if family == socket.AF_INET:
            return self.v4
        if family == socket.AF_INET6 and self.v6 is not None:
            return self.v6
        raise ValueError(f"no fake-IP pool for {family!r}")

    def _count(self, pool: _Pool, delta: int) -> None:
        if pool is self.v4:
            self._stats.v4_mappings += delta
        else:
            self._stats.v6_mappings += delta

    def _touch(self, pool: _Pool, offset: int) -> None:
        pool.lru.move_to_end(offset)
        self._clock += 1
        self._pending_touch[pool.address(offset).packed] = self._clock
        if len(self._pending_touch) >= self._touch_batch:
            with self._db:
                self._flush_touches()

    def _flush_touches(self) -> None:
        if self._pending_touch:
            self._db.executemany(
                "UPDATE mapping SET used = ? WHERE ip = ?",
                [(used, ip) for ip, used in self._pending_touch.items()],
            )
            self._pending_touch.clear()

    def _load(self) -> None:
        """Rebuild the in-memory maps; drop rows the current pools cannot hold."""
        stale: list[bytes] = []
        rows = self._db.execute("SELECT ip, name, used FROM mapping ORDER BY used").fetchall()
        for packed, name, used in rows:
            self._clock = max(self._clock, used)
            try:
                ip = ipaddress.ip_address(bytes(packed))
            except ValueError:
                stale.append(packed)
                continue
            pool = self.v4 if ip.version == 4 else self.v6
            offset = pool.offset(ip) if pool is not None else None
            if pool is None or offset is None or not pool.usable(offset):
                stale.append(packed)  # The pool or the reserved list changed.
                continue
            previous = pool.by_name.get(name)
            if previous is not None:
                # Rows come oldest first, so the newer mapping wins.
                del pool.lru[previous]
                stale.append(pool.address(previous).packed)
                self._count(pool, -1)
            pool.lru[offset] = name
            pool.by_name[name] = offset
            pool.next_offset = max(pool.next_offset, offset + 1)
            self._count(pool, +1)
        if stale:
            with self._db:
                self._db.executemany("DELETE FROM mapping WHERE ip = ?", [(p,) for p in stale])


def _label_regex(label: str) -> str:
    """A glob label as a regex that never crosses a dot; a lone `*` is one whole label."""
    if label == "*":
        return "[^.]+"
    return re.escape(label).replace(r"\*", "[^.]*").replace(r"\?", "[^.]")


class FakeIpFilter:
    """Names that must resolve for real, in Clash's pattern syntax.

    * `+.example.com`: example.com and every name below it.
    * `.example.com`: every name below example.com, not example.com itself.
    * `*.example.com`: exactly one label below example.com. In general `*`
      and `?` are globs that never cross a dot (`stun.*.*`, `time?.apple.com`).
    * `example.com`: that name only.

    Args:
        patterns: The patterns; matching is case-insensitive.

    Raises:
        ValueError: An empty pattern.
    """

    __slots__ = ("_exact", "_glob", "_plus", "_strict")

    def __init__(self, patterns: Iterable[str]) -> None:
        self._exact: set[str] = set()
        self._plus: set[str] = set()
        self._strict: set[str] = set()
        globs: list[str] = []
        for raw in patterns:
            pattern = normalize_name(raw.strip())
            if pattern in ("", "+", "+.", "."):
                raise ValueError(f"empty fake-IP filter pattern {raw!r}")
            if pattern.startswith("+."):
                self._plus.add(pattern[2:])
            elif pattern.startswith("."):
                self._strict.add(pattern[1:])
            elif "*" in pattern or "?" in pattern:
                globs.append(r"\.".join(map(_label_regex, pattern.split("."))))
            else:
                self._exact.add(pattern)
        self._glob = re.compile("|".join(f"(?:{g})" for g in globs)) if globs else None

    def matches(self, name: str) -> bool:
        """Whether `name` should bypass fake IPs and resolve for real."""
        name = normalize_name(name)
        if name in self._exact or name in self._plus:
            return True
        # Walk the proper suffixes: a.b.c -> b.c -> c.
        dot = name.find(".")
        while dot != -1:
            suffix = name[dot + 1 :]
            if suffix in self._plus or suffix in self._strict:
                return True
            dot = name.find(".", dot + 1)
        return self._glob is not None and self._glob.fullmatch(name) is not None
