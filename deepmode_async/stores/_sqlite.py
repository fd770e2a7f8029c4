"""`SQLiteStore`: a file shared by every process of one machine (stdlib sqlite3, no extra)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from .._errors import ValidationError
from ._base import (
    QueueSubscription,
    Store,
    Subscription,
    check_address,
    check_channel,
    check_items,
    check_key,
    check_ns,
    check_ttl,
    check_value,
    chunks,
)
from ._sqlite_events import EVENT_RETENTION, EventListener
from ._sqlite_file import SQLiteFile

_LIVE: Final = "(expires IS NULL OR expires > ?)"
#: Keys per statement (SQLite allows at least 999 parameters) and records per page.
_PAGE: Final = 500
#: The rows of one `put_many` statement: as many of the largest as fit, then smaller.
_ROWS_PER_STATEMENT: Final = (64, 16, 4, 1)
#: Every this many writes, expired records and old events are removed (a few at a time).
_CLEAN_EVERY: Final = 256


@functools.cache
def _upsert(rows: int) -> str:
    return (
        "INSERT INTO records (ns, key, value, expires) VALUES "
        + ",".join(["(?, ?, ?, ?)"] * rows)
        + " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value,"
        " expires = excluded.expires"
    )


class SQLiteStore(Store):
    """A store in an SQLite file, shared by every process on this machine that opens it.

    For an app served by several worker processes (`uvicorn --workers N`, gunicorn) or
    one that restarts: what it keeps survives the process. The file is in WAL mode with
    `synchronous=NORMAL`: a write that returned survives a crash or `kill -9` of any
    process (only a power cut or OS crash may lose the last ones). Waiting for a lock
    held by another process is bounded by `timeout` seconds, then `StoreError`.
    All file I/O runs in the store's own worker threads, off the event loop, except
    `secret()`'s first call; writes run on one thread of their own, and those queued
    while one commits are committed together in the next transaction. Pub/sub needs
    no server: subscribers are woken within about 10 ms of a publish in any process.
    For several machines, use `RedisStore`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        try:
            raw = os.fspath(path)
        except TypeError:
            raw = path  # type: ignore[assignment]  # refused just below
        if not isinstance(raw, str) or not raw or raw == ":memory:" or "\0" in raw:
            raise ValidationError(
                f"SQLiteStore needs the path of a file, not {raw!r} (MemoryStore() keeps "
                "records in memory)"
            )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 <= timeout < math.inf
        ):
            raise ValidationError(
                f"SQLiteStore's timeout must be seconds (0 or more), not {timeout!r}"
            )
        self.path = os.path.abspath(raw)
        # SQLite counts its wait for a lock in 32-bit milliseconds (about 24 days).
        self._file = SQLiteFile(self.path, float(min(timeout, 2**31 // 1000)))
        self._events = EventListener(self._file.connect, self.path)
        self._secrets: dict[str, bytes] = {}
        self._writes = 0

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

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

        return await self._file.run(work)

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

        return await self._file.run(work) if keys else []

    async def put(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._write(ns, key, value, ttl, "")

    async def put_many(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None
    ) -> None:
        checked, ttl = check_items(ns, items, ttl)
        if not checked:
            return

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            expires = None if ttl is None else now + ttl
            rows = [(ns, key, value, expires) for key, value in checked]
            start = 0
            # Rows go many to a statement: each statement run releases and takes back
            # the GIL, which costs more than the row when the event loop is busy. A
            # few fixed sizes keep the statements in sqlite3's cache.
            for size in _ROWS_PER_STATEMENT:
                while len(rows) - start >= size:
                    part = rows[start : start + size]
                    conn.execute(_upsert(size), [field for row in part for field in row])
                    start += size
            self._wrote(conn, now)

        await self._file.write(work)

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

        return await self._file.write(work)

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

        return await self._file.write(work)

    async def delete(self, ns: str, key: str) -> bool:
        check_address(ns, key)

        def work(conn: sqlite3.Connection) -> bool:
            live = conn.execute(
                f"DELETE FROM records WHERE ns = ? AND key = ? AND {_LIVE}", (ns, key, time.time())
            ).rowcount
            if not live:  # an expired one may still be there: clean it up too
                conn.execute("DELETE FROM records WHERE ns = ? AND key = ?", (ns, key))
            return live == 1

        return await self._file.write(work)

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

            page = await self._file.run(work)
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

        await self._file.write(work)
        self._events.wake()

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        check_channel(channel)
        sub = QueueSubscription(asyncio.get_running_loop())

        def newest(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

        self._events.register(channel, sub, await self._file.run(newest))
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

        def work(conn: sqlite3.Connection) -> bytes:
            conn.execute(
                "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                (name, secrets.token_bytes(32)),
            )
            row = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
            return bytes(row[0])

        return self._secrets.setdefault(name, self._file.run_here(work))

    async def aclose(self) -> None:
        await self._file.aclose(before=self._events.stop)
