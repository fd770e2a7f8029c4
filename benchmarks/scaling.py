"""B1 scaled: does cost grow linearly with the calls, and does memory stay flat?

One mock in its own process (`--latency 0.05`), one trained model. Scenarios, each making
POST /api/images/generate calls (distinct prompts) and reading every 200 answer:
- 1000 calls at 10, 100 and 1000 in flight (the in-flight count: cost per call and
  memory should not depend on it);
- 10000 calls at 100 in flight, next to 1000 at 100 (the call count: wall time should be
  ~10 x, cost per call and memory the same).
Contenders, both open for the whole benchmark (1000 connections allowed, so the 1000
in-flight scenario is not capped by a pool):
- `generate_many`: `AsyncClient(max_connections=1000).images.generate_many(requests,
  concurrency=N)`, the requests given as a generator (the input holds no memory);
- `raw aiohttp`: one `ClientSession` (`TCPConnector(limit=1000)`) and N workers sharing
  one iterator of call indices, each answer read and JSON-parsed: the floor of this
  stack, in constant memory (unlike a `gather` over every call).
In each scenario each contender is warmed up once, then every round runs them in turn
(alternating). Reported per scenario and contender: the median wall time, the ideal
(calls / N x latency) and the ratios to it and to raw aiohttp, the client CPU per call
(`time.process_time()` of this process over the rounds), the mock's CPU per call, and
this process's RSS before and after the scenario and the peak sampled every 50 ms during
that contender's runs (both contenders share the process: RSS is a high-water mark of
both, so a contender holding on to its results shows as growth in the 10000-call
scenario over the 1000-call one, not as a difference between the rows). Writes "scaling"
into benchmarks/results.json (not with `--quick`). `--profile` also runs `generate_many`
on the largest scenario under cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pathlib
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import cpu_seconds, machine, rss_mib, served, store, trained_model

from deepmode_async import AsyncClient, GenerateRequest

LATENCY, MAX_IN_FLIGHT, SAMPLE_EVERY = 0.05, 1000, 0.05
# (calls, in flight), in this order: 1000 and 10000 calls side by side, and the 1000
# in-flight scenario last, so its extra connections do not weigh on the others' RSS.
SCENARIOS = [(1000, 10), (1000, 100), (10000, 100), (1000, 1000)]
QUICK_SCENARIOS = [(1000, 10), (1000, 100), (3000, 100), (1000, 1000)]

Run = Callable[[int, int, str], Awaitable[tuple[float, int]]]


class Contender:
    """One way of making the calls; `run(calls, in_flight, tag)` returns (seconds, ok)."""

    def __init__(self, name: str, run: Run) -> None:
        self.name, self.run = name, run
        self.reset()

    def reset(self) -> None:
        self.times: list[float] = []
        self.cpu = self.mock_cpu = 0.0
        self.peak = 0.0


class Bench:
    """Both contenders' clients, open for the whole benchmark."""

    def __init__(
        self, dm: AsyncClient, session: aiohttp.ClientSession, base_url: str, model_id: str
    ) -> None:
        self.dm, self.session, self.model_id = dm, session, model_id
        self.url = f"{base_url}/api/images/generate"

    async def generate_many(self, calls: int, in_flight: int, tag: str) -> tuple[float, int]:
        started = time.perf_counter()
        requests = (
            GenerateRequest(model_id=self.model_id, prompt=f"a lighthouse {tag}-{index}")
            for index in range(calls)
        )
        ok = 0
        async for result in self.dm.images.generate_many(requests, concurrency=in_flight):
            ok += result.ok and result.generation is not None and bool(result.generation.images)
        return time.perf_counter() - started, ok

    async def raw(self, calls: int, in_flight: int, tag: str) -> tuple[float, int]:
        indices = iter(range(calls))  # shared: each worker takes the next index

        async def worker() -> int:
            ok = 0
            for index in indices:
                body = {"model_id": self.model_id, "prompt": f"a lighthouse {tag}-{index}"}
                async with self.session.post(self.url, json=body) as response:
                    ok += response.status == 200 and bool((await response.json())["images"])
            return ok

        started = time.perf_counter()
        ok = sum(await asyncio.gather(*(worker() for _ in range(min(in_flight, calls)))))
        return time.perf_counter() - started, ok


def raise_open_files(needed: int) -> None:
    """Allow `needed` open files (the mock, started later, inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"need {needed} open files, but the hard limit (ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    print(f"raised the open-file limit from {soft} to {needed}")


async def peak_rss(run: Awaitable[tuple[float, int]]) -> tuple[float, int, float]:
    """Run, sampling this process's RSS every SAMPLE_EVERY; (seconds, ok, peak MiB)."""
    peak = rss_mib()

    async def sample() -> None:
        nonlocal peak
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            peak = max(peak, rss_mib())

    sampler = asyncio.create_task(sample())
    try:
        seconds, ok = await run
    finally:
        sampler.cancel()
    return seconds, ok, max(peak, rss_mib())


async def timed(contender: Contender, calls: int, in_flight: int, tag: str) -> float:
    seconds, ok, peak = await peak_rss(contender.run(calls, in_flight, tag))
    contender.peak = max(contender.peak, peak)
    if ok != calls:
        raise RuntimeError(f"{contender.name}: {ok} of {calls} calls succeeded")
    return seconds


async def scenario(
    contenders: list[Contender], calls: int, in_flight: int, rounds: int, mock_pid: int
) -> list[dict[str, Any]]:
    gc.collect()
    rss_start = rss_mib()
    for contender in contenders:
        contender.reset()
        warm = min(calls, max(100, 2 * in_flight))  # opens the connections
        await timed(contender, warm, in_flight, f"warm{calls}x{in_flight}")
    for round_ in range(rounds):
        for contender in contenders:
            gc.collect()
            cpu, mock_cpu = time.process_time(), cpu_seconds(mock_pid)
            contender.times.append(
                await timed(contender, calls, in_flight, f"r{round_}-{calls}x{in_flight}")
            )
            contender.cpu += time.process_time() - cpu
            contender.mock_cpu += cpu_seconds(mock_pid) - mock_cpu
    gc.collect()
    rss_end = rss_mib()
    ideal = calls / in_flight * LATENCY
    raw = statistics.median(contenders[-1].times)
    rows = []
    for contender in contenders:
        median = statistics.median(contender.times)
        runs = calls * len(contender.times)
        rows.append(
            {
                "calls": calls,
                "in_flight": in_flight,
                "contender": contender.name,
                "median_s": round(median, 4),
                "runs_s": [round(t, 4) for t in contender.times],
                "ideal_s": round(ideal, 4),
                "ratio_to_ideal": round(median / ideal, 3),
                "ratio_to_raw_aiohttp": round(median / raw, 3),
                "cpu_us_per_call": round(contender.cpu / runs * 1e6),
                "mock_cpu_us_per_call": round(contender.mock_cpu / runs * 1e6),
                "rss_start_mib": round(rss_start, 1),
                "rss_end_mib": round(rss_end, 1),
                "rss_peak_mib": round(contender.peak, 1),
            }
        )
    return rows


async def measure(
    scenarios: list[tuple[int, int]], rounds: int, profile: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with served(LATENCY) as mock:
        base_url, api_key, pid = mock.base_url, mock.api_key, mock.pid
        headers = {"Authorization": f"Bearer {api_key}"}
        async with aiohttp.ClientSession(headers=headers) as api:
            model_id = await trained_model(api, base_url)
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        async with (
            AsyncClient(api_key, base_url=base_url, max_connections=MAX_IN_FLIGHT) as dm,
            aiohttp.ClientSession(connector=connector, headers=headers) as session,
        ):
            bench = Bench(dm, session, base_url, model_id)
            contenders = [
                Contender("generate_many", bench.generate_many),
                Contender("raw aiohttp", bench.raw),
            ]
            for calls, in_flight in scenarios:
                rows += await scenario(contenders, calls, in_flight, rounds, pid)
            if profile:
                await profile_generate_many(contenders[0], *max(scenarios))
    return rows


async def profile_generate_many(contender: Contender, calls: int, in_flight: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    await timed(contender, calls, in_flight, "profile")
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs()
    print(f"\ncProfile of one generate_many run ({calls} calls, {in_flight} in flight):")
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


def report(rows: list[dict[str, Any]], rounds: int) -> None:
    print(
        f"B1 scaled: generate calls at {LATENCY * 1000:.0f} ms server latency, one mock "
        f"process; median of {rounds} rounds; {machine()}"
    )
    print(
        "| calls | in flight | contender | median | ideal | vs ideal | vs raw aiohttp "
        "| client CPU / call | mock CPU / call | RSS start | RSS end | RSS peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['calls']} | {r['in_flight']} | {r['contender']} | {r['median_s']:.3f} s "
            f"| {r['ideal_s']:.2f} s | {r['ratio_to_ideal']:.2f} x "
            f"| {r['ratio_to_raw_aiohttp']:.2f} x | {r['cpu_us_per_call']} us "
            f"| {r['mock_cpu_us_per_call']} us | {r['rss_start_mib']:.1f} MiB "
            f"| {r['rss_end_mib']:.1f} MiB | {r['rss_peak_mib']:.1f} MiB |"
        )
    by = {(r["calls"], r["in_flight"], r["contender"]): r for r in rows}
    small, large = sorted({calls for calls, in_flight, _ in by if in_flight == 100})
    widths = sorted({in_flight for calls, in_flight, _ in by if calls == small})
    for name in ("generate_many", "raw aiohttp"):
        one, many = by[small, 100, name], by[large, 100, name]
        print(
            f"{name}: {large} vs {small} calls at 100 in flight: wall "
            f"{many['median_s'] / one['median_s']:.2f} x (linear: {large / small:.0f} x), "
            f"CPU per call {one['cpu_us_per_call']} -> {many['cpu_us_per_call']} us, "
            f"RSS peak {one['rss_peak_mib']:.1f} -> {many['rss_peak_mib']:.1f} MiB "
            f"({many['rss_peak_mib'] - many['rss_start_mib']:+.1f} MiB over the "
            f"{large}-call scenario's start); at "
            + ", ".join(str(w) for w in widths)
            + " in flight: CPU per call "
            + ", ".join(f"{by[small, w, name]['cpu_us_per_call']}" for w in widths)
            + " us, RSS peak "
            + ", ".join(f"{by[small, w, name]['rss_peak_mib']:.1f}" for w in widths)
            + " MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3000 not 10000, 1 round, no results")
    parser.add_argument("--profile", action="store_true", help="cProfile one generate_many run")
    args = parser.parse_args()
    scenarios, rounds = (QUICK_SCENARIOS, 1) if args.quick else (SCENARIOS, 3)
    # Pooled connections of both contenders at once, in this process and in the mock.
    raise_open_files(2 * MAX_IN_FLIGHT + 256)
    started = time.perf_counter()
    rows = asyncio.run(measure(scenarios, rounds, args.profile))
    report(rows, rounds)
    print(f"(took {time.perf_counter() - started:.0f} s)")
    if not args.quick:
        store("scaling", {"machine": machine(), "latency_s": LATENCY, "rows": rows})


if __name__ == "__main__":
    main()
