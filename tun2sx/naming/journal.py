"""The fake-IP table's file for one process: an append-only journal.

A single tun2sx process keeps its whole table in memory (tun2sx.naming.fakeip)
and needs the file only to get the table back after a restart. SQLite did
that at the price of libsqlite3 and the `sqlite3` module in every process,
about 1.7 MiB of an idle tun2sx's 25. This file needs nothing but `os`: it
opens with a magic line and then holds records, each one `os.write` with
`O_APPEND`:

     0       1       2               4                              12
    +-------+-------+---------------+------------------------------+
    | kind  | iplen |    namelen    |             used             |
    +-------+-------+---------------+------------------------------+
    | address (iplen: 4 or 16 bytes) | name (namelen bytes, UTF-8) |
    +--------------------------------+-----------------------------+

`MAP` says the address now stands for the name (replacing what it stood for);
`TOUCH` (no name) moves its recency. Replaying the records in order gives
every mapping and its last use, the same rows the SQLite table held.

Durability is what WAL with `synchronous=NORMAL` gave: a record reaches the
kernel before `allocate` returns, so a crash of the process loses nothing;
power loss may lose the last records or leave a torn one at the end, which
reading drops (it stops at the first record that cannot be whole: an unknown
kind, an address length other than 4 or 16, or a short read).

The journal grows by one record per new mapping and one per batch of
recency updates; once it holds more than twice the live mappings plus
`SLACK` records, the store rewrites it with one record per mapping (a
temporary file, fsync, rename), so it stays within a few times the size of
the table.

Migration: a file that still is an SQLite database (tun2sx wrote those before)
is read with `sqlite3` once and replaced by a journal; workers, which share
one table through SQLite, turn a journal back into a database
(`to_sqlite`). Either way the mappings and their recency order survive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Iterable

__all__ = [
    "SLACK",
    "SQLITE_MAGIC",
    "Journal",
    "JournalError",
    "TableInUseError",
    "lock_table",
    "to_sqlite",
]

MAGIC = b"tun2sx fake-ip journal 1\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
MAP = 1
TOUCH = 2
SLACK = 4096  # records beyond twice the live ones before a rewrite

_HEADER = struct.Struct("!BBHQ")  # kind, address length, name length, used

Row = tuple[bytes, str, int]  # packed address, name, last use


class JournalError(OSError):
    """The file is neither a journal nor an SQLite database of the table."""


class TableInUseError(OSError):
    """Another process holds the table's lock in a way this one cannot share."""


def lock_table(path: str, *, shared: bool) -> int | None:
    """Take the advisory lock of the table at `path`, on `<path>.lock`.

    The lock lives in a file of its own because the table's file does not
    keep its inode: a rewrite or a migration renames a new file over it.
    A single process takes the lock exclusively (its table is in memory, a
    second one would append to a file the first has replaced); workers take
    it shared (SQLite makes their writes safe against each other, and the
    parent's shared lock, inherited by the workers, keeps a single process
    from migrating the database away under them). The kernel drops an
    `flock` with the last descriptor of it, so a killed process leaves none.

    Returns:
        The descriptor holding the lock (close it to release), or None when
        the lock file can be neither created nor opened (a read-only
        directory): the table is then used without one, as before locks.

    Raises:
        TableInUseError: another process holds a lock that excludes this one.
    """
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        try:  # a lock file left in a directory that has since become read-only
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TableInUseError(errno.EBUSY, "in use by another tun2sx", path) from None
    except OSError:
        os.close(fd)  # a file system without flock: as without a lock file
        return None
    return fd


def _record(kind: int, packed: bytes, name: bytes, used: int) -> bytes:
    return _HEADER.pack(kind, len(packed), len(name), used) + packed + name


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _replay(data: bytes) -> tuple[list[Row], int, int]:
    """The rows in `data` (after the magic) oldest use first, the records read, and the
    length of the whole records."""
    table: dict[bytes, list[str | int]] = {}
    pos = len(MAGIC)
    records = 0
    size = len(data)
    while pos + _HEADER.size <= size:
        kind, iplen, namelen, used = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + iplen + namelen
        if kind not in (MAP, TOUCH) or iplen not in (4, 16) or end > size:
            break  # a torn or zeroed tail: the records before it are the table
        packed = data[pos + _HEADER.size : pos + _HEADER.size + iplen]
        if kind == MAP:
            name = data[pos + _HEADER.size + iplen : end].decode("utf-8", "surrogateescape")
            table[packed] = [name, used]
        elif packed in table:
            table[packed][1] = used
        pos = end
        records += 1
    rows = [(packed, str(name), int(used)) for packed, (name, used) in table.items()]
    rows.sort(key=lambda row: row[2])
    return rows, records, pos


def _read_sqlite(path: str) -> list[Row]:
    """The rows of an SQLite table file, oldest use first."""
    # Imported here: only a file written before the journal existed, or by
    # workers, gets here, once.
    import sqlite3

    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            rows = db.execute("SELECT ip, name, used FROM mapping ORDER BY used").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise JournalError(str(exc)) from exc
    return [(bytes(packed), str(name), int(used)) for packed, name, used in rows]


def _replace(path: str, rows: Iterable[Row]) -> None:
    """Write a journal of `rows` to `path` atomically (temporary file, fsync, rename)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        chunks = [MAGIC]
        chunks += [_record(MAP, packed, _encode(name), used) for packed, name, used in rows]
        data = b"".join(chunks)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        # On a full disk a half-written copy would hold on to the space.
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_directory(path)


def _sync_directory(path: str) -> None:
    """Make a rename durable: fsync the directory that holds `path`."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The open journal of one process's table.

    `Journal.open(path)` returns it with the rows it holds; the store appends
    what changes and calls `rewrite` when `needs_rewrite` says so.
    """

    __slots__ = ("_fd", "_path", "records")

    def __init__(self, path: str, fd: int, records: int) -> None:
        self._path = path
        self._fd = fd
        self.records = records  # in the file, live or superseded

    @classmethod
    def open(cls, path: str) -> tuple[Journal, list[Row]]:
        """Open (or create) the journal at `path`; its rows, oldest use first.

        An SQLite file is migrated first. A torn last record is cut off.

        Raises:
            OSError: the file cannot be opened, read or written.
            JournalError: it is neither a journal nor an SQLite table.
        """
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as existing:
            if existing.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                _replace(path, _read_sqlite(path))
                for side in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + side)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            data = _read_all(fd)
            if MAGIC.startswith(data):  # new, or cut short while it was being made
                os.ftruncate(fd, 0)
                os.write(fd, MAGIC)
                return cls(path, fd, 0), []
            if not data.startswith(MAGIC):
                raise JournalError("not a fake-IP table (neither a journal nor SQLite)")
            rows, records, whole = _replay(data)
            if whole < len(data):
                os.ftruncate(fd, whole)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, records), rows

    def append(self, touches: dict[bytes, int], packed: bytes, name: str, used: int) -> None:
        """Record new last uses and that `packed` now stands for `name`, in one write."""
        records = [_record(TOUCH, touched, b"", last) for touched, last in touches.items()]
        records.append(_record(MAP, packed, _encode(name), used))
        self._write(b"".join(records))
        self.records += len(records)

    def append_touches(self, touches: dict[bytes, int]) -> None:
        """Record new last uses, in one write."""
        self._write(b"".join(_record(TOUCH, packed, b"", used) for packed, used in touches.items()))
        self.records += len(touches)

    def needs_rewrite(self, live: int) -> bool:
        """Whether the file holds so many superseded records that a rewrite pays."""
        return self.records > 2 * live + SLACK

    def rewrite(self, rows: list[Row]) -> None:
        """Replace the file by one record per row; the journal then appends to it."""
        _replace(self._path, rows)
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = fd
        self.records = len(rows)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write(self, data: bytes) -> None:
        # O_APPEND: one write is one contiguous run at the end; a regular
        # file's write returns short only when the disk is full.
        written = os.write(self._fd, data)
        if written != len(data):
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            # The full disk's own errno: the next write would have failed with it.
            reason = f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(data)} bytes)"
            raise OSError(errno.ENOSPC, reason, self._path)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def to_sqlite(path: str, create_table: str) -> None:
    """Turn a journal at `path` into an SQLite table file, once, for workers.

    Workers open the file at the same moment: an exclusive `flock` on the
    journal lets one of them convert it (to a temporary database, renamed
    over the journal) while the others wait and then find the database.

    Args:
        path: The table's file; nothing happens unless it is a journal.
        create_table: The SQL that creates the `mapping` table.
    """
    import sqlite3  # workers share the table through SQLite anyway

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return  # another worker converted it while we waited
        except FileNotFoundError:
            return
        data = _read_all(fd)
        if not data.startswith(MAGIC):
            return
        rows, _, _ = _replay(data)
        tmp = f"{path}.sqlite-tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.executescript("BEGIN;" + create_table + "COMMIT;")
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO mapping (ip, name, used) VALUES (?, ?, ?)", rows)
            db.execute("COMMIT")
        finally:
            db.close()
        os.replace(tmp, path)
        _sync_directory(path)
    finally:
        os.close(fd)
