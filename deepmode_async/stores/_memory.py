"""`MemoryStore`: the store of one process, in its memory (the default everywhere)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final

from .._errors import StoreError
from ._base import (
    QueueSubscription,
    Store,
    Subscribers,
    Subscription,
    check_address,
    check_channel,
    check_items,
    check_key,
    check_ns,
    check_ttl,
    check_value,
)

#: `items()` hands out records in pages of this many, re-taking the lock between pages.
_PAGE: Final = 1000

_Record = tuple[bytes, float | None]  # value, monotonic expiry


class MemoryStore(Store):
    """Records and messages of this process only, in memory; lost when it ends.

    Fast (no thread hop, no I/O), thread-safe, usable from any event loop. The default
    store of the callback hub: right for one process, wrong for `--workers N` (each
    worker would have its own), where `SQLiteStore` or `RedisStore` is needed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, _Record]] = {}
        # (expiry, ns, key), to drop expired records without scanning them all. A record
        # written again leaves its old entry behind until that expiry: rebuilt from the
        # records when it has grown to twice what it was after the last rebuild.
        self._expiries: list[tuple[float, str, str]] = []
        self._rebuild_at = 64
        self._subscribers = Subscribers()
        self._secrets: dict[str, bytes] = {}
        self._closed = False

    def __repr__(self) -> str:
        return "MemoryStore()"

    def _live(self, ns: str, key: str, now: float) -> _Record | None:
        records = self._data.get(ns)
        record = None if records is None else records.get(key)
        if record is None or (record[1] is not None and record[1] <= now):
            return None
        return record

    def _set(self, ns: str, key: str, value: bytes, ttl: float | None, now: float) -> None:
        expires = None if ttl is None else now + ttl
        if (records := self._data.get(ns)) is None:
            records = self._data[ns] = {}
        records[key] = (value, expires)
        if expires is not None:
            heapq.heappush(self._expiries, (expires, ns, key))
            if len(self._expiries) > self._rebuild_at:
                self._expiries = [
                    (entry[1], space, name)
                    for space, entries in self._data.items()
                    for name, entry in entries.items()
                    if entry[1] is not None
                ]
                heapq.heapify(self._expiries)
                self._rebuild_at = 2 * len(self._expiries) + 64
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires, ns, key = heapq.heappop(self._expiries)
            records = self._data.get(ns)
            if records is not None and key in records and records[key][1] == expires:
                del records[key]
                if not records:
                    del self._data[ns]

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this MemoryStore was closed")

    async def get(self, ns: str, key: str) -> bytes | None:
        check_address(ns, key)
        with self._lock:
            self._check_open()
            record = self._live(ns, key, time.monotonic())
        return None if record is None else record[0]

    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        check_ns(ns)
        keys = keys if isinstance(keys, list | tuple) else list(keys)  # read once
        for key in keys:
            check_key(key)
        with self._lock:
            self._check_open()
            now = time.monotonic()
            records = [self._live(ns, key, now) for key in keys]
        return [None if record is None else record[0] for record in records]

    async def put(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        check_address(ns, key)
        value, ttl = check_value(value), check_ttl(ttl)
        with self._lock:
            self._check_open()
            self._set(ns, key, value, ttl, time.monotonic())

    async def put_many(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None
    ) -> None:
        checked, ttl = check_items(ns, items, ttl)
        with self._lock:
            self._check_open()
            now = time.monotonic()
            for key, value in checked:
                self._set(ns, key, value, ttl, now)

    async def add(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        check_address(ns, key)
        value, ttl = check_value(value), check_ttl(ttl)
        with self._lock:
            self._check_open()
            now = time.monotonic()
            if self._live(ns, key, now) is not None:
                return False
            self._set(ns, key, value, ttl, now)
            return True

    async def replace(
        self, ns: str, key: str, expected: bytes, value: bytes, *, ttl: float | None = None
    ) -> bool:
        check_address(ns, key)
        expected, value, ttl = check_value(expected), check_value(value), check_ttl(ttl)
        with self._lock:
            self._check_open()
            now = time.monotonic()
            record = self._live(ns, key, now)
            if record is None or record[0] != expected:
                return False
            self._set(ns, key, value, ttl, now)
            return True

    async def delete(self, ns: str, key: str) -> bool:
        check_address(ns, key)
        with self._lock:
            self._check_open()
            live = self._live(ns, key, time.monotonic()) is not None
            records = self._data.get(ns)
            if records is not None:
                records.pop(key, None)
                if not records:
                    del self._data[ns]
            return live

    async def items(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        check_ns(ns)
        with self._lock:
            self._check_open()
            keys = list(self._data.get(ns, ()))
        for start in range(0, len(keys), _PAGE):
            with self._lock:
                now = time.monotonic()
                page = [(key, self._live(ns, key, now)) for key in keys[start : start + _PAGE]]
            for key, record in page:
                if record is not None:
                    yield key, record[0]
            await asyncio.sleep(0)  # a long namespace does not hold up the loop

    async def publish(self, channel: str, message: bytes) -> None:
        check_channel(channel)
        message = check_value(message)
        with self._lock:
            self._check_open()
            subscribers = self._subscribers.of(channel)
        for sub in subscribers:
            sub.deliver(message)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        check_channel(channel)
        sub = QueueSubscription(asyncio.get_running_loop())
        with self._lock:
            self._check_open()
            self._subscribers.add(channel, sub)
        try:
            yield sub
        finally:
            with self._lock:
                self._subscribers.remove(channel, sub)

    def secret(self, name: str) -> bytes:
        check_key(name)
        with self._lock:
            self._check_open()
            return self._secrets.setdefault(name, secrets.token_bytes(32))

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            self._data.clear()
            self._expiries.clear()
            subscribers = self._subscribers.everyone()
        for sub in subscribers:
            sub.end()
