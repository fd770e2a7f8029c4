"""The floor of B8: the least CPU any journal on an SQLite thread adds to B1's calls.

B1's calls (1000 `generate` calls at 50 ms server latency, 100 in flight, the mock in its
own process), rounds interleaved, each way on a fresh SQLite file where it has one:
- raw aiohttp under a semaphore, and the same with `LeastJournal`: the least a journal
  that keeps B8's promises can do. Each request's record is made durable before it is
  sent and its answer after it ends, by one thread that owns the file (off the event
  loop, as `SQLiteStore` is); records made while a transaction runs go together in the
  next one. What it leaves out and the SDK's journal has to do: reading the journal
  back to resume, and so checking the input against it; turning an answer into a
  record that can be checked (it stores the answer's raw bytes); the errors, and the
  requests that are cancelled; and a store interface (checked keys and values) that
  Redis serves too.
- `generate_many` without a journal, with an SQLite file, with a `MemoryStore` (the
  journal's own Python, without SQLite or a thread), and with `LeastStore`: the SDK's
  journal writing through the least journal's thread (what `SQLiteStore` itself adds).
Prints the median CPU a call (`time.process_time()`, all threads) and wall time, and
what each journal adds to its own way without one. Not in `make bench`: a diagnosis for
B8, run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import queue
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Run, cpu_per_call, served
from batch import IN_FLIGHT, LATENCY, Bench, Journal, train

from deepmode_async import AsyncClient
from deepmode_async.stores import MemoryStore

CALLS = 1000
_Rows = list[tuple[str, bytes]]


class LeastJournal:
    """Records made durable in an SQLite file by a thread of its own, grouped."""

    def __init__(self, path: pathlib.Path) -> None:
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[tuple[_Rows, asyncio.Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self._rows: _Rows = []
        self._group: asyncio.Future[None] | None = None  # the one the next commit settles
        self._committing = False
        self.transactions = 0
        self._thread = threading.Thread(target=self._serve, args=(path,), daemon=True)
        self._thread.start()

    async def write(self, rows: _Rows) -> None:
        """Return once the records `(key, value)` are durable."""
        if self._group is None:
            self._group = self._loop.create_future()
            self._loop.call_soon(self._flush)  # what else this turn of the loop writes joins
        group = self._group
        self._rows += rows
        await group

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _flush(self) -> None:
        if self._committing or self._group is None:
            return
        self._committing = True
        self.transactions += 1
        rows, group, self._rows, self._group = self._rows, self._group, [], None
        self._jobs.put((rows, group))

    def _settled(self, group: asyncio.Future[None], error: sqlite3.Error | None) -> None:
        if error is None:
            group.set_result(None)
        else:  # its writers fail (and so the run), rather than wait for ever
            group.set_exception(error)
        self._committing = False
        # What was written meanwhile, and what the requests just woken write (they
        # run first): the SDK's journal gathers the same way.
        self._loop.call_soon(self._flush)

    def _serve(self, path: pathlib.Path) -> None:
        conn: sqlite3.Connection | None = None
        upsert = (
            "INSERT INTO records VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        while (job := self._jobs.get()) is not None:
            rows, group = job
            try:
                if conn is None:
                    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    conn.execute("CREATE TABLE records (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(upsert, rows)
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                self._loop.call_soon_threadsafe(self._settled, group, error)
            else:
                self._loop.call_soon_threadsafe(self._settled, group, None)
        if conn is not None:
            conn.close()


class LeastStore(MemoryStore):
    """A store for `generate_many(journal=...)` whose writes go through `LeastJournal`
    (unchecked) and whose reads find nothing: a fresh journal's, on the least thread."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__()
        self._path = path
        self.journal: LeastJournal | None = None  # made on the loop, at the first write

    async def put_many(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None
    ) -> None:
        if self.journal is None:
            self.journal = LeastJournal(self._path)
        await self.journal.write(list(items))


async def raw(
    bench: Bench, session: aiohttp.ClientSession, tag: str, journal: LeastJournal | None
) -> tuple[float, int]:
    """Raw aiohttp's B1 (as `Bench.raw`), each call recorded before and after if asked."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(index: int) -> bool:
        async with slots:
            body = bench.body(tag, index)
            if journal is not None:
                sent = b'{"q":%s,"t":%r}' % (json.dumps(body).encode(), time.time())
                await journal.write([(str(index), sent)])
            async with session.post(bench.url, json=body) as response:
                answer = await response.read()
            if journal is not None:
                await journal.write([(str(index), answer)])
            return response.status == 200 and bool(json.loads(answer)["images"])

    started = time.perf_counter()
    ok = sum(await asyncio.gather(*(one(index) for index in range(CALLS))))
    return time.perf_counter() - started, ok


async def measure(
    rounds: int, folder: pathlib.Path, walls: dict[str, float]
) -> tuple[dict[str, float], list[int]]:
    files = iter(folder / f"{n}.db" for n in range(1_000_000))
    transactions: list[int] = []
    with served(LATENCY) as mock:
        model_id = await train(mock.base_url, mock.api_key)
        bench = Bench(mock.base_url, mock.api_key, model_id)
        async with (
            bench.session() as session,
            AsyncClient(mock.api_key, base_url=mock.base_url) as dm,
        ):

            async def least(tag: str) -> tuple[float, int]:
                journal = LeastJournal(next(files))
                try:
                    return await raw(bench, session, tag, journal)
                finally:
                    journal.close()
                    transactions.append(journal.transactions)

            async def least_store(tag: str) -> tuple[float, int]:
                store = LeastStore(next(files))
                try:
                    return await bench.generate_many(dm, CALLS, tag, journal=store)
                finally:
                    if store.journal is not None:
                        store.journal.close()

            def sdk(journal: Callable[[], Journal]) -> Run:
                return lambda tag: bench.generate_many(dm, CALLS, tag, journal=journal())

            ways: dict[str, Run] = {
                "raw aiohttp": lambda tag: raw(bench, session, tag, None),
                "raw aiohttp + the least journal": least,
                "generate_many": sdk(lambda: None),
                "generate_many, journal= an SQLite file": sdk(lambda: next(files)),
                "generate_many, journal= a MemoryStore": sdk(MemoryStore),
                "generate_many, journal= LeastStore": least_store,
            }
            us = await cpu_per_call(ways, rounds, CALLS, walls=walls)
    return us, transactions[1:]  # the first: the round unmeasured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9, help="rounds measured (default: 9)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="deepmode-floor-") as folder:
        us, transactions = asyncio.run(measure(args.rounds, pathlib.Path(folder), walls))
    print(f"B8 floor: {CALLS} calls, {LATENCY * 1000:.0f} ms latency, {IN_FLIGHT} in flight;")
    print(f"medians over {args.rounds} rounds, asyncio's loop")
    print("| way | CPU a call | added by the journal | wall | against no journal |")
    print("|---|---|---|---|---|")
    for name, value in us.items():
        base = "raw aiohttp" if name.startswith("raw") else "generate_many"
        added = "" if name == base else f"{value - us[base]:+.1f} us"
        ratio = walls[name] / walls[base]
        print(f"| {name} | {value:.0f} us | {added} | {walls[name]:.3f} s | {ratio:.3f} x |")
    print(f"the least journal's transactions a run: {statistics.median(transactions):.0f}")


if __name__ == "__main__":
    main()
