"""The fake-IP store in shared mode: several stores, and processes, on one file.

Two stores in one process behave like two processes (each has its own
connection), which gives fast deterministic cases. The multi-process tests
then churn a small pool from several processes at once and check every
answer against a history that triggers write inside the writers' own
transactions.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import random
import socket
import sqlite3
import traceback
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from tun2sx.naming import fakeip
from tun2sx.naming.fakeip import FakeIpStore

V4, V6 = socket.AF_INET, socket.AF_INET6
# /29 with .1 reserved: .2 .. .6, five addresses.
SMALL: dict[str, Any] = {"v4_pool": "10.99.0.0/29", "v6_pool": None, "reserved": ["10.99.0.1"]}


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def db_rows(path: Path) -> dict[bytes, tuple[str, int]]:
    with sqlite3.connect(path) as db:
        return {bytes(k): (n, u) for k, n, u in db.execute("SELECT ip, name, used FROM mapping")}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "shared.sqlite"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(path: Path, clock: Clock) -> Iterator[tuple[FakeIpStore, FakeIpStore]]:
    a = FakeIpStore(str(path), shared=True, clock=clock, **SMALL)
    b = FakeIpStore(str(path), shared=True, clock=clock, **SMALL)
    yield a, b
    a.close()
    b.close()


def test_shared_needs_a_file() -> None:
    with pytest.raises(ValueError, match="needs a database file"):
        FakeIpStore(shared=True)


def test_other_store_sees_new_mappings(pair: tuple[FakeIpStore, FakeIpStore]) -> None:
    a, b = pair
    first = a.allocate("One.Example.", V4)
    assert first == ip("10.99.0.2")
    assert b.lookup_ip(first) == "one.example"
    assert b.lookup_name("ONE.example", V4) == first
    assert b.allocate("one.example", V4) == first
    second = b.allocate("two.example", V4)
    assert second == ip("10.99.0.3")
    assert a.lookup_ip(second) == "two.example"
    assert a.allocate("two.example", V4) == second
    assert a.lookup_ip(ip("10.99.0.4")) is None
    assert a.lookup_name("three.example", V4) is None
    stats = a.statistics()
    assert (stats.v4_mappings, stats.allocations, stats.lookups, stats.lookup_misses) == (
        2,
        1,
        2,
        1,
    )


def test_recycling_is_seen_by_the_other_store(
    pair: tuple[FakeIpStore, FakeIpStore], clock: Clock
) -> None:
    a, b = pair
    handed = {}
    for i in range(5):  # fills the pool, n0 oldest; all within one touch interval
        handed[f"n{i}"] = a.allocate(f"n{i}", V4)
        clock.now += 0.1
    assert a.lookup_ip(handed["n0"]) == "n0"  # A's view before B recycles
    recycled = b.allocate("fresh", V4)
    assert recycled == handed["n0"]
    assert b.statistics().recycled == 1
    # A answers from the database, not from what it knew before.
    assert a.lookup_ip(recycled) == "fresh"
    assert a.lookup_name("n0", V4) is None
    assert a.allocate("fresh", V4) == recycled
    # A brings n0 back: it takes the next oldest address.
    assert a.allocate("n0", V4) == handed["n1"]
    assert b.lookup_ip(handed["n1"]) == "n0"
    assert a.statistics().recycled == 1


def test_a_use_in_one_store_steers_recycling_in_the_other(
    pair: tuple[FakeIpStore, FakeIpStore], path: Path, clock: Clock
) -> None:
    a, b = pair
    handed = [a.allocate(f"n{i}", V4) for i in range(5)]  # all at the same instant
    used_at_alloc = db_rows(path)[handed[0].packed][1]
    # Within the touch interval a use is not written: the row already shows one.
    clock.now += 0.5
    assert b.lookup_ip(handed[0]) == "n0"
    assert db_rows(path)[handed[0].packed][1] == used_at_alloc
    # Later, B's use of n0 is written at once, so A recycles around it.
    clock.now += 10
    assert b.lookup_ip(handed[0]) == "n0"
    assert db_rows(path)[handed[0].packed][1] == used_at_alloc + 10_500
    recycled = {a.allocate(f"new{i}", V4) for i in range(4)}
    assert recycled == set(handed[1:])
    # A DNS answer for a known name counts as a use too.
    clock.now += 10
    assert b.allocate("new0", V4) == handed[1]
    assert a.allocate("newest", V4) == handed[0]


def test_a_late_touch_does_not_refresh_the_next_owner(path: Path, clock: Clock) -> None:
    store = FakeIpStore(str(path), shared=True, clock=clock, **SMALL)
    store.allocate("old", V4)
    with sqlite3.connect(path) as db:  # another process recycles the address meanwhile
        db.execute("UPDATE mapping SET name = 'new', used = 5 WHERE name = 'old'")
    clock.now += 10
    # The window lies inside one lookup (between its SELECT and its UPDATE),
    # so the use is written the way a lookup would write it, by hand.
    touched = store._touch_shared(ip("10.99.0.2").packed, "old", 0)
    assert not touched
    assert db_rows(path)[ip("10.99.0.2").packed] == ("new", 5)
    # Allocating the old name again sees the address moved on and takes a fresh one.
    assert store.allocate("old", V4) == ip("10.99.0.3")
    store.close()


def test_shared_table_survives_restart_in_either_mode(path: Path, clock: Clock) -> None:
    store = FakeIpStore(str(path), shared=True, clock=clock)
    before = {
        f"h{i}.example": (store.allocate(f"h{i}.example", V4), store.allocate(f"h{i}.example", V6))
        for i in range(50)
    }
    store.close()
    for shared in (True, False):
        again = FakeIpStore(str(path), shared=shared, clock=clock)
        for name, (a, aaaa) in before.items():
            assert again.lookup_ip(a) == name
            assert again.allocate(name, V6) == aaaa
        assert again.allocate("new.example", V4) == ip("198.18.0.51")
        assert again.statistics().v4_mappings == 51
        again.close()


def test_a_single_process_file_opened_shared(path: Path, clock: Clock) -> None:
    # Logical-clock rows are older than any wall-clock millisecond: they go first.
    single = FakeIpStore(str(path), **SMALL)
    handed = [single.allocate(f"n{i}", V4) for i in range(4)]
    single.lookup_ip(handed[0])
    single.close()
    shared = FakeIpStore(str(path), shared=True, clock=clock, **SMALL)
    assert shared.allocate("fifth", V4) == ip("10.99.0.6")
    assert shared.allocate("sixth", V4) == handed[1]
    assert shared.allocate("seventh", V4) == handed[2]
    shared.close()


def test_pool_change_cleans_the_file_in_shared_mode(path: Path, clock: Clock) -> None:
    store = FakeIpStore(str(path), shared=True, clock=clock)
    kept = store.allocate("kept", V4)
    store.allocate("v6only", V6)
    store.close()
    again = FakeIpStore(str(path), shared=True, clock=clock, v6_pool=None, reserved=[kept])
    assert again.lookup_ip(kept) is None
    assert again.statistics().v4_mappings == 0
    assert again.allocate("kept", V4) == ip("198.18.0.2")
    again.close()
    assert len(db_rows(path)) == 1


def test_shared_queries_probe_indexes(path: Path) -> None:
    # A full scan or sort here would cost milliseconds per DNS answer on a
    # full /15 pool, without failing anything else.
    store = FakeIpStore(str(path), shared=True)
    for sql in (fakeip._SQL_BY_IP, fakeip._SQL_BY_NAME, fakeip._SQL_HIGHEST, fakeip._SQL_OLDEST):
        params = (b"x", *store.v4.db_range)[-sql.count("?") :]
        plan = " ".join(row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert plan.startswith("SEARCH") and "TEMP B-TREE" not in plan, (sql, plan)
    store.close()


# --- several processes ---------------------------------------------------------

# Tiny pools, so that four processes recycle all the time.
CHURN_POOLS: dict[str, Any] = {
    "v4_pool": "10.99.0.0/28",
    "v6_pool": "fd00::/124",
    "reserved": ["10.99.0.1"],
}
CHURN_NAMES = [f"n{i}.example" for i in range(40)]
HISTORY = """
CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT, ip BLOB NOT NULL, name TEXT NOT NULL);
CREATE TRIGGER mapping_insert AFTER INSERT ON mapping
    BEGIN INSERT INTO history (ip, name) VALUES (new.ip, new.name); END;
CREATE TRIGGER mapping_rename AFTER UPDATE OF name ON mapping
    BEGIN INSERT INTO history (ip, name) VALUES (new.ip, new.name); END;
"""


class Checker:
    """Judges a store's answers against the history of the database.

    An answer obtained between two reads of the history is right if the
    address held that name at the first read or got it at some point
    before the second: what a linearizable table may answer.
    """

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)

    def seq(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(seq), 0) FROM history").fetchone()[0])

    def names_held(self, packed: bytes, after: int, until: int) -> set[str | None]:
        at_start = self.db.execute(
            "SELECT name FROM history WHERE ip = ? AND seq <= ? ORDER BY seq DESC LIMIT 1",
            (packed, after),
        ).fetchone()
        during = self.db.execute(
            "SELECT name FROM history WHERE ip = ? AND seq > ? AND seq <= ?",
            (packed, after, until),
        ).fetchall()
        return {None if at_start is None else at_start[0]} | {n for (n,) in during}

    def table_invariants(self) -> None:
        doubles = self.db.execute(
            "SELECT name, length(ip), count(*) FROM mapping GROUP BY name, length(ip)"
            " HAVING count(*) > 1"
        ).fetchall()
        assert not doubles, f"names with two addresses: {doubles}"


def _churn(path: str, worker: int, ops: int, barrier: Barrier, results: Any) -> None:
    try:
        rng = random.Random(worker)
        store = FakeIpStore(path, shared=True, touch_interval=0.002, **CHURN_POOLS)
        check = Checker(path)
        barrier.wait(timeout=60)
        for op in range(ops):
            name = rng.choice(CHURN_NAMES)
            family = rng.choice((V4, V6))
            before = check.seq()
            addr = store.allocate(name, family)
            after = check.seq()
            held = check.names_held(addr.packed, before, after)
            assert name in held, f"{worker}: allocate({name}) gave {addr}, which held {held}"
            # Look up an address another process may have handed out or recycled.
            pool = store.v4 if family == V4 else store.v6
            assert pool is not None
            probe = pool.address(rng.randint(1, pool.last))
            before = check.seq()
            got = store.lookup_ip(probe)
            after = check.seq()
            held = check.names_held(probe.packed, before, after)
            assert got in held, f"{worker}: lookup_ip({probe}) gave {got}, database held {held}"
            if op % 20 == 0:
                check.table_invariants()
        barrier.wait(timeout=60)  # everyone stopped writing names
        check.table_invariants()
        final = dict(check.db.execute("SELECT ip, name FROM mapping").fetchall())
        for pool in (store.v4, store.v6):
            assert pool is not None
            for offset in range(1, pool.last + 1):
                addr = pool.address(offset)
                assert store.lookup_ip(addr) == final.get(addr.packed), f"{worker}: {addr}"
        for name in CHURN_NAMES:
            for family in (V4, V6):
                held_ip = store.lookup_name(name, family)
                assert held_ip is None or final[held_ip.packed] == name
        stats = store.statistics()
        store.close()
        results.put((worker, None, stats.recycled))
    except BaseException:
        barrier.abort()
        results.put((worker, traceback.format_exc(), 0))


def _same_names(path: str, worker: int, barrier: Barrier, results: Any) -> None:
    try:
        barrier.wait(timeout=60)  # open a brand-new file all at once
        store = FakeIpStore(path, shared=True)
        barrier.wait(timeout=60)  # nobody allocates before all have opened
        names = [f"s{i}.example" for i in range(200)]
        random.Random(worker).shuffle(names)
        answer = {n: str(store.allocate(n, V4)) for n in names}
        store.close()
        results.put((worker, None, answer))
    except BaseException:
        barrier.abort()
        results.put((worker, traceback.format_exc(), {}))


def run_workers(target: Any, count: int, *args: Any) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(*args[:1], i, *args[1:], barrier, results))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    failures = [error for _, error, _ in outcomes if error is not None]
    assert not failures, "\n".join(failures)
    return [value for _, _, value in sorted(outcomes, key=lambda o: o[0])]


def test_processes_agree_while_recycling(path: Path) -> None:
    FakeIpStore(str(path), shared=True).close()
    with sqlite3.connect(path) as db:
        db.executescript(HISTORY)
    recycled = run_workers(_churn, 4, str(path), 300)
    assert sum(recycled) > 100  # the pools really turned over
    Checker(str(path)).table_invariants()


def test_processes_give_one_name_one_address(path: Path) -> None:
    answers = run_workers(_same_names, 3, str(path))
    assert answers[0] == answers[1] == answers[2]
    assert len(set(answers[0].values())) == 200


def _open_new_files(
    directory: str, worker: int, files: int, barrier: Barrier, results: Any
) -> None:
    try:
        for i in range(files):
            barrier.wait(timeout=60)  # every worker opens file i at the same moment
            FakeIpStore(f"{directory}/new{i}.sqlite", shared=True).close()
        results.put((worker, None, files))
    except BaseException:
        barrier.abort()
        results.put((worker, traceback.format_exc(), 0))


def test_workers_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Workers start together: switching a new file to WAL meets another
    process doing the same, which SQLite answers with "locked" at once."""
    assert run_workers(_open_new_files, 6, str(tmp_path), 25) == [25] * 6
