"""The SQLite file behind `SQLiteStore`: its connections, worker threads and errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Final, TypeVar

from .._errors import StoreError
from ._sqlite_writer import GroupWriter

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS records (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_expiry ON records (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, message BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
#: Worker threads (each with its own connection): SQLite writes one at a time anyway.
_WORKERS: Final = 4


class SQLiteFile:
    """Runs work on a connection of its own thread, off the loop; sqlite3 errors explained."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self._timeout = timeout
        self._schema_ready = False
        self._inherited: list[sqlite3.Connection] = []
        self._begin()
        self._writer = GroupWriter(self.connect, self.error)
        self._closed = False

    def _begin(self) -> None:
        """The threads and connections of this process (again in a forked child: no
        thread survives a fork, and SQLite's connections must not be used across one)."""
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(
            _WORKERS, thread_name_prefix="deepmode-sqlite"
        )

    def _ready(self) -> None:
        """Before any work: refuse it once closed; in a forked child, fresh threads."""
        if self._closed:
            raise StoreError(f"this SQLiteStore ({self.path}) was closed")
        self._check_process()

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            # The parent's connections stay open, unused: closing one here could end
            # what the parent holds on the file.
            self._inherited += self._connections
            self._begin()

    def connect(self) -> sqlite3.Connection:
        self._check_process()  # the writer's and the events' threads connect here too
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            if not self._schema_ready:
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                    raise StoreError(f"SQLite store {self.path}: the file cannot use WAL mode")
                conn.executescript(_SCHEMA)
                self._schema_ready = True
        except sqlite3.Error as exc:  # locked, or not a database: on every path, explained
            conn.close()
            raise self.error(exc) from None
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._connections.append(conn)
        return conn

    def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self.connect()
            return work(conn)
        except sqlite3.Error as exc:
            raise self.error(exc) from None

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._ready()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._in_thread, work)

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` inside a write transaction on the write thread, with the writes
        queued meanwhile (see `GroupWriter`)."""
        self._ready()
        return await self._writer.run(work)

    def error(self, exc: sqlite3.Error) -> StoreError:
        """What went wrong, and what to do about it, without the sqlite3 exception."""
        text = str(exc)
        lowered = text.lower()
        where = f"the SQLite store {self.path}"
        if "locked" in lowered or "busy" in lowered:
            hint = (
                f"{where} stayed locked for more than {self._timeout:g} s: another process "
                "holds a long write transaction"
            )
        elif "unable to open" in lowered or "readonly" in lowered or "read-only" in lowered:
            hint = (
                f"cannot write {where} ({text}): its directory must exist and be writable, "
                "and the path must be a file"
            )
        elif "full" in lowered:
            hint = f"{where} cannot grow: the disk is full ({text})"
        elif "not a database" in lowered or "malformed" in lowered:
            hint = f"{where} is not a usable SQLite database ({text}): move it away"
        else:
            hint = f"{where} failed: {type(exc).__name__}: {text}"
        return StoreError(hint)

    def run_here(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the calling thread (for synchronous callers), on a connection of its own."""
        self._ready()
        conn = self.connect()
        try:
            return work(conn)
        except sqlite3.Error as exc:
            raise self.error(exc) from None
        finally:
            with self._lock:
                self._connections.remove(conn)
            conn.close()

    async def aclose(self, *, before: Callable[[], None]) -> None:
        """Close every connection, once the threads (and `before`, run first) are done."""
        if self._closed:
            return
        self._closed = True
        self._check_process()  # a child closes its own connections, never its parent's
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown, before)

    def _shutdown(self, before: Callable[[], None]) -> None:
        before()
        self._executor.shutdown(wait=True)
        self._writer.stop()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
