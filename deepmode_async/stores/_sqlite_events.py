"""Pub/sub for `SQLiteStore` without a server: an events table, watched by one thread.

Publishers append to `events`. One listener thread per store instance (while it has
subscribers) asks SQLite every few milliseconds whether any connection, in any process,
changed the file (`PRAGMA data_version`, which reads no page), reads the new events when
one did, and hands them to the local subscriptions. A publish in this process wakes the
listener at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Final

from .._errors import StoreError
from ._base import QueueSubscription, Subscribers

log: Final = logging.getLogger("deepmode_async")

#: How often the listener asks SQLite whether another process wrote (seconds).
POLL_INTERVAL: Final = 0.01
#: Events are kept this long (seconds) for listeners that lag, then pruned.
EVENT_RETENTION: Final = 60.0
_PAGE: Final = 1000


class EventListener:
    """The thread that reads new events and fans them out to this instance's subscribers."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self._name = name
        self._lock = threading.Lock()
        self._subscribers = Subscribers()
        self._delivered: dict[QueueSubscription, int] = {}  # the last event id each got
        self._cursor: int | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process that `_thread` runs in
        self._stopped = False

    def register(self, channel: str, sub: QueueSubscription, after: int) -> None:
        """Deliver to `sub` every event on `channel` whose id is above `after`."""
        with self._lock:
            self._subscribers.add(channel, sub)
            self._delivered[sub] = after
            # Read again from `after`: an event the thread already passed may be newer.
            self._cursor = after if self._cursor is None else min(self._cursor, after)
            # A forked child has its parent's record of a thread, but not the thread.
            if (self._thread is None or self._pid != os.getpid()) and not self._stopped:
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name=f"deepmode-sqlite-events {self._name}", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def unregister(self, channel: str, sub: QueueSubscription) -> None:
        with self._lock:
            self._subscribers.remove(channel, sub)
            self._delivered.pop(sub, None)

    def wake(self) -> None:
        """Look for new events now (a publish in this process just wrote one)."""
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
            subscribers = self._subscribers.everyone()
        for sub in subscribers:
            sub.end()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        version = None
        failing = False
        try:
            while True:
                with self._lock:
                    if self._stopped or not self._delivered:
                        self._thread = None
                        return
                    cursor = self._cursor
                try:
                    if conn is None:
                        conn = self._connect()
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    if now != version or self._wake.is_set():
                        self._wake.clear()
                        version = now
                        if self._read(conn, cursor):
                            continue  # a full page: there may be more
                    failing = False
                except (sqlite3.Error, StoreError) as exc:  # StoreError: from connecting
                    if not failing:  # once per outage, not every 10 ms
                        log.warning("SQLite store %s: reading events failed: %s", self._name, exc)
                    failing = True
                self._wake.wait(POLL_INTERVAL)
        finally:
            if conn is not None:
                conn.close()

    def _read(self, conn: sqlite3.Connection, cursor: int | None) -> bool:
        """Deliver the events after `cursor`; True when a whole page came."""
        if cursor is None:
            return False
        rows = conn.execute(
            "SELECT id, channel, message FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, _PAGE),
        ).fetchall()
        if not rows:
            return False
        with self._lock:
            for event_id, channel, message in rows:
                for sub in self._subscribers.of(channel):
                    if self._delivered.get(sub, event_id) < event_id:
                        self._delivered[sub] = event_id
                        sub.deliver(bytes(message))
            if self._cursor == cursor:
                self._cursor = rows[-1][0]
            else:  # a subscriber registered meanwhile and moved the cursor back
                self._cursor = min(self._cursor or 0, rows[-1][0])
        return len(rows) == _PAGE
