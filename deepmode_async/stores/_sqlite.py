"""`SQLiteStore`: a file shared by every process of one machine (stdlib sqlite3, no extra)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, TypeVar

from .._errors import StoreError, ValidationError
from ._base import (
    QueueSubscription,
    Store,
    Subscription,
    check_address,
    check_channel,
    check_key,
    check_ns,
    check_ttl,
    check_value,
    chunks,
)
from ._sqlite_events import EVENT_RETENTION, EventListener

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
_LIVE: Final = "(expires IS NULL OR expires > ?)"
#: Keys per statement (SQLite allows at least 999 parameters) and records per page.
_PAGE: Final = 500
#: Every this many writes, expired records and old events are removed (a few at a time).
_CLEAN_EVERY: Final = 256
#: Worker threads (each with its own connection): SQLite writes one at a time anyway.
_WORKERS: Final = 4


class SQLiteStore(Store):
    """A store in an SQLite file, shared by every process on this machine that opens it.

    For an app served by several worker processes (`uvicorn --workers N`, gunicorn) or
    one that restarts: what it keeps survives the process. The file is in WAL mode with
    `synchronous=NORMAL`: a write that returned survives a crash or `kill -9` of any
    process (only a power cut or OS crash may lose the last ones). Waiting for a lock
    held by another process is bounded by `timeout` seconds, then `StoreError`.
    All file I/O runs in the store's own worker threads, off the event loop, except
    `secret()`'s first call. Pub/sub needs no server: subscribers are woken within
    about 10 ms of a publish in any process. For several machines, use `RedisStore`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        raw = os.fspath(path)
        if not isinstance(raw, str) or not raw or raw == ":memory:" or "\0" in raw:
            raise ValidationError(
                f"SQLiteStore needs the path of a file, not {raw!r} (MemoryStore() keeps "
                "records in memory)"
            )
        self.path = os.path.abspath(raw)
        self._timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._schema_ready = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            _WORKERS, thread_name_prefix="deepmode-sqlite"
        )
        self._events = EventListener(self._connect, self.path)
        self._secrets: dict[str, bytes] = {}
        self._writes = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            if not self._schema_ready:
                if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                    raise StoreError(f"SQLite store {self.path}: the file cannot use WAL mode")
                conn.executescript(_SCHEMA)
                self._schema_ready = True
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
                conn = self._local.conn = self._connect()
            return work(conn)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"this SQLiteStore ({self.path}) was closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._in_thread, work)

    def _error(self, exc: sqlite3.Error) -> StoreError:
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

    # ------------------------------------------------------------------ records

    def _wrote(self, conn: sqlite3.Connection, now: float) -> None:
        self._writes += 1  # racy across threads, harmless: it only paces the cleanup
        if self._writes % _CLEAN_EVERY == 0:
            conn.execute(
                "DELETE FROM records WHERE (ns, key) IN (SELECT ns, key FROM records"
                " WHERE expires <= ? LIMIT ?)",
                (now, _PAGE),
            )
            conn.execute("DELETE FROM events WHERE created < ?", (now - EVENT_RETENTION,))

    async def get(self, ns: str, key: str) -> bytes | None:
        check_address(ns, key)
        sql = f"SELECT value FROM records WHERE ns = ? AND key = ? AND {_LIVE}"

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(sql, (ns, key, time.time())).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(work)

    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        check_ns(ns)
        keys = [check_key(key) for key in keys]

        def work(conn: sqlite3.Connection) -> list[bytes | None]:
            found: dict[str, bytes] = {}
            now = time.time()
            for part in chunks(keys, _PAGE):
                marks = ",".join("?" * len(part))
                sql = (
                    f"SELECT key, value FROM records WHERE ns = ? AND {_LIVE} AND key IN ({marks})"
                )
                found.update(conn.execute(sql, (ns, now, *part)).fetchall())
            return [None if key not in found else bytes(found[key]) for key in keys]

        return await self._run(work) if keys else []

    async def put(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._write(ns, key, value, ttl, "")

    async def add(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        # One statement, so atomic: it overwrites only a record that has expired.
        return await self._write(
            ns, key, value, ttl, "WHERE records.expires IS NOT NULL AND records.expires <= ?4"
        )

    async def _write(
        self, ns: str, key: str, value: bytes, ttl: float | None, condition: str
    ) -> bool:
        check_address(ns, key)
        value, ttl = check_value(value), check_ttl(ttl)
        sql = (
            "INSERT INTO records (ns, key, value, expires) VALUES (?1, ?2, ?3, ?5)"
            " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value,"
            f" expires = excluded.expires {condition}"
        )

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            expires = None if ttl is None else now + ttl
            changed = conn.execute(sql, (ns, key, value, now, expires)).rowcount == 1
            self._wrote(conn, now)
            return changed

        return await self._run(work)

    async def replace(
        self, ns: str, key: str, expected: bytes, value: bytes, *, ttl: float | None = None
    ) -> bool:
        check_address(ns, key)
        expected, value, ttl = check_value(expected), check_value(value), check_ttl(ttl)
        sql = (
            "UPDATE records SET value = ?, expires = ?"
            f" WHERE ns = ? AND key = ? AND value = ? AND {_LIVE}"
        )

        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            expires = None if ttl is None else now + ttl
            changed = conn.execute(sql, (value, expires, ns, key, expected, now)).rowcount == 1
            self._wrote(conn, now)
            return changed

        return await self._run(work)

    async def delete(self, ns: str, key: str) -> bool:
        check_address(ns, key)

        def work(conn: sqlite3.Connection) -> bool:
            live = conn.execute(
                f"DELETE FROM records WHERE ns = ? AND key = ? AND {_LIVE}", (ns, key, time.time())
            ).rowcount
            if not live:  # an expired one may still be there: clean it up too
                conn.execute("DELETE FROM records WHERE ns = ? AND key = ?", (ns, key))
            return live == 1

        return await self._run(work)

    async def items(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        check_ns(ns)
        # Keyset pagination on the primary key; the first page has no lower bound, as
        # the empty string is a key too.
        select = f"SELECT key, value FROM records WHERE ns = ? AND {_LIVE}"
        after: str | None = None
        while True:

            def work(conn: sqlite3.Connection, last: str | None = after) -> list[Any]:
                if last is None:
                    return conn.execute(
                        f"{select} ORDER BY key LIMIT ?", (ns, time.time(), _PAGE)
                    ).fetchall()
                return conn.execute(
                    f"{select} AND key > ? ORDER BY key LIMIT ?", (ns, time.time(), last, _PAGE)
                ).fetchall()

            page = await self._run(work)
            for key, value in page:
                yield key, bytes(value)
            if len(page) < _PAGE:
                return
            after = page[-1][0]

    # ------------------------------------------------------------------ pub/sub

    async def publish(self, channel: str, message: bytes) -> None:
        check_channel(channel)
        message = check_value(message)

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "INSERT INTO events (channel, message, created) VALUES (?, ?, ?)",
                (channel, message, now),
            )
            self._wrote(conn, now)

        await self._run(work)
        self._events.wake()

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        check_channel(channel)
        sub = QueueSubscription(asyncio.get_running_loop())

        def newest(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

        self._events.register(channel, sub, await self._run(newest))
        try:
            yield sub
        finally:
            self._events.unregister(channel, sub)

    # ------------------------------------------------------------------ the rest

    def secret(self, name: str) -> bytes:
        check_key(name)
        cached = self._secrets.get(name)
        if cached is not None:
            return cached
        if self._closed:
            raise StoreError(f"this SQLiteStore ({self.path}) was closed")

        def work(conn: sqlite3.Connection) -> bytes:
            conn.execute(
                "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                (name, secrets.token_bytes(32)),
            )
            row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
            return bytes(row[0])

        # On the calling thread (it is synchronous), in a connection of its own.
        conn = self._connect()
        try:
            value = work(conn)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            with self._lock:
                self._connections.remove(conn)
            conn.close()
        return self._secrets.setdefault(name, value)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._events.stop()
        self._executor.shutdown(wait=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
