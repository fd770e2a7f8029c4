"""B1 (and B6): 1000 `generate` calls at 50 ms server latency, 100 in flight.

The mock runs in its own process (`--latency 0.05`). Contenders, each making the same
POST /api/images/generate calls (distinct prompts) and reading every 200 answer:
- `generate_many`: `AsyncClient.images.generate_many(..., concurrency=100)`;
- `raw aiohttp`: one `ClientSession` (`TCPConnector(limit=100)`) and a semaphore of 100,
  each answer read and JSON-parsed: the floor of this stack;
- `httpx`: `httpx.AsyncClient` (100 connections) and a semaphore of 100;
- `requests`: a shared `requests.Session` (pool of 100) driven by 100 threads;
- `Client, 16 threads`: 16 threads sharing one blocking `Client`, each calling
  `images.generate` for its share; 16 in flight by design, reported as is.
Each contender is warmed up once, then every round runs them all in turn (one over SLOW
times slower than raw aiohttp in the first round runs only that round). Reported: the
median wall time, its ratio to raw aiohttp and to the ideal (calls / 100 x latency), the
best run, and the client CPU time per call (`time.process_time()` of this process, all
threads; the mock's CPU is not in it). Writes "batch" into benchmarks/results.json (not with
`--quick`). `--profile` also runs `generate_many` under cProfile and prints the top.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pathlib
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import requests
import requests.adapters

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import served, store, trained_model

from deepmode_async import AsyncClient, Client, GenerateRequest

IN_FLIGHT, THREADS, LATENCY, WARM_UP = 100, 16, 0.05, 100
SLOW = 8.0  # a contender this many times slower than raw aiohttp in round 1 runs once


class Contender:
    """One way of making the calls; `run(calls, tag)` returns (wall seconds, answers ok)."""

    def __init__(
        self, name: str, in_flight: int, run: Callable[[int, str], Awaitable[tuple[float, int]]]
    ) -> None:
        self.name, self.in_flight, self.run = name, in_flight, run
        self.times: list[float] = []
        self.cpu = 0.0


class Bench:
    """The clients of every contender, open for the whole benchmark."""

    def __init__(self, base_url: str, api_key: str, model_id: str) -> None:
        self.base_url, self.api_key, self.model_id = base_url, api_key, model_id
        self.url = f"{base_url}/api/images/generate"
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def body(self, tag: str, index: int) -> dict[str, str]:
        return {"model_id": self.model_id, "prompt": f"a lighthouse {tag}-{index}"}

    async def generate_many(self, dm: AsyncClient, calls: int, tag: str) -> tuple[float, int]:
        started = time.perf_counter()
        batch = (
            GenerateRequest(model_id=self.model_id, prompt=f"a lighthouse {tag}-{index}")
            for index in range(calls)
        )
        ok = 0
        async for result in dm.images.generate_many(batch, concurrency=IN_FLIGHT):
            ok += result.ok and result.generation is not None and bool(result.generation.images)
        return time.perf_counter() - started, ok

    async def raw(self, session: aiohttp.ClientSession, calls: int, tag: str) -> tuple[float, int]:
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(index: int) -> bool:
            async with slots, session.post(self.url, json=self.body(tag, index)) as response:
                return response.status == 200 and bool((await response.json())["images"])

        started = time.perf_counter()
        ok = sum(await asyncio.gather(*(one(index) for index in range(calls))))
        return time.perf_counter() - started, ok

    async def httpx(self, client: httpx.AsyncClient, calls: int, tag: str) -> tuple[float, int]:
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(index: int) -> bool:
            async with slots:
                response = await client.post(self.url, json=self.body(tag, index))
                return response.status_code == 200 and bool(response.json()["images"])

        started = time.perf_counter()
        ok = sum(await asyncio.gather(*(one(index) for index in range(calls))))
        return time.perf_counter() - started, ok

    def requests(
        self, session: requests.Session, pool: ThreadPoolExecutor, calls: int, tag: str
    ) -> tuple[float, int]:
        def one(index: int) -> bool:
            response = session.post(self.url, json=self.body(tag, index))
            return response.status_code == 200 and bool(response.json()["images"])

        started = time.perf_counter()
        ok = sum(pool.map(one, range(calls)))
        return time.perf_counter() - started, ok

    def blocking(
        self, dm: Client, pool: ThreadPoolExecutor, calls: int, tag: str
    ) -> tuple[float, int]:
        def share(thread: int) -> int:
            ok = 0
            for index in range(thread, calls, THREADS):
                generation = dm.images.generate(
                    model_id=self.model_id, prompt=f"a lighthouse {tag}-{index}"
                )
                ok += bool(generation.images)
            return ok

        started = time.perf_counter()
        ok = sum(pool.map(share, range(THREADS)))
        return time.perf_counter() - started, ok


async def measure(calls: int, rounds: int, profile: bool) -> list[Contender]:
    async with served(LATENCY) as mock:
        base_url, api_key = mock.base_url, mock.api_key
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as api:
            model_id = await trained_model(api, base_url)
        bench = Bench(base_url, api_key, model_id)
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=IN_FLIGHT)
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        with (
            ThreadPoolExecutor(IN_FLIGHT) as hundred,
            ThreadPoolExecutor(THREADS) as sixteen,
            requests.Session() as rsession,
            Client(api_key, base_url=base_url) as sdm,
        ):
            rsession.headers.update(bench.headers)
            rsession.mount("http://", adapter)
            async with (
                AsyncClient(api_key, base_url=base_url) as adm,
                aiohttp.ClientSession(connector=connector, headers=bench.headers) as session,
                httpx.AsyncClient(headers=bench.headers, limits=limits, timeout=60) as hclient,
            ):
                contenders = [
                    Contender(
                        "generate_many", IN_FLIGHT, lambda n, t: bench.generate_many(adm, n, t)
                    ),
                    Contender("raw aiohttp", IN_FLIGHT, lambda n, t: bench.raw(session, n, t)),
                    Contender(
                        "httpx.AsyncClient", IN_FLIGHT, lambda n, t: bench.httpx(hclient, n, t)
                    ),
                    Contender(
                        "requests, 100 threads",
                        IN_FLIGHT,
                        lambda n, t: asyncio.to_thread(bench.requests, rsession, hundred, n, t),
                    ),
                    Contender(
                        f"Client, {THREADS} threads",
                        THREADS,
                        lambda n, t: asyncio.to_thread(bench.blocking, sdm, sixteen, n, t),
                    ),
                ]
                for contender in contenders:  # warm up: connections, threads, caches
                    await checked(contender, WARM_UP, "warm")
                raw = contenders[1]
                for round_ in range(rounds):
                    for contender in contenders:
                        if round_ and contender.times[0] > SLOW * raw.times[0]:
                            continue  # one round tells enough, and more would take minutes
                        gc.collect()
                        cpu = time.process_time()
                        contender.times.append(await checked(contender, calls, f"r{round_}"))
                        contender.cpu += time.process_time() - cpu
                if profile:
                    await profile_generate_many(contenders[0], calls)
    return contenders


async def checked(contender: Contender, calls: int, tag: str) -> float:
    seconds, ok = await contender.run(calls, tag)
    if ok != calls:
        raise RuntimeError(f"{contender.name}: {ok} of {calls} calls succeeded")
    return seconds


async def profile_generate_many(contender: Contender, calls: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    await checked(contender, calls, "profile")
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs()
    print(f"\ncProfile of one generate_many run ({calls} calls), by own time:")
    stats.sort_stats("tottime").print_stats(25)
    print("by cumulative time:")
    stats.sort_stats("cumulative").print_stats(30)


def report(contenders: list[Contender], calls: int, rounds: int) -> dict[str, Any]:
    ideal = calls / IN_FLIGHT * LATENCY
    medians = {c.name: statistics.median(c.times) for c in contenders}
    raw = medians["raw aiohttp"]
    rows: dict[str, Any] = {}
    print(
        f"B1: {calls} generate calls, {LATENCY * 1000:.0f} ms server latency, "
        f"{IN_FLIGHT} in flight (ideal {ideal:.2f} s); median of {rounds} rounds"
    )
    print(
        "| contender | in flight | median | best | rounds | calls/s | vs raw aiohttp | vs ideal "
        "| CPU per call |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for contender in contenders:
        median = medians[contender.name]
        cpu_us = contender.cpu / (calls * len(contender.times)) * 1e6
        rows[contender.name] = {
            "in_flight": contender.in_flight,
            "median_s": round(median, 4),
            "best_s": round(min(contender.times), 4),
            "runs_s": [round(t, 4) for t in contender.times],
            "calls_per_s": round(calls / median),
            "ratio_to_raw_aiohttp": round(median / raw, 3),
            "ratio_to_ideal": round(median / ideal, 3),
            "client_cpu_us_per_call": round(cpu_us),
        }
        print(
            f"| {contender.name} | {contender.in_flight} | {median:.3f} s "
            f"| {min(contender.times):.3f} s | {len(contender.times)} | {calls / median:.0f} "
            f"| {median / raw:.2f} x | {median / ideal:.2f} x | {cpu_us:.0f} us |"
        )
    print(
        f"| ideal | {IN_FLIGHT} | {ideal:.3f} s | - | - | {calls / ideal:.0f} "
        f"| {ideal / raw:.2f} x | 1.00 x | - |"
    )
    sdk = medians["generate_many"]
    print(
        f"generate_many: {sdk / raw:.2f} x raw aiohttp (target <= 1.10), {sdk / ideal:.2f} x "
        f"ideal (<= 1.3), {sdk / medians['httpx.AsyncClient']:.2f} x httpx, "
        f"{sdk / medians['requests, 100 threads']:.2f} x requests (both < 1); CPU "
        f"{rows['generate_many']['client_cpu_us_per_call']} us a call (B6: <= 150)"
    )
    return {
        "calls": calls,
        "in_flight": IN_FLIGHT,
        "latency_s": LATENCY,
        "rounds": rounds,
        "ideal_s": ideal,
        "contenders": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="300 calls, 2 rounds, no results")
    parser.add_argument("--profile", action="store_true", help="cProfile one generate_many run")
    args = parser.parse_args()
    calls, rounds = (300, 2) if args.quick else (1000, 5)
    contenders = asyncio.run(measure(calls, rounds, args.profile))
    results = report(contenders, calls, rounds)
    if not args.quick:
        store("batch", results)


if __name__ == "__main__":
    main()
