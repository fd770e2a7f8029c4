"""The write thread of an `SQLiteStore`: one connection, group commits.

Writes queued from any thread or loop while one transaction runs go together in the
next: one `BEGIN IMMEDIATE ... COMMIT` (one WAL append) for them all, and one wake-up
of each waiting loop for the whole group, however many writes it held. One connection
doing every write also keeps its page cache valid from one transaction to the next
(a connection that sees another's commit must read the pages again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

T = TypeVar("T")

Work = Callable[[sqlite3.Connection], Any]
#: A queued write: the work, the loop that waits for it, and its future there.
_Job = tuple[Work, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
_STOP: Final = None


class GroupWriter:
    """Runs write works on a thread of its own, as many as are queued in one transaction.

    `connect` opens the thread's connection; `explain` turns a `sqlite3.Error` into the
    exception the caller sees.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        explain: Callable[[sqlite3.Error], BaseException],
    ) -> None:
        self._connect = connect
        self._explain = explain
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` inside a write transaction (shared with the writes queued with it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._pid != os.getpid():  # not started yet, or a forked child's (no thread)
            self._start()
        self._jobs.put((work, loop, future))
        return await future

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._serve, name="deepmode-sqlite-writer", daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()

    def stop(self) -> None:
        """Finish the writes queued, then end the thread (from a thread other than it)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and self._pid == os.getpid():
            self._jobs.put(_STOP)
            thread.join()

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            jobs: list[_Job] = []
            job = self._jobs.get()
            stopping = job is _STOP
            while job is not _STOP:
                jobs.append(job)
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                stopping = job is _STOP
            if jobs:
                try:
                    if conn is None:
                        conn = self._connect()
                except BaseException as error:  # reported to every waiter
                    _settle([(job, None, error) for job in jobs])
                else:
                    _settle(self._group(conn, jobs))
            if stopping:
                return

    def _group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[_Outcome]:
        """Every job in one transaction; should a job fail, each in one of its own, so
        that one failing write fails alone."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:  # the file is locked, or gone: the same for all
            failure = self._explain(error)
            return [(job, None, failure) for job in jobs]
        results = []
        for job in jobs:
            try:
                results.append(job[0](conn))
            except BaseException as error:
                self._rollback(conn)
                if len(jobs) == 1:
                    return [(job, None, self._failure(error))]
                return [self._alone(conn, each) for each in jobs]
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback(conn)
            failure = self._explain(error)
            return [(job, None, failure) for job in jobs]
        return [(job, result, None) for job, result in zip(jobs, results, strict=True)]

    def _alone(self, conn: sqlite3.Connection, job: _Job) -> _Outcome:
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = job[0](conn)
            except BaseException:
                self._rollback(conn)
                raise
            conn.execute("COMMIT")
        except BaseException as error:
            self._rollback(conn)
            return job, None, self._failure(error)
        return job, result, None

    def _failure(self, error: BaseException) -> BaseException:
        return self._explain(error) if isinstance(error, sqlite3.Error) else error

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            # Rolled back already, perhaps (SQLite does, on some errors).
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")


_Outcome = tuple[_Job, Any, BaseException | None]


def _settle(outcomes: list[_Outcome]) -> None:
    """Hand each loop its group's outcomes in one call (one wake-up of that loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0][1], []).append(outcome)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: no one waits
            loop.call_soon_threadsafe(_deliver, group)


def _deliver(group: list[_Outcome]) -> None:
    for (_, _, future), result, error in group:
        if future.done():  # its waiter was cancelled: the write is done all the same
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
