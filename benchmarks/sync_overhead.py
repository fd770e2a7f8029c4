"""B4: what the blocking `Client` costs over `AsyncClient`.

The mock runs in its own process. Two measures, each contender alternating, medians:
- overhead per call: 1000 sequential `generate` calls with no server latency, through
  `Client` and through `AsyncClient`; the difference divided by the calls is the price
  of the helper thread's portal (target: <= 200 us);
- throughput: 1000 `generate` calls at 50 ms server latency, 16 threads sharing one
  `Client` against `AsyncClient` with 16 calls in flight (same concurrency, so the same
  ideal: 1000 / 16 x 50 ms).
Writes "sync_overhead" into benchmarks/results.json.
"""

from __future__ import annotations

import asyncio
import pathlib
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import served, store, trained_model

from deepmode_async import AsyncClient, Client

CALLS, THREADS, ROUNDS, LATENCY = 1000, 16, 5, 0.05


async def async_sequential(dm: AsyncClient, model_id: str) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        await dm.images.generate(model_id=model_id, prompt="a lighthouse")
    return time.perf_counter() - started


def sync_sequential(dm: Client, model_id: str) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        dm.images.generate(model_id=model_id, prompt="a lighthouse")
    return time.perf_counter() - started


async def async_concurrent(dm: AsyncClient, model_id: str) -> float:
    slots = asyncio.Semaphore(THREADS)

    async def one() -> None:
        async with slots:
            await dm.images.generate(model_id=model_id, prompt="a lighthouse")

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(CALLS)))
    return time.perf_counter() - started


def sync_threads(dm: Client, model_id: str) -> float:
    def work(count: int) -> None:
        for _ in range(count):
            dm.images.generate(model_id=model_id, prompt="a lighthouse")

    threads = [threading.Thread(target=work, args=(CALLS // THREADS,)) for _ in range(THREADS)]
    threads[0] = threading.Thread(target=work, args=(CALLS // THREADS + CALLS % THREADS,))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


async def measure(latency: float) -> dict[str, list[float]]:
    async with served(latency) as mock:
        base_url, api_key = mock.base_url, mock.api_key
        headers = {"Authorization": f"Bearer {api_key}"}
        async with aiohttp.ClientSession(headers=headers) as api:
            model_id = await trained_model(api, base_url)
        times: dict[str, list[float]] = {"async": [], "sync": []}
        runs: list[tuple[str, Callable[[], Awaitable[float]]]]
        async with AsyncClient(api_key, base_url=base_url) as adm:
            with Client(api_key, base_url=base_url) as sdm:
                if latency == 0:
                    runs = [
                        ("async", lambda: async_sequential(adm, model_id)),
                        ("sync", lambda: asyncio.to_thread(sync_sequential, sdm, model_id)),
                    ]
                else:
                    runs = [
                        ("async", lambda: async_concurrent(adm, model_id)),
                        ("sync", lambda: asyncio.to_thread(sync_threads, sdm, model_id)),
                    ]
                for _, run in runs:  # warm up: connections, thread pools
                    await run()
                for _ in range(ROUNDS):
                    for name, run in runs:
                        times[name].append(await run())
        return times


def main() -> None:
    sequential = asyncio.run(measure(0.0))
    concurrent = asyncio.run(measure(LATENCY))
    seq_async, seq_sync = (statistics.median(sequential[k]) for k in ("async", "sync"))
    con_async, con_sync = (statistics.median(concurrent[k]) for k in ("async", "sync"))
    overhead_us = (seq_sync - seq_async) / CALLS * 1e6
    ideal = CALLS / THREADS * LATENCY
    print(f"B4: {CALLS} generate calls, median of {ROUNDS}")
    print("| measure | AsyncClient | Client | difference |")
    print("|---|---|---|---|")
    print(
        f"| sequential, no latency | {seq_async:.3f} s ({seq_async / CALLS * 1e6:.0f} us/call) "
        f"| {seq_sync:.3f} s ({seq_sync / CALLS * 1e6:.0f} us/call) "
        f"| {overhead_us:+.0f} us/call |"
    )
    print(
        f"| {THREADS} in flight, {LATENCY * 1000:.0f} ms latency (ideal {ideal:.3f} s) "
        f"| {con_async:.3f} s | {con_sync:.3f} s ({THREADS} threads) "
        f"| {con_sync / con_async:.2f} x |"
    )
    store(
        "sync_overhead",
        {
            "calls": CALLS,
            "sequential_async_s": seq_async,
            "sequential_sync_s": seq_sync,
            "overhead_us_per_call": overhead_us,
            "threads": THREADS,
            "latency_s": LATENCY,
            "concurrent_async_s": con_async,
            "concurrent_sync_threads_s": con_sync,
            "ideal_s": ideal,
        },
    )


if __name__ == "__main__":
    main()
