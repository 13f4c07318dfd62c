"""The fake-IP table: which made-up address stands for which host name.

Fake-IP mode answers every DNS query with an address from a reserved pool and
later turns the address the application connects to back into the name, so
the proxy, not this host, resolves it. The table is the whole trick, and the
failure users know best is losing it: an OS or browser that cached a fake IP
keeps using it after a restart, and if the table is gone those connections
hang. So the table lives in a file and a restart keeps every mapping: the same
name gets the same address again, and addresses handed out before the restart
still map back to their names.

Reads are served from memory (dicts plus an LRU order); the file is only a
journal (tun2sx.naming.journal, written without SQLite, which would cost
about 1.7 MiB resident), and with `:memory:` there is none: the dicts are
the whole table. A new mapping is written at once (no fsync: durable
against a crash of the process; power failure may lose the last few).
Recency updates from lookups are batched, because they only steer which
mapping is recycled first.

A journal that cannot be written (a full disk, a file system gone read-only)
does not stop DNS: the table in memory is the table, so names keep their
addresses and new names get new ones; one warning says that what is given
out meanwhile would not survive a restart. A write that works again, at
least `RETRY_REWRITE` seconds after the last failure (each try writes the
whole table, and a nearly full disk would otherwise have the log flap),
rewrites the whole table, LRU order included, and one line says so; so does
closing the store.

One file has one user: before reading it, a store takes an `flock` on
`<path>.lock` (tun2sx.naming.journal.lock_table), exclusive for a single
process and shared for workers, and is refused (`TableInUseError`, the file
untouched) when another tun2sx holds it in a way that excludes it. Closing
the store, or the end of the process, releases it.

When a pool is full the least recently used mapping is recycled. The network
address, the last (broadcast-like) address and any reserved address (the TUN
gateway) are never handed out.

Shared mode (`shared=True`) is for worker processes that serve the queues of
one multi-queue TUN device: a DNS query answered by one worker may be followed
by a connection that lands on another, so every worker must read and change
one table. They share it through SQLite (a journal left by a single process
is converted at their first start), and the database is then the only
state. An allocation is one
`BEGIN IMMEDIATE` transaction (concurrent writers wait on the busy timeout)
that finds the name, or takes the next fresh address, or recycles the row with
the smallest `used`, all from what the database holds at that moment; indexes
on `name` and on (family, `used`) keep each step a B-tree probe. Lookups are
one indexed SELECT each, with no in-process cache. A cache would still need a
validity check per lookup (`PRAGMA data_version`), and in WAL mode any
statement, that one included, begins a read transaction (`fcntl` locks plus
the `sqlite3` call overhead): the check alone costs about half of an uncached
lookup, and every commit of another worker, recency writes included, would
empty the cache.

Recency is what the trade-off is about. In shared mode `used` holds wall-clock
milliseconds (every worker reads the same clock), and a use writes `used`
through at once unless the row already shows a use less than `touch_interval`
old. So a mapping used at time t always has `used >= t - touch_interval` in
the database, and recycling, which takes the smallest `used`, reaches it only
once every other mapping in its pool has been allocated or used after
`t - touch_interval`: LRU to within `touch_interval`, and never behind a
process's unwritten batch (batching as the single-process mode does would let
one worker recycle what another used a moment ago). The price is one small
write transaction per mapping per interval when it is in use. A wall clock
stepped backwards only makes new rows look older (recycled sooner); it never
breaks the one-name-one-address rule, which rests on the transaction alone.

`FakeIpFilter` decides which names must not get a fake address at all (LAN
names, captive portals, NTP), with Clash's pattern syntax.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import attrs

from tun2sx.naming.journal import Journal, TableInUseError, lock_table, to_sqlite

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("tun2sx.fakeip")
RETRY_REWRITE = 10.0  # seconds between tries to rewrite a journal that could not be written

__all__ = [
    "FakeIpFilter",
    "FakeIpStatistics",
    "FakeIpStore",
    "FakeIpStoreError",
    "TableInUseError",
    "normalize_name",
    "pool_capacity",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_V4_POOL = "198.18.0.0/15"
DEFAULT_V6_POOL = "fc00::/18"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mapping (
    ip BLOB PRIMARY KEY,      -- packed address: 4 or 16 bytes
    name TEXT NOT NULL,       -- lower case, no trailing dot
    used INTEGER NOT NULL     -- last use, for LRU: a logical clock, or ms in shared mode
) WITHOUT ROWID;
"""

# Only shared mode asks the database by name or by age; a file it has opened
# keeps the indexes, which then cost a single-process store a little per write.
_SHARED_SCHEMA = """
CREATE INDEX IF NOT EXISTS mapping_name ON mapping (name);
CREATE INDEX IF NOT EXISTS mapping_age ON mapping (length(ip), used);
"""

# Range scans over one pool: the length keeps the other family's blobs out;
# its unary `+` keeps the planner on the primary key, off the age index.
_SQL_BY_IP = "SELECT name, used FROM mapping WHERE ip = ?"
_SQL_BY_NAME = (
    "SELECT ip, used FROM mapping WHERE name = ? AND ip BETWEEN ? AND ? AND +length(ip) = ?"
)
_SQL_HIGHEST = (
    "SELECT ip FROM mapping WHERE ip BETWEEN ? AND ? AND +length(ip) = ? ORDER BY ip DESC LIMIT 1"
)
# The unary `+` keeps the planner off the primary key, so it walks the age
# index of one family (the IPv6 pool, which never fills, keeps its old rows
# out of the way) and stops at the first row instead of sorting the pool.
_SQL_OLDEST = (
    "SELECT ip, name FROM mapping WHERE +ip BETWEEN ? AND ? AND length(ip) = ?"
    " ORDER BY used LIMIT 1"
)
_SQL_COUNT = "SELECT count(*) FROM mapping WHERE ip BETWEEN ? AND ? AND +length(ip) = ?"
_SQL_TOUCH = "UPDATE mapping SET used = max(used, ?) WHERE ip = ? AND name = ?"

_BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's transaction


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting out other processes doing the same.

    Workers open a new file at the same moment; SQLite answers a journal
    mode change that meets another one with "database is locked" at once,
    without its busy handler, so the wait is ours (about 1 in 50 opens of a
    new file by six processes failed before).
    """
    import sqlite3  # loaded already: only a store with a file gets here

    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class FakeIpStoreError(OSError):
    """The table's file cannot be opened or read (SQLite's reason in the message)."""


def pool_capacity(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network, reserved: Iterable[IPAddress]
) -> int:
    """How many fake addresses `network` can hand out with `reserved` kept back.

    The network address and the last (all-ones) address are never used.
    """
    last = network.num_addresses - 2
    excluded = {
        int(ip) - int(network.network_address)
        for ip in reserved
        if ip.version == network.version and ip in network
    }
    return max(0, last - sum(1 for offset in excluded if 1 <= offset <= last))


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

    __slots__ = (
        "base",
        "by_name",
        "capacity",
        "db_range",
        "excluded",
        "last",
        "lru",
        "network",
        "next_offset",
        "size",
        "width",
    )

    def __init__(
        self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, reserved: set[IPAddress]
    ) -> None:
        if network.num_addresses < 4:
            raise ValueError(f"fake-IP pool {network} is too small (need at least a /30 or /126)")
        self.network = network
        self.last = network.num_addresses - 2  # the all-ones address is never used
        base = int(network.network_address)
        # For `offset_packed`: the pool as integers, no address objects.
        self.base = base
        self.size = network.num_addresses
        self.width = len(network.network_address.packed)
        self.excluded = {
            int(ip) - base for ip in reserved if ip.version == network.version and ip in network
        }
        self.capacity = self.last - len(self.excluded)
        if self.capacity < 1:
            raise ValueError(f"fake-IP pool {network} has no address left after the reserved ones")
        self.next_offset = 1  # offset 0 is the network address
        # Parameters of the shared-mode range queries: first, last, blob length.
        self.db_range = (self.packed(1), self.packed(self.last), self.width)
        self.lru: collections.OrderedDict[int, str] = collections.OrderedDict()
        self.by_name: dict[str, int] = {}

    def usable(self, offset: int) -> bool:
        return 1 <= offset <= self.last and offset not in self.excluded

    def address(self, offset: int) -> IPAddress:
        return self.network.network_address + offset

    def packed(self, offset: int) -> bytes:
        """`address(offset).packed` without the address object: a quarter of the time,
        which a rewrite of the whole table pays once per mapping."""
        return (self.base + offset).to_bytes(self.width, "big")

    def offset_packed(self, packed: bytes) -> int | None:
        """The offset of an address given as its 4 or 16 bytes (a packet's
        field), None outside the pool.

        A flow's destination comes as these bytes: building an address
        object for it would be most of the cost of a lookup.
        """
        if len(packed) != self.width:
            return None
        offset = int.from_bytes(packed, "big") - self.base
        return offset if 0 <= offset < self.size else None

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

    def fresh_after(self, highest: bytes | None) -> int | None:
        """The first usable offset above the highest one in use, or None (shared mode)."""
        base = int(self.network.network_address)
        offset = 1 if highest is None else int.from_bytes(highest, "big") - base + 1
        while offset in self.excluded:
            offset += 1
        return offset if offset <= self.last else None


class FakeIpStore:
    """Name <-> fake address mappings, persisted in a file.

    Args:
        path: The table's file (a journal; an SQLite database when shared),
            or ":memory:" (the default): kept in this process only.
        v4_pool: CIDR for A answers.
        v6_pool: CIDR for AAAA answers, or None to disable fake AAAA.
        reserved: Addresses never handed out, e.g. the TUN gateway address.
        touch_batch: Recency updates buffered before they are written (not shared).
        shared: Several processes use `path` at once; every call reads and
            writes the database (see the module docstring).
        touch_interval: Shared mode: seconds within which a mapping's recency
            is not written again.
        clock: Shared mode: wall clock in seconds, for tests.

    Attributes:
        errors: The exceptions the table's file can raise (`OSError` for a
            journal, `sqlite3.Error` when shared, none for `:memory:`), for
            callers that fail one query on them.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_db",
        "_journal",
        "_lock",
        "_path",
        "_pending_touch",
        "_retry_at",
        "_shared",
        "_stats",
        "_time",
        "_touch_batch",
        "_touch_interval_ms",
        "_unwritten",
        "errors",
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
        shared: bool = False,
        touch_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if shared and path == ":memory:":
            raise ValueError("a shared fake-IP store needs a database file")
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
        self._shared = shared
        self._touch_interval_ms = round(touch_interval * 1000)
        self._time = clock
        self._db: sqlite3.Connection | None = None
        self._journal: Journal | None = None
        self._lock: int | None = None
        self._path = path
        self._unwritten = False  # the journal lacks changes it could not take
        self._retry_at = 0.0
        self.errors: tuple[type[Exception], ...] = ()
        if path == ":memory:":
            return  # the dicts are the table; nothing outlives the process
        # Before the file is read: a refused store must not migrate or
        # rewrite what another process is using.
        self._lock = lock_table(path, shared=shared)
        try:
            self._open(path, shared)
        except BaseException:
            self._release()
            raise

    def _open(self, path: str, shared: bool) -> None:
        """Open the table's file, converting it to this mode's kind first."""
        if not shared:
            self._open_journal(path)
            return
        # Imported here: only workers share the table through SQLite.
        import sqlite3

        try:
            to_sqlite(path, _SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise FakeIpStoreError(str(exc)) from exc

        self.errors = (sqlite3.Error,)
        try:
            # The runtime calls us from one trio thread only; the check would
            # only get in the way of closing from a test's fixture thread.
            self._db = db = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            _enable_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            # IMMEDIATE: workers open a new file at the same moment, and a
            # deferred transaction that read the schema and then tries to
            # write fails at once (SQLITE_BUSY_SNAPSHOT) instead of waiting.
            db.executescript(
                "BEGIN IMMEDIATE;" + _SCHEMA + (_SHARED_SCHEMA if shared else "") + "COMMIT;"
            )
        except sqlite3.Error as exc:
            if self._db is not None:
                self._db.close()
            raise FakeIpStoreError(str(exc)) from exc
        rows = self._file.execute("SELECT ip, name, used FROM mapping ORDER BY used").fetchall()
        stale = self._load(rows)
        if stale:
            # Keyed by name too: in shared mode another process may have
            # reused the address since the scan.
            with self._write():
                db.executemany("DELETE FROM mapping WHERE ip = ? AND name = ?", stale)
        # The scan only cleaned the file; the database is the table now.
        for pool in (self.v4, self.v6):
            if pool is not None:
                pool.lru.clear()
                pool.by_name.clear()

    def _open_journal(self, path: str) -> None:
        """Read the table from its journal, dropping what the pools cannot hold."""
        self.errors = (OSError,)
        self._journal, rows = Journal.open(path)
        if self._load(rows):
            self._rewrite()

    # --- public API -----------------------------------------------------------

    @property
    def v6_enabled(self) -> bool:
        return self.v6 is not None

    def contains(self, ip: IPAddress) -> bool:
        """Whether `ip` lies inside a fake pool (mapped or not)."""
        return self.contains_packed(ip.packed)

    def contains_packed(self, packed: bytes) -> bool:
        """`contains` for an address as its 4 or 16 bytes."""
        pool = self.v4 if len(packed) == 4 else self.v6
        return pool is not None and pool.offset_packed(packed) is not None

    def lookup_ip(self, ip: IPAddress) -> str | None:
        """The name `ip` was handed out for, refreshing its recency; None if unknown."""
        return self.lookup_packed(ip.packed)

    def lookup_packed(self, packed: bytes) -> str | None:
        """`lookup_ip` for an address as its 4 or 16 bytes (a packet's field)."""
        self._stats.lookups += 1
        pool = self.v4 if len(packed) == 4 else self.v6
        offset = pool.offset_packed(packed) if pool is not None else None
        if pool is None or offset is None:
            name = None
        elif self._shared:
            name = self._lookup_ip_shared(packed)
        else:
            name = pool.lru.get(offset)
            if name is not None:
                self._touch(pool, offset, packed)
        if name is None:
            self._stats.lookup_misses += 1
        return name

    def lookup_name(self, name: str, family: socket.AddressFamily) -> IPAddress | None:
        """The address already mapped to `name` in `family`'s pool, without allocating."""
        pool = self._pool(family)
        if self._shared:
            row = self._file.execute(
                _SQL_BY_NAME, (normalize_name(name), *pool.db_range)
            ).fetchone()
            return None if row is None else self._address(pool, row[0])
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
        if self._shared:
            return self._address(pool, self._allocate_shared(pool, key))
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
        journal = self._journal
        if journal is None:
            return ip
        packed = ip.packed
        self._pending_touch.pop(packed, None)
        # Pending recency updates ride along in the same write.
        self._save(journal.append, self._pending_touch, packed, key, self._clock)
        return ip

    def statistics(self) -> FakeIpStatistics:
        """A snapshot of sizes and counters (counters of this process only)."""
        stats = attrs.evolve(self._stats)
        if self._shared:
            count = self._file.execute(_SQL_COUNT, self.v4.db_range).fetchone()[0]
            stats.v4_mappings = count
            if self.v6 is not None:
                stats.v6_mappings = self._file.execute(_SQL_COUNT, self.v6.db_range).fetchone()[0]
        return stats

    def close(self) -> None:
        """Write pending recency updates and close the file; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._journal is not None:
            try:
                if self._unwritten:
                    self._retry_at = 0.0  # the last chance to catch up
                    self._save(self._journal.append_touches, {})
                elif self._pending_touch:
                    self._save(self._journal.append_touches, self._pending_touch)
            finally:
                self._journal.close()
                self._release()
        else:
            if self._db is not None:
                self._db.close()
            self._release()

    def _release(self) -> None:
        """Give up the table's lock (after the last write)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

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

    @property
    def _file(self) -> sqlite3.Connection:
        """The database, for the paths only a store with a file takes."""
        assert self._db is not None
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; IMMEDIATE, so another writer is waited for at BEGIN."""
        # The connection is in autocommit mode (isolation_level=None), where
        # `with connection:` opens no transaction: each statement would
        # commit on its own, at several times the cost.
        db = self._file
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT too: left open, the transaction would keep the
            # write lock and stall every other worker.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _address(pool: _Pool, packed: bytes) -> IPAddress:
        return pool.network.network_address.__class__(packed)

    def _now_ms(self) -> int:
        return int(self._time() * 1000)

    def _lookup_ip_shared(self, packed: bytes) -> str | None:
        import sqlite3  # loaded already: shared mode has a file

        row = self._file.execute(_SQL_BY_IP, (packed,)).fetchone()
        if row is None:
            return None
        name: str = row[0]
        # Recency only steers recycling: a write that found the file locked
        # too long must not fail a lookup that has its answer.
        with contextlib.suppress(sqlite3.OperationalError):
            self._touch_shared(packed, name, row[1])
        return name

    def _touch_shared(self, packed: bytes, name: str, used: int) -> bool:
        """Write a use through unless the row shows a recent one; False if `packed` moved on."""
        now = self._now_ms()
        if now - used < self._touch_interval_ms:
            return True
        # Keyed by name: if another process recycled the address since our
        # read, the new mapping must not inherit this use.
        return self._file.execute(_SQL_TOUCH, (now, packed, name)).rowcount == 1

    def _allocate_shared(self, pool: _Pool, key: str) -> bytes:
        # The common case, a name asked for again, needs no write lock.
        row = self._file.execute(_SQL_BY_NAME, (key, *pool.db_range)).fetchone()
        if row is not None and self._touch_shared(row[0], key, row[1]):
            return bytes(row[0])
        with self._write():
            return self._allocate_locked(pool, key)

    def _allocate_locked(self, pool: _Pool, key: str) -> bytes:
        """Find or make `key`'s row; runs inside the write transaction."""
        db = self._file
        now = self._now_ms()
        row = db.execute(_SQL_BY_NAME, (key, *pool.db_range)).fetchone()
        if row is not None:  # another process allocated it since our read
            db.execute(_SQL_TOUCH, (now, row[0], key))
            return bytes(row[0])
        highest = db.execute(_SQL_HIGHEST, pool.db_range).fetchone()
        offset = pool.fresh_after(None if highest is None else bytes(highest[0]))
        if offset is not None:
            packed = pool.packed(offset)
        else:
            # A full pool holds at least one row, so there is an oldest.
            packed = bytes(db.execute(_SQL_OLDEST, pool.db_range).fetchone()[0])
            self._stats.recycled += 1
        db.execute(
            "INSERT OR REPLACE INTO mapping (ip, name, used) VALUES (?, ?, ?)", (packed, key, now)
        )
        self._stats.allocations += 1
        return packed

    def _touch(self, pool: _Pool, offset: int, packed: bytes | None = None) -> None:
        pool.lru.move_to_end(offset)
        journal = self._journal
        if journal is None:
            return  # the LRU order is all the recency there is
        self._clock += 1
        if packed is None:
            packed = pool.packed(offset)
        self._pending_touch[packed] = self._clock
        if len(self._pending_touch) >= self._touch_batch:
            self._save(journal.append_touches, self._pending_touch)

    def _save(self, write: Callable[..., None], *args: object) -> None:
        """Append to the journal with `write(*args)` and rewrite it when it is due.

        The pending recency updates are in the write (or were lost with it).
        A failure is logged once and left to the next write (module docstring).
        """
        assert self._journal is not None
        try:
            write(*args)
        except OSError as exc:
            self._pending_touch.clear()
            self._retry_at = self._time() + RETRY_REWRITE
            self._failed(exc)
            return
        self._pending_touch.clear()
        live = self._stats.v4_mappings + self._stats.v6_mappings
        if self._unwritten:
            if self._time() < self._retry_at:
                return
        elif not self._journal.needs_rewrite(live):
            return
        try:
            self._rewrite()
        except OSError as exc:
            self._retry_at = self._time() + RETRY_REWRITE
            self._failed(exc)
            return
        if self._unwritten:
            self._unwritten = False
            log.info("fake-IP table: %s written again, with every mapping", self._path)

    def _failed(self, exc: OSError) -> None:
        if not self._unwritten:
            self._unwritten = True
            log.warning(
                "fake-IP table: cannot write %s (%s); DNS answers from memory, and names "
                "given out until the file can be written are lost if tun2sx restarts first",
                self._path,
                exc.strerror or exc,
            )

    def _rewrite(self) -> None:
        """Rewrite the journal as one record per mapping, in each pool's LRU order."""
        assert self._journal is not None
        # The in-memory order already holds the pending uses.
        self._pending_touch.clear()
        rows = [
            (pool.packed(offset), name, used)
            for pool in (self.v4, self.v6)
            if pool is not None
            for used, (offset, name) in enumerate(pool.lru.items(), 1)
        ]
        self._clock = max(self._clock, len(rows))
        self._journal.rewrite(rows)

    def _load(self, rows: Iterable[tuple[bytes, str, int]]) -> list[tuple[bytes, str]]:
        """Rebuild the in-memory maps from rows oldest use first.

        Returns:
            The rows the current pools cannot hold.
        """
        stale: list[tuple[bytes, str]] = []
        # By length and integer value, not ipaddress objects: at start-up
        # with a full table those cost half of the load.
        pools = {4: self.v4, 16: self.v6}
        for packed, name, used in rows:
            self._clock = max(self._clock, used)
            pool = pools.get(len(packed))
            # An offset outside the pool's network is not usable either.
            offset = -1 if pool is None else int.from_bytes(packed, "big") - pool.base
            if pool is None or not pool.usable(offset):
                stale.append((packed, name))  # The pool or the reserved list changed.
                continue
            previous = pool.by_name.get(name)
            if previous is not None:
                # Rows come oldest first, so the newer mapping wins.
                del pool.lru[previous]
                stale.append((pool.packed(previous), name))
                self._count(pool, -1)
            pool.lru[offset] = name
            pool.by_name[name] = offset
            if offset >= pool.next_offset:
                pool.next_offset = offset + 1
            self._count(pool, +1)
        return stale


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
