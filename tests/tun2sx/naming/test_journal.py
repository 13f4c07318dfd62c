"""The fake-IP table's journal: restarts, torn tails, rewrites, migration to and from SQLite."""

from __future__ import annotations

import ipaddress
import json
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tun2sx.naming import journal
from tun2sx.naming.fakeip import FakeIpStore

V4, V6 = socket.AF_INET, socket.AF_INET6
SMALL = {"v4_pool": "10.99.0.0/28", "v6_pool": "fd00::/124", "touch_batch": 3}
# The table as tun2sx wrote it before the journal, and as workers write it.
OLD_SCHEMA = (
    "CREATE TABLE mapping (ip BLOB PRIMARY KEY, name TEXT NOT NULL, used INTEGER NOT NULL)"
    " WITHOUT ROWID"
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# Allocates two names in argv[1] and dies by SIGKILL: no close, no flush.
CRASH = textwrap.dedent(
    """
    import os, signal, socket, sys
    from tun2sx.naming.fakeip import FakeIpStore
    store = FakeIpStore(sys.argv[1], v4_pool="10.99.0.0/28", v6_pool="fd00::/124", touch_batch=3)
    a = store.allocate("a.example", socket.AF_INET)
    b = store.allocate("b.example", socket.AF_INET6)
    print(a, b, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_new_file_is_a_journal_and_survives_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "fakeip.sqlite"
    child = subprocess.run(
        [sys.executable, "-c", CRASH, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -9, child.stderr
    a, b = map(ip, child.stdout.split())
    # A crashed process leaves what it wrote: allocations are written at once.
    again = FakeIpStore(str(path), **SMALL)
    assert path.read_bytes().startswith(journal.MAGIC)
    assert (again.lookup_ip(a), again.lookup_ip(b)) == ("a.example", "b.example")
    again.close()


def test_a_torn_last_record_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "fakeip"
    store = FakeIpStore(str(path), **SMALL)
    kept = store.allocate("kept.example", V4)
    store.allocate("torn.example", V4)
    store.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # power lost in the middle of the last record
    again = FakeIpStore(str(path), **SMALL)
    assert again.lookup_ip(kept) == "kept.example"
    assert again.lookup_name("torn.example", V4) is None
    # Appends go on after the cut, so the next start reads them.
    fresh = again.allocate("fresh.example", V4)
    again.close()
    third = FakeIpStore(str(path), **SMALL)
    assert third.lookup_ip(fresh) == "fresh.example"
    assert third.lookup_ip(kept) == "kept.example"
    third.close()


def test_a_file_that_is_neither_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fakeip"
    path.write_bytes(b"some other file\n")
    with pytest.raises(OSError, match="not a fake-IP table"):
        FakeIpStore(str(path))
    assert path.read_bytes() == b"some other file\n"


def test_superseded_records_are_rewritten_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SLACK", 10)
    path = tmp_path / "fakeip"
    store = FakeIpStore(str(path), v4_pool="10.99.0.0/29", v6_pool=None, touch_batch=1)
    first = [store.allocate(f"n{i}", V4) for i in range(5)]
    for _ in range(40):
        for addr in first[1:]:
            assert store.lookup_ip(addr) is not None  # n0 stays the least recently used
    size = path.stat().st_size
    store.close()
    record = journal._HEADER.size + 4
    assert size <= len(journal.MAGIC) + (2 * 5 + 10 + 1) * (record + 2)
    again = FakeIpStore(str(path), v4_pool="10.99.0.0/29", v6_pool=None)
    assert again.allocate("sixth", V4) == ip("10.99.0.6")
    assert again.allocate("seventh", V4) == first[0]  # recycled: still the oldest
    again.close()


# The kernel refuses writes past RLIMIT_FSIZE (EFBIG) as it refuses them on a
# full disk (ENOSPC): the same short or failed `write`, without a full disk.
# A child process, so that no other file of the test run meets the limit.
FULL_DISK = textwrap.dedent(
    """
    import json, logging, os, resource, signal, socket, sys
    from tun2sx.naming import journal
    from tun2sx.naming.fakeip import FakeIpStore

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    journal.SLACK = 8
    path = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    now = [0.0]
    store = FakeIpStore(
        path, v4_pool="10.99.0.0/24", v6_pool=None, touch_batch=4, clock=lambda: now[0]
    )
    before = {f"old{i}": str(store.allocate(f"old{i}", socket.AF_INET)) for i in range(20)}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    size = len(open(path, "rb").read())
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))  # not a byte more
    known = {name: str(store.allocate(name, socket.AF_INET)) for name in list(before) * 3}
    during = {f"new{i}": str(store.allocate(f"new{i}", socket.AF_INET)) for i in range(40)}
    # Room for a few records but not for a copy of the table: the rewrite
    # that would catch up fails, and leaves no half copy behind.
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 200, hard))
    now[0] += 60
    during.update({f"mid{i}": str(store.allocate(f"mid{i}", socket.AF_INET)) for i in range(3)})
    files = sorted(os.listdir(os.path.dirname(path)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    now[0] += 60
    after = {"later": str(store.allocate("later", socket.AF_INET))}
    store.close()
    print(json.dumps([before, known, during, after, files]))
    """
)


def test_a_full_disk_keeps_answers_and_the_file_catches_up(tmp_path: Path) -> None:
    path = tmp_path / "fakeip"
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    before, known, during, after, files = json.loads(child.stdout)
    # While the file cannot grow, names keep their addresses and new names
    # get one each (DNS answers instead of failing)...
    assert known == before
    assert len(set(during.values()) | set(before.values())) == 63
    assert files == ["fakeip", "fakeip.lock"]  # the failed rewrite's copy is gone
    # ...one warning says so, and one line when writing works again.
    assert child.stderr.count("cannot write") == 1, child.stderr
    assert child.stderr.count("written again") == 1, child.stderr
    assert "Traceback" not in child.stderr
    # Once it can, the file catches up: a restart knows every name.
    again = FakeIpStore(str(path), v4_pool="10.99.0.0/24", v6_pool=None)
    for name, address in {**before, **during, **after}.items():
        assert again.lookup_ip(ip(address)) == name
    again.close()
    # No temporary file left; the lock file stays (removing it would race).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fakeip", "fakeip.lock"]


def test_an_sqlite_table_is_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "fakeip.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    rows = [(ip(f"10.99.0.{i}").packed, f"n{i}", 10 - i) for i in range(1, 6)]  # n5 oldest
    db.executemany("INSERT INTO mapping VALUES (?, ?, ?)", rows)
    db.execute("INSERT INTO mapping VALUES (?, ?, ?)", (ip("fd00::2").packed, "six", 20))
    db.commit()
    db.close()
    store = FakeIpStore(str(path), **SMALL)
    assert path.read_bytes().startswith(journal.MAGIC)
    assert not (tmp_path / "fakeip.sqlite-wal").exists()
    assert [store.lookup_name(f"n{i}", V4) for i in range(1, 6)] == [
        ip(f"10.99.0.{i}") for i in range(1, 6)
    ]
    assert store.lookup_name("six", V6) == ip("fd00::2")
    store.close()
    # The recency order came along: once the fresh addresses are gone, n5 goes first.
    again = FakeIpStore(str(path), v4_pool="10.99.0.0/29", v6_pool=None)
    assert again.allocate("fresh", V4) == ip("10.99.0.6")
    assert again.allocate("fresher", V4) == ip("10.99.0.5")
    again.close()


def test_workers_turn_a_journal_into_their_database(tmp_path: Path) -> None:
    path = tmp_path / "fakeip.sqlite"
    single = FakeIpStore(str(path), **SMALL)
    a = single.allocate("a.example", V4)
    aaaa = single.allocate("a.example", V6)
    single.close()
    one = FakeIpStore(str(path), shared=True, **SMALL)
    two = FakeIpStore(str(path), shared=True, **SMALL)
    assert path.read_bytes().startswith(journal.SQLITE_MAGIC)
    assert one.lookup_ip(a) == two.lookup_ip(aaaa) == "a.example"
    assert two.allocate("b.example", V4) == one.lookup_name("b.example", V4)
    one.close()
    two.close()
    # And back, keeping what the workers added.
    single = FakeIpStore(str(path), **SMALL)
    assert single.lookup_ip(a) == "a.example"
    assert single.lookup_name("b.example", V4) is not None
    single.close()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("allocate"), st.integers(0, 24), st.sampled_from([V4, V6])),
        st.tuples(st.just("lookup"), st.integers(1, 16), st.sampled_from([4, 6])),
        st.tuples(st.just("restart"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_restarts_and_rewrites_change_no_answer(ops: list[tuple[str, int, int]]) -> None:
    """A file table restarted and rewritten at any point answers as one kept in memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/fakeip"
        original = journal.SLACK
        journal.SLACK = 2  # rewrite often
        try:
            model = FakeIpStore(**SMALL)
            store = FakeIpStore(path, **SMALL)
            for op, n, family in ops:
                if op == "allocate":
                    assert store.allocate(f"n{n}", family) == model.allocate(f"n{n}", family)
                elif op == "lookup":
                    addr = ip(f"10.99.0.{n - 1}" if family == 4 else f"fd00::{n - 1:x}")
                    assert store.lookup_ip(addr) == model.lookup_ip(addr)
                else:
                    store.close()
                    store = FakeIpStore(path, **SMALL)
            store.close()
        finally:
            journal.SLACK = original


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.data())
def test_a_file_cut_anywhere_keeps_exactly_the_whole_records(
    count: int, data: st.DataObject
) -> None:
    """Power loss can end the file at any byte: what is whole is kept, nothing else."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fakeip"
        store = FakeIpStore(str(path), **SMALL)
        ends = []
        for i in range(count):
            store.allocate(f"name{i}.example", V4 if i % 2 else V6)
            ends.append(path.stat().st_size)
        store.close()
        whole = path.read_bytes()
        cut = data.draw(st.integers(0, len(whole)))
        path.write_bytes(whole[:cut])
        again = FakeIpStore(str(path), **SMALL)
        kept = [
            i
            for i in range(count)
            if again.lookup_name(f"name{i}.example", V4 if i % 2 else V6) is not None
        ]
        assert kept == [i for i, end in enumerate(ends) if end <= cut]
        assert path.stat().st_size == max([len(journal.MAGIC), *(e for e in ends if e <= cut)])
        again.close()
