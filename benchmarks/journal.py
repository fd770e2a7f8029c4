"""B8: B1 with `journal=` an SQLite file, against B1 without, side by side in one run.

B1 is 1000 `generate` calls at 50 ms server latency, 100 in flight, through
`generate_many`; the mock runs in its own process. Each round runs both in turn, the
journalled one on a fresh SQLite file (every request recorded before it is sent and
again when it ends). Reported: median wall times and their ratio (target <= 1.10 x), and
client CPU per call (`time.process_time()`, all threads of this process, the store's
own included; target <= +40 us). Then the resume rate: a journal of 100,000 recorded
results yielded again without a call, with the peak of traced memory during the resume
(flat: it does not grow with the journal; 10,000 for comparison). Writes "journal"
into benchmarks/results.json (not with `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import pathlib
import statistics
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import served, store, trained_model

from deepmode_async import AsyncClient, GenerateRequest, Generation, Image
from deepmode_async._convert import converter
from deepmode_async._journal import NAMESPACE, Entry
from deepmode_async._requests import generate_body
from deepmode_async.stores import SQLiteStore

IN_FLIGHT, LATENCY, WARM_UP = 100, 0.05, 100


def requests_of(model_id: str, tag: str, calls: int) -> list[GenerateRequest]:
    return [
        GenerateRequest(model_id=model_id, prompt=f"a lighthouse {tag}-{i}") for i in range(calls)
    ]


async def one_run(dm: AsyncClient, model_id: str, calls: int, tag: str, journal: Any) -> float:
    started = time.perf_counter()
    ok = 0
    async for result in dm.images.generate_many(
        requests_of(model_id, tag, calls), concurrency=IN_FLIGHT, journal=journal
    ):
        if result.ok:
            ok += bool(result.generation.images)
    seconds = time.perf_counter() - started
    if ok != calls:
        raise RuntimeError(f"{ok} of {calls} calls succeeded ({tag})")
    return seconds


async def measure(calls: int, rounds: int, folder: pathlib.Path) -> dict[str, Any]:
    times: dict[str, list[float]] = {"without": [], "with journal": []}
    cpu = dict.fromkeys(times, 0.0)
    async with served(LATENCY) as mock:
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {mock.api_key}"}
        ) as api:
            model_id = await trained_model(api, mock.base_url)
        async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
            await one_run(dm, model_id, WARM_UP, "warm", None)
            await one_run(dm, model_id, WARM_UP, "warm-j", folder / "warm.db")
            for round_ in range(rounds):
                for name in times:
                    journal = folder / f"r{round_}.db" if name == "with journal" else None
                    gc.collect()
                    started = time.process_time()
                    times[name].append(await one_run(dm, model_id, calls, f"r{round_}", journal))
                    cpu[name] += time.process_time() - started
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    cpu_us = {name: cpu[name] / (calls * rounds) * 1e6 for name in times}
    return {
        "calls": calls,
        "in_flight": IN_FLIGHT,
        "latency_s": LATENCY,
        "rounds": rounds,
        "median_s": {name: round(value, 4) for name, value in medians.items()},
        "runs_s": {name: [round(t, 4) for t in runs] for name, runs in times.items()},
        "wall_ratio": round(medians["with journal"] / medians["without"], 3),
        "cpu_us_per_call": {name: round(value, 1) for name, value in cpu_us.items()},
        "cpu_us_added": round(cpu_us["with journal"] - cpu_us["without"], 1),
    }


async def fill(path: pathlib.Path, count: int) -> list[GenerateRequest]:
    """A journal of `count` recorded results (as a finished batch leaves it)."""
    requests = requests_of("model-1", "resume", count)
    image = Image("img", "a.jpg", "model-1", "https://blob.example/a.jpg?sig=x", "p", None)
    generation = converter.unstructure(Generation((image,)))
    async with SQLiteStore(path) as journal:
        for start in range(0, count, 5000):
            await journal.put_many(
                NAMESPACE,
                [
                    (str(i), Entry(generate_body(requests[i]), time.time(), generation).encode())
                    for i in range(start, min(start + 5000, count))
                ],
            )
    return requests


async def resume(count: int, folder: pathlib.Path) -> dict[str, Any]:
    path = folder / f"resume-{count}.db"
    requests = await fill(path, count)
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    resumed = 0
    # Nothing is sent: an address where nothing listens proves it.
    async with AsyncClient("key", base_url="http://127.0.0.1:9") as dm:
        async for result in dm.images.generate_many(iter(requests), journal=path):
            resumed += result.resumed and result.ok
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if resumed != count:
        raise RuntimeError(f"{resumed} of {count} resumed")
    return {"count": count, "seconds": round(seconds, 3), "per_s": round(count / seconds),
            "peak_traced_mib": round(peak / 2**20, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="300 calls, 2 rounds, no results")
    args = parser.parse_args()
    calls, rounds, big = (300, 2, 10_000) if args.quick else (1000, 5, 100_000)
    with tempfile.TemporaryDirectory(prefix="deepmode-b8-") as folder:
        results = asyncio.run(measure(calls, rounds, pathlib.Path(folder)))
        # The requests list itself is the caller's; only the batch's own memory is traced.
        results["resume"] = [
            asyncio.run(resume(count, pathlib.Path(folder))) for count in (big // 10, big)
        ]
    without, journalled = results["median_s"]["without"], results["median_s"]["with journal"]
    print(
        f"B8: {calls} generate calls, {LATENCY * 1000:.0f} ms latency, {IN_FLIGHT} in flight; "
        f"median of {rounds} rounds"
    )
    print("| run | median | CPU per call |\n|---|---|---|")
    for name, median in results["median_s"].items():
        print(f"| {name} | {median:.3f} s | {results['cpu_us_per_call'][name]:.0f} us |")
    print(
        f"journal: {journalled / without:.3f} x the wall time (target <= 1.10), "
        f"+{results['cpu_us_added']:.0f} us CPU a call (target <= +40)"
    )
    for row in results["resume"]:
        print(
            f"resume of {row['count']} recorded results: {row['seconds']:.2f} s, "
            f"{row['per_s']}/s, traced memory peak {row['peak_traced_mib']} MiB"
        )
    if not args.quick:
        store("journal", results)


if __name__ == "__main__":
    main()
