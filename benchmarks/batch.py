"""B1 and B6: 1000 `generate` calls at 50 ms server latency, 100 in flight, on two loops.

The mock runs in its own process (`--latency 0.05`). Contenders, each making the same
POST /api/images/generate calls (distinct prompts) and reading every 200 answer:
- `generate_many`: `AsyncClient.images.generate_many(..., concurrency=100)`;
- `raw aiohttp`: one `ClientSession` (`TCPConnector(limit=100)`) and a semaphore of 100,
  each answer read and JSON-parsed: the floor of this stack. Its connector keeps idle
  connections as long as the SDK's does (0.5 s, `KEEPALIVE_SECONDS`), so that both open
  their 100 connections in every round (the other contenders run in between): the same
  socket work, the calls' own CPU compared;
- `httpx`: `httpx.AsyncClient` (100 connections) and a semaphore of 100;
- `requests`: a shared `requests.Session` (pool of 100) driven by 100 threads;
- `Client, 16 threads`: 16 threads sharing one blocking `Client`, each calling
  `images.generate` for its share; 16 in flight by design, reported as is.
All of them run on asyncio's loop; with uvloop installed (the `[speedups]` extra),
`generate_many` and raw aiohttp run again on a uvloop loop, both loops open side by side
for the whole run (B6). Each contender is warmed up once, then every round runs them all
in turn (one over SLOW times slower than raw aiohttp in the first round runs only that
round). Reported: the median wall time, its ratio to raw aiohttp (asyncio) and to the
ideal (calls / 100 x latency), the best run, and the median client CPU time per call
(`time.process_time()` of this process, all threads; the mock's CPU is not in it); B6 as
generate_many's CPU over raw aiohttp's on asyncio, and generate_many's on uvloop over raw
aiohttp's on asyncio. Writes "batch" into benchmarks/results.json (not with `--quick`).
`--profile` also runs generate_many and raw aiohttp once more on each loop under
cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from deepmode_async._connection import KEEPALIVE_SECONDS
from deepmode_async.stores import Store

IN_FLIGHT, THREADS, LATENCY, WARM_UP = 100, 16, 0.05, 100
SLOW = 8.0  # a contender this many times slower than raw aiohttp in round 1 runs once
#: What `generate_many(journal=...)` takes.
Journal = str | pathlib.Path | Store | None


class Contender:
    """One way of making the calls; `run(calls, tag)` returns (wall seconds, answers ok)."""

    def __init__(
        self, name: str, in_flight: int, run: Callable[[int, str], Awaitable[tuple[float, int]]]
    ) -> None:
        self.name, self.in_flight, self.run = name, in_flight, run
        self.times: list[float] = []
        self.cpu: list[float] = []  # seconds, one a run


class Bench:
    """The clients of every contender, open for the whole benchmark."""

    def __init__(self, base_url: str, api_key: str, model_id: str) -> None:
        self.base_url, self.api_key, self.model_id = base_url, api_key, model_id
        self.url = f"{base_url}/api/images/generate"
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def session(self) -> aiohttp.ClientSession:
        """Raw aiohttp's session: `IN_FLIGHT` connections, kept idle as long as the SDK's."""
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT, keepalive_timeout=KEEPALIVE_SECONDS)
        return aiohttp.ClientSession(connector=connector, headers=self.headers)

    def body(self, tag: str, index: int) -> dict[str, str]:
        return {"model_id": self.model_id, "prompt": f"a lighthouse {tag}-{index}"}

    async def generate_many(
        self, dm: AsyncClient, calls: int, tag: str, *, journal: Journal = None
    ) -> tuple[float, int]:
        started = time.perf_counter()
        batch = (
            GenerateRequest(model_id=self.model_id, prompt=f"a lighthouse {tag}-{index}")
            for index in range(calls)
        )
        ok = 0
        async for result in dm.images.generate_many(batch, concurrency=IN_FLIGHT, journal=journal):
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


class Loop:
    """One event loop of the benchmark, kept open (with its clients) across rounds."""

    def __init__(self, name: str, runner: asyncio.Runner) -> None:
        self.name, self.runner = name, runner
        self.clients = contextlib.AsyncExitStack()


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def async_contenders(bench: Bench, loop: Loop, blocking: list[Contender]) -> list[Contender]:
    """The contenders running on `loop`: all of them on asyncio's, the two of B6 on uvloop."""
    clients, suffix = loop.clients, "" if loop.name == "asyncio" else f", {loop.name}"
    adm = await clients.enter_async_context(AsyncClient(bench.api_key, base_url=bench.base_url))
    session = await clients.enter_async_context(bench.session())
    contenders = [
        Contender(f"generate_many{suffix}", IN_FLIGHT, lambda n, t: bench.generate_many(adm, n, t)),
        Contender(f"raw aiohttp{suffix}", IN_FLIGHT, lambda n, t: bench.raw(session, n, t)),
    ]
    if loop.name != "asyncio":
        return contenders
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    hclient = await clients.enter_async_context(
        httpx.AsyncClient(headers=bench.headers, limits=limits, timeout=60)
    )
    httpx_contender = Contender(
        "httpx.AsyncClient", IN_FLIGHT, lambda n, t: bench.httpx(hclient, n, t)
    )
    return [*contenders, httpx_contender, *blocking]


def measure(calls: int, rounds: int, profile: bool) -> list[tuple[Loop, Contender]]:
    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(served(LATENCY))
        loops = [Loop("asyncio", stack.enter_context(asyncio.Runner()))]
        factory = uvloop_factory()
        if factory is None:
            print("uvloop is not installed (the [speedups] extra): B6 runs on asyncio only")
        else:
            loops.append(Loop("uvloop", stack.enter_context(asyncio.Runner(loop_factory=factory))))
        for loop in loops:  # each loop's clients close on that loop, before it closes
            stack.callback(loop.runner.run, loop.clients.aclose())
        model_id = loops[0].runner.run(train(mock.base_url, mock.api_key))
        bench = Bench(mock.base_url, mock.api_key, model_id)
        hundred = stack.enter_context(ThreadPoolExecutor(IN_FLIGHT))
        sixteen = stack.enter_context(ThreadPoolExecutor(THREADS))
        rsession = stack.enter_context(requests.Session())
        rsession.headers.update(bench.headers)
        rsession.mount(
            "http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=IN_FLIGHT)
        )
        sdm = stack.enter_context(Client(mock.api_key, base_url=mock.base_url))
        blocking = [
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
        on_loops = [
            (loop, contender)
            for loop in loops
            for contender in loop.runner.run(async_contenders(bench, loop, blocking))
        ]
        for loop, contender in on_loops:  # warm up: connections, threads, caches
            loop.runner.run(checked(contender, WARM_UP, "warm"))
        raw = on_loops[1][1]
        for round_ in range(rounds):
            for loop, contender in on_loops:
                if round_ and contender.times[0] > SLOW * raw.times[0]:
                    continue  # one round tells enough, and more would take minutes
                gc.collect()
                cpu = time.process_time()
                contender.times.append(loop.runner.run(checked(contender, calls, f"r{round_}")))
                contender.cpu.append(time.process_time() - cpu)
        if profile:
            for loop, contender in on_loops:
                if contender.name.startswith(("generate_many", "raw aiohttp")):
                    loop.runner.run(profiled(contender, calls, loop.name))
    return on_loops


async def train(base_url: str, api_key: str) -> str:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as api:
        return await trained_model(api, base_url)


async def checked(contender: Contender, calls: int, tag: str) -> float:
    seconds, ok = await contender.run(calls, tag)
    if ok != calls:
        raise RuntimeError(f"{contender.name}: {ok} of {calls} calls succeeded")
    return seconds


async def profiled(contender: Contender, calls: int, loop: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    await checked(contender, calls, "profile")
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs()
    print(f"\ncProfile of one {contender.name} run ({calls} calls, {loop}), by own time:")
    stats.sort_stats("tottime").print_stats(30)
    if contender.name.startswith("generate_many"):
        print("by cumulative time:")
        stats.sort_stats("cumulative").print_stats(40)


def report(on_loops: list[tuple[Loop, Contender]], calls: int, rounds: int) -> dict[str, Any]:
    ideal = calls / IN_FLIGHT * LATENCY
    contenders = [contender for _, contender in on_loops]
    loop_of = {contender.name: loop.name for loop, contender in on_loops}
    medians = {c.name: statistics.median(c.times) for c in contenders}
    raw = medians["raw aiohttp"]
    rows: dict[str, Any] = {}
    print(
        f"B1: {calls} generate calls, {LATENCY * 1000:.0f} ms server latency, "
        f"{IN_FLIGHT} in flight (ideal {ideal:.2f} s); median of {rounds} rounds"
    )
    print(
        "| contender | loop | in flight | median | best | rounds | calls/s | vs raw aiohttp "
        "| vs ideal | CPU per call |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for contender in contenders:
        median = medians[contender.name]
        cpu_us = statistics.median(contender.cpu) / calls * 1e6
        rows[contender.name] = {
            "loop": loop_of[contender.name],
            "in_flight": contender.in_flight,
            "median_s": round(median, 4),
            "best_s": round(min(contender.times), 4),
            "runs_s": [round(t, 4) for t in contender.times],
            "calls_per_s": round(calls / median),
            "ratio_to_raw_aiohttp": round(median / raw, 3),
            "ratio_to_ideal": round(median / ideal, 3),
            "client_cpu_us_per_call": round(cpu_us),
            "cpu_us_per_call_runs": [round(cpu / calls * 1e6) for cpu in contender.cpu],
        }
        print(
            f"| {contender.name} | {loop_of[contender.name]} | {contender.in_flight} "
            f"| {median:.3f} s | {min(contender.times):.3f} s | {len(contender.times)} "
            f"| {calls / median:.0f} | {median / raw:.2f} x | {median / ideal:.2f} x "
            f"| {cpu_us:.0f} us |"
        )
    print(
        f"| ideal | - | {IN_FLIGHT} | {ideal:.3f} s | - | - | {calls / ideal:.0f} "
        f"| {ideal / raw:.2f} x | 1.00 x | - |"
    )
    sdk = medians["generate_many"]
    print(
        f"B1 generate_many: {sdk / raw:.2f} x raw aiohttp (target <= 1.05), {sdk / ideal:.2f} x "
        f"ideal (<= 1.3), {sdk / medians['httpx.AsyncClient']:.2f} x httpx, "
        f"{sdk / medians['requests, 100 threads']:.2f} x requests (both < 1)"
    )
    b6 = cpu_ratios(rows)
    print(
        f"B6 CPU a call: generate_many {b6['sdk_us']} us, raw aiohttp {b6['raw_us']} us on "
        f"asyncio: {b6['ratio']:.2f} x (target <= 1.10)"
    )
    if "uvloop" in b6:
        uv = b6["uvloop"]
        print(
            f"B6 on uvloop: generate_many {uv['sdk_us']} us, raw aiohttp {uv['raw_us']} us: "
            f"{uv['ratio_to_raw_on_asyncio']:.2f} x raw on asyncio (target <= 0.85), "
            f"{uv['ratio']:.2f} x raw on uvloop"
        )
    return {
        "calls": calls,
        "in_flight": IN_FLIGHT,
        "latency_s": LATENCY,
        "rounds": rounds,
        "ideal_s": ideal,
        "contenders": rows,
        "b6": b6,
    }


def cpu_ratios(rows: dict[str, Any]) -> dict[str, Any]:
    """B6: the SDK's CPU a call against raw aiohttp's, on the same loop and, on uvloop,
    against raw aiohttp on asyncio's loop too."""
    raw = rows["raw aiohttp"]["client_cpu_us_per_call"]
    sdk = rows["generate_many"]["client_cpu_us_per_call"]
    b6: dict[str, Any] = {"sdk_us": sdk, "raw_us": raw, "ratio": round(sdk / raw, 3)}
    if "generate_many, uvloop" in rows:
        uv_sdk = rows["generate_many, uvloop"]["client_cpu_us_per_call"]
        uv_raw = rows["raw aiohttp, uvloop"]["client_cpu_us_per_call"]
        b6["uvloop"] = {
            "sdk_us": uv_sdk,
            "raw_us": uv_raw,
            "ratio": round(uv_sdk / uv_raw, 3),
            "ratio_to_raw_on_asyncio": round(uv_sdk / raw, 3),
        }
    return b6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="300 calls, 2 rounds, no results")
    parser.add_argument("--profile", action="store_true", help="cProfile one generate_many run")
    args = parser.parse_args()
    calls, rounds = (300, 2) if args.quick else (1000, 5)
    results = report(measure(calls, rounds, args.profile), calls, rounds)
    if not args.quick:
        store("batch", results)


if __name__ == "__main__":
    main()
