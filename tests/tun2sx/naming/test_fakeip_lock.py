"""The fake-IP table's lock: one single process per file, or workers, never both."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tun2sx.naming import journal
from tun2sx.naming.fakeip import FakeIpStore, TableInUseError

V4 = socket.AF_INET
Holder = Callable[[Path, str], "subprocess.Popen[str]"]
SMALL = {"v4_pool": "10.99.0.0/28", "v6_pool": "fd00::/124"}

# Another process keeps a store open on argv[1] (shared if argv[2] says so)
# until its stdin closes; it says "ready" once the store is open.
HOLDER = textwrap.dedent(
    """
    import socket, sys
    from tun2sx.naming.fakeip import FakeIpStore
    store = FakeIpStore(sys.argv[1], v4_pool="10.99.0.0/28", v6_pool="fd00::/124",
                        shared=sys.argv[2] == "shared")
    store.allocate("held.example", socket.AF_INET)
    print("ready", flush=True)
    sys.stdin.read()
    store.close()
    """
)


def snapshot(path: Path) -> tuple[bytes, int, int]:
    """What a refused store must leave alone: the bytes, the inode, the mtime."""
    stat = path.stat()
    return path.read_bytes(), stat.st_ino, stat.st_mtime_ns


@pytest.fixture
def holder() -> Iterator[Holder]:
    children: list[subprocess.Popen[str]] = []

    def start(path: Path, mode: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


def test_a_second_single_store_on_one_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "fakeip"
    first = FakeIpStore(str(path), **SMALL)
    first.allocate("a.example", V4)
    before = snapshot(path)
    with pytest.raises(TableInUseError) as refused:
        FakeIpStore(str(path), **SMALL)
    assert refused.value.filename == str(path)
    assert snapshot(path) == before
    # The first one goes on appending to the file a restart reads.
    b = first.allocate("b.example", V4)
    first.close()
    again = FakeIpStore(str(path), **SMALL)
    assert again.lookup_name("b.example", V4) == b
    again.close()


def test_the_lock_file_sits_beside_the_table_and_outlives_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "fakeip"
    store = FakeIpStore(str(path), **SMALL, touch_batch=1)
    inode = (tmp_path / "fakeip.lock").stat().st_ino
    # Enough superseded records for a rewrite, which renames a new file in
    # (the old one held open, so that its inode number is not reused).
    with path.open("rb") as old:
        for i in range(3 * journal.SLACK):
            store.allocate(f"n{i % 3}.example", V4)
        assert path.stat().st_ino != os.fstat(old.fileno()).st_ino
    assert (tmp_path / "fakeip.lock").stat().st_ino == inode
    with pytest.raises(TableInUseError):
        FakeIpStore(str(path), **SMALL)
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fakeip", "fakeip.lock"]


def test_another_process_holding_the_table_refuses_until_it_is_killed(
    tmp_path: Path, holder: Holder
) -> None:
    path = tmp_path / "fakeip"
    child = holder(path, "single")
    before = snapshot(path)
    with pytest.raises(TableInUseError):
        FakeIpStore(str(path), **SMALL)
    with pytest.raises(TableInUseError):
        FakeIpStore(str(path), **SMALL, shared=True)
    assert snapshot(path) == before
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    # kill -9 ran no cleanup; the kernel dropped the lock with the process.
    store = FakeIpStore(str(path), **SMALL)
    assert store.lookup_name("held.example", V4) is not None
    store.close()


def test_a_single_process_does_not_migrate_the_workers_database(
    tmp_path: Path, holder: Holder
) -> None:
    path = tmp_path / "fakeip"
    holder(path, "shared")
    assert path.read_bytes().startswith(journal.SQLITE_MAGIC)
    before = snapshot(path)
    with pytest.raises(TableInUseError):
        FakeIpStore(str(path), **SMALL)
    assert snapshot(path) == before
    # Another worker shares it (their writes are SQLite transactions).
    worker = FakeIpStore(str(path), **SMALL, shared=True)
    assert worker.lookup_name("held.example", V4) is not None
    worker.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM mapping").fetchall() == [("held.example",)]


def test_workers_do_not_convert_a_single_process_journal(tmp_path: Path, holder: Holder) -> None:
    path = tmp_path / "fakeip"
    holder(path, "single")
    before = snapshot(path)
    with pytest.raises(TableInUseError):
        FakeIpStore(str(path), **SMALL, shared=True)
    assert snapshot(path) == before
    assert before[0].startswith(journal.MAGIC)


def test_closing_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "fakeip"
    FakeIpStore(str(path), **SMALL).close()
    FakeIpStore(str(path), **SMALL, shared=True).close()
    FakeIpStore(str(path), **SMALL).close()


def test_a_lock_file_that_cannot_be_made_leaves_the_table_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read-only directory (root ignores permission bits, so the error is
    # made here): the table is opened as before there were locks.
    real_open = os.open

    def read_only_dir(name: str, flags: int, *args: int) -> int:
        if str(name).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        return real_open(name, flags, *args)

    path = tmp_path / "fakeip"
    monkeypatch.setattr(journal.os, "open", read_only_dir)
    first = FakeIpStore(str(path), **SMALL)
    a = first.allocate("a.example", V4)
    first.close()
    again = FakeIpStore(str(path), **SMALL)
    assert again.lookup_name("a.example", V4) == a
    again.close()
    assert not (tmp_path / "fakeip.lock").exists()


def test_memory_tables_take_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first, second = FakeIpStore(**SMALL), FakeIpStore(**SMALL)
    first.close()
    second.close()
    assert list(tmp_path.iterdir()) == []
